"""The offline demo: every analysis of qkweights on a small trained ViT shipped with the package.

The demo model (``qkweights/demo_model/``, model card in its README.md) is a 4-layer ViT
trained by ``tests/fixtures/train_demo_model.py`` to find the odd one out in the synthetic
scenes of :mod:`qkweights.datasets.synthetic_o3`. :func:`run_demo` runs, with no network:

1. ``profile/``: the query-key SVD profile of every head (:func:`qkweights.profile`);
2. ``maps/``: projection maps of the bundled ``demo.jpg`` on the top :data:`MAP_MODES`
   modes (by contribution to the attention logits) of two heads: the one with the lowest
   and the one with the highest σ-weighted cosine;
3. ``scenes/``: :data:`N_SCENES` synthetic O3 scenes at the model's input size, from
   :func:`qkweights.datasets.synthetic_o3.make_o3` with seed :data:`SCENE_SEED` (the same bytes on every
   run, so in effect a bundled folder);
4. ``top_images/``: the scenes that drive the first :data:`TOP_MODES` modes of those two
   heads' layers and heads most;
5. ``o3/``: attention allocation (target / distractor / background) on the scenes;
6. ``same_object/``: do a mode's query and key directions pick the same object (paper Fig. 6),
   on ``same_object_scenes/``: the same generator and seed with objects :data:`SAME_OBJECT_SCALE`
   times larger (the O3 scenes' objects are smaller than one 8×8 patch, and the protocol drops
   such objects), written with their instance maps (``instances/``, 1 = target, 2… = distractors);
7. ``atlas/``: the atlas of these results (:func:`qkweights.report`), ``atlas/index.html``;
8. ``summary.txt``: where to look.
"""

from __future__ import annotations

import csv
import importlib.resources
import json
from pathlib import Path
from typing import Callable

import numpy as np

from qkweights.errors import InputError, SourceError
from qkweights.outputs import write_text

N_SCENES = 48
SCENE_SEED = 7
MAP_MODES = 4
TOP_MODES = 4
TOP_IMAGES = 6
SAME_OBJECT_SCALE = 2.0
SUMMARY_NAME = "summary.txt"
ATLAS_NAME = "atlas"
DEMO_IMAGE = "demo.jpg"
DEMO_FILES = ("config.json", "preprocessor_config.json", "model.safetensors", DEMO_IMAGE)


def demo_model_folder() -> Path:
    """The folder of the shipped demo model (package data ``qkweights/demo_model``)."""
    folder = Path(str(importlib.resources.files("qkweights") / "demo_model"))
    missing = [name for name in DEMO_FILES if not (folder / name).is_file()]
    if missing:
        raise SourceError(
            f"{folder}: the demo model lacks {', '.join(missing)}; reinstall qkweights (its package data must "
            "include qkweights/demo_model/)"
        )
    return folder


def extreme_heads(weighted: np.ndarray) -> list[tuple[int, int]]:
    """[(layer, head) of the lowest, (layer, head) of the highest] σ-weighted cosine; weighted (L, H), NaN ignored."""
    lo = np.unravel_index(int(np.nanargmin(weighted)), weighted.shape)
    hi = np.unravel_index(int(np.nanargmax(weighted)), weighted.shape)
    return [(int(lo[0]), int(lo[1])), (int(hi[0]), int(hi[1]))]


def scene_folder(out: Path, size: tuple[int, int], *, name: str = "scenes", object_scale: float = 1.0) -> Path:
    """``out/NAME``: the synthetic O3 folder, drawn now or kept from an earlier run of the demo.

    object_scale ≠ 1: objects that much larger, with instance maps (``instances/``).
    """
    from qkweights.datasets.synthetic_o3 import make_o3

    folder = out / name
    props = folder / "image_properties.txt"
    instances = object_scale != 1.0
    if not folder.exists():
        return make_o3(folder, n=N_SCENES, seed=SCENE_SEED, size=size, instances=instances, object_scale=object_scale)
    names = []
    if props.is_file():
        with open(props, newline="", encoding="utf-8") as f:
            names = [row.get("image_name") for row in csv.DictReader(f)]
    if names != [f"synth_{i:04d}.jpg" for i in range(N_SCENES)] or (instances and not (folder / "instances").is_dir()):
        raise InputError(
            f"{folder} exists but is not the demo's {N_SCENES} synthetic scenes; remove it or choose another "
            "output folder"
        )
    return folder


def _card(folder: Path) -> dict:
    """The training record stored under ``qkweights_demo`` in the demo model's config.json."""
    return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("qkweights_demo", {})


def summary_text(
    out: Path,
    folder: Path,
    card: dict,
    heads: list[tuple[int, int]],
    weighted: np.ndarray,
    o3: dict,
    n_scenes: int,
    same: dict | None = None,
) -> str:
    """The lines of ``summary.txt``: what each output folder holds, with the numbers worth a first look."""
    held = card.get("held_out", {})
    last = o3["layers"][-1]
    first = o3["layers"][0]
    uni = o3["uniform"]
    (l0, h0), (l1, h1) = heads
    lines = [
        f"qkweights demo: the shipped demo model (model card: {folder / 'README.md'})",
        f"  a {o3['model']['layers']}-layer ViT trained to find the odd one out in synthetic scenes; held-out: "
        f"target cell {held.get('where_accuracy', float('nan')):.1%} (chance "
        f"{held.get('chance_where_uniform_cell', float('nan')):.1%}, "
        f"random object {held.get('chance_where_random_object', float('nan')):.1%})",
        "",
        f"{out / 'profile'}/",
        "  cosine_by_layer.png  σ-weighted cosine u_n·v_n per layer (paper Fig. 3); profile.json, heads.csv per head",
        f"{out / 'maps'}/",
        f"  maps_L{l0}_H{h0}_ln.png  lowest weighted cosine ({weighted[l0, h0]:+.3f}): query (red) and key "
        "(cyan) maps on demo.jpg",
        f"  maps_L{l1}_H{h1}_ln.png  highest weighted cosine ({weighted[l1, h1]:+.3f}), top {MAP_MODES} modes "
        "by contribution to the logits",
        f"{out / 'top_images'}/",
        f"  top_L*_H*.png  the {TOP_IMAGES} of {n_scenes} scenes that drive each mode most; anisotropy.png",
        f"{out / 'o3'}/",
        f"  o3_by_layer.png  where attention goes from the target and a distractor token ({o3['images_used']} scenes):",
        f"    layer {first['layer']}: same object {first['same']['mean']:.3f}, different object "
        f"{first['different']['mean']:.3f}, background {first['background']['mean']:.3f}",
        f"    layer {last['layer']}: same object {last['same']['mean']:.3f}, different object "
        f"{last['different']['mean']:.3f}, background {last['background']['mean']:.3f}",
        f"    uniform attention would give same = different = {uni['same']:.3f}, background {uni['background']:.3f}",
        f"{out / 'scenes'}/  the {n_scenes} synthetic scenes (seed {SCENE_SEED}) used by top_images and o3",
    ]
    if same is not None:
        first_s, last_s = same["layers"][0], same["layers"][-1]
        lines[-1:-1] = [
            f"{out / 'same_object'}/",
            f"  same_object_by_layer.png  P(query and key directions pick the same object) in the top "
            f"{same['options']['top']} scenes per mode ({same['dataset']['n_eligible']} eligible scenes):",
            f"    layer {first_s['layer']}: {first_s['probability']:.3f} (chance {first_s['chance']:.3f}); "
            f"layer {last_s['layer']}: {last_s['probability']:.3f} (chance {last_s['chance']:.3f})",
            "  same_object_examples.png  the selected scenes: query object outlined red, key object cyan",
        ]
        lines.append(
            f"{out / 'same_object_scenes'}/  {n_scenes} scenes of the same generator and seed with objects "
            f"{SAME_OBJECT_SCALE:g}× larger, and their instance maps, used by same_object"
        )
    lines.append(f"{out / ATLAS_NAME / 'index.html'}  the atlas: every head, its modes, top images and maps (open it)")
    return "\n".join(lines) + "\n"


def run_demo(out_dir: str | Path, *, progress: Callable[[str], object] | None = None) -> list[Path]:
    """Run the demo (module docstring) into ``out_dir``; return the files and folders written.

    progress: called with a one-line description at the start of each stage. The
    returned list ends with ``summary.txt``. Re-running into the same folder reuses its
    scenes and overwrites the other outputs.
    """
    from qkweights.analyses.maps import projection_maps
    from qkweights.analyses.runner import SweepSettings
    from qkweights.analyses.sweep import ModeSelection
    from qkweights.atlas import report
    from qkweights.vision.model import open_vision_model
    from qkweights.workflow import Reporter, o3, profile, same_object, save_maps, save_profile, top_images

    def stage(text: str) -> None:
        if progress is not None:
            progress(text)

    out = Path(out_dir)
    folder = demo_model_folder()
    stage(f"profile of the demo model ({folder})")
    prof = profile(str(folder), reporter=Reporter(downloads=False))
    written = save_profile(prof, out / "profile")
    heads = extreme_heads(prof.weighted)
    model = open_vision_model(str(folder))

    stage(f"projection maps on {DEMO_IMAGE}: layer/head {heads[0]} (lowest weighted cosine), {heads[1]} (highest)")
    for layer, head in heads:
        maps = projection_maps(model, folder / DEMO_IMAGE, layer=layer, head=head, top=MAP_MODES)
        written += save_maps(maps, out / "maps")

    stage(f"{N_SCENES} synthetic scenes (seed {SCENE_SEED})")
    scenes = scene_folder(out, model.dims.image_size)
    written.append(scenes)

    stage(f"top images over the {N_SCENES} scenes")
    layers, head_ids = sorted({l for l, _ in heads}), sorted({h for _, h in heads})
    top_dir = out / "top_images"
    selection = ModeSelection(layers, head_ids, range(TOP_MODES), TOP_IMAGES)
    written += top_images(model, scenes / "images", top_dir, selection, SweepSettings(batch_size=16)).files

    stage(f"O3 attention allocation on the {N_SCENES} scenes")
    result = o3(model, scenes, out / "o3", SweepSettings(batch_size=16))
    written += result.files

    stage(f"same object: {N_SCENES} scenes with objects {SAME_OBJECT_SCALE:g}× larger and their instance maps")
    big = scene_folder(out, model.dims.image_size, name="same_object_scenes", object_scale=SAME_OBJECT_SCALE)
    written.append(big)
    same = same_object(model, big, out / "same_object", settings=SweepSettings(batch_size=16))
    written += same.files

    stage("the atlas of these results")
    report([out], out / ATLAS_NAME)
    written.append(out / ATLAS_NAME)

    text = summary_text(out, folder, _card(folder), heads, prof.weighted, result.doc, N_SCENES, same.doc)
    written.append(write_text(out / SUMMARY_NAME, text))
    return written
