"""Gate a checkpoint against a saved profile: did the query-key interaction of its heads drift?

:func:`check_profile` compares a freshly computed :class:`~qkweights.weights.profile.Profile`
with a baseline (a saved ``profile.json``) and returns a :class:`CheckReport`
holding one :class:`Check` per measurement. The checks, in report order:

- ``architecture`` (once): family, layers, heads, width D and head dim K equal
  to the baseline's. On a mismatch the numeric comparisons are skipped (there is
  nothing to compare head by head); the finite and collapse checks still run.
- per layer, ``layer weighted cosine``: |Δ| of the mean over heads of the
  σ-weighted cosine (paper Fig. 3), absolute, ≤ ``tol_layer``. The mean runs
  over the heads that are finite and not collapsed in the current model and
  have a defined weighted cosine in the baseline.
- per head, ``finite weights``: W_q and W_k of the head hold no NaN/inf.
- per head, ``not collapsed``: σ_0 > 0, the largest singular value of
  W_qᵀW_k. σ_0 = 0 covers an all-zero W_q, an all-zero W_k, and W_qᵀW_k = 0
  with both non-zero; :func:`collapse_causes` says which from the weights.
- per head, ``head weighted cosine``: |Δ| of the head's σ-weighted cosine ≤ ``tol_head``.
- per head, ``head top singular values``: the largest relative change
  ``|σ_n − σ_n,base| / σ_n,base`` over the top modes n = 0 … N−1
  (N = ``top_sigma``, at most K), mode by mode in descending order,
  ≤ ``tol_sigma``. "Top" means the N largest singular values of W_qᵀW_k
  (unscaled; the logits carry a further 1/√K). Baseline σ_n below
  ``SIGMA_FLOOR``·σ_0 (numerically zero: a rank-deficient head) are measured
  relative to σ_0 instead, so rounding noise on a zero mode cannot fail the check.

- per head, only when their tolerance is given: ``head symmetric fraction``: |Δ| of the
  head's symmetric_fraction ≤ ``tol_symmetry``; ``head OV weighted cosine``: |Δ| of the
  λ-weighted cosine of its value-output circuit ≤ ``tol_ov``. A baseline that lacks the
  statistic (profile/1, or no value-output circuit), in every head or in some, skips the check
  there: absent, never invented, and said in :attr:`CheckReport.skipped` (the command line
  prints it, JUnit lists it as a skipped test case).
- ``folding`` (only when they differ): current and baseline are both LayerNorm-folded
  (``profile --fold-ln``) or both plain; on a mismatch the numeric comparisons are skipped.
  :func:`qkweights.workflow.check` folds the current profile when the baseline is folded.

Heads that fail ``finite weights`` or ``not collapsed`` get no numeric
comparisons (their statistics are undefined); the report's notes list them.
A baseline with non-finite or collapsed heads is rejected (InputError), both
alike: such a head would fail ``finite weights`` or ``not collapsed`` in the
model checked, so the baseline cannot vouch for it, and its statistics
(Σσ = 0 or NaN) give no allowance to compare with.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qkweights.checkpoints.folders import listing
from qkweights.errors import InputError
from qkweights.outputs import model_name, plural
from qkweights.version import __version__
from qkweights.weights.profile import Profile

SCHEMA = "qkweights.check/1"
SIGMA_FLOOR = 1e-9  # baseline σ_n below this × σ_0 count as zero modes (see the module docstring)
SUMMARY_LINES = 20

ARCHITECTURE = "architecture"
LAYER_COSINE = "layer weighted cosine"
FINITE = "finite weights"
COLLAPSED = "not collapsed"
HEAD_COSINE = "head weighted cosine"
HEAD_SIGMA = "head top singular values"
FOLDING = "folding"
HEAD_SYMMETRY = "head symmetric fraction"
HEAD_OV = "head OV weighted cosine"
CIRCUIT_TOLERANCES = (("symmetry", "symmetric fraction"), ("ov", "OV"))  # their keys in tolerances, and names


@dataclass(frozen=True)
class Check:
    """One measurement against its allowance.

    ``measured``: a number, a text (architecture, finite weights) or None when
    undefined (e.g. the baseline head has Σσ = 0); JSON writes an infinite
    value (σ grown from a zero baseline) as null. ``allowed``: a number (the
    check passes when measured ≤ allowed) or a text. ``layer``/``head``: 0-based
    location, None when the check is not about one layer/head.
    """

    name: str
    layer: int | None
    head: int | None
    measured: float | str | None
    allowed: float | str
    passed: bool
    detail: str = ""

    @property
    def where(self) -> str:
        """ "model", "L3" or "L3 H2"."""
        if self.layer is None:
            return "model"
        return f"L{self.layer}" if self.head is None else f"L{self.layer} H{self.head}"

    def line(self) -> str:
        """One human-readable line, e.g. ``L1 H2  head top singular values: 0.5 > allowed 0.01 — mode 0: σ 3.908 →
        5.863``."""
        if isinstance(self.allowed, str):
            text = f"{_fmt(self.measured)} (allowed: {self.allowed})"
        else:
            op = "≤" if self.passed else ">"
            text = f"{_fmt(self.measured)} {op} allowed {_fmt(self.allowed)}"
        return f"{self.where:<6} {self.name}: {text}" + (f" — {self.detail}" if self.detail else "")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "where": self.where,
            "layer": self.layer,
            "head": self.head,
            "measured": self.measured,
            "allowed": self.allowed,
            "passed": self.passed,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, doc: dict) -> Check:
        return cls(
            doc["name"],
            doc["layer"],
            doc["head"],
            doc["measured"],
            doc["allowed"],
            doc["passed"],
            doc.get("detail", ""),
        )


@dataclass(frozen=True)
class CheckReport:
    """The outcome of :func:`check_profile`: every check, the tolerances, and what was compared.

    ``current``/``baseline``: {"source": …, "model": …} of the two profiles;
    ``tolerances``: {"layer", "head", "sigma", "top_sigma"}, and "symmetry", "ov" when given;
    ``notes``: checks that were skipped and why; ``skipped``: (check name, why) of each gate
    asked for that could not run, in all heads or in some (also among the notes).
    """

    checks: tuple[Check, ...]
    tolerances: dict
    current: dict
    baseline: dict
    notes: tuple[str, ...] = ()
    tool_version: str = __version__
    skipped: tuple[tuple[str, str], ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self, limit: int = SUMMARY_LINES) -> str:
        """A headline, then one line per failed check (at most ``limit``, then "... and N more")."""
        t = self.tolerances
        against = f"{model_name(self.current)} against baseline {model_name(self.baseline)}"
        if self.passed:
            K = self.current["model"]["head_dim"]  # the σ check covers at most the K modes a head has
            top = (
                f"the top {plural(t['top_sigma'], 'mode')}"
                if t["top_sigma"] <= K
                else f"all {K} modes (a head has {K})"
            )
            circuits = "".join(f", {what} {t[key]:g}" for key, what in CIRCUIT_TOLERANCES if key in t)
            return (
                f"check passed: {len(self.checks)} checks, {against} (tolerances: layer {t['layer']:g}, "
                f"head {t['head']:g}, σ {t['sigma']:g} over {top}{circuits})"
            )
        fails = self.failures
        lines = [f"check FAILED: {len(fails)} of {len(self.checks)} checks, {against}"]
        lines += [c.line() for c in fails[:limit]]
        if len(fails) > limit:
            lines.append(f"... and {len(fails) - limit} more")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The report document (schema ``qkweights.check/1``)."""
        return {
            "schema": SCHEMA,
            "tool_version": self.tool_version,
            "passed": self.passed,
            "counts": {"checks": len(self.checks), "failed": len(self.failures)},
            "tolerances": self.tolerances,
            "current": self.current,
            "baseline": self.baseline,
            "notes": list(self.notes),
            "skipped": [{"name": name, "why": why} for name, why in self.skipped],
            "checks": [c.to_json() for c in self.checks],
        }

    @classmethod
    def from_json(cls, doc: dict) -> CheckReport:
        """Read back :meth:`to_json` (after a JSON round trip)."""
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise InputError(
                "not a qkweights check report (schema "
                f"{doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})"
            )
        return cls(
            tuple(Check.from_json(c) for c in doc["checks"]),
            doc["tolerances"],
            doc["current"],
            doc["baseline"],
            tuple(doc["notes"]),
            doc["tool_version"],
            tuple((s["name"], s["why"]) for s in doc.get("skipped", [])),  # absent in older reports
        )

    def to_junit(self) -> str:
        """JUnit XML: one testsuite, one testcase per group of checks.

        Groups: "architecture"; per layer "layer l weighted cosine" and
        "layer l heads <check>" for each per-head check (its H heads in one
        testcase). A failing testcase carries ``<failure message=…>`` naming
        the failing heads, with one line per failed check as its text. Each
        gate in :attr:`skipped` is one more testcase, ``<skipped message=…>``.
        """
        groups: dict[str, list[Check]] = {}
        for c in self.checks:
            groups.setdefault(_group(c), []).append(c)
        n_failed = sum(any(not c.passed for c in g) for g in groups.values())
        n_tests = str(len(groups) + len(self.skipped))
        suites = ET.Element("testsuites", name="qkweights check", tests=n_tests, failures=str(n_failed))
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"qkweights check {model_name(self.current)}",
            tests=n_tests,
            failures=str(n_failed),
            errors="0",
            skipped=str(len(self.skipped)),
        )
        props = ET.SubElement(suite, "properties")
        for key, value in [("baseline", model_name(self.baseline))] + [
            (f"tolerance_{k}", str(v)) for k, v in self.tolerances.items()
        ]:
            ET.SubElement(props, "property", name=key, value=value)
        for name, checks in groups.items():
            case = ET.SubElement(suite, "testcase", classname="qkweights.check", name=name)
            failed = [c for c in checks if not c.passed]
            if failed:
                short = "; ".join(
                    f"{c.where}: {_fmt(c.measured)}" + ("" if isinstance(c.allowed, str) else f" > {_fmt(c.allowed)}")
                    for c in failed
                )
                message = f"{len(failed)} of {len(checks)} failed: {short}" if len(checks) > 1 else failed[0].line()
                ET.SubElement(case, "failure", message=message, type=checks[0].name).text = "\n".join(
                    c.line() for c in failed
                )
        for name, why in self.skipped:
            case = ET.SubElement(suite, "testcase", classname="qkweights.check", name=name)
            ET.SubElement(case, "skipped", message=why)
        ET.indent(suites)
        return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


@dataclass(frozen=True)
class Tolerances:
    """The allowances of :func:`check_profile` (the ``tol_…`` of the module docstring).

    Absolute for the cosines (which lie in [−1, 1]) and relative for σ; ``top_sigma``: how many of
    a head's largest singular values ``sigma`` covers; ``symmetry``, ``ov``: None leaves that gate out.
    """

    layer: float = 0.02
    head: float = 0.05
    sigma: float = 0.01
    top_sigma: int = 5
    symmetry: float | None = None
    ov: float | None = None

    def validate(self) -> None:
        """Raise InputError naming the first tolerance below 0 (or NaN), or a ``top_sigma`` below 1."""
        for name in ("layer", "head", "sigma", "symmetry", "ov"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"tol_{name}={value}: a tolerance must be a number ≥ 0")
        if self.top_sigma < 1:
            raise InputError(f"top_sigma={self.top_sigma}: compare at least the top 1 singular value")

    def record(self) -> dict:
        """The report's ``tolerances``: {"layer", "head", "sigma", "top_sigma"}, and "symmetry", "ov" when given."""
        given = {k: v for k, v in (("symmetry", self.symmetry), ("ov", self.ov)) if v is not None}
        return {"layer": self.layer, "head": self.head, "sigma": self.sigma, "top_sigma": self.top_sigma, **given}


def check_profile(
    current: Profile,
    baseline: Profile,
    tolerances: Tolerances = Tolerances(),
    *,
    causes: Mapping[tuple[int, int], str] | None = None,
) -> CheckReport:
    """Compare ``current`` with ``baseline`` within ``tolerances`` (see the module docstring for each check).

    ``causes``: optional text per collapsed (layer, head), from :func:`collapse_causes`, added
    to that check's detail.
    """
    tolerances.validate()
    check_baseline(baseline)
    causes = causes or {}
    m, mb = current.model, baseline.model
    same = (m.family, *m.shape) == (mb.family, *mb.shape)
    checks = [Check(ARCHITECTURE, None, None, m.shape_text(), mb.shape_text(), same)]
    notes = [] if same else ["architecture differs from the baseline: numeric comparisons skipped"]
    if (m.folded or None) != (mb.folded or None):
        checks.append(
            Check(
                FOLDING,
                None,
                None,
                m.folded or "plain",
                mb.folded or "plain",
                False,
                "profile the model as the baseline was (fold_ln=True or not)",
            )
        )
        notes.append("folding differs from the baseline: numeric comparisons skipped")
        same = False
    circuit, skipped = _circuit_plan(current, baseline, tolerances.symmetry, tolerances.ov) if same else ({}, [])
    notes += [why for _, why in skipped]
    nonfinite = set(current.nonfinite)
    S, Sb = current.singular_values, baseline.singular_values  # (L, H, K)
    N = min(tolerances.top_sigma, m.head_dim)
    for l in range(m.layers):
        head_checks, usable = [], []
        for h in range(m.heads):
            if (l, h) in nonfinite:
                head_checks.append(Check(FINITE, l, h, "NaN/inf", "finite", False, "W_q or W_k holds NaN or inf"))
                notes.append(f"L{l} H{h}: numeric comparisons skipped (non-finite weights)")
                continue
            head_checks.append(Check(FINITE, l, h, "finite", "finite", True))
            s0 = float(S[l, h, 0])
            cause = f"σ_0 of W_qᵀW_k; {causes[l, h]}" if (l, h) in causes else "σ_0 of W_qᵀW_k"
            head_checks.append(Check(COLLAPSED, l, h, s0, "> 0", s0 > 0, "" if s0 > 0 else cause))
            if s0 <= 0:
                notes.append(f"L{l} H{h}: numeric comparisons skipped (collapsed, σ_0 = 0)")
                continue
            if same:
                usable.append(h)
                head_checks.append(
                    _cosine_check(HEAD_COSINE, l, h, current.weighted[l, h], baseline.weighted[l, h], tolerances.head)
                )
                head_checks.append(_sigma_check(l, h, S[l, h, :N], Sb[l, h, :N], tolerances.sigma))
                for name, (now, base, tol) in circuit.items():
                    if np.isfinite(base[l, h]):
                        head_checks.append(_cosine_check(name, l, h, now[l, h], base[l, h], tol))
        if same:
            both = [h for h in usable if np.isfinite(baseline.weighted[l, h])]
            if both:
                checks.append(
                    _cosine_check(
                        LAYER_COSINE,
                        l,
                        None,
                        current.weighted[l, both].mean(),
                        baseline.weighted[l, both].mean(),
                        tolerances.layer,
                    )
                )
                if len(both) < m.heads:
                    notes.append(f"L{l}: layer mean over heads {', '.join(map(str, both))} only")
            else:
                notes.append(f"L{l}: no head to compare; layer weighted cosine skipped")
        checks += head_checks
    return CheckReport(
        tuple(checks), tolerances.record(), current.side(), baseline.side(), tuple(notes), skipped=tuple(skipped)
    )


def check_baseline(baseline: Profile) -> None:
    """Raise InputError when the baseline has non-finite or collapsed (σ_0 = 0) heads: both are refused alike."""
    bad = set(baseline.nonfinite)
    collapsed = [
        (int(l), int(h)) for l, h in zip(*np.nonzero(~(baseline.singular_values[..., 0] > 0))) if (l, h) not in bad
    ]
    problems = [
        f"{what} in {', '.join(f'L{l} H{h}' for l, h in heads)}"
        for what, heads in (("non-finite weights", sorted(bad)), ("collapsed heads (σ_0 = 0)", collapsed))
        if heads
    ]
    if problems:
        raise InputError(
            f"baseline {baseline.name}: {'; '.join(problems)}, which check fails in any model; "
            f"write the baseline from a healthy checkpoint with `python -m qkweights profile`"
        )


def _circuit_plan(current: Profile, baseline: Profile, tol_symmetry, tol_ov) -> tuple[dict, list]:
    """The requested circuit gates: ({check name: (current (L, H), baseline (L, H), tolerance)} of those both profiles
    can give, [(check name, why)] of those that cannot run, in every head or in some)."""
    plan, skipped = {}, []
    ov_unlike = current.model.ov_folded != baseline.model.ov_folded  # a folded profile/2 written before OV folding
    for name, flag, tol, get, unlike in (
        (HEAD_SYMMETRY, "tol_symmetry", tol_symmetry, lambda p: p.symmetric, False),
        (HEAD_OV, "tol_ov", tol_ov, lambda p: None if p.ov is None else p.ov.weighted, ov_unlike),
    ):
        if tol is None:
            continue
        now, base = get(current), get(baseline)
        what, given = name.removeprefix("head "), f"{flag}={tol:g}"
        if unlike:
            why = "the baseline's value-output circuit is not LayerNorm-folded (saved before fold_ln=True folded it)"
            skipped.append((name, f"{given}: not checked: {why}; save the baseline again"))
        elif base is None or not np.isfinite(base).any():
            why = f"the baseline has no {what} (profile/1, or no value-output circuit)"
            skipped.append((name, f"{given}: not checked: {why}"))
        elif now is None or not np.isfinite(now).any():
            skipped.append((name, f"{given}: not checked: the current model has no {what}"))
        else:
            lacking = [f"L{l} H{h}" for l, h in zip(*np.nonzero(~np.isfinite(base)))]
            if lacking:
                skipped.append(
                    (name, f"{given}: not compared in {listing(lacking)}, where the baseline lacks the statistic")
                )
            plan[name] = (now, base, tol)
    return plan, skipped


def collapse_causes(ck, heads) -> dict[tuple[int, int], str]:
    """Why each of ``heads`` ((layer, head) pairs) has W_qᵀW_k = 0, read from the checkpoint's weights.

    ``ck``: a :class:`~qkweights.specs.checkpoint.Checkpoint`. Returns "W_q all zero",
    "W_k all zero", "W_q and W_k all zero" or "W_qᵀW_k = 0 with non-zero W_q and W_k".
    """
    out: dict[tuple[int, int], str] = {}
    for l in sorted({l for l, _ in heads}):
        qk = ck.qk(l)  # wq, wk: (H, K, D)
        for h in sorted(h for ll, h in heads if ll == l):
            zq, zk = not qk.wq[h].any(), not qk.wk[h].any()
            out[l, h] = (
                "W_q and W_k all zero"
                if zq and zk
                else "W_q all zero"
                if zq
                else "W_k all zero"
                if zk
                else "W_qᵀW_k = 0 with non-zero W_q and W_k"
            )
    return out


def _cosine_check(name: str, l: int, h: int | None, now: float, base: float, tol: float) -> Check:
    if not np.isfinite(base):
        return Check(name, l, h, None, tol, False, f"current {now:.4g}, baseline undefined (Σσ = 0)")
    d = abs(float(now) - float(base))
    return Check(name, l, h, d, tol, d <= tol, f"current {now:.4g}, baseline {base:.4g}")


def _sigma_check(l: int, h: int, s: np.ndarray, sb: np.ndarray, tol: float) -> Check:
    """s, sb: (N,) the top singular values, current and baseline."""
    denom = np.where(sb > SIGMA_FLOOR * sb[0], sb, sb[0])  # (N,)
    diff = np.abs(s - sb)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / denom)  # (N,) x/0 → inf
    n = int(np.argmax(rel))
    worst = float(rel[n])
    return Check(HEAD_SIGMA, l, h, worst, tol, worst <= tol, f"mode {n}: σ {sb[n]:.4g} → {s[n]:.4g}")


def _group(c: Check) -> str:
    if c.name == ARCHITECTURE:
        return ARCHITECTURE
    if c.name == LAYER_COSINE:
        return f"layer {c.layer} weighted cosine"
    if c.name == FOLDING:
        return FOLDING
    return f"layer {c.layer} heads {c.name.removeprefix('head ')}"


def _fmt(x) -> str:
    if x is None:
        return "undefined"
    return f"{x:.4g}" if isinstance(x, float) else str(x)
