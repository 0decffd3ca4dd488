"""Exit codes when stdout is a pipe whose reader has gone (``qkweights check … | true``).

Each command runs as a real process whose stdout is a pipe with its read end closed before the
command writes, so every write to stdout fails with EPIPE (Python ignores SIGPIPE). The exit
code must be the result's (1 for a failed check or non-finite weights), or 141 as a process
killed by SIGPIPE reports: never 0 for a failure, and no traceback. Which of the two depends on
when the failed write happens: with stdout buffered (Python's default for a pipe) the few hundred
bytes of a summary are written after the command returned its code; unbuffered
(PYTHONUNBUFFERED=1), or with more than the 8 kB buffer, while the command is still writing.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import MODELS, edited_fixture, vit_qk_name


def run_into_closed_pipe(unbuffered: bool, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``python -m qkweights ARGV`` whose stdout's reader has already gone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": "1"} if unbuffered else {}
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `… | true` once `true` has exited
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "qkweights", *map(str, argv)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=env,
        )
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


UNBUFFERED = pytest.mark.parametrize("unbuffered", [False, True], ids=["buffered", "unbuffered"])


@UNBUFFERED
def test_a_passing_check_exits_0_or_141(baseline, unbuffered):
    code, err = run_into_closed_pipe(unbuffered, "check", MODELS / "vit", "--baseline", baseline)
    assert (code, err) == (141 if unbuffered else 0, "")


@UNBUFFERED
def test_a_failed_check_never_exits_0_through_a_closed_pipe(tmp_path, baseline, unbuffered):
    def double_key(t):
        t[vit_qk_name(0, "key")][:] *= 2  # every layer-0 σ doubles: the σ check fails

    model = edited_fixture(tmp_path, "scaled", double_key)
    code, err = run_into_closed_pipe(unbuffered, "check", model, "--baseline", baseline)
    assert (code, err) == (141 if unbuffered else 1, "")


@UNBUFFERED
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_non_finite_weights_never_exit_0_through_a_closed_pipe(tmp_path, json_flag, unbuffered):
    def nan(t):
        t[vit_qk_name(0, "key")][0, 0] = np.nan

    model = edited_fixture(tmp_path, "nan", nan)
    code, err = run_into_closed_pipe(unbuffered, "profile", model, "--out", tmp_path / "out", "--no-plots", *json_flag)
    # The table (a few hundred bytes) is still buffered when the command returns 1: the result's code. profile.json
    # (12 kB, over the 8 kB buffer) fails while written, before the result is known: 141, as SIGPIPE.
    assert code == (141 if json_flag or unbuffered else 1)
    assert "Traceback" not in err and "Exception ignored" not in err
