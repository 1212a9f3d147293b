"""The CPU frame analysis: per row, each group of 2l inputs times the frame block F (2k x 2l),
written as broadcast-multiply-adds into a vector of the 2k outputs (F transposed once per task).

Same buffers as `kernels.frame_analysis` (x, F -> y), so `cpu.variant` can swap it in.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .common import STACK, each_row, lane_sums, parsed_once, row_kernel
from .kernels import OPAQUE

KIND = "frame_rows"


@parsed_once
def frame_analysis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    """Same buffers as `kernels.frame_analysis` (x, F [2k, 2l] -> y): F transposed once per task."""
    row = analysis_row(nblk, two_l, two_k, tail)

    @T.macro
    def rows(lo, n, x, F, y):
        ft = T.alloc_buffer((two_l, two_k), "float32")
        for c, r in T.grid(two_l, two_k):
            ft[c, r] = F[r, c]
        for i in range(n):
            row(lo + i, x, ft, lo + i, y)

    func = row_kernel(nblk * two_l + tail, nblk * two_k + tail, (two_k, two_l), rows)
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


GROUP = 4  # blocks analysed together: independent sums hide the multiply-add latency


def analysis_row(nblk: int, two_l: int, two_k: int, tail: int, lanes: int = 16):
    """The macro row(xi, x, ft, yi, y): row xi of x analysed into row yi of y, with ft the frame
    block transposed, F^T [2l, 2k] (`cpu.rewrite` gives the fused input side F^T). Blocks in
    groups of GROUP, each block's 2k outputs as full vectors and one short one (18 = 16 + 2 at 16
    lanes), its inputs broadcast.
    One block at a time was one chain of 2l dependent multiply-adds (~4x slower on Zen 4); an
    18-lane vector made LLVM rebuild F^T's rows lane by lane for every row."""
    ins, outs = nblk * two_l, nblk * two_k
    tree_blocks = _tree_blocks(two_l, two_k, lanes)
    tree = tree_blocks > 0
    G = tree_blocks or GROUP
    grouped = _tree_group(two_k, G, lanes) if tree else _block_group(two_l, two_k, G, lanes)
    single = _block_group(two_l, two_k, 1, lanes)
    e = two_k - lanes
    size = G * two_k + (e * lanes if tree else 0)

    @T.macro
    def row(xi, x, ft, yi, y):
        acc = T.alloc_buffer((size,), "float32", annotations=STACK)
        if tree:  # F's extra rows, contiguous after the accumulators
            for o, c in T.grid(max(e, 0), lanes):
                acc[G * two_k + o * lanes + c] = ft[c, lanes + o]
        for g in range(nblk // G):
            grouped(g * G, xi, x, ft, yi, y, acc)
        for b in range(nblk // G * G, nblk):
            single(b, xi, x, ft, yi, y, acc)
        for j in range(tail):
            y[yi, outs + j] = x[xi, ins + j]

    return row


def _tree_blocks(two_l: int, two_k: int, lanes: int) -> int:
    """Blocks per group of `_tree_group` (0 where it does not apply): a block's inputs are one
    vector and its e = 2k - L extra outputs divide the lanes (r = 1.1 at 16 lanes: 8 blocks)."""
    e = two_k - lanes
    return lanes // e if two_l == lanes and 1 < e <= lanes and lanes % e == 0 else 0


def _tree_group(two_k: int, G: int, L: int):
    """macro(b0, xi, x, ft, yi, y, acc): blocks b0 .. b0 + G - 1 of row xi (2l = L inputs each).
    The first L outputs of each block as broadcast-multiply-adds (one full vector per block), the
    e = 2k - L others as dot products: each block's input vector times F's extra rows, the G x e
    products summed across lanes at once (`lane_sums`). The extra outputs as 2 of 18 lanes doubled
    the multiply-adds and spilled F^T's rows (27 cycles a block on Zen 4)."""
    e = two_k - L

    def extras(xi, x, acc, b0):  # acc holds F's extra rows after the G x 2k outputs (`analysis_row`)
        rows = [acc[T.ramp(G * two_k + o * L, 1, L)] for o in range(e)]
        return lane_sums([x[xi, T.ramp((b0 + g) * L, 1, L)] * rows[o] for g in range(G) for o in range(e)], L)

    @T.macro
    def group(b0, xi, x, ft, yi, y, acc):
        for g in T.unroll(G):
            acc[T.ramp(g * L, 1, L)] = T.Broadcast(T.float32(0), L)
        for c in T.unroll(L):
            for g in T.unroll(G):
                acc[T.ramp(g * L, 1, L)] = acc[T.ramp(g * L, 1, L)] + T.Broadcast(
                    x[xi, (b0 + g) * L + c], L) * ft[c, T.ramp(0, 1, L)]
        acc[T.ramp(G * L, 1, L)] = extras(xi, x, acc, b0)
        for g in T.unroll(G):
            y[yi, T.ramp((b0 + g) * two_k, 1, L)] = acc[T.ramp(g * L, 1, L)]
            y[yi, T.ramp((b0 + g) * two_k + L, 1, e)] = acc[T.ramp(G * L + g * e, 1, e)]

    return group


def _block_group(two_l: int, two_k: int, G: int, lanes: int):
    """macro(b0, xi, x, ft, yi, y, acc): blocks b0 .. b0 + G - 1 of row xi into row yi of y."""
    L = min(lanes, two_k)
    full, rest = two_k // L, two_k % L

    @T.macro
    def group(b0, xi, x, ft, yi, y, acc):
        for g in T.unroll(G):
            for v in T.unroll(full):
                acc[T.ramp(g * two_k + v * L, 1, L)] = T.Broadcast(T.float32(0), L)
            for r in T.unroll(full * L, two_k):
                acc[g * two_k + r] = T.float32(0)
        for c in T.unroll(two_l):
            for g in T.unroll(G):
                for v in T.unroll(full):
                    acc[T.ramp(g * two_k + v * L, 1, L)] = acc[T.ramp(g * two_k + v * L, 1, L)] + T.Broadcast(
                        x[xi, (b0 + g) * two_l + c], L) * ft[c, T.ramp(v * L, 1, L)]
                if rest > 1:
                    acc[T.ramp(g * two_k + full * L, 1, rest)] = acc[T.ramp(g * two_k + full * L, 1, rest)] + \
                        T.Broadcast(x[xi, (b0 + g) * two_l + c], rest) * ft[c, T.ramp(full * L, 1, rest)]
                if rest == 1:
                    acc[g * two_k + two_k - 1] = acc[g * two_k + two_k - 1] + x[xi, (b0 + g) * two_l + c] * \
                        ft[c, two_k - 1]
        for g in T.unroll(G):
            for v in T.unroll(full):
                y[yi, T.ramp((b0 + g) * two_k + v * L, 1, L)] = acc[T.ramp(g * two_k + v * L, 1, L)]
            for r in T.unroll(full * L, two_k):
                y[yi, (b0 + g) * two_k + r] = acc[g * two_k + r]

    return group


SYNTHESIS_KIND = "frame_synthesis_rows"


@parsed_once
def frame_synthesis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    """The transposed frame (a quantized tied embedding's P^T): per row, each group of 2k inputs
    times F (2k x 2l), broadcast-multiply-adds into a vector of the 2l outputs (F's rows are
    contiguous, so no transposed copy). Same buffers as `kernels.frame_synthesis`."""
    body, din = nblk * two_k, nblk * two_l

    @T.macro
    def row(i, x, F, y):
        acc = T.alloc_buffer((two_l,), "float32", annotations=STACK)
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

    func = row_kernel(body + tail, din + tail, (two_k, two_l), each_row(row))
    return func.with_attrs({"fq_kernel": SYNTHESIS_KIND, "op_pattern": OPAQUE})
