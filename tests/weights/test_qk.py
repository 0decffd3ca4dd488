"""The QR-core SVD against the paper's dense SVD, and the statistics' identities."""

import numpy as np
import pytest

from qkweights.weights.qk import degenerate_blocks, head_stats, null_band, qk_svd


def dense_reference(wq, wk):
    """The paper's method: full SVD of the D×D product (first K modes), same sign convention."""
    u, s, vt = np.linalg.svd(wq.T @ wk)
    k = wq.shape[0]
    u, v, s = u[:, :k], vt[:k].T, s[:k]
    idx = np.argmax(np.abs(u), axis=0)
    sign = np.sign(u[idx, np.arange(k)])
    return u * sign, s, v * sign


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.numerics
def test_matches_dense_svd(dtype):
    rng = np.random.default_rng(1)
    wq = rng.standard_normal((3, 16, 96)).astype(dtype)
    wk = (0.5 * rng.standard_normal((3, 16, 96)) + 0.3 * wq).astype(dtype)
    u, s, v = qk_svd(wq, wk)
    st = head_stats(u, s, v, wq, wk)
    for h in range(3):
        ur, sr, vr = dense_reference(wq[h].astype(np.float64), wk[h].astype(np.float64))
        np.testing.assert_allclose(s[h], sr, rtol=1e-9)
        np.testing.assert_allclose(st.cosines[h], np.sum(ur * vr, 0), atol=1e-8)
        np.testing.assert_allclose(np.abs(u[h].T @ ur), np.eye(16), atol=1e-7)  # same directions
    # Σ σ_n cos_n = ⟨W_q, W_k⟩_F (method.md §2), independently computed from the weights
    np.testing.assert_allclose((s * st.cosines).sum(-1), st.trace, rtol=1e-10)


@pytest.mark.numerics
def test_reconstructs_product_and_is_orthonormal():
    rng = np.random.default_rng(2)
    wq, wk = rng.standard_normal((2, 8, 40)), rng.standard_normal((2, 8, 40))
    u, s, v = qk_svd(wq, wk)
    for h in range(2):
        np.testing.assert_allclose(u[h] @ np.diag(s[h]) @ v[h].T, wq[h].T @ wk[h], atol=1e-12)
        np.testing.assert_allclose(u[h].T @ u[h], np.eye(8), atol=1e-12)
        np.testing.assert_allclose(v[h].T @ v[h], np.eye(8), atol=1e-12)
    assert np.all(np.diff(s, axis=-1) <= 0)


def test_sign_convention_is_deterministic():
    rng = np.random.default_rng(3)
    wq, wk = rng.standard_normal((1, 4, 10)), rng.standard_normal((1, 4, 10))
    u, s, v = qk_svd(wq, wk)
    idx = np.argmax(np.abs(u[0]), axis=0)
    assert np.all(u[0][idx, np.arange(4)] > 0)
    # Basis invariance (method.md §1): W_q -> Aᵀ W_q, W_k -> A⁻¹ W_k leaves U, S, V unchanged.
    a = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    u2, s2, v2 = qk_svd(a.T @ wq[0], np.linalg.solve(a, wk[0]))
    np.testing.assert_allclose(s2, s[0], rtol=1e-10)
    np.testing.assert_allclose(u2, u[0], atol=1e-9)
    np.testing.assert_allclose(v2, v[0], atol=1e-9)


@pytest.mark.numerics
def test_hand_computed_heads():
    # W_k = W_q: the product is W_qᵀW_q (symmetric PSD), so u_n = v_n and every cosine is exactly 1.
    rng = np.random.default_rng(4)
    wq = rng.standard_normal((1, 4, 12))
    st = head_stats(*qk_svd(wq, wq), wq, wq)
    np.testing.assert_allclose(st.cosines, 1.0, atol=1e-12)
    assert st.weighted[0] == pytest.approx(1.0, abs=1e-12)
    # W_k = -W_q: every cosine is -1.
    st = head_stats(*qk_svd(wq, -wq), wq, -wq)
    np.testing.assert_allclose(st.cosines, -1.0, atol=1e-12)
    # Orthogonal query and key spaces: W_q on coordinates 0-3, W_k on 4-7 → all cosines 0, trace 0.
    wq = np.zeros((1, 4, 8))
    wk = np.zeros((1, 4, 8))
    wq[0, :, :4] = np.diag([4.0, 3, 2, 1])
    wk[0, :, 4:] = np.eye(4)
    u, s, v = qk_svd(wq, wk)
    st = head_stats(u, s, v, wq, wk)
    np.testing.assert_allclose(s[0], [4, 3, 2, 1], rtol=1e-14)
    np.testing.assert_allclose(st.cosines, 0.0, atol=1e-14)
    assert st.trace[0] == 0.0
    # effective rank: exp(entropy of [.4 .3 .2 .1])
    p = np.array([4, 3, 2, 1]) / 10
    assert st.effective_rank[0] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_degenerate_blocks_flagged_with_block_sums():
    # W_q = I (4 modes, σ = 1 each): every σ ties, the block's cosine sum is trace(W_k restricted) = 2.
    wq = np.zeros((1, 4, 6))
    wq[0, :, :4] = np.eye(4)
    wk = np.zeros((1, 4, 6))
    wk[0, :, :4] = np.diag([1.0, 1, -1, 1])  # σ all 1, cos ±1 inside the block
    u, s, v = qk_svd(wq, wk)
    st = head_stats(u, s, v, wq, wk)
    blocks = degenerate_blocks(s[0], st.cosines[0])
    assert blocks == [{"start": 0, "stop": 4, "sigma": pytest.approx(1.0), "cos_sum": pytest.approx(2.0)}]
    assert degenerate_blocks(np.array([3.0, 2.0, 1.0]), np.zeros(3)) == []


def test_degenerate_blocks_are_relative_to_sigma_0():
    # σ_0 = 1000: a gap of 1e-4 is 1e-7·σ_0 < 1e-6·σ_0, a tie (an absolute 1e-6 tolerance would miss it).
    blocks = degenerate_blocks(np.array([1000.0, 1000.0 - 1e-4, 1.0]), np.array([0.5, 0.25, 1.0]))
    assert blocks == [{"start": 0, "stop": 2, "sigma": 1000.0 - 5e-5, "cos_sum": 0.75}]
    # σ_0 = 1e-9: a gap of 1e-12 is 1e-3·σ_0, no tie (an absolute tolerance would tie everything).
    assert degenerate_blocks(np.array([1e-9, 1e-9 - 1e-12, 5e-10]), np.zeros(3)) == []


def test_degenerate_blocks_exactly_at_the_tolerance():
    # README: runs of σ closer than 1e-6·σ_0 are tied. σ_0 = 1e6 makes the tolerance exactly 1.0 (1e-6 * 1e6 == 1.0
    # in float64), and every σ below is exact: a gap of exactly 1 ties, a gap of 1 + 2⁻²⁰ does not.
    assert 1e-6 * 1e6 == 1.0
    s = np.array([1e6, 1e6 - 1, 1e6 - 2, 1e6 - 3 - 2.0**-20, 1.0])
    blocks = degenerate_blocks(s, np.array([1.0, 0.5, 0.25, 0.0, 0.0]))
    assert blocks == [{"start": 0, "stop": 3, "sigma": 1e6 - 1, "cos_sum": 1.75}]
    assert degenerate_blocks(s, np.zeros(5), rtol=1.5e-6) == [  # tolerance 1.5: the near miss ties too
        {"start": 0, "stop": 4, "sigma": pytest.approx(1e6 - 1.5), "cos_sum": 0.0}
    ]


@pytest.mark.parametrize("c", [1e-4, 1e-2, 1.0, 37.0, 1e4])
@pytest.mark.numerics
def test_scaling_the_weights_keeps_the_blocks(c):
    # σ = [9, 9(1 − 4e-7), 4, 4(1 − 3e-6), 1]: one tie (4e-7·σ_0 apart), one near miss (1.3e-6·σ_0 apart).
    # W_q = diag(√σ) E, W_k = diag(√σ) E (E: rows of the identity) gives W_qᵀW_k = Σ σ_n e_n e_nᵀ, cos_n = 1.
    # Scaling both by c scales every σ by c², and must not change which modes tie.
    sigma = np.array([9.0, 9.0 * (1 - 4e-7), 4.0, 4.0 * (1 - 3e-6), 1.0])
    w = np.zeros((1, 5, 7))
    w[0, :, :5] = np.diag(np.sqrt(sigma))
    u, s, v = qk_svd(c * w, c * w)
    np.testing.assert_allclose(s[0], c * c * sigma, rtol=1e-12)
    blocks = degenerate_blocks(s[0], head_stats(u, s, v, c * w, c * w).cosines[0])
    assert [(b["start"], b["stop"]) for b in blocks] == [(0, 2)]
    assert blocks[0]["sigma"] == pytest.approx(c * c * 9.0 * (1 - 2e-7), rel=1e-12)
    assert blocks[0]["cos_sum"] == pytest.approx(2.0, abs=1e-9)


def test_null_band():
    # 1.96/√768 = 0.070725 (z_0.975 = 1.959964)
    assert null_band(768) == pytest.approx(1.959963984540054 / np.sqrt(768))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20000, 64))
    y = rng.standard_normal((20000, 64))
    c = np.sum(x * y, 1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert np.mean(np.abs(c) < null_band(64)) == pytest.approx(0.95, abs=0.01)
