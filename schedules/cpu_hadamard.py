"""The CPU randomized Hadamard: one pass per row instead of one kernel launch per butterfly stage.

Same buffers as `kernels.hadamard` (x, signs -> y), so `cpu.variant` can swap it in. Each row is
transformed while it sits in L1, rows in parallel. The first three stages (pair distances 1, 2, 4,
which do not fill a vector) run as one 8 x 8 Hadamard per 8 columns: 8 broadcast multiply-adds into
a vector of 8. The normalisation and the forward signs are applied on the way in, the inverse
signs by the last stage on the way out. The remaining stages are radix-2, unrolled so that each
stage's pair distance is a constant LLVM can vectorise. Blocks under 8 columns: radix-2 throughout.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from .common import row_kernel, same_row
from .kernels import OPAQUE

KIND = "hadamard_rows"
FIRST = 8  # columns of the fused first stages


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
        for s in T.unroll(3, stages):
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
