"""Refining GPTQ's codes and grid after the fact: coordinate descent on the layer objective.

GPTQ visits each column once and never revisits a code once later columns have moved. Given its
result (codes q, per-row scale s and zero z, dequantized C_hat = (q - z) s), two exact steps each
lower the objective f = tr((C - C_hat) H (C - C_hat)^T) (H: the Hessian in the domain where C is
quantized, damped as for GPTQ):

* **Code sweep** (cyclic coordinate descent, as in QuantEase, Behdin et al. 2023): with
  P = (C - C_hat) H, the best value of column j with the others fixed is C_hat_j + P_j / H_jj; its
  nearest grid level (clamped) is the best code of that one-dimensional quadratic. All rows at
  once; columns in order, P updated lazily per block of BLOCK columns (one matmul per block).
* **Grid refit** (per-row grids only): with the codes fixed, row i's (s, z) is a 2-parameter least
  squares in the H metric, C_hat_i = a q_i + b (a = s, b = -s z); kept only where a > 0 and the
  row's error falls (float32 rounding included).

`refine` alternates them `sweeps` times (refit, then a code sweep). Cost per sweep about one GPTQ
column pass (O(N C^2)) without the Cholesky.
"""

from __future__ import annotations

import numpy as np

BLOCK = 64  # columns per lazy update of P


def _f32(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def expand(scale: np.ndarray, zero: np.ndarray, ncols: int, group_size: int | None):
    """Per-column scale and zero [R, C] from per-group [R, G]."""
    gs = ncols if group_size is None else group_size
    idx = np.arange(ncols) // gs
    return scale[:, idx], zero[:, idx]


def objective(C: np.ndarray, C_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Per row (C - C_hat) H (C - C_hat)^T, float64 [R]."""
    E = C - C_hat
    return np.einsum("ij,ij->i", E @ H, E)


def code_sweep(C, H, codes, s_col, z_col, maxq):
    """One cyclic coordinate-descent pass over the columns; returns new codes (uint8 [R, C])."""
    codes = codes.copy()
    C_hat = (codes - z_col) * s_col
    P = (C - C_hat) @ H
    d = np.diag(H)
    ncols = C.shape[1]
    for a in range(0, ncols, BLOCK):
        b = min(a + BLOCK, ncols)
        local = P[:, a:b].copy()
        delta = np.zeros((C.shape[0], b - a))
        for j in range(a, b):
            if d[j] <= 0:
                continue
            target = C_hat[:, j] + local[:, j - a] / d[j]
            q = np.clip(np.rint(target / s_col[:, j] + z_col[:, j]), 0, maxq)
            new = (q - z_col[:, j]) * s_col[:, j]
            step = new - C_hat[:, j]
            codes[:, j], C_hat[:, j] = q, new
            delta[:, j - a] = step
            local[:, j - a + 1 :] -= np.outer(step, H[j, j + 1 : b])
        P -= delta @ H[a:b]
    return codes


def grid_refit(C, H, codes, scale, zero):
    """Per-row least-squares (scale, zero) for fixed codes; rows that would not improve keep theirs."""
    q = codes.astype(np.float64)
    ones = np.ones(C.shape[1])
    qH, h1 = q @ H, H @ ones
    a11 = np.einsum("ij,ij->i", qH, q)
    a12 = qH @ ones
    a22 = float(ones @ h1)
    r1 = np.einsum("ij,ij->i", qH, C)
    r2 = C @ h1
    det = a11 * a22 - a12 * a12
    ok = det > 1e-12 * np.maximum(a11 * a22, 1e-300)
    det = np.where(ok, det, 1.0)
    a = (r1 * a22 - a12 * r2) / det
    b = (a11 * r2 - a12 * r1) / det
    ok &= a > 0
    s_new = _f32(np.where(ok, a, scale[:, 0]))
    z_new = _f32(np.where(ok, -b / np.where(ok, a, 1.0), zero[:, 0]))
    old = objective(C, (q - zero) * scale, H)
    new = objective(C, (q - z_new[:, None]) * s_new[:, None], H)
    better = ok & (new < old)
    return np.where(better, s_new, scale[:, 0])[:, None], np.where(better, z_new, zero[:, 0])[:, None]


def refine(C, H, codes, scale, zero, maxq: int, group_size: int | None, sweeps: int, percdamp: float = 0.0):
    """(codes, scale, zero) after `sweeps` rounds of grid refit (per-row grids) and a code sweep,
    on H damped by percdamp x its mean diagonal (GPTQ's convention). float64 scale/zero [R, G]."""
    C = np.asarray(C, dtype=np.float64)
    H = np.array(H, dtype=np.float64)
    H[np.diag_indices_from(H)] += percdamp * float(np.mean(np.diag(H)))
    scale, zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    per_row = group_size is None or group_size >= C.shape[1]
    for _ in range(sweeps):
        if per_row:
            scale, zero = grid_refit(C, H, codes, scale, zero)
        s_col, z_col = expand(scale, zero, C.shape[1], group_size)
        codes = code_sweep(C, H, codes, s_col, z_col, maxq)
    return codes, scale, zero
