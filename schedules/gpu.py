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
        _generic(sch, block)


SHARED_BYTES = 48 * 1024  # static shared memory per block without opting in


def hadamard(sch: s_tir.Schedule, target) -> None:
    """One thread block per row: the sign flip and every butterfly stage live in shared memory, so
    the whole transform is one kernel instead of one per stage. Rows too long for two shared
    buffers keep the per-stage kernels."""
    dim = int(sch.mod["main"].attrs["fq_dim"])
    if 2 * 4 * dim > SHARED_BYTES:
        elementwise(sch, target)
        return
    threads = min(THREADS, dim)
    out = sch.get_sblock("y")
    row, col = sch.get_loops(out)
    sch.bind(row, "blockIdx.x")
    sch.bind(sch.split(col, [None, threads])[1], "threadIdx.x")
    for block in reversed(blocks(sch)[:-1]):  # producers, last stage first
        sch.compute_at(block, row)
        sch.set_scope(block, 0, "shared")
        sch.bind(sch.split(sch.get_loops(block)[-1], [None, threads])[1], "threadIdx.x")


def dequant_matmul(sch: s_tir.Schedule, target) -> None:
    """The code reduction yq[i, n, g] gets one thread block per weight row and group (n, g) that
    loops over the activation rows i, so a row's packed codes are fetched from device memory once
    and re-read from cache for the other rows; other stages use the generic rule."""
    yq = sch.get_sblock("yq")
    i, n, g, t, b = sch.get_loops(yq)
    sch.reorder(n, g, i, t, b)
    sch.bind(sch.fuse(n, g), "blockIdx.x")
    sch.bind(sch.split(sch.fuse(t, b), [None, REDUCE_THREADS])[1], "threadIdx.x")
    for block in blocks(sch):
        if sch.get(block).name_hint != "yq":
            _generic(sch, block)


def _generic(sch, block) -> None:
    if is_reduction(sch, block) and _reduction_length(sch, block) > SMALL_REDUCTION:
        block_per_output(sch, block)
    else:
        one_thread_per_output(sch, block)


TILE_ROWS, TILE_COLS, TILE_K = 32, 64, 32  # activation rows x weight rows per block, codes per step
THREAD_ROWS, THREAD_COLS = 8, 16  # threads per block: each computes 4 x 4 outputs


WRITTEN_SCHEDULED = ()


def variant(func, target=None, act_bits: int = 32):
    """Per-row quantized layers run the tiled form of the kernel on GPUs (same buffers); float
    activations whatever act_bits asks (no int8 GPU kernel yet)."""
    from . import kernels

    attrs = func.attrs
    if str(attrs["fq_kernel"]) != "dequant_matmul" or int(attrs.get("fq_group", 0)):
        return func
    tiled = kernels.dequant_matmul_tiled(int(attrs["fq_rows"]), int(attrs["fq_cols"]), int(attrs["fq_bits"]),
                                         TILE_ROWS)
    return tiled.with_attr("global_symbol", attrs["global_symbol"])


def dequant_matmul_tiled(sch: s_tir.Schedule, target) -> None:
    """acc = xpad @ w^T as a tiled matmul: per block a 32 x 64 output tile, per thread 4 x 4 in
    registers; per step of 32 codes, the activation tile and the decoded code tile (decoded once,
    straight from the packed bytes) are staged in shared memory."""
    acc = sch.get_sblock("acc")
    i, n, c = sch.get_loops(acc)
    bi, ti, ii = sch.split(i, [None, THREAD_ROWS, TILE_ROWS // THREAD_ROWS])
    bn, tn, jn = sch.split(n, [None, THREAD_COLS, TILE_COLS // THREAD_COLS])
    ko, ki = sch.split(c, [None, TILE_K])
    sch.reorder(bi, bn, ti, tn, ko, ki, ii, jn)
    sch.bind(bi, "blockIdx.y")
    sch.bind(bn, "blockIdx.x")
    sch.bind(ti, "threadIdx.y")
    sch.bind(tn, "threadIdx.x")
    local = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(local, tn)
    for name in ("xpad", "w"):
        stage = sch.get_sblock(name)
        sch.set_scope(stage, 0, "shared")  # before compute_at: the region then covers the whole block
        sch.compute_at(stage, ko)
        sch.storage_align(stage, 0, axis=0, factor=32, offset=1)  # rows 33 floats apart: no bank conflicts
        loops = sch.get_loops(stage)[-2:]
        _, ty, tx = sch.split(sch.fuse(*loops), [None, THREAD_ROWS, THREAD_COLS])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
    sch.unroll(ki)
    sch.decompose_reduction(acc, ko)
    for block in blocks(sch):
        if sch.get(block).name_hint in ("xs", "y"):
            _generic(sch, block)


RULES: dict = {"hadamard": hadamard, "dequant_matmul": dequant_matmul,
               "dequant_matmul_tiled": dequant_matmul_tiled}
DEFAULT = elementwise
