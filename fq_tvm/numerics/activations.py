"""Activation quantization of the int8 CPU kernels, defined here so that numpy and TVM agree.

The coded input `xf` of a layer (after the Hadamard and the frame) is quantized per row and per
group of columns (`act_group`, or the weight's group where the weights are grouped): symmetric,
`ax = max|x| / Q`, `xq = rint(x * (Q / max|x|))`, all in float32, with Q = 127 for 8 bits or 63
for 7 (`act_max`). The kernels then sum `q * xq` in int32 and apply `ax` and the weight scale once
per group, so the fewer the groups, the less float work per integer product
(benchmarks/act_bits_accuracy.py measures the accuracy). 7 bits: on AVX2 without VNNI an 8-bit
code times a 7-bit activation cannot saturate `vpmaddubsw`'s int16 pairs (2 * 255 * 63 < 2^15),
so 8-bit layers skip the sign trick that 8-bit activations need there.
"""

from __future__ import annotations

import numpy as np

ACT_GROUP = 4096  # most columns in one activation group
ACT_ALIGN = 256  # group widths are whole multiples of this: whole blocks of every kernel
ACT_BITS = (7, 8, 32)  # 32: float activations (the kernels decode codes to float)
INT_ACT_BITS = (7, 8)  # quantized activations: the int8 kernels


def act_group(cols: int, rotated: bool = True) -> int:
    """Columns per activation group of a row of `cols`. Rotated inputs (a randomized Hadamard,
    no outlier channels left): the row in the fewest equal parts of at most ACT_GROUP columns,
    each rounded up to ACT_ALIGN (the last part may be shorter). Unrotated ones keep their outlier
    channels, so ACT_ALIGN-wide groups (SmolLM2 int8: whole rows cost 2% perplexity)."""
    if not rotated:
        return ACT_ALIGN
    parts = -(-cols // ACT_GROUP)
    return -(-cols // (parts * ACT_ALIGN)) * ACT_ALIGN


def act_max(bits: int) -> int:
    """The largest |xq| of `bits`-bit symmetric activations (127 for 8 bits, 63 for 7)."""
    if bits not in INT_ACT_BITS:
        raise ValueError(f"activations are quantized to one of {INT_ACT_BITS} bits, not {bits}")
    return (1 << (bits - 1)) - 1


def quantize_activations(x: np.ndarray, group: int | None = None, bits: int = 8) -> np.ndarray:
    """x [..., K] -> the float32 values the int8 kernels multiply: ax * xq, group by group
    (default `act_group(K)`), at `bits` bits (7 or 8)."""
    x = np.asarray(x, np.float32)
    top = np.float32(act_max(bits))
    group = group or act_group(x.shape[-1])
    out = np.empty_like(x)
    for lo in range(0, x.shape[-1], group):
        part = x[..., lo:lo + group]
        amax = np.abs(part).max(-1, keepdims=True)
        inv = np.where(amax > 0, top / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
        out[..., lo:lo + group] = np.rint(part * inv) * (amax / top)
    return out
