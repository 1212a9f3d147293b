"""FrameQuant and the per-layer entry point `quantize_layer`.

FrameQuant: T_K = P_K R_K (frame after randomized Hadamard), T_N = R_N.
    C  = T_N W T_K^T                                   (N_p x K_f)
    H' = T_K (H K / tr H + 0.01 I) T_K^T               (rank K; GPTQ adds percdamp * mean diag)
    GPTQ(C, H') with the configured grid (1.75-sigma clipping for fq2, see quantize.SCHEMES).
Redundancy 1.0 (k == l_den) means no frame: the "Hadamard only" variant.
"""

from __future__ import annotations

import numpy as np

from .calibrate import HessianStat
from .denoise import denoised
from .frames import FusionFrame, frame_k
from .gptq import gptq
from .guard import Candidate, auto_damp, choose, output_energy, output_error
from .hadamard import Hadamard, seed_for
from .quantize import QuantConfig, get_scheme, rtn
from .record import QuantizedLinear, effective_weight
from .refine import refine
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


class _Layer:
    """One layer in the domain where it is quantized: C (the weight there) and Hc(H) (a Hessian
    carried there), and how codes become a record. gptq: C = W, Hc = H; framequant: C = T_N W T_K^T,
    Hc = T_K (H K / tr H + 0.01 I) T_K^T."""

    def __init__(self, name, W, cfg, input_seed, output_seed, output_rotation=True):
        self.name, self.cfg, self.W = name, cfg, W
        self.kw = {}
        if cfg.method == "framequant":
            N, K = W.shape
            in_seed = seed_for(name + ":in", cfg.seed) if input_seed is None else int(input_seed)
            out_seed = seed_for(name + ":out", cfg.seed) if output_seed is None else int(output_seed)
            had_in, frame = input_transforms(K, cfg, in_seed)
            had_out = Hadamard.create(N, out_seed) if output_rotation else None  # None: T_N = I
            self.t_in = Chain([had_in, frame], K)
            self.C = Chain([had_out], N).apply_rows(self.t_in.apply(W))  # T_N W T_K^T
            self.kw = {"input_hadamard": had_in, "input_frame": frame, "output_hadamard": had_out}
        else:
            self.C = W

    def hessian(self, H):
        if self.cfg.method != "framequant":
            return H
        return self.t_in.apply(self.t_in.apply(normalized_hessian(H)).T)  # T H T^T

    def solve(self, cand: Candidate, Hc):
        if cand.solver == "rtn":
            return rtn(self.C, self.cfg)
        codes, scale, zero = gptq(self.C, Hc, self.cfg, percdamp=cand.percdamp, act_order=cand.act_order)
        if self.cfg.refine:
            codes, scale, zero = refine(self.C, Hc, codes, scale, zero, self.cfg.maxq, self.cfg.group_size,
                                        self.cfg.refine, cand.percdamp)
        return codes, scale, zero

    def record(self, codes, scale, zero, guard=None) -> QuantizedLinear:
        N, K = self.W.shape
        cfg = self.cfg
        return QuantizedLinear.from_codes(self.name, N, K, cfg.bits, codes, scale, zero, group_size=cfg.group_size,
                                          scheme=cfg.name, guard=guard, **self.kw)


def quantize_layer(
    name: str,
    W: np.ndarray,
    H,
    cfg: QuantConfig | str,
    input_seed: int | None = None,
    output_seed: int | None = None,
    output_rotation: bool = True,
) -> QuantizedLinear:
    """Quantize one dense layer W [N, K] (y = W x) with Hessian H [K, K] (X X^T up to a positive
    factor; unused by RTN). Seeds default to seed_for(name + ':in' / ':out', cfg.seed); pass the
    same input_seed to layers that read one activation so they can share the input transform.

    H may be a calibrate.HessianStat: then its row count raises the damping when rows are few
    (guard.auto_damp), and with a held-out part and cfg.guard the held-out guard chooses the
    option (guard.py); the record's `guard` says which, with every candidate's held-out error.

    output_rotation False keeps T_N = I (FrameQuant): each stored row is one output row, so a
    tied embedding can gather its rows (record.gather_rows); per-row scales and zeros adapt."""
    cfg = get_scheme(cfg) if isinstance(cfg, str) else cfg
    W = np.asarray(W, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"{name}: weight must be 2-D [N, K], got shape {W.shape}")
    N, K = W.shape
    stat = H if isinstance(H, HessianStat) else None
    if stat is not None:
        H = stat.hessian()
    if cfg.method not in ("rtn", "gptq", "framequant"):
        raise ValueError(f"{name}: scheme '{cfg.name}' (method '{cfg.method}') does not quantize")
    if cfg.method != "rtn" and (H is None or np.shape(H) != (K, K)):
        raise ValueError(f"{name}: method '{cfg.method}' needs a Hessian of shape ({K}, {K})")
    layer = _Layer(name, W, cfg, input_seed, output_seed, output_rotation)
    if cfg.method == "rtn":
        return layer.record(*rtn(W, cfg))
    if stat is not None and cfg.guard and stat.has_holdout:
        return _guarded(layer, stat)
    rows = None if stat is None else stat.count
    record = layer.record(*layer.solve(Candidate("gptq", auto_damp(cfg.percdamp, rows, K)), layer.hessian(H)))
    return denoised(record, W, H) if cfg.denoise else record


def _guarded(layer: _Layer, stat: HessianStat) -> QuantizedLinear:
    """Fit every candidate on the fit rows, score it on the held-out rows, keep the best (refitted
    on all rows with cfg.guard_refit)."""
    cfg, W = layer.cfg, layer.W
    H_held = stat.held_hessian()
    energy = output_energy(W, H_held)
    H_fit = layer.hessian(stat.fit_hessian())
    fitted = {}

    def score(cand):
        fitted[cand] = layer.solve(cand, H_fit)
        return output_error(W, effective_weight(layer.record(*fitted[cand])), H_held, energy)

    best, errors = choose(cfg, stat.fit_count, W.shape[1], score)
    held_out = {c.label: round(e, 6) for c, e in errors.items()}
    gain = False
    if cfg.denoise:  # the row gains fitted on the fit rows, kept if they lower the held-out error
        trial = denoised(layer.record(*fitted[best]), W, stat.fit_hessian())
        held_out[best.label + " + denoise"] = round(output_error(W, effective_weight(trial), H_held, energy), 6)
        gain = held_out[best.label + " + denoise"] < errors[best]
    refit = cfg.guard_refit and best.solver != "rtn"  # RTN does not read the Hessian
    codes = layer.solve(best, layer.hessian(stat.hessian())) if refit else fitted[best]
    guard = {"chosen": best.label + (" + denoise" if gain else ""), "held_out_err": held_out,
             "fit_rows": round(stat.fit_count, 3), "held_rows": round(stat.held_count, 3),
             "refit": bool(cfg.guard_refit)}
    record = layer.record(*codes, guard=guard)
    if gain:
        record = denoised(record, W, stat.hessian() if cfg.guard_refit else stat.fit_hessian())
    return record
