"""check: a checkpoint against a saved profile, with exit codes, summary lines, JSON and JUnit reports.

Models are the tiny ViT fixture (2 layers, 4 heads, D = 32, K = 8; tests/fixtures/models/vit)
and copies whose weights are edited with safetensors.numpy. Reference values come from a
dense float64 SVD of the D×D product W_qᵀW_k of the stored weights (brute force, independent
of the QR-core SVD under test) or are exact by construction (W_k → −W_k negates every cos_n;
a zero W_q makes σ_0 = 0).
"""

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, edited_fixture, flip_value_head, vit_qk_name
from safetensors.numpy import load_file

import qkweights
from qkweights.cli import main
from qkweights.errors import InputError
from qkweights.weights.check import CheckReport, Tolerances, check_profile
from qkweights.weights.load import load_profile

VIT = MODELS / "vit"
K = 8  # head dim of the fixture (config: hidden 32, 4 heads)
N_CHECKS = 1 + 2 * (1 + 4 * 4)  # architecture + per layer (layer cosine + 4 heads × 4 checks)


name, edited = vit_qk_name, edited_fixture


def rows(l, h):
    return slice(h * K, (h + 1) * K)


def dense_head(folder, l, h):
    """σ (K,) and weighted cosine of one head by dense SVD of the D×D matrix W_qᵀW_k (float64)."""
    t = load_file(Path(folder) / "model.safetensors")
    wq = t[name(l, "query")][rows(l, h)].astype(np.float64)
    wk = t[name(l, "key")][rows(l, h)].astype(np.float64)
    u, s, vt = np.linalg.svd(wq.T @ wk)
    cos = np.einsum("dn,nd->n", u[:, :K], vt[:K])
    return s[:K], float((s[:K] * cos).sum() / s[:K].sum())


def model_id(folder):
    return str(Path(folder).resolve())


def run(capsys, *argv):
    code = main(["check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_unchanged_model_passes_and_writes_reports(tmp_path, baseline, capsys):
    code, lines, _ = run(
        capsys, VIT, "--baseline", baseline, "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml"
    )
    assert code == 0
    assert lines == [
        f"check passed: {N_CHECKS} checks, {model_id(VIT)} against baseline {model_id(VIT)} "
        "(tolerances: layer 0.02, head 0.05, σ 0.01 over the top 5 modes)"
    ]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == "qkweights.check/1" and doc["passed"] is True
    assert doc["counts"] == {"checks": N_CHECKS, "failed": 0}
    assert all(c["passed"] for c in doc["checks"])
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("tests") == str(1 + 2 * 5)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_scaled_key_fails_sigma_check_only(tmp_path, baseline, capsys):
    def scale(t):
        t[name(1, "key")][rows(1, 2)] *= np.float32(1.5)

    model = edited(tmp_path, "scaled", scale)
    code, lines, _ = run(capsys, model, "--baseline", baseline, "--report", tmp_path / "r.json")
    assert code == 1
    # Reference: dense SVD of both checkpoints; σ scales by 1.5 up to float32 rounding of the stored weights.
    s0, w0 = dense_head(VIT, 1, 2)
    s1, w1 = dense_head(model, 1, 2)
    rel = np.abs(s1[:5] - s0[:5]) / s0[:5]
    n = int(np.argmax(rel))
    assert lines == [
        f"check FAILED: 1 of {N_CHECKS} checks, {model_id(model)} against baseline {model_id(VIT)}",
        f"L1 H2  head top singular values: 0.5 > allowed 0.01 — mode {n}: σ {s0[n]:.4g} → {s1[n]:.4g}",
    ]
    doc = json.loads((tmp_path / "r.json").read_text())
    [fail] = [c for c in doc["checks"] if not c["passed"]]
    assert (fail["name"], fail["where"], fail["layer"], fail["head"], fail["allowed"]) == (
        "head top singular values",
        "L1 H2",
        1,
        2,
        0.01,
    )
    assert fail["measured"] == pytest.approx(rel.max(), abs=1e-9) and fail["measured"] == pytest.approx(0.5, abs=1e-6)
    # The weighted cosine is scale-invariant (it is ⟨W_q, W_k⟩_F / ‖W_qᵀW_k‖_*): that head check passes, measured ≈ 0.
    [head] = [c for c in doc["checks"] if c["name"] == "head weighted cosine" and c["where"] == "L1 H2"]
    assert head["passed"] and head["measured"] == pytest.approx(abs(w1 - w0), abs=1e-9) and head["measured"] < 1e-6


def test_negated_key_flips_the_weighted_cosine(tmp_path, baseline, capsys):
    def negate(t):
        t[name(0, "key")][rows(0, 3)] *= -1

    model = edited(tmp_path, "negated", negate)
    _, w = dense_head(VIT, 0, 3)  # −W_k negates every cos_n, σ unchanged: |Δ| = 2|w| for the head, 2|w|/4 for layer 0
    code, lines, _ = run(capsys, model, "--baseline", baseline, "--report", tmp_path / "r.json")
    assert code == 1
    assert lines[1:] == [
        f"L0     layer weighted cosine: {2 * abs(w) / 4:.4g} > allowed 0.02 — current "
        f"{np.mean(load_profile(baseline).weighted[0]) - 2 * w / 4:.4g}, "
        f"baseline {np.mean(load_profile(baseline).weighted[0]):.4g}",
        f"L0 H3  head weighted cosine: {2 * abs(w):.4g} > allowed 0.05 — current {-w:.4g}, baseline {w:.4g}",
    ]
    failed = {
        c["where"]: c["measured"] for c in json.loads((tmp_path / "r.json").read_text())["checks"] if not c["passed"]
    }
    assert failed == pytest.approx({"L0": 2 * abs(w) / 4, "L0 H3": 2 * abs(w)}, abs=1e-9)
    # A looser layer tolerance passes the layer; the head still fails.
    code, lines, _ = run(capsys, model, "--baseline", baseline, "--tol-layer", 0.1)
    assert code == 1 and [line.split(":")[0] for line in lines[1:]] == ["L0 H3  head weighted cosine"]


def test_collapsed_heads_name_their_cause(tmp_path, baseline, capsys):
    def collapse(t):
        t[name(0, "query")][rows(0, 1)] = 0  # W_q all zero
        t[name(1, "key")][rows(1, 0)] = 0  # W_k all zero
        q, k = t[name(1, "query")], t[name(1, "key")]
        q[rows(1, 3)][4:] = 0  # rows 0-3 of W_q and rows 4-7 of W_k: W_qᵀW_k = Σ_r q_r k_rᵀ = 0
        k[rows(1, 3)][:4] = 0

    model = edited(tmp_path, "collapsed", collapse)
    code, lines, _ = run(capsys, model, "--baseline", baseline, "--report", tmp_path / "r.json")
    assert code == 1
    assert lines[1:] == [
        "L0 H1  not collapsed: 0 (allowed: > 0) — σ_0 of W_qᵀW_k; W_q all zero",
        "L1 H0  not collapsed: 0 (allowed: > 0) — σ_0 of W_qᵀW_k; W_k all zero",
        "L1 H3  not collapsed: 0 (allowed: > 0) — σ_0 of W_qᵀW_k; W_qᵀW_k = 0 with non-zero W_q and W_k",
    ]
    doc = json.loads((tmp_path / "r.json").read_text())
    # Collapsed heads get no numeric comparisons; the layer means run over the other heads (unchanged: Δ = 0).
    assert not [c for c in doc["checks"] if c["where"] in ("L0 H1", "L1 H0", "L1 H3") and c["name"].startswith("head ")]
    assert [c["measured"] for c in doc["checks"] if c["name"] == "layer weighted cosine"] == [0.0, 0.0]
    assert "L1: layer mean over heads 1, 2 only" in doc["notes"]


def test_nonfinite_weights_fail(tmp_path, baseline, capsys):
    def poison(t):
        t[name(1, "query")][rows(1, 3)][2, 5] = np.nan

    model = edited(tmp_path, "nan", poison)
    code, lines, _ = run(capsys, model, "--baseline", baseline)
    assert code == 1
    assert lines[1:] == ["L1 H3  finite weights: NaN/inf (allowed: finite) — W_q or W_k holds NaN or inf"]


def test_architecture_mismatch_skips_numeric_checks(tmp_path, capsys):
    other = tmp_path / "h3"
    qkweights.profile(str(MODELS / "vit-h3")).save(other)
    code, lines, _ = run(capsys, VIT, "--baseline", other, "--report", tmp_path / "r.json")
    assert code == 1
    # Shapes from the fixtures' config.json files: vit 32 wide with 4 heads, vit-h3 48 wide with 3 heads of 16.
    assert lines[1:] == [
        "model  architecture: hf-vit, 2 layers × 4 heads, D = 32, K = 8 (allowed: hf-vit, 2 layers × 3 heads, "
        "D = 48, K = 16)"
    ]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {c["name"] for c in doc["checks"]} == {"architecture", "finite weights", "not collapsed"}
    assert len(doc["checks"]) == 1 + 2 * 4 * 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--baseline", "{tmp}/missing.json"], "missing.json: no such profile"),
        (["--baseline", "{tmp}/bad.json"], "not a qkweights profile"),
        (["--baseline", "{base}", "--tol-head", "-1"], "--tol-head -1.0: a tolerance must be a number ≥ 0"),
        (["--baseline", "{base}", "--top-sigma", "0"], "--top-sigma 0: compare at least the top 1 singular value"),
    ],
)
def test_input_errors_exit_2(tmp_path, baseline, capsys, argv, message):
    (tmp_path / "bad.json").write_text('{"schema": "something/1"}')
    argv = [a.format(tmp=tmp_path, base=baseline) for a in argv]
    code, lines, err = run(capsys, VIT, *argv)
    assert code == 2 and lines == [] and message in err and err.startswith("qkweights: error: ")


def test_baseline_with_nonfinite_heads_is_rejected(tmp_path, baseline):
    def poison(t):
        t[name(0, "key")][rows(0, 0)][0, 0] = np.inf

    bad = qkweights.profile(str(edited(tmp_path, "inf", poison)))
    with pytest.raises(InputError, match="non-finite weights in L0 H0"):
        check_profile(load_profile(baseline), bad)


def test_junit_groups_heads_per_layer(tmp_path, baseline, capsys):
    def change(t):
        t[name(0, "key")][rows(0, 3)] *= -1
        t[name(1, "key")][rows(1, 2)] *= np.float32(1.5)

    model = edited(tmp_path, "both", change)
    assert run(capsys, model, "--baseline", baseline, "--junit", tmp_path / "j.xml")[0] == 1
    root = ET.parse(tmp_path / "j.xml").getroot()
    suite = root.find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == ["architecture"] + [
        f"layer {l} {what}"
        for l in (0, 1)
        for what in (
            "weighted cosine",
            "heads finite weights",
            "heads not collapsed",
            "heads weighted cosine",
            "heads top singular values",
        )
    ]
    failed = [n for n, c in cases.items() if c.find("failure") is not None]
    assert failed == ["layer 0 weighted cosine", "layer 0 heads weighted cosine", "layer 1 heads top singular values"]
    assert suite.get("tests") == "11" and suite.get("failures") == "3"
    msg = cases["layer 1 heads top singular values"].find("failure").get("message")
    assert msg.startswith("1 of 4 failed: L1 H2: 0.5 > 0.01")
    assert cases["layer 0 heads weighted cosine"].find("failure").get("type") == "head weighted cosine"


def test_report_json_round_trip(tmp_path, baseline, capsys):
    def negate(t):
        t[name(0, "key")][rows(0, 3)] *= -1

    model = edited(tmp_path, "negated", negate)
    run(capsys, model, "--baseline", baseline, "--report", tmp_path / "r.json", "--tol-sigma", 0.02, "--top-sigma", 3)
    doc = json.loads((tmp_path / "r.json").read_text())
    direct = check_profile(qkweights.profile(str(model)), load_profile(baseline), Tolerances(sigma=0.02, top_sigma=3))
    assert CheckReport.from_json(doc) == direct
    assert doc["tolerances"] == {"layer": 0.02, "head": 0.05, "sigma": 0.02, "top_sigma": 3}
    assert {"name", "where", "measured", "allowed", "passed"} <= set(doc["checks"][0])


def test_top_sigma_covers_the_first_n_modes(baseline):
    base = load_profile(baseline)
    S = base.singular_values.copy()
    S[0, 2, 5] *= 1.2  # mode 5 (the 6th largest) of L0 H2 grows by 20%
    cur = dataclasses.replace(base, singular_values=S)
    assert check_profile(cur, base, Tolerances(top_sigma=5)).passed
    report = check_profile(cur, base, Tolerances(top_sigma=6))
    [fail] = report.failures
    assert (fail.where, fail.measured) == ("L0 H2", pytest.approx(0.2, abs=1e-12))


def test_summary_is_capped(baseline):
    other = qkweights.profile(str(MODELS / "vit-cls"))  # a different random model of the same shape
    report = check_profile(other, load_profile(baseline), Tolerances(head=0, sigma=0, layer=0))
    n = len(report.failures)
    assert n == 2 + 8 * 2  # every layer cosine, and every head's cosine and σ differ at tolerance 0
    lines = report.summary(limit=5).splitlines()
    assert len(lines) == 1 + 5 + 1 and lines[-1] == f"... and {n - 5} more"
    assert len(report.summary().splitlines()) == 1 + n  # the default cap (20) is not reached
    assert lines[0].startswith(f"check FAILED: {n} of {N_CHECKS} checks")


def test_top_sigma_beyond_the_head_dim_is_not_echoed(baseline, capsys):
    code, lines, _ = run(capsys, VIT, "--baseline", baseline, "--top-sigma", 100)
    assert code == 0 and lines[0].endswith(
        "(tolerances: layer 0.02, head 0.05, σ 0.01 over all 8 modes (a head has 8))"
    )


def test_baseline_with_collapsed_heads_is_rejected_like_nonfinite(tmp_path, baseline, capsys):
    # Both kinds of unhealthy baseline head are refused alike, with one line naming each, before any weights are read.
    def spoil(t):
        t[name(0, "key")][rows(0, 0)][0, 0] = np.nan
        t[name(1, "query")][rows(1, 2)] = 0  # W_q all zero: σ_0 = 0

    bad_dir = tmp_path / "bad"
    qkweights.profile(str(edited(tmp_path, "spoilt", spoil))).save(bad_dir)
    bad = load_profile(bad_dir)
    message = (
        f"baseline {model_id(tmp_path / 'spoilt')}: non-finite weights in L0 H0; collapsed heads (σ_0 = 0) in L1 H2, "
        "which check fails in any model; write the baseline from a healthy checkpoint with `python -m "
        "qkweights profile`"
    )
    with pytest.raises(InputError) as e:
        check_profile(load_profile(baseline), bad)
    assert str(e.value) == message
    collapsed_only = dataclasses.replace(bad, nonfinite=[])
    with pytest.raises(InputError, match=r": collapsed heads \(σ_0 = 0\) in L0 H0, L1 H2, which check fails"):
        check_profile(load_profile(baseline), collapsed_only)  # (L0 H0's σ are NaN: not > 0 either)
    code, lines, err = run(capsys, tmp_path / "no-such-model", "--baseline", bad_dir)
    assert (code, lines, err) == (2, [], f"qkweights: error: {message}\n")


# ---- tolerances at their boundaries. Values are dyadic (exact in float64), so |Δ| equals the tolerance exactly.


def _with(prof, weighted=None, sigma=None):
    return dataclasses.replace(
        prof,
        weighted=prof.weighted if weighted is None else weighted,
        singular_values=prof.singular_values if sigma is None else sigma,
    )


def test_profile_against_itself_passes_at_zero_tolerances(baseline):
    base = load_profile(baseline)
    report = check_profile(base, base, Tolerances(layer=0, head=0, sigma=0, top_sigma=K))
    assert report.passed and len(report.checks) == N_CHECKS
    assert {c.measured for c in report.checks if not isinstance(c.measured, str) and c.name != "not collapsed"} == {0.0}


@pytest.mark.parametrize("step, passed", [(0, True), (1, False)])
def test_head_and_layer_cosine_exactly_at_the_tolerance(baseline, step, passed):
    base = load_profile(baseline)
    tol = 2.0**-6
    w0 = np.full_like(base.weighted, 0.25)
    w1 = w0.copy()
    w1[1, 2] += tol + step * 2.0**-40  # one head: Δ = tol, or just above
    report = check_profile(_with(base, w1), _with(base, w0), Tolerances(head=tol, layer=1, sigma=0))
    [head] = [c for c in report.checks if c.name == "head weighted cosine" and c.where == "L1 H2"]
    assert (head.measured, head.passed, report.passed) == (tol + step * 2.0**-40, passed, passed)
    w1 = w0 + tol + step * 2.0**-40  # every head: each layer's mean moves by exactly the same Δ
    report = check_profile(_with(base, w1), _with(base, w0), Tolerances(layer=tol, head=1, sigma=0))
    layers = [c for c in report.checks if c.name == "layer weighted cosine"]
    assert [(c.measured, c.passed) for c in layers] == [(tol + step * 2.0**-40, passed)] * 2
    assert report.passed == passed


@pytest.mark.parametrize("grow, passed", [(2.0**-7, True), (2.0**-7 - 2.0**-30, True), (2.0**-7 + 2.0**-30, False)])
def test_sigma_drift_at_just_below_and_just_above_tol_sigma(baseline, grow, passed):
    base = load_profile(baseline)
    S0 = base.singular_values.copy()
    S0[0, 1, :] = [4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    S1 = S0.copy()
    S1[0, 1, 2] *= 1 + grow  # mode 2: σ 1 → 1 + grow (relative change = grow exactly)
    report = check_profile(_with(base, sigma=S1), _with(base, sigma=S0), Tolerances(sigma=2.0**-7, top_sigma=5))
    [c] = [c for c in report.checks if c.name == "head top singular values" and c.where == "L0 H1"]
    assert (c.measured, c.passed, report.passed) == (grow, passed, passed)
    assert c.detail == f"mode 2: σ 1 → {1 + grow:.4g}"


def test_rounding_noise_on_a_near_zero_mode_passes(baseline):
    # σ_7 = 1e-15·σ_0 (numerically zero: a rank-deficient head) → 3e-15·σ_0 is rounding noise, not a 200% drift:
    # measured relative to σ_0 (SIGMA_FLOOR), the change is 2e-15.
    base = load_profile(baseline)
    S0 = base.singular_values.copy()
    S0[1, 3, -1] = 1e-15 * S0[1, 3, 0]
    S1 = S0.copy()
    S1[1, 3, -1] = 3e-15 * S0[1, 3, 0]
    report = check_profile(_with(base, sigma=S1), _with(base, sigma=S0), Tolerances(sigma=1e-12, top_sigma=K))
    [c] = [c for c in report.checks if c.name == "head top singular values" and c.where == "L1 H3"]
    assert c.passed and report.passed and c.measured == pytest.approx(2e-15, rel=1e-6)


# ---- the symmetric-fraction and OV gates: each at its own tolerance, the two tolerances different, so that a swap,
# a scaled tolerance or a gate read from the wrong profile changes the outcome. Values are dyadic: |Δ| is exact.

TOL_SYM, TOL_OV = 2.0**-6, 2.0**-4  # different on purpose
EPS = 2.0**-40  # "just over": exact in float64 next to 0.25 + 2⁻⁴


def _circuits(prof, symmetric=None, ov=None):
    """``prof`` with its (L, H) symmetric fraction and OV weighted cosine replaced."""
    return dataclasses.replace(
        prof,
        symmetric=prof.symmetric if symmetric is None else symmetric,
        ov=prof.ov if ov is None else dataclasses.replace(prof.ov, weighted=ov),
    )


def _gates(report, name):
    return {(c.layer, c.head): (c.measured, c.allowed, c.passed) for c in report.checks if c.name == name}


@pytest.mark.parametrize("over", [0, 1], ids=["at", "over"])
@pytest.mark.parametrize("gate", ["symmetry", "ov"])
def test_each_circuit_gate_at_and_just_over_its_own_tolerance(baseline, gate, over):
    from qkweights.weights.check import HEAD_OV, HEAD_SYMMETRY

    base = load_profile(baseline)
    quarter = np.full_like(base.weighted, 0.25)
    moved = quarter.copy()
    tol = TOL_SYM if gate == "symmetry" else TOL_OV
    moved[1, 2] += tol + over * EPS  # one head moves by exactly its gate's tolerance, or just over
    now = _circuits(base, *((moved, quarter) if gate == "symmetry" else (quarter, moved)))
    then = _circuits(base, quarter, quarter)
    report = check_profile(now, then, Tolerances(symmetry=TOL_SYM, ov=TOL_OV))
    sym, ov = _gates(report, HEAD_SYMMETRY), _gates(report, HEAD_OV)
    assert len(sym) == len(ov) == 8 and report.tolerances["symmetry"] == TOL_SYM and report.tolerances["ov"] == TOL_OV
    assert {a for _, a, _ in sym.values()} == {TOL_SYM} and {a for _, a, _ in ov.values()} == {TOL_OV}
    moved_gate, still = (sym, ov) if gate == "symmetry" else (ov, sym)
    assert moved_gate[1, 2] == (tol + over * EPS, tol, not over)
    assert report.passed == (not over) and [c.where for c in report.failures] == (["L1 H2"] if over else [])
    assert all(m == 0.0 and p for m, _, p in still.values())


def test_a_drift_between_the_two_tolerances_fails_only_the_tighter_gate(baseline):
    from qkweights.weights.check import HEAD_OV, HEAD_SYMMETRY

    base = load_profile(baseline)
    quarter = np.full_like(base.weighted, 0.25)
    moved = quarter + 2.0**-5  # every head: over TOL_SYM = 2⁻⁶, under TOL_OV = 2⁻⁴
    sym_moved = check_profile(
        _circuits(base, moved, quarter), _circuits(base, quarter, quarter), Tolerances(symmetry=TOL_SYM, ov=TOL_OV)
    )
    ov_moved = check_profile(
        _circuits(base, quarter, moved), _circuits(base, quarter, quarter), Tolerances(symmetry=TOL_SYM, ov=TOL_OV)
    )
    assert {c.name for c in sym_moved.failures} == {HEAD_SYMMETRY} and len(sym_moved.failures) == 8
    assert ov_moved.passed and {m for m, _, _ in _gates(ov_moved, HEAD_OV).values()} == {2.0**-5}


def test_a_baseline_lacking_a_statistic_in_some_heads_gates_the_others(baseline):
    from qkweights.weights.check import HEAD_OV, HEAD_SYMMETRY

    base = load_profile(baseline)
    quarter = np.full_like(base.weighted, 0.25)
    holes = quarter.copy()
    holes[0, 1] = holes[1, 3] = np.nan  # the baseline lacks the statistic in two heads only
    then_sym, then_ov = _circuits(base, holes, quarter), _circuits(base, quarter, holes)
    for then, name, given in ((then_sym, HEAD_SYMMETRY, "tol_symmetry=0.015625"), (then_ov, HEAD_OV, "tol_ov=0.0625")):
        # the current model has the statistic everywhere, equal to the baseline where the baseline has one
        same = check_profile(_circuits(base, quarter, quarter), then, Tolerances(symmetry=TOL_SYM, ov=TOL_OV))
        every = {(l, h) for l in range(2) for h in range(4)}
        assert same.passed and set(_gates(same, name)) == every - {(0, 1), (1, 3)}
        why = f"{given}: not compared in L0 H1, L1 H3, where the baseline lacks the statistic"
        assert same.skipped == ((name, why),)
        drifted = quarter.copy()
        drifted[1, 0] += 2 * TOL_OV  # a head the baseline has: the gate still runs there and fails
        now = _circuits(base, drifted, quarter) if name == HEAD_SYMMETRY else _circuits(base, quarter, drifted)
        report = check_profile(now, then, Tolerances(symmetry=TOL_SYM, ov=TOL_OV))
        assert [(c.name, c.where) for c in report.failures] == [(name, "L1 H0")]


def test_cli_tol_ov_alone_gates_the_ov_circuit(tmp_path, baseline, capsys):
    flipped = edited(tmp_path, "flipped", flip_value_head)
    ov = load_profile(baseline).ov.weighted[1, 2]
    code, lines, err = run(capsys, flipped, "--baseline", baseline, "--tol-ov", 0.001, "--report", tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and err == "" and doc["tolerances"]["ov"] == 0.001 and "symmetry" not in doc["tolerances"]
    [fail] = [c for c in doc["checks"] if not c["passed"]]
    assert (fail["name"], fail["where"], fail["allowed"]) == ("head OV weighted cosine", "L1 H2", 0.001)
    assert fail["measured"] == pytest.approx(2 * abs(ov), abs=1e-12)  # w → −w; float64 statistics of one head
    assert not any(c["name"] == "head symmetric fraction" for c in doc["checks"])
    assert lines[0].startswith("check FAILED: 1 of ")
    # at a tolerance over the drift it passes, and the summary names the OV tolerance given
    code, lines, _ = run(capsys, flipped, "--baseline", baseline, "--tol-ov", 2 * abs(ov) + 1e-9)
    assert code == 0 and f"OV {2 * abs(ov) + 1e-9:g}" in lines[0] and "symmetric" not in lines[0]


def test_gates_that_cannot_run_are_said_on_stderr_and_in_junit(tmp_path, baseline, capsys):
    doc = json.loads(baseline.read_text())
    doc["schema"] = "qkweights.profile/1"
    for layer in doc["layers"]:
        for head in layer["heads"]:
            del head["symmetric_fraction"], head["ov"]
    old = tmp_path / "old" / "profile.json"
    old.parent.mkdir()
    old.write_text(json.dumps(doc))
    code, lines, err = run(
        capsys, VIT, "--baseline", old, "--tol-symmetry", 0.01, "--tol-ov", 0.02, "--junit", tmp_path / "j.xml"
    )
    assert code == 0 and lines[0].startswith("check passed:")
    assert err.splitlines() == [
        "qkweights: note: --tol-symmetry 0.01: not checked: the baseline has no symmetric fraction (profile/1, or no "
        "value-output circuit)",
        "qkweights: note: --tol-ov 0.02: not checked: the baseline has no OV weighted cosine (profile/1, or no "
        "value-output circuit)",
    ]
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    skipped = [(c.get("name"), c.find("skipped").get("message")) for c in suite if c.find("skipped") is not None]
    assert skipped == [
        (
            "head symmetric fraction",
            "tol_symmetry=0.01: not checked: the baseline has no symmetric fraction (profile/1, or no value-output "
            "circuit)",
        ),
        (
            "head OV weighted cosine",
            "tol_ov=0.02: not checked: the baseline has no OV weighted cosine (profile/1, or no value-output circuit)",
        ),
    ]
    assert suite.get("skipped") == "2" and int(suite.get("tests")) == len(suite.findall("testcase"))
    # without the two tolerances nothing is skipped, and nothing is said
    code, lines, err = run(capsys, VIT, "--baseline", old)
    assert (code, err) == (0, "")


def test_a_current_model_without_the_statistic_skips_the_gate_and_says_so(baseline):
    from qkweights.weights.check import HEAD_OV

    base = load_profile(baseline)
    none = _circuits(base, ov=np.full_like(base.weighted, np.nan))  # a model with no value-output circuit
    report = check_profile(none, base, Tolerances(symmetry=TOL_SYM, ov=TOL_OV))
    assert report.passed and not _gates(report, HEAD_OV)
    assert report.skipped == ((HEAD_OV, "tol_ov=0.0625: not checked: the current model has no OV weighted cosine"),)


def test_a_folded_baseline_from_before_ov_folding_skips_the_ov_gate_and_says_so(tmp_path, capsys):
    """A --fold-ln profile saved before the value-output circuit was folded (its ``model.fold`` lacks
    ``value_output``) holds the plain W_o W_v: --tol-ov would compare two different matrices, so it is skipped."""
    out = tmp_path / "folded"
    qkweights.profile(str(VIT), fold_ln=True).save(out)
    doc = json.loads((out / "profile.json").read_text())
    assert doc["model"]["fold"]["value_output"] is True
    del doc["model"]["fold"]["value_output"]  # as written before the OV circuit was folded
    (out / "profile.json").write_text(json.dumps(doc))
    code, lines, err = run(capsys, VIT, "--baseline", out / "profile.json", "--tol-ov", 0.5, "--tol-symmetry", 0.5)
    assert code == 0 and lines[0].startswith("check passed:")
    assert err.splitlines() == [
        "qkweights: note: --tol-ov 0.5: not checked: the baseline's value-output circuit is not LayerNorm-folded "
        "(saved before --fold-ln folded it); save the baseline again"
    ]
