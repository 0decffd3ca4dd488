"""Time and size of the atlas (``qkweights report``), and its page load times in headless Chromium.

Run from the repository root:

    python bench/bench_atlas.py              # all three inputs, then the browser
    python bench/bench_atlas.py --no-browser

Inputs, built once and cached in bench/out/ (git-ignored; the sweep is slow on a small machine):

- **demo**: the demo's outputs (profile, top images, O3, same-object on 48 scenes of the 4-layer demo ViT);
- **ViT-B**: the ViT-B/16-shaped random hf-vit checkpoint of bench_profile.py (12 layers × 12 heads, D 768):
  its profile, and top-images over 160 synthetic 500×375 photos, every head, modes 0–9, top 8 (--no-plots);
- **ViT-L profile**: the ViT-L/16-shaped random checkpoint (24 × 16 heads, D 1024), profile only.

Measured: seconds of ``qkweights.report`` (median of --reps, into a fresh folder each time, compare figures
included), the site's bytes on disk, the link and offline checks of tests/atlas/test_atlas.py, and in headless
Chromium (Selenium, system chromedriver) the
``loadEventEnd`` of the index, a model page and a head page (median of --reps). Targets (issue 17): demo ≤ 5 s;
ViT-B ≤ 30 s and ≤ 40 MB; ViT-L profile ≤ 10 s; index and model pages < 1 s, a head page < 0.5 s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_profile import make_vit  # noqa: E402
from bench_sweep import photos  # noqa: E402

OUT = ROOT / "bench" / "out"


def demo_run() -> Path:
    from qkweights.demo import run_demo

    out = OUT / "atlas-demo-run"
    if not (out / "summary.txt").is_file():
        run_demo(out)
    return out


def vit_b_run(n_images: int = 160) -> Path:
    import qkweights
    from qkweights.analyses.sweep import ModeSelection
    from qkweights.analyses.top_images import run_top_images
    from qkweights.vision.model import open_vision_model

    out = OUT / f"atlas-vit-b-run-n{n_images}"
    vit = make_vit(OUT / "vit-b-random", 768, 12, 12)
    if not (out / "profile" / "profile.json").is_file():
        qkweights.save_profile(qkweights.profile(str(vit)), out / "profile", plots=True)
    if not (out / "top_images" / "top_images.json").is_file():
        run_top_images(
            open_vision_model(str(vit)), photos(n_images), out / "top_images", ModeSelection(modes=range(10), top=8)
        )
    return out


def vit_l_profile() -> Path:
    import qkweights

    out = OUT / "atlas-vit-l-profile"
    if not (out / "profile.json").is_file():
        qkweights.save_profile(qkweights.profile(str(make_vit(OUT / "vit-l-random", 1024, 24, 16))), out, plots=True)
    return out


def time_report(src: Path, reps: int) -> tuple[float, int, Path]:
    import qkweights

    times, site = [], OUT / f"site-{src.name}"
    for _ in range(reps):
        shutil.rmtree(site, ignore_errors=True)
        t0 = time.perf_counter()
        files = qkweights.report([src], site, max_mb=1000)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(f.stat().st_size for f in files), site


REF = re.compile(r"""(?:href|src|data-src)="([^"]*)"|url\(([^)]*)\)""")


def check_site(site: Path) -> int:
    """The checks of tests/atlas/test_atlas.py on a site: every reference resolves to a file inside it, and no page,
    script or style names http:, https:, fetch( or type="module". Returns the number of references checked."""
    n, root = 0, site.resolve()
    for f in site.rglob("*"):
        if f.suffix not in (".html", ".js", ".css"):
            continue
        text = f.read_text(encoding="utf-8")
        bad = [b for b in ("http:", "https:", "fetch(", 'type="module"') if b in text]
        if bad:
            raise SystemExit(f"{f}: contains {bad}")
        for groups in REF.findall(text) if f.suffix == ".html" else []:
            ref = next((g for g in groups if g), "").split("#")[0]
            if ref and not ((f.parent / ref).resolve().is_file() and root in (f.parent / ref).resolve().parents):
                raise SystemExit(f"{f}: {ref} does not resolve inside the site")
            n += 1
    return n


def browser_loads(site: Path, reps: int) -> dict[str, float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    model = next(p for p in site.iterdir() if (p / "L00_H00.html").is_file())
    out = {}
    try:
        for name, page in (
            ("index", site / "index.html"),
            ("model", model / "index.html"),
            ("head", model / "L05_H03.html"),
        ):
            if not page.is_file():
                page = model / "L01_H02.html"
            ms = []
            for _ in range(reps):
                d.get(page.resolve().as_uri())
                ms.append(d.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd"))
            out[name] = statistics.median(ms) / 1000
    finally:
        d.quit()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for label, src, limit_s, limit_mb in (
        ("demo", demo_run(), 5, None),
        ("ViT-B top 8, 160 images", vit_b_run(), 30, 40),
        ("ViT-L profile", vit_l_profile(), 10, None),
    ):
        seconds, size, site = time_report(src, args.reps)
        refs = check_site(site)
        loads = {} if args.no_browser else browser_loads(site, args.reps)
        mb = f" (limit {limit_mb} MB)" if limit_mb else ""
        load = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in loads.items())
        print(
            f"{label}: report {seconds:.2f} s (limit {limit_s} s), {size / 1e6:.1f} MB{mb}; {refs} references "
            f"resolve offline; loadEventEnd {load}"
        )


if __name__ == "__main__":
    main()
