import numpy as np
import pytest

from fq_tvm.numerics.gptq import gptq, inverse_hessian_factor, tril_inverse
from fq_tvm.numerics.quantize import QuantConfig


def _grid_reference(w, cfg):
    """Per-row grid, written out plainly (float32-rounded like the stored grid)."""
    maxq = 2**cfg.bits - 1
    scale, zero = np.zeros(len(w)), np.zeros(len(w))
    for r, row in enumerate(w):
        if cfg.clip_sigma is not None:
            mean = row.mean()
            std = np.sqrt(np.mean((row - mean) ** 2))
            scale[r] = np.float32(2 * cfg.clip_sigma * std / maxq)
            zero[r] = np.float32(maxq / 2 - mean / scale[r])
        else:
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            scale[r] = np.float32((hi - lo) / maxq)
            zero[r] = np.rint(-lo / scale[r])
    return scale, zero


def gptq_reference(W, H, cfg):
    """Textbook GPTQ in float64: explicit inverse, upper Cholesky, one column at a time, no lazy
    blocks; group grids from the current columns when the group starts."""
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    n = H.shape[0]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += cfg.percdamp * np.mean(np.diag(H)) * np.eye(n)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    maxq = 2**cfg.bits - 1
    gs = n if cfg.group_size is None else cfg.group_size
    codes = np.zeros(W.shape, dtype=np.uint8)
    scales, zeros = [], []
    for j in range(n):
        if j % gs == 0:
            s, z = _grid_reference(W[:, j : j + gs], cfg)
            scales.append(s)
            zeros.append(z)
        q = np.clip(np.rint(W[:, j] / s + z), 0, maxq)
        codes[:, j] = q
        err = (W[:, j] - (q - z) * s) / U[j, j]
        W[:, j + 1 :] -= np.outer(err, U[j, j + 1 :])
    return codes, np.stack(scales, 1), np.stack(zeros, 1)


def _layer(seed, N=24, K=96, S=400):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((S, K)) @ rng.standard_normal((K, K))
    W = rng.standard_normal((N, K))
    return W, X.T @ X


@pytest.mark.parametrize(
    "cfg",
    [
        QuantConfig(method="gptq", bits=2, block_size=32),
        QuantConfig(method="gptq", bits=3, block_size=32),
        QuantConfig(method="gptq", bits=4, block_size=128),
        QuantConfig(method="gptq", bits=2, group_size=24, block_size=32),
        QuantConfig(method="gptq", bits=2, group_size=40, block_size=16),
        QuantConfig(method="gptq", bits=2, clip_sigma=2.0, block_size=32),
        QuantConfig(method="gptq", bits=2, clip_sigma=2.0, group_size=48, block_size=32),
    ],
    ids=["b2", "b3", "b4", "g24", "g40-bs16", "sigma", "sigma-g48"],
)
def test_gptq_matches_reference(cfg):
    for seed in range(3):
        W, H = _layer(seed)
        codes, scale, zero = gptq(W, H, cfg)
        ref_codes, ref_scale, ref_zero = gptq_reference(W, H, cfg)
        assert np.array_equal(codes, ref_codes)
        assert np.allclose(scale, ref_scale, rtol=1e-12) and np.allclose(zero, ref_zero, rtol=1e-12)


def test_dead_columns():
    W, H = _layer(0, K=32)
    H[5, :] = H[:, 5] = 0
    H[9, :] = H[:, 9] = 0
    cfg = QuantConfig(method="gptq", bits=4)
    codes, scale, zero = gptq(W, H, cfg)
    ref = gptq_reference(W, H, cfg)
    assert np.array_equal(codes, ref[0])
    deq = (codes[:, [5, 9]] - zero) * scale
    assert np.all(np.abs(deq) <= scale / 2 + 1e-12)  # a dead column is quantised as zero


def test_gptq_beats_rtn_on_its_objective():
    from fq_tvm.numerics.quantize import dequantize_groups, rtn

    W, H = _layer(1, N=32, K=128)
    cfg = QuantConfig(method="gptq", bits=2)
    loss = {}
    for name, out in (("gptq", gptq(W, H, cfg)), ("rtn", rtn(W, cfg))):
        E = dequantize_groups(out[0], out[1], out[2], None) - W
        loss[name] = np.trace(E @ H @ E.T)
    assert loss["gptq"] < 0.7 * loss["rtn"]


def test_inverse_hessian_factor():
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 65, 300):
        A = rng.standard_normal((n + 5, n))
        H = A.T @ A
        U = inverse_hessian_factor(H, 0.01)
        Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(n)
        assert np.allclose(U, np.triu(U))
        assert np.allclose(U.T @ U, np.linalg.inv(Hd), rtol=1e-9, atol=1e-12 * np.abs(np.linalg.inv(Hd)).max())
        L = np.linalg.cholesky(Hd)
        assert np.allclose(tril_inverse(L) @ L, np.eye(n), atol=1e-10)


def test_singular_hessian_gets_more_damping():
    H = np.ones((8, 8))  # rank one, and percdamp 0 makes it singular
    U = inverse_hessian_factor(H, 0.0)
    assert np.all(np.isfinite(U)) and np.allclose(U, np.triu(U))
