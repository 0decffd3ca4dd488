"""The forward pass's linear layers (qkweights.vision.gemm): a packed product equals the float64 product within
float32's error bound, is the same on every call and thread, and the route falls back to np.matmul where the
packed one cannot run."""

from __future__ import annotations

import copy
import ctypes
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import MODELS
from threadpoolctl import threadpool_info

from qkweights.errors import InputError, QkWarning
from qkweights.vision import gemm
from qkweights.vision.forward import forward
from qkweights.vision.gemm import COLUMNS, DEPTH, Linear, gemm_route, scratch
from qkweights.vision.model import open_vision_model, vit_weights

packed_only = pytest.mark.skipif(gemm_route() != "packed", reason="numpy's BLAS here has no packed route")
U32 = 2.0**-24  # float32's unit roundoff


def _operands(t: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    return x, w, b


def _product(lin: Linear, x: np.ndarray) -> np.ndarray:
    return lin(x, np.empty((len(x), lin.shape[1]), np.float32), scratch(len(x), lin.route))


@packed_only
@pytest.mark.numerics
@pytest.mark.parametrize(
    "t, k, n",
    [
        (1, 1, 1),
        (3, DEPTH, COLUMNS),  # exactly one block
        (3, DEPTH + 1, COLUMNS + 1),  # a block of depth 1, a panel of one column
        (37, 2 * DEPTH - 1, 2 * COLUMNS - 1),
        (197, 768, 3 * 768),  # ViT-B's q/k/v, out, fc1, fc2 on one image's 197 tokens
        (197, 768, 768),
        (197, 768, 3072),
        (197, 3072, 768),
    ],
)
def test_a_packed_product_is_within_float32_error_of_float64(t, k, n):
    x, w, b = _operands(t, k, n)
    y = _product(Linear(w, b, "packed"), x)
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    # a sum of k products and the bias in float32, any order, FMA or not: |error| ≤ γ_{k+1}(|x||w| + |b|),
    # γ_m = m·u / (1 − m·u) ≤ (m + 1)·u for m·u ≤ 1/(m + 1)
    bound = (k + 2) * U32 * (np.abs(x).astype(np.float64) @ np.abs(w) + np.abs(b))
    assert np.all(np.abs(y - exact) <= bound)
    assert y.dtype == np.float32 and y.shape == (t, n)


def test_the_numpy_route_is_matmul_then_the_bias():
    x, w, b = _operands(197, 768, 300)
    expected = np.matmul(x, w)
    expected += b
    assert np.array_equal(_product(Linear(w, b, "numpy"), x), expected)


@packed_only
def test_a_packed_product_is_the_same_on_every_call_thread_and_layout():
    """Same operands, same arithmetic: again, on 4 threads at once, and with x and the output as strided views."""
    x, w, b = _operands(197, 2 * DEPTH + 5, COLUMNS + 7)
    lin = Linear(w, b, "packed")
    first = _product(lin, x)
    assert np.array_equal(_product(lin, x), first)
    with ThreadPoolExecutor(4) as pool:
        assert all(np.array_equal(y, first) for y in pool.map(lambda _: _product(lin, x), range(8)))
    wide_x = np.zeros((197, x.shape[1] + 9), np.float32)
    wide_x[:, 3 : 3 + x.shape[1]] = x  # x's rows 9 floats apart from each other's ends
    wide_out = np.full((197, w.shape[1] + 5), np.nan, np.float32)
    lin(wide_x[:, 3 : 3 + x.shape[1]], wide_out[:, 2 : 2 + w.shape[1]], scratch(197))
    assert np.array_equal(wide_out[:, 2 : 2 + w.shape[1]], first)
    assert np.isnan(wide_out[:, :2]).all() and np.isnan(wide_out[:, 2 + w.shape[1] :]).all()  # nothing else written


@packed_only
def test_a_packed_product_refuses_operands_of_other_shapes():
    x, w, b = _operands(5, 40, 30)
    lin = Linear(w, b, "packed")
    with pytest.raises(ValueError, match=r"a packed product of \(40, 30\) got x \(5, 41\)"):
        lin(np.zeros((5, 41), np.float32), np.empty((5, 30), np.float32), scratch(5))
    with pytest.raises(ValueError, match="the work space holds"):
        lin(x, np.empty((5, 30), np.float32), scratch(4))


@packed_only
def test_the_check_catches_a_wrong_panel_layout():
    """Weights packed by another processor's copy routine (another panel layout) for this one's kernel must fail the
    check that decides the route; OpenBLAS's DYNAMIC_ARCH build exports several cores' routines."""
    here = gemm._routines()
    assert gemm._self_check(here) == ""
    path = next(i["filepath"] for i in threadpool_info() if i.get("internal_api") == "openblas")
    lib, failed = ctypes.CDLL(path), {}
    for core in {"HASWELL", "SANDYBRIDGE", "NEHALEM", "SKYLAKEX"} - {here.core}:
        try:
            other = gemm._Routines(lib, core)
        except AttributeError:
            continue
        mixed = copy.copy(here)
        mixed.itcopy = other.itcopy
        failed[core] = gemm._self_check(mixed)
    assert any(failed.values()), failed  # some layouts coincide (e.g. SkylakeX's and Sandybridge's), not all
    assert all(why.startswith("y[") and "float64 gives" in why for why in failed.values() if why)


@pytest.fixture
def fresh_route():
    """gemm_route decided anew under the test's environment, and again after it."""
    gemm_route.cache_clear()
    yield
    gemm_route.cache_clear()


def test_qkweights_gemm_chooses_the_route(fresh_route, monkeypatch):
    monkeypatch.setenv("QKWEIGHTS_GEMM", "numpy")
    assert gemm_route() == "numpy"
    gemm_route.cache_clear()
    monkeypatch.setenv("QKWEIGHTS_GEMM", "fast")
    with pytest.raises(InputError, match="QKWEIGHTS_GEMM='fast' is not a GEMM route; set it to auto or numpy"):
        gemm_route()


def test_a_failed_check_warns_and_falls_back_to_numpy(fresh_route, monkeypatch):
    monkeypatch.delenv("QKWEIGHTS_GEMM", raising=False)
    monkeypatch.setattr(gemm, "_openblas", lambda: (object(), ""))
    monkeypatch.setattr(gemm, "_self_check", lambda routines: "y[0, 0] = 1.0, float64 gives 2.0")
    with pytest.warns(QkWarning, match=r"OpenBLAS's packed GEMM failed its check \(y\[0, 0\] = 1.0"):
        assert gemm_route() == "numpy"


def test_another_platform_has_no_packed_route(monkeypatch):
    monkeypatch.setattr(gemm.platform, "machine", lambda: "aarch64")
    assert gemm._openblas() == (None, "the packed route is built for x86-64, this is aarch64")


@packed_only
def test_a_kernel_without_exported_routines_falls_back_to_numpy():
    """OPENBLAS_CORETYPE=Prescott runs OpenBLAS's Katmai kernels, whose routines this build does not export (where
    it does, the route is packed and checked like any other)."""
    code = "from qkweights.vision import gemm; print(gemm.gemm_route(), gemm._openblas()[0] is None)"
    env = {"OPENBLAS_CORETYPE": "Prescott", "PATH": "", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() in (["numpy", "True"], ["packed", "False"])


@packed_only
@pytest.mark.numerics
@pytest.mark.parametrize("name", ["dinov2-swiglu", "timm-beit"])
def test_the_two_routes_give_the_same_forward_within_float32_error(name):
    """The packed and the numpy route differ only in the order of each layer's sums."""
    model = open_vision_model(str(MODELS / name))
    pixels = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    packed = forward(model.weights, pixels)
    plain = forward(vit_weights(model.checkpoint, route="numpy"), pixels)
    for a, b in zip(packed.hidden_states, plain.hidden_states):
        # float32 sums of at most F = 4·D products per layer: ≲ 1e-5 relative per layer, grown over the few layers
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
