"""Progress bars on stderr (tqdm, which huggingface_hub already brings), shown only on a terminal, and the
command line's reporter, which draws them and writes the library's notes."""

from __future__ import annotations

import sys

from qkweights.cli.words import flag_words
from qkweights.workflow import Reporter


class Progress:
    """``Progress(total, "profile")``; call ``update(n_done[, total])``; ``close()`` (or a ``with`` block) ends it.

    Silent when stderr is not a TTY or ``enabled`` is False, so logs and CI stay clean.
    The total may be given by the first ``update``; a bar that starts at n > 0 (a
    resumed run) counts its rate from there.
    """

    def __init__(
        self, total: int | None = None, label: str = "", *, unit: str = "it", enabled: bool | None = None, stream=None
    ):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.unit = total, label, unit
        self.bar = None

    def update(self, done: int, total: int | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: worker processes are forked from this one
            self.bar = tqdm(
                total=total or self.total,
                initial=done,
                desc=self.label,
                unit=f" {self.unit}",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        elif total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Terminal(Reporter):
    """The command line's :class:`~qkweights.workflow.Reporter`: a bar per task and ``qkweights: note:`` lines on
    stderr.

    Bars (ours and huggingface_hub's download bars) only on a terminal, and none when ``quiet``;
    notes are written either way. A task that starts
    again from the beginning (the second model of ``diff``) gets a new bar. ``name``: what stage lines start with.
    """

    def __init__(self, *, quiet: bool = False, stream=None, name: str = "qkweights"):
        out = stream or sys.stderr
        super().__init__(downloads=not quiet and out is not None and out.isatty())
        self.quiet, self.stream, self.name = quiet, stream, name
        self.bars: dict[str, Progress] = {}
        self.done: dict[str, int] = {}

    def progress(self, task: str, done: int, total: int | None, unit: str) -> None:
        if self.quiet:
            return
        bar = self.bars.get(task)
        if bar is not None and done <= self.done[task]:
            bar.close()
            bar = None
        if bar is None:
            bar = self.bars[task] = Progress(total, task, unit=unit, stream=self.stream)
        self.done[task] = done
        bar.update(done, total)

    def note(self, text: str) -> None:
        print(f"qkweights: note: {flag_words(text)}", file=self.stream or sys.stderr)

    def stage(self, text: str) -> None:
        if not self.quiet:
            print(f"{self.name}: {text}", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
