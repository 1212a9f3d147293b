"""The held-out guard: per layer, choose among quantization options by their output error on
calibration rows they were not fitted on.

Calibration keeps two Hessian sums per activation (calibrate.py): all rows, and a held-out part
(every 5th sample). The output error of a quantized weight W_hat on the held-out rows X_h is

    err = ||X_h (W - W_hat)^T||^2 / ||X_h W^T||^2 = tr(E H_h E^T) / tr(W H_h W^T),  E = W - W_hat,

so no activations need to be kept. Each candidate (CANDIDATES: GPTQ at its damping and at larger
ones, GPTQ in act order, and round-to-nearest on the same grid; for FrameQuant all in the frame
domain) is fitted on the fit rows and scored on the held-out rows; the best one is then refitted
on all rows (`guard_refit`, the default) or kept as fitted. RTN is always a candidate, so the
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


def candidates(cfg, rows: float | None, in_features: int) -> list[Candidate]:
    """The options the guard compares for `cfg` (method gptq or framequant); the first one is what
    the scheme does without the guard (its damping, auto-raised for few rows)."""
    base = auto_damp(cfg.percdamp, rows, in_features)
    out = [Candidate("gptq", base)]
    out += [Candidate("gptq", d) for d in sorted({cfg.percdamp, *GUARD_DAMPS}) if d != base]
    per_row = cfg.group_size is None
    if cfg.method == "gptq" and per_row:  # after FrameQuant's rotation the diagonal is flat
        out.append(Candidate("gptq", base, act_order=True))
    out.append(Candidate("rtn"))
    return out


def output_error(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """Relative output error tr(E H E^T) / tr(W H W^T), E = W - W_hat (float64)."""
    W = np.asarray(W, dtype=np.float64)
    E = W - np.asarray(W_hat, dtype=np.float64)
    num = float(np.einsum("ij,ij->", E @ H, E))
    den = float(np.einsum("ij,ij->", W @ H, W))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return max(num, 0.0) / den
