"""Closed-form denoising of the reconstruction: one gain per stored row.

A record applies W_hat = R^T diag(a) M with M = dequant(C) T_K (the stored rows pulled back
through the input transforms, N_p x K) and R the output Hadamard (identity without one); a = 1 is
the plain frame reconstruction. The paper notes that for a tight (fusion) frame with noise
independent of the signal the least-mean-square linear estimate is the reconstruction shrunk by a
closed-form (Wiener) gain. We fit that gain per stored row on the calibration data instead of
assuming a noise model: `a` minimises the output error tr(E H E^T), E = W - W_hat, a quadratic:

    (G o S) a = b,   G = M H M^T,   S = R R^T,   b_j = (R W H M^T)_jj

(o: elementwise). Without output padding S = I and a_j = b_j / G_jj. The gain folds into row j's
stored scales (codes and zeros stay), so records, artifacts and kernels do not change.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .record import QuantizedLinear, dequantize


def row_gains(record: QuantizedLinear, W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """float64 [N_p]: the gains a minimising tr(E H E^T) (1 for rows whose reconstruction is 0)."""
    M = record.input_transform().adjoint(dequantize(record).astype(np.float64))  # [N_p, K]
    out = record.output_transform()
    MH = M @ np.asarray(H, dtype=np.float64)
    b = np.einsum("ij,ij->i", out.apply_rows(np.asarray(W, dtype=np.float64)), MH)
    g = np.einsum("ij,ij->i", M, MH)
    live = g > 1e-12 * max(float(g.max(initial=0.0)), 1e-300)
    if out.out_dim == out.in_dim:  # R orthogonal: rows decouple
        return np.where(live, b / np.where(live, g, 1.0), 1.0)
    S = out.apply_rows(out.adjoint_rows(np.eye(out.out_dim)))  # R R^T, a projector when padded
    A = (MH @ M.T) * S
    gains = np.ones(len(b))
    gains[live] = np.linalg.lstsq(A[np.ix_(live, live)], b[live] - A[np.ix_(live, ~live)] @ gains[~live],
                                  rcond=None)[0]
    return gains


def denoised(record: QuantizedLinear, W: np.ndarray, H: np.ndarray) -> QuantizedLinear:
    """The record with row j's scales multiplied by its gain (row_gains), rounded to float32."""
    gains = row_gains(record, W, H)
    return replace(record, scale=(record.scale.astype(np.float64) * gains[:, None]).astype(np.float32))
