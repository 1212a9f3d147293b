"""Quantization config, the scheme registry, uniform grids and round-to-nearest.

A grid maps a weight w to a code q = clamp(rint(w / scale + zero), 0, 2**bits - 1) and back to
(q - zero) * scale. Grids (per row, or per group of `group_size` columns):
- min-max, asymmetric: the range [min(w, 0), max(w, 0)], integer zero (GPTQ's convention);
- min-max, symmetric: scale = max|w| / (2**(bits-1) - 1), zero = 2**(bits-1) (code 0 unused);
- sigma (clip_sigma = c): scale = 2 c std / (2**bits - 1), zero = (2**bits - 1) / 2 - mean / scale
  (a float: the mean sits at the grid centre), so the end levels are mean +- c std and the code
  clamp is the c-sigma clipping (c = 1.75 for the 2-bit FrameQuant schemes); symmetric uses
  mean 0 and the RMS instead of std. clip_search: per row/group, the c of CLIP_SEARCH with the
  least round-to-nearest MSE (an option; it measured worse than a fixed 1.75 on SmolLM2).
Scales and zeros are rounded to float32 before codes are chosen, so codes match the stored grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .packing import SUPPORTED_BITS

METHODS = ("none", "rtn", "gptq", "framequant")
# fp_target's damping (QuantConfig.fp_target_damp, sequential.fp_target_weight), fraction of the mean Hessian
# diagonal: 0.1-1.0 measured better than 0.01 on MiniLM fq2; 1.0 best on SmolLM2 at 64 x 512 and far
# ahead with 4,096 calibration tokens, where 0.01 doubled perplexity (docs/numerics.md, "fp32-target
# damping" and "The fp32 target with small calibration")
FP_TARGET_DAMP = 1.0
# QuantConfig.fp_target_rows: above this many calibration rows the damping falls as 1 / rows
# (sequential.fp_target_damping; None keeps it fixed). 32768 = SmolLM2's 64 x 512 tokens, so its
# default calibrations and MiniLM's 256 passages (25,704 rows) keep 1.0 exactly; MiniLM with 512 / 1024
# passages measured better with less damping (docs/numerics.md, "Calibration rows and the damping")
FP_TARGET_ROWS = 32768.0


@dataclass(frozen=True)
class QuantConfig:
    """One quantization scheme. method 'framequant' with redundancy 1.0 is 'Hadamard only'."""

    name: str = "custom"
    method: str = "rtn"
    bits: int = 2
    group_size: int | None = None  # None: one group per row
    symmetric: bool = False
    clip_sigma: float | None = None  # None: min-max grid
    redundancy: float = 1.0  # framequant only
    l_den: int = 8  # framequant only: a frame block maps 2*l_den coordinates to 2*k
    seed: int = 0
    block_size: int = 128  # GPTQ lazy-update block
    percdamp: float = 0.01  # GPTQ damping, fraction of the mean Hessian diagonal
    clip_search: bool = False  # sigma grid: per row/group, the c in CLIP_SEARCH minimising the MSE
    guard: bool = True  # gptq / framequant: choose per layer by held-out error (guard.py)
    guard_refit: bool = True  # guard: requantize the chosen option on all rows (else keep the fit-rows result)
    sequential: bool = False  # gptq / framequant: calibrate each layer on the model with earlier layers quantized
    denoise: bool = False  # gptq / framequant: a least-squares gain per stored row (denoise.py), kept if it helps
    fp_target: bool = False  # sequential: fit each layer to the fp32 model's outputs (sequential.fp_target_weight)
    fp_residual: bool = False  # with fp_target: also correct the residual the layer's output is added to
    fp_target_damp: float = FP_TARGET_DAMP  # fp_target: damping of the correction, fraction of the mean Hessian diagonal
    fp_target_rows: float | None = FP_TARGET_ROWS  # fp_target: calibration rows above which the damping falls as 1 / rows
    refine: int = 0  # gptq / framequant: rounds of grid refit + code coordinate descent after GPTQ (refine.py)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method '{self.method}'; expected one of {METHODS}")
        if self.method == "none":
            if self.bits != 32:
                raise ValueError("method 'none' (fp32) needs bits=32")
            return
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if self.clip_sigma is not None and not (math.isfinite(self.clip_sigma) and self.clip_sigma > 0):
            raise ValueError(f"clip_sigma must be a positive number or None, got {self.clip_sigma!r}")
        if not (math.isfinite(self.redundancy) and self.redundancy >= 1.0):
            raise ValueError(f"redundancy must be >= 1.0, got {self.redundancy!r}")
        if self.method != "framequant" and self.redundancy != 1.0:
            raise ValueError(f"redundancy {self.redundancy} needs method 'framequant', not '{self.method}'")
        if self.l_den < 1:
            raise ValueError(f"l_den must be >= 1, got {self.l_den}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp!r}")
        if not (math.isfinite(self.fp_target_damp) and self.fp_target_damp >= 0):
            raise ValueError(f"fp_target_damp must be >= 0, got {self.fp_target_damp!r}")
        if self.fp_target_rows is not None and not (math.isfinite(self.fp_target_rows) and self.fp_target_rows > 0):
            raise ValueError(f"fp_target_rows must be a positive number or None, got {self.fp_target_rows!r}")
        if not (isinstance(self.refine, int) and self.refine >= 0):
            raise ValueError(f"refine must be an int >= 0, got {self.refine!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> QuantConfig:
        return cls(**meta)


CLIP_SIGMA_2BIT = 1.75

SCHEMES = {
    "fp32": QuantConfig("fp32", "none", bits=32),
    "int8": QuantConfig("int8", "rtn", bits=8, symmetric=True),
    # int7: codes 0..127 in bytes, so that on AVX2 without VNNI a code times an 8-bit activation
    # cannot saturate vpmaddubsw's int16 pair (2 * 127 * 127 < 2^15): no sign correction there
    # (docs/numerics.md, "Schemes"); elsewhere as fast as int8
    "int7": QuantConfig("int7", "rtn", bits=7, symmetric=True),
    "rtn2": QuantConfig("rtn2", "rtn", bits=2),
    "rtn4": QuantConfig("rtn4", "rtn", bits=4),
    # 2-bit schemes calibrate sequentially (sequential.py): better on MiniLM (fq2, fq2r1, gptq2) and
    # SmolLM2 (fq2), means of 3 rotation seeds in docs/numerics.md.
    "gptq2": QuantConfig("gptq2", "gptq", bits=2, sequential=True),
    "gptq4": QuantConfig("gptq4", "gptq", bits=4),
    # 2-bit sigma grids clip at 1.75 sigma, not the paper's 2: with the clipping error fed back
    # (gptq.py) it measured better on SmolLM2 and MiniLM at r = 1.0 and 1.1 (docs/numerics.md).
    "had2": QuantConfig("had2", "framequant", bits=2, clip_sigma=CLIP_SIGMA_2BIT, redundancy=1.0, sequential=True),
    # fq2 also fits each layer to the fp32 model's outputs and residual stream (sequential.fp_target_weight):
    # MiniLM cosine .864 -> .914, SmolLM2 perplexity (docs/numerics.md, "Fitting to the fp32 model"). fq2r1 and
    # gptq2 do not: with it they gained on MiniLM but lost on the synthetic llama block (same section).
    "fq2": QuantConfig("fq2", "framequant", bits=2, clip_sigma=CLIP_SIGMA_2BIT, redundancy=1.1, sequential=True,
                       fp_target=True, fp_residual=True),
    "fq2r1": QuantConfig("fq2r1", "framequant", bits=2, clip_sigma=CLIP_SIGMA_2BIT, redundancy=1.0,
                         sequential=True),
    "fq4": QuantConfig("fq4", "framequant", bits=4, clip_sigma=3.0, redundancy=1.0),
}


def get_scheme(name: str, **overrides) -> QuantConfig:
    """The registered scheme `name`, optionally with fields replaced (validated again)."""
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme '{name}'; available: {', '.join(SCHEMES)}")
    return replace(SCHEMES[name], **overrides) if overrides else SCHEMES[name]


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def grid_params(w: np.ndarray, cfg: QuantConfig):
    """Grid of each row of w [R, C]: returns (scale [R], zero [R])."""
    w = np.asarray(w, dtype=np.float64)
    maxq = cfg.maxq
    if cfg.clip_sigma is not None:
        if cfg.clip_search:
            return _searched_sigma_grid(w, maxq, cfg.symmetric)
        return _sigma_grid(w, cfg.clip_sigma, maxq, cfg.symmetric)
    if cfg.symmetric:
        amax = np.abs(w).max(axis=1)
        amax = np.where(amax > 0, amax, 1.0)
        scale = _f32(amax / ((maxq + 1) // 2 - 1))
        zero = np.full_like(scale, float((maxq + 1) // 2))
    else:
        lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
        empty = (lo == 0) & (hi == 0)
        lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
        scale = _f32((hi - lo) / maxq)
        zero = np.rint(-lo / scale)
    return scale, zero


def _sigma_grid(w, c, maxq, symmetric):
    mean = np.zeros(w.shape[0]) if symmetric else w.mean(axis=1)
    std = np.sqrt(((w - mean[:, None]) ** 2).mean(axis=1))
    std = np.where(std > 0, std, np.maximum(np.abs(mean), 1.0))
    scale = _f32(2.0 * c * std / maxq)
    zero = _f32(maxq / 2.0 - mean / scale)
    return scale, zero


CLIP_SEARCH = tuple(np.round(np.arange(1.0, 3.001, 0.125), 3))


def _searched_sigma_grid(w, maxq, symmetric):
    """Per row, the sigma grid whose c (from CLIP_SEARCH) gives the least round-to-nearest MSE."""
    best = None
    for c in CLIP_SEARCH:
        s, z = _sigma_grid(w, c, maxq, symmetric)
        err = ((dequantize_codes(quantize_codes(w, s, z, maxq), s, z) - w) ** 2).sum(axis=1)
        if best is None:
            best = [err, s, z]
        else:
            better = err < best[0]
            for i, v in enumerate((err, s, z)):
                best[i] = np.where(better, v, best[i])
    return best[1], best[2]


def quantize_codes(w, scale, zero, maxq):
    """Codes of w [R, C] for per-row scale/zero [R] (or broadcastable)."""
    q = np.rint(np.asarray(w) / scale[:, None] + zero[:, None])
    return np.clip(q, 0, maxq).astype(np.uint8)


def dequantize_codes(q, scale, zero):
    return (np.asarray(q, dtype=np.float64) - zero[:, None]) * scale[:, None]


def group_bounds(ncols: int, group_size: int | None):
    """[(start, stop)] of the column groups."""
    gs = ncols if group_size is None else group_size
    return [(s, min(s + gs, ncols)) for s in range(0, ncols, gs)]


def rtn(W: np.ndarray, cfg: QuantConfig):
    """Round-to-nearest: returns codes uint8 [R, C], scale, zero float64 [R, G]."""
    W = np.asarray(W, dtype=np.float64)
    groups = group_bounds(W.shape[1], cfg.group_size)
    codes = np.empty(W.shape, dtype=np.uint8)
    scale, zero = np.empty((W.shape[0], len(groups))), np.empty((W.shape[0], len(groups)))
    for g, (a, b) in enumerate(groups):
        s, z = grid_params(W[:, a:b], cfg)
        codes[:, a:b] = quantize_codes(W[:, a:b], s, z, cfg.maxq)
        scale[:, g], zero[:, g] = s, z
    return codes, scale, zero


def dequantize_groups(codes, scale, zero, group_size: int | None) -> np.ndarray:
    """float64 [R, C] from codes and per-group scale/zero [R, G]."""
    codes = np.asarray(codes)
    out = np.empty(codes.shape, dtype=np.float64)
    for g, (a, b) in enumerate(group_bounds(codes.shape[1], group_size)):
        out[:, a:b] = dequantize_codes(codes[:, a:b], np.asarray(scale[:, g], np.float64), np.asarray(zero[:, g], np.float64))
    return out
