"""The CPU randomized Hadamard: one pass per row instead of one kernel launch per butterfly stage.

Same buffers as `kernels.hadamard` (x, signs -> y), so `cpu.variant` can swap it in. Each row is
signed into `y` (forward) and transformed in place while it sits in L1: log2(block) radix-2
stages, unrolled so that each stage's pair distance is a constant LLVM can vectorise; rows run in
parallel.
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from .kernels import OPAQUE

KIND = "hadamard_rows"


def hadamard(dim: int, block: int, inverse: bool) -> tvm.tirx.PrimFunc:
    stages = int(math.log2(block))
    norm = 1.0 / math.sqrt(block)

    @T.prim_func(private=True)
    def func(x_h: T.handle, signs: T.Buffer((dim,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, dim), "float32")
        y = T.match_buffer(y_h, (m, dim), "float32")
        for i in T.parallel(m):
            for j in range(dim):
                y[i, j] = x[i, j] if inverse else x[i, j] * signs[j]
            for s in T.unroll(stages):
                for b in range(dim >> (s + 1)):
                    for j in range(1 << s):
                        lo = b * (2 << s) + j
                        a = y[i, lo]
                        c = y[i, lo + (1 << s)]
                        y[i, lo] = a + c
                        y[i, lo + (1 << s)] = a - c
            for j in range(dim):
                y[i, j] = y[i, j] * (signs[j] * T.float32(norm) if inverse else T.float32(norm))

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})
