"""Closed-form row gains (numerics/denoise.py) against a brute-force least-squares solve, and the
guard keeping them only when they lower the held-out error."""

import numpy as np
import pytest

from fq_tvm.numerics import HessianStat, effective_weight, get_scheme, output_error, quantize_layer
from fq_tvm.numerics.denoise import denoised, row_gains


def _layer(N, K, rows, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((N, K))
    X = rng.standard_t(4, (rows, K)) @ (np.eye(K) + 0.3 * rng.standard_normal((K, K)))
    return W, X


def _brute_gains(record, W, H):
    """argmin_a tr(E H E^T), E = W - R^T diag(a) M, by least squares on the vectorised error:
    column j of the system is vec(R^T e_j m_j H^(1/2))."""
    M = effective_weight_rows(record)
    R = record.output_transform().matrix()  # [N_p, N]
    L = np.linalg.cholesky(H + 1e-12 * np.eye(len(H)))
    cols = [np.outer(R[j], M[j] @ L).ravel() for j in range(len(M))]
    return np.linalg.lstsq(np.stack(cols, axis=1), (W @ L).ravel(), rcond=None)[0]


def effective_weight_rows(record):
    from fq_tvm.numerics import dequantize

    return record.input_transform().adjoint(dequantize(record).astype(np.float64))


@pytest.mark.parametrize("scheme,N", [("fq2", 64), ("fq2", 40), ("gptq2", 48), ("fq2r1", 100)])
def test_gains_are_the_least_squares_solution(scheme, N):
    """N = 40 and 100 pad the output Hadamard (to 64 and 128): gains couple through R R^T."""
    W, X = _layer(N, 64, 400)
    H = X.T @ X / len(X)
    record = quantize_layer("l", W, H, scheme)
    gains = row_gains(record, W, H)
    np.testing.assert_allclose(gains, _brute_gains(record, W, H), rtol=1e-6, atol=1e-9)
    before = output_error(W, effective_weight(record), H)
    after = output_error(W, effective_weight(denoised(record, W, H)), H)
    assert after < before  # in-sample the fitted gains can only help


def test_guard_keeps_gains_only_when_held_out_error_falls():
    W, X = _layer(64, 64, 2000, seed=1)
    held = np.arange(len(X)) % 5 == 4
    stat = HessianStat(X.T @ X, len(X), X[held].T @ X[held], float(held.sum()))
    record = quantize_layer("l", W, stat, get_scheme("fq2", denoise=True))
    guard = record.guard
    labels = list(guard["held_out_err"])
    trial = next(label for label in labels if label.endswith("+ denoise"))
    base = trial.removesuffix(" + denoise")
    kept = guard["held_out_err"][trial] < guard["held_out_err"][base]
    assert guard["chosen"] == (trial if kept else base)
    plain = quantize_layer("l", W, stat, get_scheme("fq2"))
    np.testing.assert_array_equal(record.packed, plain.packed)  # codes stay, only scales move
    if kept:
        H = stat.hessian()
        np.testing.assert_allclose(record.scale[:, 0] / plain.scale[:, 0], row_gains(plain, W, H), rtol=1e-6)
    else:
        np.testing.assert_array_equal(record.scale, plain.scale)
