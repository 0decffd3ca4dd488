"""Atomic outputs: an interrupted write leaves neither a partial file nor a temporary one."""

import json
import os

import pytest

from qkweights.outputs import atomic_path, write_json


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "profile.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"schema": "qkweights.profile/1", "lay')  # half written
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_interrupted_rewrite_keeps_the_old_file(tmp_path):
    target = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "b.json", {"nan": float("nan")})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert json.loads(path.read_text()) == {"nan": None}
