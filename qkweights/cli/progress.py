"""Progress bars on stderr (tqdm, which huggingface_hub already brings), shown only on a terminal."""

from __future__ import annotations

import sys


class Progress:
    """``Progress(total, "profile")``; call ``update(n_done[, total])``; ``close()`` (or a ``with`` block) ends it.

    Silent when stderr is not a TTY or ``enabled`` is False, so logs and CI stay clean.
    The total may be given by the first ``update``; a bar that starts at n > 0 (a
    resumed run) counts its rate from there.
    """

    def __init__(self, total: int | None = None, label: str = "", *, unit: str = "it", enabled: bool | None = None, stream=None):
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
            self.bar = tqdm(total=total or self.total, initial=done, desc=self.label, unit=f" {self.unit}", file=self.stream,
                            dynamic_ncols=True, leave=True)
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
