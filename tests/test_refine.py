"""Code sweep and grid refit (numerics/refine.py) against plain numpy references."""

import numpy as np
import pytest

from fq_tvm.numerics import HessianStat, effective_weight, get_scheme, gptq, output_error, quantize_layer
from fq_tvm.numerics.refine import code_sweep, expand, grid_refit, objective, refine


def _problem(R=24, C=150, rows=600, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((R, C))
    X = rng.standard_t(4, (rows, C)) @ (np.eye(C) + 0.3 * rng.standard_normal((C, C)))
    return W, X.T @ X / rows


def _sweep_reference(C, H, codes, s, z, maxq):
    """Column by column, the exact one-dimensional minimiser over the grid levels, no batching."""
    codes = codes.astype(np.float64).copy()
    for j in range(C.shape[1]):
        for i in range(C.shape[0]):
            levels = (np.arange(maxq + 1) - z[i, j]) * s[i, j]
            best = None
            for q, v in enumerate(levels):
                trial = (codes[i] - z[i]) * s[i]
                trial[j] = v
                e = C[i] - trial
                f = e @ H @ e
                if best is None or f < best[0] - 1e-12:
                    best = (f, q)
            codes[i, j] = best[1]
    return codes.astype(np.uint8)


@pytest.mark.parametrize("group_size", [None, 64])
def test_code_sweep_is_exact_coordinate_descent(group_size):
    W, H = _problem(R=6, C=130)
    cfg = get_scheme("gptq2", group_size=group_size)
    codes, scale, zero = gptq(W, H, cfg)
    s, z = expand(scale, zero, W.shape[1], group_size)
    got = code_sweep(W, H, codes, s, z, cfg.maxq)
    np.testing.assert_array_equal(got, _sweep_reference(W, H, codes, s, z, cfg.maxq))
    assert objective(W, (got - z) * s, H).sum() <= objective(W, (codes - z) * s, H).sum()


def test_grid_refit_is_the_row_least_squares():
    W, H = _problem()
    cfg = get_scheme("fq2r1")
    codes, scale, zero = gptq(W, H, cfg)
    s_new, z_new = grid_refit(W, H, codes, scale, zero)
    L = np.linalg.cholesky(H)
    for i in range(len(W)):
        A = np.stack([codes[i].astype(np.float64), np.ones(W.shape[1])], axis=1)
        a, b = np.linalg.lstsq(L.T @ A, L.T @ W[i], rcond=None)[0]
        np.testing.assert_allclose([s_new[i, 0], -s_new[i, 0] * z_new[i, 0]], [a, b], rtol=1e-5, atol=1e-6)
    before = objective(W, (codes - zero) * scale, H)
    after = objective(W, (codes - z_new) * s_new, H)
    assert np.all(after <= before)


@pytest.mark.parametrize("scheme", ["fq2", "gptq2", "fq2r1"])
def test_refine_lowers_the_layer_error(scheme):
    W, H = _problem(R=64, C=64, rows=2000, seed=1)
    plain = quantize_layer("l", W, H, scheme)
    refined = quantize_layer("l", W, H, get_scheme(scheme, refine=2))
    assert output_error(W, effective_weight(refined), H) < output_error(W, effective_weight(plain), H)


def test_refine_rounds_never_raise_the_objective():
    W, H = _problem(seed=2)
    cfg = get_scheme("gptq2")
    codes, scale, zero = gptq(W, H, cfg)
    last = objective(W, (codes - zero) * scale, H).sum()
    for _ in range(3):
        codes, scale, zero = refine(W, H, codes, scale, zero, cfg.maxq, None, 1)
        now = objective(W, (codes - zero) * scale, H).sum()
        assert now <= last * (1 + 1e-9)
        last = now


def test_guard_candidates_are_refined():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 64))
    X = rng.standard_t(4, (1500, 64))
    held = np.arange(len(X)) % 5 == 4
    stat = HessianStat(X.T @ X, len(X), X[held].T @ X[held], float(held.sum()))
    plain = quantize_layer("l", W, stat, "fq2").guard["held_out_err"]
    refined = quantize_layer("l", W, stat, get_scheme("fq2", refine=2)).guard["held_out_err"]
    assert refined["rtn"] == plain["rtn"]  # RTN is the untouched baseline
    assert refined["gptq damp 0.01"] < plain["gptq damp 0.01"]


def test_refine_must_be_a_count():
    with pytest.raises(ValueError, match="refine"):
        get_scheme("fq2", refine=-1)
