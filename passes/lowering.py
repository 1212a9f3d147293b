"""What the dense rewrite needs to know about one quantized layer: plain arrays and shapes.

The numerics produce records; `fq_tvm.quantize` turns them into these. The pass never quantizes and
never knows a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rotation:
    """Randomized Hadamard on the last axis: zero-pad `dim` -> `padded`, multiply by `signs`,
    orthonormal Walsh-Hadamard on consecutive blocks of `block`."""

    dim: int
    padded: int
    block: int
    signs: np.ndarray  # float32 [padded], +-1

    def key(self) -> tuple:
        return (self.dim, self.padded, self.block, self.signs.tobytes())


@dataclass(frozen=True)
class Frame:
    """Block-diagonal frame analysis: `nblk` copies of `block` ([two_k, two_l]), then `tail` copied."""

    nblk: int
    block: np.ndarray  # float32 [two_k, two_l]
    tail: int

    @property
    def in_dim(self) -> int:
        return self.nblk * self.block.shape[1] + self.tail

    @property
    def out_dim(self) -> int:
        return self.nblk * self.block.shape[0] + self.tail

    def key(self) -> tuple:
        return (self.nblk, self.tail, self.block.shape, self.block.tobytes())


@dataclass(frozen=True)
class PackedLinear:
    """y = Rot_out^T(dequant(packed) @ Frame(Rot_in(x)))[:out_features] for x [..., in_features]."""

    name: str
    in_features: int
    out_features: int
    bits: int
    cols: int  # columns of the coded matrix (the frame's output length)
    group_size: int
    packed: np.ndarray  # uint8 [rows, ceil(cols * bits / 8)]
    scale: np.ndarray  # float32 [rows, ceil(cols / group_size)]
    zero: np.ndarray  # float32 [rows, ceil(cols / group_size)]
    in_rot: Rotation | None = None
    frame: Frame | None = None
    out_rot: Rotation | None = None
    act_group: int = 0  # columns per activation group of the int8 kernels (QuantizedLinear.act_group)
    code_bits: int = 0  # codes narrower than their storage `bits` (7 in bytes: scheme int7); 0: bits

    @property
    def rows(self) -> int:
        return self.scale.shape[0]

    def input_key(self) -> tuple:
        """Layers with equal keys reading the same tensor share one input transform."""
        return (self.in_features,
                self.in_rot.key() if self.in_rot else None,
                self.frame.key() if self.frame else None)

    def weight_bytes(self) -> int:
        return self.packed.nbytes + self.scale.nbytes + self.zero.nbytes
