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


def test_unwritable_paths_are_input_errors_naming_the_path(tmp_path):
    from qkweights.errors import InputError
    from qkweights.outputs import check_file_target, prepare_dir

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(
        InputError, match=f"^{afile}: is a file, not a folder; remove it or choose another output folder$"
    ):
        prepare_dir(afile)
    with pytest.raises(InputError, match=f"^{afile / 'sub'}: {afile} is a file, not a folder"):
        write_json(afile / "sub" / "profile.json", {})
    with pytest.raises(InputError, match=f"^{tmp_path}: is a folder; give a file name$"):
        write_json(tmp_path, {})
    with pytest.raises(InputError, match=f"^{tmp_path}: is a folder; give a file name$"):
        check_file_target(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no temporary file left behind


def test_record_outputs_removes_only_the_previous_runs_leftovers(tmp_path):
    from qkweights.outputs import manifest_path, record_outputs

    first = [write_json(tmp_path / n, {}) for n in ("profile.json", "modes.npz", "a.png")]
    assert record_outputs(tmp_path, "profile", first) == []
    other = write_json(tmp_path / "diff.json", {})  # another command's file
    mine = write_json(tmp_path / "notes.txt", {})  # a file qkweights did not record
    again = [write_json(tmp_path / "profile.json", {})]
    assert record_outputs(tmp_path, "profile", again) == [tmp_path / "a.png", tmp_path / "modes.npz"]
    assert other.exists() and mine.exists() and again[0].exists()
    assert json.loads(manifest_path(tmp_path, "profile").read_text())["files"] == ["profile.json"]


def test_a_hand_edited_manifest_cannot_delete_outside_the_folder(tmp_path):
    from qkweights.outputs import manifest_path, record_outputs

    outside = write_json(tmp_path / "keep.json", {})
    out = tmp_path / "out"
    out.mkdir()
    write_json(manifest_path(out, "profile"), {"files": ["../keep.json", str(outside), "..", 3]})
    assert record_outputs(out, "profile", []) == [] and outside.exists()


def test_missing_glyphs_do_not_warn(tmp_path, recwarn):
    from matplotlib.figure import Figure

    from qkweights.outputs import save_figure

    fig = Figure()
    fig.suptitle("模型 Модель")
    save_figure(fig, tmp_path / "g.png")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
