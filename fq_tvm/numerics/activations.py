"""Activation quantization of the int8 CPU kernels, defined here so that numpy and TVM agree.

The coded input `xf` of a layer (after the Hadamard and the frame) is quantized per row and per
group of columns (`ACT_GROUP`, or the weight's group where the weights are grouped): symmetric
int8, `ax = max|x| / 127`, `xq = rint(x * (127 / max|x|))`, all in float32. The kernels then sum
`q * xq` in int32 and apply `ax` and the weight scale once per group.
"""

from __future__ import annotations

import numpy as np

ACT_GROUP = 256
ACT_BITS = (8, 32)  # 32: float activations (the kernels decode codes to float)


def quantize_activations(x: np.ndarray, group: int = ACT_GROUP) -> np.ndarray:
    """x [..., K] -> the float32 values the int8 kernels multiply: ax * xq, group by group."""
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    for lo in range(0, x.shape[-1], group):
        part = x[..., lo:lo + group]
        amax = np.abs(part).max(-1, keepdims=True)
        inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
        out[..., lo:lo + group] = np.rint(part * inv) * (amax / np.float32(127))
    return out
