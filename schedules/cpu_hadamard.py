"""The CPU randomized Hadamard: one pass per row instead of one kernel launch per butterfly stage.

Same buffers as `kernels.hadamard` (x, signs -> y), so `cpu.variant` can swap it in. Each row is
transformed while it sits in L1, rows in parallel. The first three stages (pair distances 1, 2, 4,
which do not fill a vector) run as one 8 x 8 Hadamard per 8 columns: 8 broadcast multiply-adds into
a vector of 8. The normalisation and the forward signs are applied on the way in, the inverse
signs by the last stage on the way out. The remaining stages run two per pass (radix-4; radix-2
for an odd last one and for RADIX2_BLOCKS), unrolled so that each stage's distance is a constant
LLVM can vectorise. Blocks under 8 columns: radix-2 throughout.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from .common import row_kernel, same_row
from .kernels import OPAQUE

KIND = "hadamard_rows"
FIRST = 8  # columns of the fused first stages
# Blocks whose later stages stay radix-2: on a Zen 4 machine (2026-11-27, 2048 rows, 2 threads,
# interleaved) radix-4 passes took 1536-wide rows of 512-blocks 3.5 -> 2.3 ms (inverse), 576-wide
# of 64-blocks 1.29 -> 1.06, 4096-blocks 13.5 -> 10.1 with the frame, but 384-wide of 128-blocks
# 0.67 -> 0.75 (inverse) and 1.22 -> 1.27 with the frame.
RADIX2_BLOCKS = (128,)


def hadamard(dim: int, block: int, inverse: bool) -> tvm.tirx.PrimFunc:
    row = row_macro(dim, block, inverse)
    func = row_kernel(dim, dim, (dim,), same_row(row))
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


def row_macro(dim: int, block: int, inverse: bool):
    """The macro row(xi, x, signs, yi, y): row xi of x transformed into row yi of y."""
    if block < FIRST:
        return _radix2(dim, block, inverse)
    stages = int(math.log2(block))
    norm = 1.0 / math.sqrt(block)
    pairs = 0 if block in RADIX2_BLOCKS else (stages - 3) // 2

    @T.macro
    def radix4(yi, y, signs, s):
        """Stages s and s + 1 in one pass: each 4 values 2^s apart become their 4-point Hadamard,
        summed in the radix-2 order (same results), half the loads and stores."""
        for b in range(dim >> (s + 2)):
            for j in range(1 << s):
                i0 = b * (4 << s) + j
                a0 = y[yi, i0]
                a1 = y[yi, i0 + (1 << s)]
                a2 = y[yi, i0 + (2 << s)]
                a3 = y[yi, i0 + (3 << s)]
                if inverse and s + 2 == stages:
                    y[yi, i0] = (a0 + a1 + (a2 + a3)) * signs[i0]
                    y[yi, i0 + (1 << s)] = (a0 - a1 + (a2 - a3)) * signs[i0 + (1 << s)]
                    y[yi, i0 + (2 << s)] = (a0 + a1 - (a2 + a3)) * signs[i0 + (2 << s)]
                    y[yi, i0 + (3 << s)] = (a0 - a1 - (a2 - a3)) * signs[i0 + (3 << s)]
                else:
                    y[yi, i0] = a0 + a1 + (a2 + a3)
                    y[yi, i0 + (1 << s)] = a0 - a1 + (a2 - a3)
                    y[yi, i0 + (2 << s)] = a0 + a1 - (a2 + a3)
                    y[yi, i0 + (3 << s)] = a0 - a1 - (a2 - a3)

    @T.macro
    def radix2(yi, y, signs, s):
        for b in range(dim >> (s + 1)):
            for j in range(1 << s):
                lo = b * (2 << s) + j
                hi = lo + (1 << s)
                a = y[yi, lo]
                c2 = y[yi, hi]
                if inverse and s == stages - 1:
                    y[yi, lo] = (a + c2) * signs[lo]
                    y[yi, hi] = (a - c2) * signs[hi]
                else:
                    y[yi, lo] = a + c2
                    y[yi, hi] = a - c2

    @T.macro
    def row(xi, x, signs, yi, y):
        acc = T.alloc_buffer((FIRST,), "float32", scope="local")
        for c in range(dim // FIRST):
            for k in T.vectorized(FIRST):
                acc[k] = T.float32(0)
            for j in T.unroll(FIRST):
                for k in T.vectorized(FIRST):
                    acc[k] = acc[k] + _h8(j, k) * (
                        x[xi, c * FIRST + j] * T.float32(norm) if inverse
                        else x[xi, c * FIRST + j] * (signs[c * FIRST + j] * T.float32(norm)))
            for k in T.vectorized(FIRST):
                y[yi, c * FIRST + k] = acc[k] * signs[c * FIRST + k] if inverse and stages == 3 else acc[k]
        for p in T.unroll(pairs):  # two stages per pass over the row
            radix4(yi, y, signs, 3 + 2 * p)
        for s in T.unroll(3 + 2 * pairs, stages):
            radix2(yi, y, signs, s)

    return row


def _h8(j, k):
    """Entry (j, k) of the unnormalised 8 x 8 Sylvester Hadamard: (-1)^popcount(j & k)."""
    both = j & k
    return T.Cast("float32", 1 - 2 * ((both ^ (both >> 1) ^ (both >> 2)) & 1))


def _radix2(dim: int, block: int, inverse: bool):
    stages = int(math.log2(block))
    norm = 1.0 / math.sqrt(block)

    @T.macro
    def row(xi, x, signs, yi, y):
        for j in range(dim):
            y[yi, j] = x[xi, j] if inverse else x[xi, j] * signs[j]
        for s in T.unroll(stages):
            for b in range(dim >> (s + 1)):
                for j in range(1 << s):
                    lo = b * (2 << s) + j
                    a = y[yi, lo]
                    c = y[yi, lo + (1 << s)]
                    y[yi, lo] = a + c
                    y[yi, lo + (1 << s)] = a - c
        for j in range(dim):
            y[yi, j] = y[yi, j] * (signs[j] * T.float32(norm) if inverse else T.float32(norm))

    return row
