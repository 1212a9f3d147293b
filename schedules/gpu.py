"""CUDA schedules: every block thread-bound. `rewrite` first fuses each layer side's row
transforms into one kernel and lets the row count choose the code reduction at run time (GEMV
or tiled). Other large reductions use one thread block per output and a cross-thread (warp
shuffle) reduction; elementwise stages and small reductions use one thread per output."""

from __future__ import annotations

import tvm
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
    """A per-row quantized layer scheduled alone (not through `rewrite`) runs the tiled form of
    the kernel (same buffers). Float activations whatever act_bits asks (no int8 GPU kernel yet)."""
    from . import kernels

    attrs = func.attrs
    if str(attrs["fq_kernel"]) != "dequant_matmul" or int(attrs.get("fq_group", 0)):
        return func
    tiled = kernels.dequant_matmul_tiled(int(attrs["fq_rows"]), int(attrs["fq_cols"]), int(attrs["fq_bits"]),
                                         TILE_ROWS)
    return tiled.with_attr("global_symbol", attrs["global_symbol"])


def dequant_matmul_tiled(sch: s_tir.Schedule, target) -> None:
    """acc = xpad @ w^T as a tiled matmul in one kernel: per block a 32 x 64 output tile, per
    thread 4 x 4 in registers, written straight to y; per step of 32 codes, the activation tile
    and the dequantized code tile (decoded once, straight from the packed bytes) are staged in
    shared memory."""
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
    sch.set_scope(acc, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("y"), tn)
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


GEMV_THREADS = 128
GEMV_WEIGHT_ROWS = 8  # weight rows per block: each activation load serves this many rows


def dequant_gemv(sch: s_tir.Schedule, target) -> None:
    """GEMV_WEIGHT_ROWS weight rows per thread block, looping over the activation rows; its threads
    split the packed bytes (thread t takes bytes t, t + 128, ...), each loading the 4 activations
    of a byte once (one 128-bit load for 2-bit codes when the row needs no padding) for all the
    block's weight rows, decoding every code of its bytes; per output, a warp-shuffle reduction."""
    y = sch.get_sblock("y")
    i, n, b, t = sch.get_loops(y)
    if _extent(sch, b) % GEMV_THREADS:  # compute_at below would drop an uneven split's guard
        raise ValueError(f"dequant_gemv on a GPU wants its bytes padded to a multiple of {GEMV_THREADS} "
                         "(kernels.dequant_gemv byte_tile)")
    nb, nr = sch.split(n, [None, GEMV_WEIGHT_ROWS])
    bo, bt = sch.split(b, [None, GEMV_THREADS])
    sch.reorder(nb, i, nr, bt, bo, t)
    part = sch.rfactor(bt, 0)  # part[bt, i, n]: each thread's share of every output
    sch.bind(nb, "blockIdx.x")
    sch.bind(bt, "threadIdx.x")
    sch.compute_at(part, i)
    sch.set_scope(part, 0, "local")
    inner = sch.get_loops(part)[2:]  # threads, weight rows, [byte steps: gone if one], codes
    pbt, pnr, pt = inner[0], inner[1], inner[-1]
    step = inner[2] if len(inner) == 4 else pbt
    sch.reorder(*inner[2:], pnr)
    sch.bind(pbt, "threadIdx.x")
    if _codes_per_byte(sch) > 1 and not _padded_row(sch):  # a byte's activations: one vector load
        reads = [r.source.name for r in sch.get(part).reads]
        xs = sch.cache_read(part, reads.index("x"), "local")
        sch.compute_at(xs, step)
        sch.vectorize(sch.get_loops(xs)[-1])
    sch.unroll(pt)
    sch.unroll(pnr)
    sch.decompose_reduction(part, inner[2])


def _codes_per_byte(sch) -> int:
    return 8 // int(sch.mod["main"].attrs["fq_bits"])


def _padded_row(sch) -> bool:
    """Whether the kernel reads through a guard: codes or bytes padded past the activation row."""
    a = sch.mod["main"].attrs
    per = _codes_per_byte(sch)
    width = -(-int(a["fq_cols"]) // per)
    return width * per != int(a["fq_cols"]) or width % GEMV_THREADS != 0


TRANSFORM_THREADS = 1024  # one block per row: at M = 1 the whole transform is this block's work
DYN_SHARED_BYTES = 200 * 1024  # dynamic shared memory a block may opt in to (H100: 227 KB)


def transform(sch: s_tir.Schedule, target) -> None:
    """A chain of row transforms (`kernels.transform`, or one Hadamard) as one kernel: one thread
    block per row, every intermediate in shared memory (dynamic shared memory past 48 KB); the
    pad / take copies are inlined into their neighbours. Longer rows keep one kernel per stage."""
    need = 2 * 4 * int(sch.mod["main"].attrs["fq_dim"])
    if need > DYN_SHARED_BYTES:
        elementwise(sch, target)
        return
    scope = "shared" if need <= SHARED_BYTES else "shared.dyn"
    for block in blocks(sch):
        if sch.get(block).name_hint.startswith("copy"):
            sch.compute_inline(block)
    out = blocks(sch)[-1]
    if len(blocks(sch)) > 1 and _is_copy(sch, out):
        try:
            sch.reverse_compute_inline(out)
            out = blocks(sch)[-1]
        except Exception:  # noqa: BLE001 - not inlinable: it stays a last shared-memory pass
            pass
    row, col = sch.get_loops(out)[:2]  # a frame's reduction loop stays inside the thread
    sch.bind(row, "blockIdx.x")
    sch.bind(sch.split(col, [None, TRANSFORM_THREADS])[1], "threadIdx.x")
    for block in reversed(blocks(sch)[:-1]):  # producers, last stage first
        sch.compute_at(block, row)
        sch.set_scope(block, 0, scope)
        sch.bind(sch.split(sch.get_loops(block)[1], [None, TRANSFORM_THREADS])[1], "threadIdx.x")


def _is_copy(sch, block) -> bool:
    body = sch.get(block).body
    return isinstance(body, tvm.tirx.BufferStore) and type(body.value).__name__ == "BufferLoad"


RULES: dict = {"hadamard": transform, "dequant_matmul": dequant_matmul,
               "dequant_matmul_tiled": dequant_matmul_tiled, "dequant_gemv": dequant_gemv, "transform": transform}
DEFAULT = elementwise


GEMV_ROWS = 8  # up to this many activation rows a per-row layer runs the GEMV form (H100: crossover 7-18 rows)


def rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    """Relax rewrites for GPUs: each run of row transforms (pad, Hadamard, frame, take) becomes one
    `transform` kernel, and each per-row quantized matmul a call to a small Relax function choosing
    by the row count at run time: the GEMV form up to GEMV_ROWS rows, the tiled form above."""
    from tvm import relax

    from .chains import callee, drop_unused, transform_name, transform_plans
    from .common import mutate_relax_functions

    plans = transform_plans(mod)

    @relax.expr_functor.mutator
    class _Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.added = {}

        def visit_call_(self, call):
            if call in plans:
                source, steps, consts = plans[call]
                gvar = self._add(transform_name(steps), lambda: _kernels().transform(steps))
                return relax.call_tir(gvar, [self.visit_expr(source), *consts], call.ty)
            call = super().visit_call_(call)
            func = callee(mod, call)
            if func is not None and str(func.attrs["fq_kernel"]) == "dequant_matmul" \
                    and not int(func.attrs.get("fq_group", 0)):
                weights = [arg.ty for arg in list(call.args[1].fields)[1:4]]
                gvar = self._add(f"{func.attrs['global_symbol']}_rows", lambda: self._by_rows(func, weights))
                return relax.Call(gvar, list(call.args[1].fields))
            return call

        def _add(self, name, make):
            if name not in self.added:
                func = make()
                if isinstance(func, tvm.tirx.PrimFunc):
                    func = func.with_attr("global_symbol", name)
                self.added[name] = self.builder_.add_func(func, name)
            return self.added[name]

        def _by_rows(self, func, weights):
            a = func.attrs
            base = str(a["global_symbol"])
            gemv = self._add(f"{base}_gemv", lambda: _kernels().dequant_gemv(
                int(a["fq_rows"]), int(a["fq_cols"]), int(a["fq_bits"]), GEMV_THREADS))
            tiled = self._add(f"{base}_tiled", lambda: _kernels().dequant_matmul_tiled(
                int(a["fq_rows"]), int(a["fq_cols"]), int(a["fq_bits"]), TILE_ROWS))
            return _row_switch(func, gemv, tiled, weights)

    return drop_unused(mutate_relax_functions(mod, _Rewrite(mod)))


def _kernels():
    from . import kernels

    return kernels


def _row_switch(func, gemv, tiled, weights):
    """A Relax function (x, packed, scale, zero) -> y that calls `gemv` for few rows, else `tiled`."""
    from tvm import relax, tirx

    a = func.attrs
    m = tirx.Var("m", "int64")
    params = [relax.Var("x", relax.TensorType([m, int(a["fq_cols"])], "float32"))]
    params += [relax.Var(name, ty) for name, ty in zip(("packed", "scale", "zero"), weights)]
    out = relax.TensorType([m, int(a["fq_rows"])], "float32")
    bb = relax.BlockBuilder()
    with bb.function("by_rows", params, private=True):
        branch = relax.If(relax.prim_value(m <= tirx.IntImm("int64", GEMV_ROWS)),
                          relax.SeqExpr([], relax.call_tir(gemv, params, out)),
                          relax.SeqExpr([], relax.call_tir(tiled, params, out)))
        bb.emit_func_output(bb.emit(branch))
    return bb.get()["by_rows"]
