"""The forward pass's linear layers, ``y = x W + b`` for a fixed weight W, with W packed once where numpy's BLAS
allows it.

A BLAS GEMM copies its weight operand into the kernel's panel layout on every call. The per-image forward calls
each linear layer with one image's 197 rows, so that copy is shared by 197 rows instead of a batch's thousands:
about 10% of the GEMMs' time (measured, ``bench/bench_forward.py``). Where numpy's BLAS is a DYNAMIC_ARCH OpenBLAS
(numpy's own wheels), :class:`Linear` packs W once, at load, with that library's own copy routine for the
processor it runs (``sgemm_itcopy_<CORE>``), and a product packs only x (``sgemm_oncopy_<CORE>``) and runs the
kernel (``sgemm_kernel_<CORE>``): the routines OpenBLAS's own ``sgemm`` runs, bound through ctypes. They are
internal to OpenBLAS, so the route is taken only after a product of it passes a check against float64 at first
use (:func:`gemm_route`); everywhere else (another BLAS, another processor family, a failed check,
``QKWEIGHTS_GEMM=numpy``) a product is ``np.matmul``. Which route ran is part of a sweep's kernel provenance: the
two round differently in the last digits, each the same on every call.

OpenBLAS computes column-major ``Cᵀ = Wᵀ xᵀ``: W is cut in blocks of ``DEPTH`` rows (the K of the kernel) and
``COLUMNS`` columns, each block packed once; a product packs x's columns of each depth block once and adds each
block's product into y, which starts as the bias.
"""

from __future__ import annotations

import ctypes
import os
import platform
import warnings
from functools import cache

import numpy as np

from qkweights.errors import InputError, QkWarning

DEPTH = 384  # rows of W per packed block (OpenBLAS's own sgemm depth block on its x86-64 kernels is 256-512)
COLUMNS = 768  # columns of W per packed block
_SLACK = 1024  # floats after a packed buffer: the kernels read a little past the data they use
ROUTES = ("packed", "numpy")


class _Routines:
    """numpy's OpenBLAS copy and kernel routines for the processor it runs on, bound through ctypes (they release
    the GIL while they run)."""

    def __init__(self, lib: ctypes.CDLL, core: str):
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        self.core = core
        self.itcopy, self.oncopy, self.kernel = (
            getattr(lib, f"sgemm_{name}_{core}") for name in ("itcopy", "oncopy", "kernel")
        )
        self.itcopy.argtypes = self.oncopy.argtypes = [i64, i64, ptr, i64, ptr]
        self.kernel.argtypes = [i64, i64, i64, f32, ptr, ptr, ptr, i64]
        self.itcopy.restype = self.oncopy.restype = self.kernel.restype = ctypes.c_int


def _openblas() -> tuple[_Routines | None, str]:
    """numpy's OpenBLAS routines, or None and why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the packed route is built for x86-64, this is {platform.machine()}"
    from threadpoolctl import threadpool_info

    path = next((i["filepath"] for i in threadpool_info() if i.get("internal_api") == "openblas"), None)
    if path is None:
        return None, "numpy's BLAS is not OpenBLAS"
    try:
        lib = ctypes.CDLL(path)
        lib.gotoblas_corename.restype = ctypes.c_char_p
        core = lib.gotoblas_corename().decode().upper()
        return _Routines(lib, core), ""
    except (OSError, AttributeError) as e:
        return None, f"numpy's OpenBLAS does not export its kernel routines ({e})"


@cache
def gemm_route() -> str:
    """How this process multiplies by a weight: "packed" (OpenBLAS's routines on weights packed once) or "numpy"
    (``np.matmul``). Decided once: ``QKWEIGHTS_GEMM`` ("numpy" forces np.matmul; "auto" or unset chooses), then
    whether numpy's OpenBLAS exports the routines and a product of them with tails in every dimension agrees with
    float64 within float32's error bound; a failed check warns and falls back to numpy."""
    asked = os.environ.get("QKWEIGHTS_GEMM", "auto").strip().lower() or "auto"
    if asked not in ("auto", "numpy"):
        raise InputError(f"QKWEIGHTS_GEMM={asked!r} is not a GEMM route; set it to auto or numpy, or unset it")
    if asked == "numpy":
        return "numpy"
    routines, why = _openblas()
    if routines is None:
        return "numpy"
    error = _self_check(routines)
    if error:
        warnings.warn(f"OpenBLAS's packed GEMM failed its check ({error}); using np.matmul", QkWarning, stacklevel=2)
        return "numpy"
    return "packed"


@cache
def _routines() -> _Routines:
    routines, why = _openblas()
    if routines is None:
        raise RuntimeError(why)
    return routines


def _self_check(routines: _Routines) -> str:
    """What is wrong with a packed product, or "" when it agrees with float64 within float32's error bound. The
    shapes have tails in every dimension: depth and column blocks cut short, rows not a multiple of any kernel's
    unroll."""
    rng = np.random.default_rng(15)
    rows, k, n = 37, DEPTH + 77, COLUMNS + 45
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    try:
        y = Linear(w, b, "packed", routines)(x, np.empty((rows, n), np.float32), scratch(rows, "packed"))
    except (OSError, ValueError) as e:  # pragma: no cover - a routine missing or faulting
        return str(e)
    exact = x.astype(np.float64) @ w.astype(np.float64) + b
    bound = (k + 2) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w) + np.abs(b))  # γ_{K+1} |x||w| + |b|
    bad = ~(np.abs(y - exact) <= bound)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        return f"y[{i}, {j}] = {y[i, j]:.8g}, float64 gives {exact[i, j]:.8g}"
    return ""


def _aligned(n: int) -> np.ndarray:
    """n float32 (and _SLACK more) starting on a 4096-byte boundary."""
    raw = np.zeros(n + _SLACK + 1024, np.float32)
    start = (-raw.ctypes.data % 4096) // 4
    return raw[start : start + n + _SLACK]


def scratch(rows: int, route: str | None = None) -> np.ndarray:
    """Work space of one thread for products of up to ``rows`` rows (x packed, one depth block at a time); empty on
    the numpy route. ``route``: the route (default: :func:`gemm_route`)."""
    return _aligned(DEPTH * rows) if (route or gemm_route()) == "packed" else np.empty(0, np.float32)


class Linear:
    """``y = x @ weight + bias`` for a fixed float32 weight (I, O) and bias (O,): one linear layer.

    On the "packed" route (:func:`gemm_route`) the weight is kept only as OpenBLAS's packed blocks (as much memory as
    the matrix); on the "numpy" route as the C-contiguous matrix. ``route``: force one ("packed" needs numpy's
    OpenBLAS to export the routines). Either way a product of given operands is the same on every call, whatever
    the thread.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, route: str | None = None, routines=None):
        weight = np.ascontiguousarray(weight, np.float32)
        self.shape = weight.shape  # (I, O)
        self.bias = np.ascontiguousarray(bias, np.float32)
        self.route = route or gemm_route()
        if self.route not in ROUTES:
            raise ValueError(f"route {self.route!r} is not one of {ROUTES}")
        self.weight = None
        self._blocks: list = []
        if self.route == "numpy":
            self.weight = weight
            return
        self._fn = routines or _routines()
        k, n = weight.shape
        for ls in range(0, k, DEPTH):
            depth, panels = min(DEPTH, k - ls), []
            for i in range(0, n, COLUMNS):
                cols = min(COLUMNS, n - i)
                packed = _aligned(depth * cols)
                self._fn.itcopy(depth, cols, weight.ctypes.data + 4 * (i + ls * n), n, packed.ctypes.data)
                panels.append((4 * i, cols, packed, packed.ctypes.data))
            self._blocks.append((4 * ls, depth, panels))

    def __call__(self, x: np.ndarray, out: np.ndarray, work: np.ndarray) -> np.ndarray:
        """out (T, O) = x (T, I) @ weight + bias. x and out: float32 with unit column stride (rows may be strided);
        work: :func:`scratch` for at least T rows."""
        if self.weight is not None:
            np.matmul(x, self.weight, out=out)
            out += self.bias
            return out
        t, k = x.shape
        if (k, out.shape[1]) != self.shape or len(out) != t or x.strides[1] != 4 or out.strides[1] != 4:
            raise ValueError(f"a packed product of {self.shape} got x {x.shape}, out {out.shape}")
        if work.size < DEPTH * t + _SLACK:
            raise ValueError(f"the work space holds {work.size} floats, {DEPTH * t + _SLACK} are needed")
        np.copyto(out, self.bias)  # the kernel adds its product to out
        fn, xp, op, wp = self._fn, x.ctypes.data, out.ctypes.data, work.ctypes.data
        xld, old = x.strides[0] // 4, out.strides[0] // 4
        for ls, depth, panels in self._blocks:
            fn.oncopy(depth, t, xp + ls, xld, wp)
            for i, cols, _, pp in panels:
                fn.kernel(cols, t, depth, 1.0, pp, wp, op + i, old)
        return out
