"""GPTQ (Frantar et al. 2023): column-by-column rounding with error feedback through the upper
Cholesky factor of the damped inverse Hessian, lazily applied in blocks.

Grid parameters: per row, from the whole (dead-column-zeroed) row before GPTQ starts; per group,
from the group's columns as they stand (all earlier feedback applied) when GPTQ reaches the group.
Block boundaries are cut at group starts so that "as they stand" is exact. Clipping happens in
the code clamp and its error is fed back like any rounding error (the reference code clamps W
before GPTQ and so never compensates it; feeding it back measured 25-35% lower output error).
"""

from __future__ import annotations

import numpy as np

from .quantize import QuantConfig, grid_params, quantize_codes


def tril_inverse(L: np.ndarray) -> np.ndarray:
    """Inverse of a lower triangular matrix by recursive 2x2 blocks (matmul-bound):
    inv([[A, 0], [B, C]]) = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]."""
    n = len(L)
    if n <= 64:
        return np.tril(np.linalg.inv(L))
    h = n // 2
    Ai, Ci = tril_inverse(L[:h, :h]), tril_inverse(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h], out[h:, h:] = Ai, Ci
    out[h:, :h] = -Ci @ (L[h:, :h] @ Ai)
    return out


def inverse_hessian_factor(H: np.ndarray, percdamp: float, tries: int = 4) -> np.ndarray:
    """Upper triangular U with U^T U = (H + damp I)^-1, damp = percdamp * mean(diag H).

    With J the reversal, J H J = L L^T gives U = J L^-1 J: one Cholesky and one triangular
    inverse, no explicit inverse. If H is not positive definite the damping grows tenfold."""
    H = np.asarray(H, dtype=np.float64)
    mean_diag = float(np.mean(np.diag(H))) or 1.0
    damp = percdamp * mean_diag
    diag = np.arange(len(H))
    for _ in range(tries):
        Hd = H[::-1, ::-1].copy()
        Hd[diag, diag] += damp
        try:
            L = np.linalg.cholesky(Hd)
        except np.linalg.LinAlgError:
            damp = max(damp * 10.0, 1e-8 * mean_diag)
            continue
        del Hd
        return np.ascontiguousarray(tril_inverse(L)[::-1, ::-1])
    raise np.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp:g}")


def _block_ends(ncols: int, block_size: int, group_size: int | None):
    i1 = 0
    while i1 < ncols:
        i2 = min(i1 + block_size, ncols)
        if group_size is not None:
            i2 = min(i2, (i1 // group_size + 1) * group_size)
        yield i1, i2
        i1 = i2


def gptq(W: np.ndarray, H: np.ndarray, cfg: QuantConfig, percdamp: float | None = None,
         act_order: bool = False):
    """Quantize W [R, C] against the Hessian H [C, C] (any positive scale).
    Returns codes uint8 [R, C], scale and zero float64 [R, G].
    percdamp: overrides cfg.percdamp. act_order: process columns by decreasing H[j, j] (per-row
    grids only: the grid comes from the whole row, so the stored codes just go back to column
    order and records and kernels are unchanged)."""
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    R, C = W.shape
    if H.shape != (C, C):
        raise ValueError(f"Hessian shape {H.shape} does not match {C} columns")
    if act_order:
        if cfg.group_size is not None and cfg.group_size < C:
            raise ValueError("act_order needs a per-row grid (group_size None)")
        perm = np.argsort(-np.diag(H), kind="stable")
        codes, scale, zero = gptq(W[:, perm], H[np.ix_(perm, perm)], cfg, percdamp)
        out = np.empty_like(codes)
        out[:, perm] = codes
        return out, scale, zero
    dead = np.diag(H) == 0
    Wt = np.array(W.T, order="C")  # column j of W is the row Wt[j]
    if dead.any():
        H = H.copy()
        H[dead, dead] = 1.0
        Wt[dead] = 0.0
    U = inverse_hessian_factor(H, cfg.percdamp if percdamp is None else percdamp)
    del H, W
    gs = cfg.group_size
    ngroups = 1 if gs is None else -(-C // gs)
    codes = np.empty((C, R), dtype=np.uint8)
    scale, zero = np.empty((R, ngroups)), np.empty((R, ngroups))
    s = z = None
    if gs is None:
        s, z = grid_params(Wt.T, cfg)
        scale[:, 0], zero[:, 0] = s, z
    for i1, i2 in _block_ends(C, cfg.block_size, gs):
        if gs is not None and i1 % gs == 0:
            s, z = grid_params(Wt[i1 : i1 + gs].T, cfg)
            scale[:, i1 // gs], zero[:, i1 // gs] = s, z
        err = _quantize_block(Wt[i1:i2], U[i1:i2, i1:i2], codes[i1:i2], s, z, cfg.maxq)
        Wt[i2:] -= U[i1:i2, i2:].T @ err
    return np.ascontiguousarray(codes.T), scale, zero


INNER_BLOCK = 16  # columns quantized with per-column updates; larger spans are split in two


def _quantize_block(Wb, Ub, codes, s, z, maxq):
    """Quantize the rows of Wb (columns of W) in order; returns the scaled errors. A span longer
    than INNER_BLOCK is split: its first half is quantized, the second half gets the first half's
    feedback in one matmul, then the second half is quantized (the same updates, batched)."""
    n = len(Wb)
    if n > INNER_BLOCK:
        h = n // 2
        first = _quantize_block(Wb[:h], Ub[:h, :h], codes[:h], s, z, maxq)
        Wb[h:] -= Ub[:h, h:].T @ first
        return np.concatenate([first, _quantize_block(Wb[h:], Ub[h:, h:], codes[h:], s, z, maxq)])
    err = np.empty_like(Wb)
    for i in range(n):
        q = np.clip(np.rint(Wb[i] / s + z), 0, maxq)
        codes[i] = q
        e = (Wb[i] - (q - z) * s) / Ub[i, i]
        Wb[i + 1 :] -= Ub[i, i + 1 :, None] * e
        err[i] = e
    return err


__all__ = ["gptq", "inverse_hessian_factor", "quantize_codes"]
