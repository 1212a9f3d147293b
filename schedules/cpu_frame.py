"""The CPU frame analysis: per row, each group of 2l inputs times the frame block F (2k x 2l),
written as broadcast-multiply-adds into a vector of the 2k outputs (F transposed once per task).

Same buffers as `kernels.frame_analysis` (x, F -> y), so `cpu.variant` can swap it in.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .common import row_kernel, same_row
from .kernels import OPAQUE

KIND = "frame_rows"


def frame_analysis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    row = analysis_row(nblk, two_l, two_k, tail)
    func = row_kernel(nblk * two_l + tail, nblk * two_k + tail, (two_k, two_l), same_row(row))
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


def analysis_row(nblk: int, two_l: int, two_k: int, tail: int):
    """The macro row(xi, x, F, yi, y): row xi of x analysed into row yi of y."""
    body, din = nblk * two_k, nblk * two_l

    @T.macro
    def row(xi, x, F, yi, y):
        ft = T.alloc_buffer((two_l * two_k,), "float32", scope="local")
        acc = T.alloc_buffer((two_k,), "float32", scope="local")
        for c, r in T.grid(two_l, two_k):
            ft[c * two_k + r] = F[r, c]
        for b in range(nblk):
            for r in T.vectorized(two_k):
                acc[r] = T.float32(0)
            for c in T.unroll(two_l):
                for r in T.vectorized(two_k):
                    acc[r] = acc[r] + x[xi, b * two_l + c] * ft[c * two_k + r]
            for r in T.vectorized(two_k):
                y[yi, b * two_k + r] = acc[r]
        for j in range(tail):
            y[yi, body + j] = x[xi, din + j]

    return row


SYNTHESIS_KIND = "frame_synthesis_rows"


def frame_synthesis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    """The transposed frame (a quantized tied embedding's P^T): per row, each group of 2k inputs
    times F (2k x 2l), broadcast-multiply-adds into a vector of the 2l outputs (F's rows are
    contiguous, so no transposed copy). Same buffers as `kernels.frame_synthesis`."""
    body, din = nblk * two_k, nblk * two_l

    @T.macro
    def row(i, x, F, y):
        acc = T.alloc_buffer((two_l,), "float32", scope="local")
        for b in range(nblk):
            for c in T.vectorized(two_l):
                acc[c] = T.float32(0)
            for r in T.unroll(two_k):
                for c in T.vectorized(two_l):
                    acc[c] = acc[c] + x[i, b * two_k + r] * F[r, c]
            for c in T.vectorized(two_l):
                y[i, b * two_l + c] = acc[c]
        for j in range(tail):
            y[i, din + j] = x[i, body + j]

    func = row_kernel(body + tail, din + tail, (two_k, two_l), row)
    return func.with_attrs({"fq_kernel": SYNTHESIS_KIND, "op_pattern": OPAQUE})
