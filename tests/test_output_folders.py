"""Output folders of the image analyses: never inside an input folder, and held by one run at a time.

The lock is a real ``flock`` on ``.qkweights.lock`` in the output folder; the other run is a real
process (a holder started with ``subprocess``), killed for real with SIGKILL where the test says so.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MODELS, quadrant_scenes
from PIL import Image

from qkweights.cli import main
from qkweights.errors import InputError
from qkweights.outputs import LOCK_NAME, claim_dir, manifest_path, record_outputs, write_json

COMMANDS = ["top-images", "o3", "same-object"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 2-scene O3 folder with instance maps (:func:`conftest.quadrant_scenes`): input of all three analyses
    (top-images reads its images/)."""
    return quadrant_scenes(tmp_path_factory.mktemp("data") / "o3")


def source(command, data):
    return data / "images" if command == "top-images" else data


def listing(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def run_cli(capsys, command, data, out, *more):
    code = main([command, str(MODELS / "vit"), str(source(command, data)), "--out", str(out), "--quiet", *more])
    return code, capsys.readouterr().err


# ---- item 4 and 16: an --out inside (or equal to) an input folder is refused, nothing is written into the data


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["inside", "equal", "deep inside"])
def test_an_out_inside_the_input_folder_is_refused(data, capsys, command, where):
    root = source(command, data)
    out = {"inside": root / "out", "equal": root, "deep inside": root / "a" / "b"}[where]
    before = listing(data)
    code, err = run_cli(capsys, command, data, out)
    what = "is the input folder" if where == "equal" else f"lies inside the input folder {root}"
    assert code == 2 and err == (
        f"qkweights: error: {out}: {what}, whose files a run reads; choose an output folder outside it\n"
    )
    assert listing(data) == before  # nothing created, nothing dropped


def test_an_out_reached_through_a_symlink_is_refused_too(data, tmp_path, capsys):
    (tmp_path / "link").symlink_to(data / "images")
    code, err = run_cli(capsys, "top-images", data, tmp_path / "link" / "out")
    assert code == 2 and f"lies inside the input folder {data / 'images'}" in err


def test_an_input_inside_the_output_folder_is_fine(tmp_path):
    # --out . with the images in ./images: the outputs go beside the input folder, not into it
    images = tmp_path / "images"
    images.mkdir()
    with claim_dir(tmp_path, inputs=[images]) as out:
        assert out == tmp_path


# ---- item 5: one run per output folder


HOLDER = textwrap.dedent(
    """
    import sys
    from qkweights.outputs import claim_dir
    with claim_dir(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()  # hold until the test closes stdin (or kills this process)
    """
)


def start_holder(out):
    """A real process holding ``out``; returns it once it holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def refusal(out, pid):
    return (
        f"{out}: another qkweights run (PID {pid}) is writing into this folder; wait for it to finish, or choose "
        "another output folder"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(data, tmp_path, capsys, command):
    out = tmp_path / "out"
    holder = start_holder(out)
    try:
        code, err = run_cli(capsys, command, data, out)
        assert (code, err) == (2, f"qkweights: error: {refusal(out, holder.pid)}\n")
    finally:
        holder.communicate("")  # let it go
    assert holder.returncode == 0 and listing(out) == []  # the holder's lock file went with it
    code, err = run_cli(capsys, command, data, out, "--no-plots")  # free again: the run goes through
    assert (code, err) == (0, "")
    manifest = json.loads(manifest_path(out, command).read_text())
    assert LOCK_NAME not in manifest["files"] and not (out / LOCK_NAME).exists()


def test_a_held_folder_is_refused_in_the_same_process(tmp_path):
    with claim_dir(tmp_path / "out"):
        with pytest.raises(InputError) as e:
            with claim_dir(tmp_path / "out"):
                pass
        assert str(e.value) == refusal(tmp_path / "out", os.getpid())
    with claim_dir(tmp_path / "out"):  # released at the end of the block
        pass


def test_a_killed_holder_releases_the_folder(data, tmp_path, capsys):
    out = tmp_path / "out"
    holder = start_holder(out)
    with pytest.raises(InputError, match=rf"\(PID {holder.pid}\)"):
        with claim_dir(out):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (out / LOCK_NAME).read_text() == f"{holder.pid}\n"  # a dead holder's file stays, its lock does not
    with claim_dir(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    # a real run over the stale lock file: the lock file is never recorded, and goes at the end
    code, err = run_cli(capsys, "o3", data, out, "--no-plots")
    assert (code, err) == (0, "")
    assert LOCK_NAME not in json.loads(manifest_path(out, "o3").read_text())["files"]
    assert not (out / LOCK_NAME).exists()


# ---- the output manifest: a recorded name that is now not a plain file is left alone


def test_a_recorded_name_that_became_a_symlink_or_a_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    first = [write_json(out / name, {}) for name in ("link.png", "folder.png", "plain.png")]
    assert record_outputs(out, "profile", first) == []
    target = write_json(tmp_path / "target.json", {"keep": True})
    (out / "link.png").unlink()
    (out / "link.png").symlink_to(target)  # now a symlink to a file
    (out / "folder.png").unlink()
    (out / "folder.png").mkdir()  # now a folder, with a file in it
    write_json(out / "folder.png" / "inside.json", {})
    assert record_outputs(out, "profile", []) == [out / "plain.png"]
    assert (out / "link.png").is_symlink() and json.loads(target.read_text()) == {"keep": True}
    assert (out / "folder.png" / "inside.json").is_file()


@pytest.mark.slow
def test_two_real_sweeps_into_one_folder(data, tmp_path):
    """Two `python -m qkweights top-images` processes into one --out: the second is refused while the first runs."""
    images = tmp_path / "many"
    images.mkdir()
    picture = Image.open(data / "images" / "synth_0000.jpg")
    for i in range(200):  # about 200 one-image shards: the first run holds the folder for a while
        picture.save(images / f"{i:03d}.jpg")
    out = tmp_path / "out"

    def sweep(**kw):
        argv = ["top-images", MODELS / "vit", images, "--out", out, "--shard-size", "1", "--no-plots", "--quiet"]
        cmd = [sys.executable, "-m", "qkweights", *map(str, argv)]
        return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **kw)

    first = sweep()
    lock = out / LOCK_NAME
    while not (lock.exists() and lock.read_text() == f"{first.pid}\n"):  # it holds the folder
        assert first.poll() is None, first.stderr.read()
        time.sleep(0.001)
    first.send_signal(signal.SIGSTOP)  # keep it holding while the second one tries
    try:
        second = sweep()
        assert second.wait(120) == 2
        assert second.stderr.read() == f"qkweights: error: {refusal(out, first.pid)}\n"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(120) == 0 and first.stderr.read() == ""
    doc = json.loads((out / "top_images.json").read_text())
    assert doc["n_images"] == 200 and not lock.exists()


# ---- skip reasons name the image once: the record holds its path, the reason says why


@pytest.mark.parametrize("command", COMMANDS)
def test_a_skip_reason_does_not_repeat_the_image_path(tmp_path, capsys, command):
    import shutil

    data = quadrant_scenes(tmp_path / "o3", n=3)
    broken = data / "images" / "synth_0001.jpg"
    broken.write_bytes(b"not a jpeg")
    code, err = run_cli(capsys, command, data, tmp_path / "out", "--no-plots")
    assert (code, err) == (0, "")
    name = {"top-images": "top_images.json", "o3": "o3_summary.json", "same-object": "same_object.json"}[command]
    [skip] = json.loads((tmp_path / "out" / name).read_text())["skipped"]
    reason = skip["reason"]
    # Pillow's own message names the file once, inside the parentheses: nothing before it repeats the path
    assert reason.startswith("cannot decode the image (UnidentifiedImageError: cannot identify image file ")
    assert reason.count(str(broken)) == 1
    shutil.rmtree(tmp_path / "out")


def test_a_lock_file_removed_while_claiming_is_not_trusted(tmp_path, monkeypatch):
    import fcntl

    out = tmp_path / "out"
    holder = claim_dir(out)
    holder.__enter__()
    flock = fcntl.flock

    def holder_ends_first(fd, operation):
        # the holder ends between this claim's open and its flock: the file this claim opened is removed
        monkeypatch.setattr(fcntl, "flock", flock)
        holder.__exit__(None, None, None)
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_ends_first)
    with claim_dir(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # it locked the file now at the path
        with pytest.raises(InputError, match=rf"\(PID {os.getpid()}\)"):
            with claim_dir(out):
                pass


def test_a_run_refused_before_writing_leaves_no_new_output_folder(data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["top-images", str(MODELS / "vit"), str(empty), "--out", str(tmp_path / "new" / "out")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert listing(tmp_path) == ["empty", "new"]  # the folder it made is gone (its parent, made by mkdir -p, stays)
    (tmp_path / "kept").mkdir()
    assert main(["top-images", str(MODELS / "vit"), str(empty), "--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()  # a folder that was there before stays
