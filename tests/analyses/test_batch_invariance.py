"""An image's numbers depend on the image alone (issue 15): the image analyses over folders of duplicated images.

Each folder holds copies of a few source images under names that interleave them irregularly, so that the
copies of one image land at different positions of their batches. The arithmetic of an image is the same by
construction whatever its batch (qkweights.vision.forward runs every image alone at one BLAS thread, and the
analyses project each image with its own GEMM), so:

- the documents are byte-identical at every batch size and BLAS thread count (they do not record the batch size,
  and the resume fingerprint does not hash it);
- every copy of an image scores exactly as the others, so the documented tie-break decides: the earlier
  path (top-images, same-object), and o3's rows of copies are equal.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv
from PIL import Image
from threadpoolctl import threadpool_limits

from qkweights.analyses.o3 import run_o3
from qkweights.analyses.runner import SweepSettings
from qkweights.analyses.same_object import run_same_object
from qkweights.analyses.sweep import ModeSelection
from qkweights.analyses.top_images import run_top_images
from qkweights.datasets.synthetic_o3 import make_o3

SOURCES = [0, 1, 0, 0, 2, 1, 0, 2, 1, 0, 2]  # copy k is a copy of source image SOURCES[k]
BATCHES = (1, 3, 5, 8)
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def o3_copies(tmp_path_factory):
    """An O3 folder of 11 scenes, copies of 3 synthetic ones (image and both masks copied together)."""
    scenes = make_o3(tmp_path_factory.mktemp("o3") / "scenes", n=3, seed=4, size=(48, 48))
    root = tmp_path_factory.mktemp("o3") / "copies"
    for sub in ("images", "targ_images", "dist_images"):
        (root / sub).mkdir(parents=True)
        for k, src in enumerate(SOURCES):
            shutil.copy(scenes / sub / f"synth_{src:04d}.jpg", root / sub / f"copy_{k:02d}.jpg")
    return root


@pytest.fixture(scope="module")
def ade_copies(tmp_path_factory):
    """An ADE20K-full-release folder of 11 images with their annotations, copies of 3 random scenes."""
    root = tmp_path_factory.mktemp("ade") / "ADE20K_2021_17_01"
    sub = root / "images" / "ADE" / "validation"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(3)
    scenes = []
    for _ in range(3):
        img = rng.integers(0, 256, (48, 56, 3)).astype(np.uint8)
        seg = np.zeros((48, 56, 3), np.uint8)
        for b in range(1, 5):  # four rectangles: instance b of class 10b
            y0, x0 = int(rng.integers(0, 24)), int(rng.integers(0, 28))
            seg[y0 : y0 + 24, x0 : x0 + 28] = (0, 10 * b, b)
            img[y0 : y0 + 24, x0 : x0 + 28] //= 2
        scenes.append((img, seg))
    for k, src in enumerate(SOURCES):
        img, seg = scenes[src]
        Image.fromarray(img).save(sub / f"ADE_{k:04d}.jpg", quality=95)
        Image.fromarray(seg).save(sub / f"ADE_{k:04d}_seg.png")
    return root


def source_of(path: str) -> int:
    """The source image of a copy, from its name (copy_07.jpg, …/ADE_0007.jpg)."""
    return SOURCES[int(Path(path).stem.split("_")[-1])]


def runs(analysis, out: Path) -> list[Path]:
    """``analysis(out_dir, batch_size)`` at every batch size, at 1 and 2 BLAS threads; the output folders."""
    folders = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            for b in BATCHES:
                folders.append(out / f"t{threads}_b{b}")
                analysis(folders[-1], b)
    return folders


def assert_ties_go_to_the_earlier_path(entries: list[dict], paths: list[str], key: str) -> None:
    """entries: one ranked list (best first) of dicts with ``key`` (the path) and their numbers. Copies of an
    image must have identical numbers, and those listed must be the earliest of their copies, in order."""
    by_source = {}
    for e in entries:
        by_source.setdefault(source_of(e[key]), []).append(e)
    for src, copies in by_source.items():
        numbers = [{k: v for k, v in e.items() if k not in (key, "rank")} for e in copies]
        assert all(n == numbers[0] for n in numbers), f"copies of source {src} score differently: {numbers}"
        earliest = [p for p in paths if source_of(p) == src][: len(copies)]
        assert [e[key] for e in copies] == earliest


def test_top_images_over_copies(vit, o3_copies, tmp_path):
    def analysis(out, b):
        run_top_images(
            vit,
            o3_copies,
            out,
            selection=ModeSelection(layers=[0, 1], heads=[0, 2], modes=range(3), top=5),
            settings=SweepSettings(batch_size=b),
        )

    folders = runs(analysis, tmp_path)
    for f in folders[1:]:
        assert (f / "top_images.json").read_bytes() == (folders[0] / "top_images.json").read_bytes(), f.name
        with np.load(f / "top_images_maps.npz") as got, np.load(folders[0] / "top_images_maps.npz") as want:
            np.testing.assert_array_equal(got["maps"], want["maps"])
    paths = sorted(f"{sub}/copy_{k:02d}.jpg" for sub in ("dist_images", "images", "targ_images") for k in range(11))
    n_lists = 0
    for head in json.loads((folders[0] / "top_images.json").read_text())["heads"]:
        for mode in head["modes"]:
            for entries in mode["signs"].values():
                for sub in ("dist_images", "images", "targ_images"):  # copies are copies within one folder
                    inside = [e for e in entries if e["path"].startswith(sub)]
                    assert_ties_go_to_the_earlier_path(inside, [p for p in paths if p.startswith(sub)], "path")
                n_lists += 1
    assert n_lists == 2 * 2 * 3 * 2


def test_o3_over_copies(vit, o3_copies, tmp_path):
    def analysis(out, b):
        run_o3(vit, o3_copies, out, settings=SweepSettings(batch_size=b))

    folders = runs(analysis, tmp_path)
    for f in folders[1:]:
        for name in ("o3.csv", "o3_summary.json"):
            assert (f / name).read_bytes() == (folders[0] / name).read_bytes(), f"{f.name}/{name}"
    rows = read_csv(folders[0] / "o3.csv")
    by_source = {}
    for r in rows:
        numbers = {k: v for k, v in r.items() if k != "image"}
        by_source.setdefault((source_of(r["image"]), r["layer"], r["head"]), []).append(numbers)
    assert len(by_source) == 3 * 2 * 4  # 3 sources, 2 layers, 4 heads
    for key, copies in by_source.items():
        assert len(copies) == SOURCES.count(key[0])
        assert all(c == copies[0] for c in copies), key  # bit-identical ratios for every copy


def test_same_object_over_copies(vit, ade_copies, tmp_path):
    def analysis(out, b):
        run_same_object(
            vit,
            ade_copies,
            out,
            selection=ModeSelection(layers=[0, 1], modes=[0, 1, 2], top=5),
            settings=SweepSettings(batch_size=b),
        )

    folders = runs(analysis, tmp_path)
    for f in folders[1:]:
        for name in ("same_object.csv", "same_object.json"):
            assert (f / name).read_bytes() == (folders[0] / name).read_bytes(), f"{f.name}/{name}"
    rows = read_csv(folders[0] / "same_object.csv")
    paths = [f"images/ADE/validation/ADE_{k:04d}.jpg" for k in range(11)]
    lists = {}
    for r in rows:
        lists.setdefault((r["layer"], r["head"], r["mode"]), []).append(r)
    assert len(lists) == 2 * 4 * 3
    for entries in lists.values():
        assert [int(e["rank"]) for e in entries] == list(range(5))
        assert_ties_go_to_the_earlier_path(entries, paths, "image")


def test_the_executors_give_the_same_documents_over_copies(vit, o3_copies, ade_copies, tmp_path):
    """Issue 15's check: in process, on 2 local worker processes and on a loopback Dask cluster (each at another
    batch size, so that copies land at other positions of other batches), the documents of top-images, o3 and
    same-object over the folders of copies are identical, and every copy scores exactly alike."""
    distributed = pytest.importorskip("distributed")
    selection = ModeSelection(layers=[0, 1], heads=[0, 2], modes=range(3), top=5)

    def sweeps(out: Path, settings: SweepSettings) -> dict:
        run_top_images(vit, o3_copies, out / "top", selection=selection, settings=settings)
        run_o3(vit, o3_copies, out / "o3", settings=settings)
        run_same_object(vit, ade_copies, out / "same", selection=selection, settings=settings)
        files = ("top/top_images.json", "o3/o3_summary.json", "o3/o3.csv", "same/same_object.json")
        docs = {name: (out / name).read_bytes() for name in (*files, "same/same_object.csv")}
        with np.load(out / "top" / "top_images_maps.npz") as maps:
            docs["maps"] = maps["maps"].tobytes()
        return docs

    here = sweeps(tmp_path / "here", SweepSettings(batch_size=8))
    assert sweeps(tmp_path / "workers", SweepSettings(batch_size=3, workers=2)) == here
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert sweeps(tmp_path / "dask", SweepSettings(batch_size=5, client=client)) == here
    for head in json.loads(here["top/top_images.json"])["heads"]:
        for mode in head["modes"]:
            for entries in mode["signs"].values():
                for sub in ("dist_images", "images", "targ_images"):
                    inside = [e for e in entries if e["path"].startswith(sub)]
                    paths = [f"{sub}/copy_{k:02d}.jpg" for k in range(len(SOURCES))]
                    assert_ties_go_to_the_earlier_path(inside, paths, "path")
