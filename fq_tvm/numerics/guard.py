"""The held-out guard: per layer, choose among quantization options by their output error on
calibration rows they were not fitted on.

Calibration keeps two Hessian sums per activation (calibrate.py): all rows, and a held-out part
(every 5th sample). The output error of a quantized weight W_hat on the held-out rows X_h is

    err = ||X_h (W - W_hat)^T||^2 / ||X_h W^T||^2 = tr(E H_h E^T) / tr(W H_h W^T),  E = W - W_hat,

so no activations need to be kept. Each candidate (GPTQ at the scheme's damping and at
GUARD_DAMPS, GPTQ in act order, and round-to-nearest on the same grid; for FrameQuant all in the
frame domain) is fitted on the fit rows and scored on the held-out rows (`choose` tries the
dampings as a ladder, stopping when the error stops falling); the best one is then refitted on all
rows (`guard_refit`, the default) or kept as fitted. RTN is always a candidate, so the
chosen option is never worse than RTN on the held-out rows, by construction.

Few rows: when the rows are under FEW_ROWS x the input dimension, the base damping (the first
candidate, which wins ties, and the damping used without a held-out split) is raised to at least
FEW_ROWS_DAMP. Measured on a synthetic layer (K = 256, full-rank Student-t inputs, docs/numerics.md):
damping 0.1 beat 0.01 for GPTQ only at rows <= K / 2; at rows = K and above 0.01 was better, and
for FrameQuant 0.01 was as good or better throughout; so FEW_ROWS is 0.5, not 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEW_ROWS = 0.5  # rows under FEW_ROWS * K: the base damping is raised to FEW_ROWS_DAMP
FEW_ROWS_DAMP = 0.1
GUARD_DAMPS = (0.1, 1.0)  # damping candidates besides the scheme's own (fractions of the mean diagonal)


@dataclass(frozen=True)
class Candidate:
    """One option: 'gptq' (percdamp, act_order) or 'rtn' on the scheme's grid."""

    solver: str
    percdamp: float = 0.0
    act_order: bool = False

    @property
    def label(self) -> str:
        if self.solver == "rtn":
            return "rtn"
        return f"gptq{' act-order' if self.act_order else ''} damp {self.percdamp:g}"


def auto_damp(percdamp: float, rows: float | None, in_features: int) -> float:
    """The scheme's damping, raised to FEW_ROWS_DAMP when rows < FEW_ROWS * in_features."""
    if rows is not None and rows < FEW_ROWS * in_features:
        return max(percdamp, FEW_ROWS_DAMP)
    return percdamp


def damping_ladder(cfg, rows: float | None, in_features: int) -> tuple[float, list[float], list[float]]:
    """(base, larger, smaller): the scheme's damping (auto-raised for few rows) and the other
    damping candidates above it (ascending) and below it (descending)."""
    base = auto_damp(cfg.percdamp, rows, in_features)
    others = sorted({cfg.percdamp, *GUARD_DAMPS} - {base})
    return base, [d for d in others if d > base], [d for d in reversed(others) if d < base]


def candidates(cfg, rows: float | None, in_features: int) -> list[Candidate]:
    """Every option the guard may compare for `cfg` (method gptq or framequant); the first is what
    the scheme does without the guard (its damping, auto-raised for few rows). `choose` scores a
    subset of them."""
    base, larger, smaller = damping_ladder(cfg, rows, in_features)
    damps = (base, *larger, *smaller)
    out = [Candidate("gptq", d) for d in damps]
    if cfg.group_size is None:  # act order keeps per-row grids only
        out += [Candidate("gptq", d, act_order=True) for d in damps]
    out.append(Candidate("rtn"))
    return out


def choose(cfg, rows: float | None, in_features: int, score) -> tuple[Candidate, dict]:
    """The candidate with the least score (held-out error) and {candidate: score} of those tried.

    Damping is searched as a ladder, since each step costs a GPTQ run: from the base damping up
    through the larger ones while the error falls; if the first step up does not help, down through
    the smaller ones the same way. Then act order at the best damping (per-row grids; FrameQuant's in
    the frame domain), then RTN. Ties keep the earlier candidate (the scheme's own option first)."""
    base, larger, smaller = damping_ladder(cfg, rows, in_features)
    errors = {}

    def tried(cand):
        errors[cand] = float(score(cand))
        return errors[cand]

    best_d, best = base, tried(Candidate("gptq", base))
    for direction in (larger, smaller):
        for d in direction:
            err = tried(Candidate("gptq", d))
            if not err < best:
                break
            best_d, best = d, err
        if best_d != base:
            break
    if cfg.group_size is None:
        tried(Candidate("gptq", best_d, act_order=True))
    tried(Candidate("rtn"))
    chosen = min(errors, key=errors.get)  # dicts keep order: the first of equals
    return chosen, errors


def output_energy(W: np.ndarray, H: np.ndarray) -> float:
    """tr(W H W^T): the output energy of W [N, K] on rows with Hessian H. The product in float32
    (60% of float64's time; ~1e-9 relative on real layers, far under the gaps between the guard's
    candidates), the sum in float64."""
    W = np.asarray(W, dtype=np.float32)
    return float(np.einsum("ij,ij->", W @ np.asarray(H, dtype=np.float32), W, dtype=np.float64))


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray, energy: float | None = None) -> float:
    """Relative output error tr(E H E^T) / tr(W H W^T), E = W - W_hat (float64); `energy`: the
    denominator when already known (output_energy)."""
    E = np.asarray(W, dtype=np.float64) - np.asarray(W_hat, dtype=np.float64)
    num = output_energy(E, H)
    den = output_energy(W, H) if energy is None else energy
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den
