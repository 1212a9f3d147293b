"""Activation quantization of the int8 CPU kernels, defined here so that numpy and TVM agree.

The coded input `xf` of a layer (after the Hadamard and the frame) is quantized per row and per
group of columns (`act_group`, or the weight's group where the weights are grouped): symmetric
int8, `ax = max|x| / 127`, `xq = rint(x * (127 / max|x|))`, all in float32. The kernels then sum
`q * xq` in int32 and apply `ax` and the weight scale once per group, so the fewer the groups, the
less float work per integer product (benchmarks/act_bits_accuracy.py measures the accuracy).
"""

from __future__ import annotations

import numpy as np

ACT_GROUP = 4096  # most columns in one activation group
ACT_ALIGN = 256  # group widths are whole multiples of this: whole blocks of every kernel
ACT_BITS = (8, 32)  # 32: float activations (the kernels decode codes to float)


def act_group(cols: int, rotated: bool = True) -> int:
    """Columns per activation group of a row of `cols`. Rotated inputs (a randomized Hadamard,
    no outlier channels left): the row in the fewest equal parts of at most ACT_GROUP columns,
    each rounded up to ACT_ALIGN (the last part may be shorter). Unrotated ones keep their outlier
    channels, so ACT_ALIGN-wide groups (SmolLM2 int8: whole rows cost 2% perplexity)."""
    if not rotated:
        return ACT_ALIGN
    parts = -(-cols // ACT_GROUP)
    return -(-cols // (parts * ACT_ALIGN)) * ACT_ALIGN


def quantize_activations(x: np.ndarray, group: int | None = None) -> np.ndarray:
    """x [..., K] -> the float32 values the int8 kernels multiply: ax * xq, group by group
    (default `act_group(K)`)."""
    x = np.asarray(x, np.float32)
    group = group or act_group(x.shape[-1])
    out = np.empty_like(x)
    for lo in range(0, x.shape[-1], group):
        part = x[..., lo:lo + group]
        amax = np.abs(part).max(-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
        out[..., lo:lo + group] = np.rint(part * inv) * (amax / np.float32(127))
    return out
