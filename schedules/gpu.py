"""CUDA schedules: every block thread-bound. Large reductions (the dequant-matmul over packed
codes) use one thread block per output and a cross-thread (warp shuffle) reduction; elementwise
stages and small reductions use one thread per output."""

from __future__ import annotations

import tvm.s_tir as s_tir

from .common import blocks, is_reduction

THREADS = 256  # threads per block for elementwise stages
REDUCE_THREADS = 128  # threads cooperating on one long reduction
SMALL_REDUCTION = 64  # reductions up to this length stay serial in one thread


def _extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if hasattr(ext, "value") else None


def _spatial_and_reduce(sch, block):
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = [lp for lp, it in zip(loops, iters) if it.iter_type != 2]
    reduce = [lp for lp, it in zip(loops, iters) if it.iter_type == 2]
    return spatial, reduce


def one_thread_per_output(sch: s_tir.Schedule, block) -> None:
    spatial, reduce = _spatial_and_reduce(sch, block)
    sch.reorder(*spatial, *reduce)
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def block_per_output(sch: s_tir.Schedule, block) -> None:
    spatial, reduce = _spatial_and_reduce(sch, block)
    sch.reorder(*spatial, *reduce)
    bx = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    red = sch.fuse(*reduce) if len(reduce) > 1 else reduce[0]
    _, tx = sch.split(red, [None, REDUCE_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _reduction_length(sch, block) -> int:
    _, reduce = _spatial_and_reduce(sch, block)
    total = 1
    for loop in reduce:
        ext = _extent(sch, loop)
        total *= ext if ext is not None else 1 << 30
    return total


def elementwise(sch: s_tir.Schedule, target) -> None:
    for block in blocks(sch):
        if is_reduction(sch, block) and _reduction_length(sch, block) > SMALL_REDUCTION:
            block_per_output(sch, block)
        else:
            one_thread_per_output(sch, block)


RULES: dict = {}
DEFAULT = elementwise
