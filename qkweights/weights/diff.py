"""How the query-key interaction of each head changed between two checkpoints of one architecture.

:func:`diff_profiles` compares two :class:`~qkweights.weights.profiles.Profile` objects
(A, e.g. pretrained, and B, e.g. fine-tuned) head by head (L layers, H heads,
K modes):

- ``delta_weighted`` = weighted cosine of B − that of A (paper's cos_avg, in [−2, 2]).
- ``spectrum_tv``: total-variation distance ½ Σ_n |p_n,A − p_n,B| between the
  normalised spectra p_n = σ_n/Σσ, in [0, 1]: 0 for spectra of the same shape,
  1 for spectra on disjoint modes. Blind to a uniform rescaling of σ, which
  ``sigma_ratio`` = Σσ_B/Σσ_A reports (the strength of the head's logits).
- principal angles between the top-k left singular subspaces span(u_0 … u_k−1)
  of A and B (``angles_u``, degrees, ascending; k = ``k`` capped at K), likewise
  the right ones (``angles_v``); ``overlap_u``/``overlap_v`` = mean over the k
  angles of cos²θ = ‖U_Aᵀ U_B‖_F²/k, in [0, 1] (1: same subspace). Each angle
  is atan2(sin θ, cos θ) with cos θ the singular values of U_AᵀU_B and sin θ
  those of U_B − U_A U_AᵀU_B, accurate at 0° and at 90°. They need the singular
  vectors (profiles computed with ``save_vectors`` / ``--save-vectors``);
  without them they are None and a note says so. A tie of σ across mode k−1/k
  makes a top-k subspace non-unique; the notes list such heads.
- ``score``: the mean of the measures available, each scaled to [0, 1]:
  |Δ weighted cosine|/2, spectrum_tv, 1 − overlap_u, 1 − overlap_v. The
  ranking sorts heads by score, largest first. Heads with non-finite weights
  or collapsed (σ_0 = 0, so σ/Σσ and the singular vectors are undefined) in
  either model have NaN measures and come first, above every measured change
  (a head that broke is the largest change of all), and are named in the notes;
  ``python -m qkweights check`` is the tool that flags them.

Beyond the paper (profile/2), each head also reports its symmetric_fraction, the λ-weighted
cosine of its value-output circuit and (LayerNorm-folded profiles) its key-salience norm in A
and B, and their changes ``delta_symmetric_fraction``, ``delta_ov_weighted_cosine``,
``salience_ratio`` (‖w_h‖_B/‖w_h‖_A). They are not part of the score (the ranking stays the
paper's query-key measures). A statistic one side lacks (a profile/1, no value-output circuit,
an unfolded profile) is null, and a note says so.

:meth:`DiffResult.save` writes ``diff.json`` (schema ``qkweights.diff/1``),
``diff_heads.csv`` (one row per head, ranked) and the figures
``diff_heatmaps.png`` (a layer × head map of each measure) and
``diff_cosine.png`` (both models' per-layer weighted cosine, paper Fig. 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from qkweights import figures
from qkweights.errors import InputError
from qkweights.figures.compare import curves_from
from qkweights.figures.curves import curves_figure
from qkweights.outputs import plural, record_outputs, save_figure, write_csv, write_json
from qkweights.version import __version__
from qkweights.weights.profiles import Profile
from qkweights.weights.qk import null_band

SCHEMA = "qkweights.diff/1"
ANNOTATE_MAX_CELLS = 256  # heatmap cells carry their value when a panel has at most this many
TOP_MARKED = 5  # the score panel labels the top-ranked heads #1 … #5 …
MARK_MIN_SCORE = 1e-6  # … whose score exceeds this (unchanged heads score ≈ 1e-16 from rounding)
MEASURES = {
    "delta_weighted_cosine": "weighted cosine of B minus that of A (σ-weighted mean of u_n·v_n), in [-2, 2]",
    "spectrum_tv": "total-variation distance 1/2 Σ_n |σ_n/Σσ (A) − σ_n/Σσ (B)|, in [0, 1]",
    "sigma_ratio": "Σσ of B / Σσ of A (nuclear norm of W_qᵀW_k; the overall strength of the logits)",
    "max_angle_u_deg": "largest principal angle between the top-k query (left) singular subspaces, degrees",
    "max_angle_v_deg": "largest principal angle between the top-k key (right) singular subspaces, degrees",
    "overlap_u": "mean cos² of the principal angles of the query subspaces, in [0, 1] (1 = same subspace)",
    "overlap_v": "mean cos² of the principal angles of the key subspaces, in [0, 1]",
    "delta_symmetric_fraction": "symmetric fraction ‖(M+Mᵀ)/2‖²/‖M‖² of B − that of A, in [−1, 1] (not in the score)",
    "delta_ov_weighted_cosine": (
        "λ-weighted cosine of the value-output circuit W_o,h W_v,h of B − that of A (not in the score)"
    ),
    "salience_ratio": "key-salience norm ‖w_h‖ of B / that of A, LayerNorm-folded profiles (not in the score)",
}
CIRCUIT_FIELDS = {
    "symmetric_fraction": lambda p: p.symmetric,
    "ov_weighted_cosine": lambda p: None if p.ov is None or not np.isfinite(p.ov.weighted).any() else p.ov.weighted,
    "salience_norm": lambda p: p.salience,
}
SCORE = (
    "mean of the available measures scaled to [0, 1]: |delta_weighted_cosine|/2, spectrum_tv, 1 − overlap_u, 1 − "
    "overlap_v"
)


@dataclass(frozen=True, eq=False)
class DiffResult:
    """Per-head changes from profile ``a`` to profile ``b``, each array (L, H); see the module docstring.

    ``angles_u``/``angles_v``: (L, H, k) principal angles in degrees, ascending,
    or None without singular vectors.
    """

    a: Profile
    b: Profile
    k: int
    spectrum_tv: np.ndarray
    sigma_ratio: np.ndarray
    angles_u: np.ndarray | None
    angles_v: np.ndarray | None
    notes: tuple[str, ...] = ()
    tool_version: str = __version__

    @property
    def delta_weighted(self) -> np.ndarray:
        return self.b.weighted - self.a.weighted

    @property
    def overlap_u(self) -> np.ndarray | None:
        return None if self.angles_u is None else (np.cos(np.radians(self.angles_u)) ** 2).mean(-1)

    @property
    def overlap_v(self) -> np.ndarray | None:
        return None if self.angles_v is None else (np.cos(np.radians(self.angles_v)) ** 2).mean(-1)

    @property
    def score(self) -> np.ndarray:
        """(L, H) the combined score in [0, 1] (see ``SCORE``)."""
        terms = [np.abs(self.delta_weighted) / 2, self.spectrum_tv]
        if self.angles_u is not None:
            terms += [1 - self.overlap_u, 1 - self.overlap_v]
        return np.mean(terms, axis=0)

    def ranking(self) -> list[tuple[int, int]]:
        """(layer, head) pairs: heads with undefined (NaN) scores first, then by score, largest first; ties in (layer,
        head) order."""
        s = self.score.ravel()
        order = np.lexsort((np.arange(s.size), -np.nan_to_num(s, nan=np.inf)))
        H = self.score.shape[1]
        return [(int(i // H), int(i % H)) for i in order]

    def head_rows(self) -> list[dict]:
        """One dict per head, in ranking order, with the keys of ``MEASURES`` plus rank, layer, head, A/B values,
        score."""
        ou, ov, score = self.overlap_u, self.overlap_v, self.score
        vectors = self.angles_u is not None
        rows = []
        for rank, (l, h) in enumerate(self.ranking(), 1):
            rows.append(
                {
                    "rank": rank,
                    "layer": l,
                    "head": h,
                    "weighted_cosine_a": float(self.a.weighted[l, h]),
                    "weighted_cosine_b": float(self.b.weighted[l, h]),
                    "delta_weighted_cosine": float(self.delta_weighted[l, h]),
                    "spectrum_tv": float(self.spectrum_tv[l, h]),
                    "sigma_ratio": float(self.sigma_ratio[l, h]),
                    "max_angle_u_deg": float(self.angles_u[l, h, -1]) if vectors else None,
                    "max_angle_v_deg": float(self.angles_v[l, h, -1]) if vectors else None,
                    "overlap_u": float(ou[l, h]) if vectors else None,
                    "overlap_v": float(ov[l, h]) if vectors else None,
                    "score": float(score[l, h]),
                    **self._circuit_row(l, h),
                }
            )
        return rows

    def _circuit_row(self, l: int, h: int) -> dict:
        """The statistics beyond the paper of head (l, h) in A and B and their change; None where a side lacks one."""
        row = {}
        for name, get in CIRCUIT_FIELDS.items():
            a, b = get(self.a), get(self.b)
            va = None if a is None else float(a[l, h])
            vb = None if b is None else float(b[l, h])
            row[f"{name}_a"], row[f"{name}_b"] = va, vb
            if name == "salience_norm":
                with np.errstate(divide="ignore", invalid="ignore"):
                    row["salience_ratio"] = None if va is None or vb is None else float(np.float64(vb) / va)
            else:
                row[f"delta_{name}"] = None if va is None or vb is None else vb - va
        return row

    def to_json(self) -> dict:
        """The ``diff.json`` document (schema ``qkweights.diff/1``); heads in ranking order."""
        heads = self.head_rows()
        if self.angles_u is not None:
            for row in heads:
                row["angles_u_deg"] = self.angles_u[row["layer"], row["head"]].tolist()
                row["angles_v_deg"] = self.angles_v[row["layer"], row["head"]].tolist()
        la, lb = self.a.layer_stats()["weighted_cosine"], self.b.layer_stats()["weighted_cosine"]  # (L,)
        ca, cb = self.a.circuit_layer_stats(), self.b.circuit_layer_stats()
        layers = [
            {
                "layer": l,
                "depth": float(self.a.depth[l]),
                "weighted_cosine_a": float(la[l]),
                "weighted_cosine_b": float(lb[l]),
                "delta_weighted_cosine": float(lb[l] - la[l]),
                **{
                    f"{k}_{side}": float(c[k][l])
                    for k in ("symmetric_fraction", "ov_weighted_cosine")
                    for side, c in (("a", ca), ("b", cb))
                    if k in c
                },
            }
            for l in range(len(la))
        ]
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "a": self.a.side(),
            "b": self.b.side(),
            "k": self.k,
            "measures": MEASURES,
            "score": SCORE,
            "notes": list(self.notes),
            "layers": layers,
            "heads": heads,
        }

    def save(self, out_dir: str | Path, *, plots: bool = True) -> list[Path]:
        """Write diff.json, diff_heads.csv and (with ``plots``) diff_heatmaps.png and diff_cosine.png; return their
        paths."""
        out = Path(out_dir)
        written = [write_json(out / "diff.json", self.to_json())]
        rows = self.head_rows()
        header = list(rows[0])
        written.append(write_csv(out / "diff_heads.csv", header, [[_cell(r[c]) for c in header] for r in rows]))
        if plots:
            written.append(save_figure(heatmaps_figure(self), out / "diff_heatmaps.png", dpi=figures.DPI))
            written.append(cosine_figure(self.a, self.b, out / "diff_cosine.png"))
        record_outputs(out, "diff", written)  # figures of an earlier run, after --no-plots, go
        return written


def principal_angles(qa: np.ndarray, qb: np.ndarray) -> np.ndarray:
    """Principal angles between span(qa) and span(qb), radians, ascending.

    qa, qb: (..., D, k) with orthonormal columns. Returns (..., k). cos θ from
    the singular values of qaᵀqb, sin θ from those of qb − qa qaᵀqb; the angle
    is atan2(sin, cos), accurate over [0, π/2].
    """
    m = np.swapaxes(qa, -1, -2) @ qb  # (..., k, k)
    cos = np.linalg.svd(m, compute_uv=False)  # (..., k) descending
    sin = np.linalg.svd(qb - qa @ m, compute_uv=False)[..., ::-1]  # (..., k) ascending: pairs with cos descending
    return np.arctan2(np.clip(sin, 0, 1), np.clip(cos, 0, 1))


def spectrum_tv(sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Total-variation distance ½ Σ_n |σ_n,a/Σσ_a − σ_n,b/Σσ_b| of singular-value spectra (..., K) → (...)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        pa = sa / sa.sum(-1, keepdims=True)
        pb = sb / sb.sum(-1, keepdims=True)
    return 0.5 * np.abs(pa - pb).sum(-1)


def diff_profiles(a: Profile, b: Profile, *, k: int = 8) -> DiffResult:
    """Head-by-head change from profile ``a`` to profile ``b`` (same L, H, D, K; see the module docstring).

    ``k``: size of the top singular subspaces compared (capped at K and at the
    vectors stored). Raises InputError when the shapes differ or k < 1.
    """
    ma, mb = a.model, b.model
    if ma.shape != mb.shape:
        raise InputError(
            f"diff: A ({a.name}: {ma.shape_text()}) and B ({b.name}: {mb.shape_text()}) differ in shape; "
            f"diff compares two checkpoints of the same architecture"
        )
    if k < 1:
        raise InputError(f"k={k}: compare subspaces of at least 1 mode")
    notes = []
    if ma.family != mb.family:
        notes.append(
            f"families differ (A: {ma.family}, B: {mb.family}); the shapes match, so heads are compared by index"
        )
    bad = sorted(set(a.nonfinite) | set(b.nonfinite))
    if bad:
        notes.append("non-finite weights, measures undefined: " + ", ".join(f"L{l} H{h}" for l, h in bad))
    collapsed = [
        (l, h, side) for side, p in (("A", a), ("B", b)) for l, h in zip(*np.nonzero(p.singular_values[..., 0] == 0))
    ]
    if collapsed:
        notes.append(
            "collapsed heads (σ_0 = 0), measures undefined: "
            + ", ".join(f"L{l} H{h} ({side})" for l, h, side in collapsed)
        )
    if (ma.folded or None) != (mb.folded or None):
        notes.append(
            f"folding differs (A: {ma.folded or 'plain'}, B: {mb.folded or 'plain'}): the query-key measures "
            "compare different matrices"
        )
    elif ma.ov_folded != mb.ov_folded:
        notes.append(
            f"the value-output circuit is LayerNorm-folded in {'A' if ma.ov_folded else 'B'} only (the other profile "
            "was written before it was folded): delta_ov_weighted_cosine compares different matrices"
        )
    for name, get in CIRCUIT_FIELDS.items():
        missing = [side for side, p in (("A", a), ("B", b)) if get(p) is None]
        if len(missing) == 1:
            notes.append(
                f"{name} absent from {missing[0]} (profile/1, no value-output circuit, or not "
                "LayerNorm-folded): its change is null"
            )
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = b.singular_values.sum(-1) / a.singular_values.sum(-1)
    angles_u = angles_v = None
    if a.U is None or b.U is None:
        k = min(k, ma.head_dim)
        missing = " and ".join(side for side, p in (("A", a), ("B", b)) if p.U is None)
        notes.append(
            f"no singular vectors for {missing} (profile without modes.npz): subspace angles omitted; "
            f"profile with save_vectors=True or pass the checkpoints"
        )
    else:
        kk = min(k, ma.head_dim, a.U.shape[-1], b.U.shape[-1])
        if kk < k:
            notes.append(
                f"k reduced from {k} to {kk} (head dim K = {ma.head_dim}, vectors stored: "
                f"{min(a.U.shape[-1], b.U.shape[-1])})"
            )
        k = kk
        ok = np.ones((ma.layers, ma.heads), bool)  # (L, H) heads finite (SVD of NaN fails) and not collapsed in both
        for l, h, *_ in bad + collapsed:
            ok[l, h] = False
        angles_u = np.full((ma.layers, ma.heads, k), np.nan)
        angles_v = np.full((ma.layers, ma.heads, k), np.nan)
        angles_u[ok] = np.degrees(principal_angles(a.U[ok][..., :k], b.U[ok][..., :k]))  # (M, k)
        angles_v[ok] = np.degrees(principal_angles(a.V[ok][..., :k], b.V[ok][..., :k]))
        if k < ma.head_dim:
            tied = [
                f"L{l} H{h} ({side})"
                for side, p in (("A", a), ("B", b))
                for l in range(ma.layers)
                for h in range(ma.heads)
                if any(blk["start"] < k < blk["stop"] for blk in p.degenerate[l][h])
            ]
            if tied:
                notes.append(f"σ tied across modes {k - 1}/{k}, top-{k} subspace not unique: " + ", ".join(tied))
    return DiffResult(
        a, b, k, spectrum_tv(a.singular_values, b.singular_values), ratio, angles_u, angles_v, tuple(notes)
    )


def heatmaps_figure(d: DiffResult) -> Figure:
    """A layer × head map of each measure (layer 0 on top); non-finite cells grey.

    Colours: white/pale = unchanged (diverging maps centred on 0 for signed
    measures). The score panel frames the top-ranked heads and labels them #n.
    """
    L, H = d.spectrum_tv.shape
    panels = [
        ("Δ weighted cosine (B − A)", d.delta_weighted, "RdBu_r", _symmetric(d.delta_weighted), "{:+.2f}"),
        ("spectrum change: total variation of σ/Σσ", d.spectrum_tv, "YlOrRd", (0, _top(d.spectrum_tv)), "{:.3f}"),
        (
            "strength: log₂(Σσ_B / Σσ_A)",
            np.log2(d.sigma_ratio),
            "PuOr_r",
            _symmetric(np.log2(d.sigma_ratio)),
            "{:+.2f}",
        ),
    ]
    if d.angles_u is not None:
        panels += [
            (
                f"largest principal angle, query subspace (top {d.k} u), °",
                d.angles_u[..., -1],
                "YlOrRd",
                (0, 90),
                "{:.0f}",
            ),
            (
                f"largest principal angle, key subspace (top {d.k} v), °",
                d.angles_v[..., -1],
                "YlOrRd",
                (0, 90),
                "{:.0f}",
            ),
        ]
    for key, title in (
        ("symmetric_fraction", "Δ symmetric fraction (B − A)"),
        ("ov_weighted_cosine", "Δ OV weighted cosine (B − A)"),
    ):
        fa, fb = CIRCUIT_FIELDS[key](d.a), CIRCUIT_FIELDS[key](d.b)
        if fa is not None and fb is not None:
            panels.append((title, fb - fa, "RdBu_r", _symmetric(fb - fa), "{:+.2f}"))
    panels.append(("combined score (ranking; #n = rank)", d.score, "YlOrRd", (0, _top(d.score)), "{:.3f}"))
    cols = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // cols)
    cw, ch = max(3.2, 0.42 * H + 1.6), max(2.4, 0.34 * L + 1.0)
    fig = Figure(figsize=(cw * cols, ch * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    annotate = L * H <= ANNOTATE_MAX_CELLS
    top = [(rank, lh) for rank, lh in enumerate(d.ranking(), 1) if np.isfinite(d.score[lh])][
        :TOP_MARKED
    ]  # measured heads
    for i, (ax, (title, values, cmap_name, (lo, hi), fmt)) in enumerate(zip(axes, panels)):
        cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="0.85")
        im = ax.imshow(
            np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest"
        )
        fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(H), [f"H{h}" for h in range(H)], fontsize=7, rotation=90 if H > 12 else 0)
        ax.set_yticks(range(L), [f"L{l}" for l in range(L)], fontsize=7)
        if annotate:
            norm = im.norm
            for l in range(L):
                for h in range(H):
                    v = values[l, h]
                    rgba = cmap(norm(v)) if np.isfinite(v) else (0.85, 0.85, 0.85, 1)
                    dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
                    ax.text(
                        h,
                        l,
                        fmt.format(v) if np.isfinite(v) else "n/a",
                        ha="center",
                        va="center",
                        fontsize=6 if H > 8 else 7,
                        color="white" if dark else "black",
                    )
        if i == len(panels) - 1:
            for rank, (l, h) in top:
                if values[l, h] > MARK_MIN_SCORE:
                    ax.add_patch(_cell_box(h, l))
                    ax.text(
                        h - 0.42,
                        l - 0.42,
                        f"#{rank}",
                        ha="left",
                        va="top",
                        fontsize=6,
                        color="#08306b",
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
                    )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    names = f"A = {d.a.name}   B = {d.b.name}"
    fig.suptitle(
        f"How each head changed from A to B ({plural(L, 'layer')} × {plural(H, 'head')})\n{names}", fontsize=10
    )
    return fig


def cosine_figure(a: Profile, b: Profile, path: str | Path) -> Path:
    """Paper Fig. 3 for both models: per-layer weighted cosine with head-range bands, against l/(L−1)."""
    curves = [
        c
        for p, side in ((a, "A"), (b, "B"))
        for c in curves_from(p, label=f"{side}: {p.name}")
        if c.kind == "weighted_cosine"
    ]
    D = a.model.hidden
    return curves_figure(
        curves,
        path,
        title="Weighted query-key cosine by normalised depth, A vs B",
        ylabel="weighted cosine u·v (mean over heads)",
        null_band=float(null_band(D)),
        null_label=f"95% null band ±1.96/√D = ±{null_band(D):.3f} (D = {D})",
    )


def _cell_box(h: int, l: int) -> Rectangle:
    return Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="#08306b", lw=1.5)


def _symmetric(values: np.ndarray) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    r = float(np.abs(v).max()) if v.size else 0.0
    r = r if r > 0 else 1e-3
    return -r, r


def _top(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    t = float(v.max()) if v.size else 0.0
    return t if t > 0 else 1e-3


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return repr(x) if np.isfinite(x) else ""
    return str(x)
