"""FrameQuant and the per-layer entry point `quantize_layer`.

FrameQuant: T_K = P_K R_K (frame after randomized Hadamard), T_N = R_N.
    C  = T_N W T_K^T                                   (N_p x K_f)
    H' = T_K (H K / tr H + 0.01 I) T_K^T               (rank K; GPTQ adds percdamp * mean diag)
    GPTQ(C, H') with the configured grid (1.75-sigma clipping for fq2, see quantize.SCHEMES).
Redundancy 1.0 (k == l_den) means no frame: the "Hadamard only" variant.
"""

from __future__ import annotations

import numpy as np

from .frames import FusionFrame, frame_k
from .gptq import gptq
from .hadamard import Hadamard, seed_for
from .quantize import QuantConfig, get_scheme, rtn
from .record import QuantizedLinear
from .transforms import Chain

NORM_DAMP = 0.01  # the reference's H <- H K / tr(H) + 0.01 I, before the transform


def input_transforms(K: int, cfg: QuantConfig, seed: int):
    """(Hadamard, FusionFrame or None) for the input side of a framequant layer."""
    had = Hadamard.create(K, seed)
    use_frame = frame_k(cfg.l_den, cfg.redundancy) > cfg.l_den and had.dp >= 2 * cfg.l_den
    frame = FusionFrame.create(had.dp, cfg.l_den, cfg.redundancy, seed) if use_frame else None
    return had, frame


def normalized_hessian(H: np.ndarray) -> np.ndarray:
    """H K / tr(H) + NORM_DAMP I (identity when H is all zero)."""
    H = np.asarray(H, dtype=np.float64)
    K, tr = len(H), float(np.trace(H))
    Hn = H * (K / tr) if tr > 0 else np.zeros_like(H)
    return Hn + NORM_DAMP * np.eye(K)


def framequant(W: np.ndarray, H: np.ndarray, cfg: QuantConfig, input_seed: int, output_seed: int):
    """Returns (codes [N_p, K_f], scale, zero, input Hadamard, frame or None, output Hadamard)."""
    W = np.asarray(W, dtype=np.float64)
    N, K = W.shape
    had_in, frame = input_transforms(K, cfg, input_seed)
    had_out = Hadamard.create(N, output_seed)
    t_in, t_out = Chain([had_in, frame], K), Chain([had_out], N)
    Hf = t_in.apply(t_in.apply(normalized_hessian(H)).T)  # T H T^T
    C = t_out.apply_rows(t_in.apply(W))  # T_N W T_K^T
    del W
    codes, scale, zero = gptq(C, Hf, cfg)
    return codes, scale, zero, had_in, frame, had_out


def quantize_layer(
    name: str,
    W: np.ndarray,
    H: np.ndarray | None,
    cfg: QuantConfig | str,
    input_seed: int | None = None,
    output_seed: int | None = None,
) -> QuantizedLinear:
    """Quantize one dense layer W [N, K] (y = W x) with Hessian H [K, K] (X X^T up to a positive
    factor; unused by RTN). Seeds default to seed_for(name + ':in' / ':out', cfg.seed); pass the
    same input_seed to layers that read one activation so they can share the input transform."""
    cfg = get_scheme(cfg) if isinstance(cfg, str) else cfg
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"{name}: weight must be 2-D [N, K], got shape {W.shape}")
    N, K = W.shape
    if cfg.method != "rtn" and (H is None or np.shape(H) != (K, K)):
        raise ValueError(f"{name}: method '{cfg.method}' needs a Hessian of shape ({K}, {K})")
    kw = {}
    if cfg.method == "rtn":
        codes, scale, zero = rtn(W, cfg)
    elif cfg.method == "gptq":
        codes, scale, zero = gptq(W, H, cfg)
    elif cfg.method == "framequant":
        in_seed = seed_for(name + ":in", cfg.seed) if input_seed is None else int(input_seed)
        out_seed = seed_for(name + ":out", cfg.seed) if output_seed is None else int(output_seed)
        codes, scale, zero, had_in, frame, had_out = framequant(W, H, cfg, in_seed, out_seed)
        kw = {"input_hadamard": had_in, "input_frame": frame, "output_hadamard": had_out}
    else:
        raise ValueError(f"{name}: scheme '{cfg.name}' (method '{cfg.method}') does not quantize")
    return QuantizedLinear.from_codes(
        name, N, K, cfg.bits, codes, scale, zero, group_size=cfg.group_size, scheme=cfg.name, **kw
    )
