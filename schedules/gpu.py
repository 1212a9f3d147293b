"""CUDA schedules: every block thread-bound. `rewrite` first fuses each layer side's row
transforms into one kernel and lets the row count choose the code reduction at run time (GEMV
or tensor cores; the tiled CUDA-core form stays for a layer scheduled alone). Other large
reductions use one thread block per output and a cross-thread (warp shuffle) reduction;
elementwise stages and small reductions use one thread per output."""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace

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


@dataclass(frozen=True)
class TensorCoreTiles:
    """A block of warps_m x warps_n warps, each computing frags_m x frags_n 16 x 16 fragments;
    k_frags 16-code steps per shared-memory stage; the codes split into `splits` slices summed
    by a second kernel (more blocks in flight when the rows are few)."""
    warps_m: int = 1
    warps_n: int = 4
    frags_m: int = 1
    frags_n: int = 1
    k_frags: int = 4
    splits: int = 1

    @property
    def tile(self) -> tuple[int, int, int]:
        return 16 * self.warps_m * self.frags_m, 16 * self.warps_n * self.frags_n, 16 * self.k_frags


# Chosen on an H100 (2026-11-27, benchmarks/cuda_check.py --kernels, 4096 x 4608 2-bit): 16 x 64
# tiles up to 32 rows (0.015 ms at 16 rows, 8 slices; 64 x 64 tiles 0.023), 64 x 64 above
# (0.042 ms at 128 rows, 4 slices; 16 x 64 tiles 0.077).
FEW_ROWS_TILES = TensorCoreTiles(1, 4, 1, 1, 4)
MANY_ROWS_TILES = TensorCoreTiles(2, 2, 2, 2, 4)
SMALL_ROWS = 32  # up to this many rows the FEW_ROWS_TILES kernel, above it MANY_ROWS_TILES
FEW_ROWS_SLICES = 8  # 4096 x 4608: 8 slices 0.015 ms, 4 0.020, 2 0.032, 1 0.066 (16 rows)
MANY_ROWS_BLOCKS = 512  # blocks wanted at 128 rows: 4 slices for 4096 weight rows, 1 for 11008


def tensor_core_tiles(rows: int, cols: int, few_rows: bool) -> TensorCoreTiles:
    """The bucket's tiles, its codes cut into as few equal slices (whole k steps) as give
    FEW_ROWS_SLICES, or about MANY_ROWS_BLOCKS blocks at 128 rows."""
    base = FEW_ROWS_TILES if few_rows else MANY_ROWS_TILES
    tile_m, tile_n, tile_k = base.tile
    units = -(-cols // tile_k)
    wanted = FEW_ROWS_SLICES if few_rows else round(MANY_ROWS_BLOCKS / (-(-rows // tile_n) * (128 // tile_m)))
    per_slice = -(-units // max(1, min(wanted, units)))
    return replace(base, splits=-(-units // per_slice))


def tensor_core_kernel(rows: int, cols: int, bits: int, tiles: TensorCoreTiles):
    """`kernels.dequant_matmul_tc` for these tiles, which its schedule reads back (`fq_tiles`)."""
    from . import kernels

    func = kernels.dequant_matmul_tc(rows, cols, bits, tiles.tile, tiles.splits)
    return func.with_attr("fq_tiles", list(astuple(tiles)))


def dequant_matmul_tc(sch: s_tir.Schedule, target) -> None:
    tc_schedule(sch, TensorCoreTiles(*(int(v) for v in sch.mod["main"].attrs["fq_tiles"])))


def tc_schedule(sch: s_tir.Schedule, cfg: TensorCoreTiles) -> None:
    """part[s] on tensor cores (WMMA 16 x 16 x 16, float16 in, float32 accumulators): per block a
    tile of rows x weight rows for one code slice (blockIdx.z); per stage, the activation tile
    (cast) and the code tile (decoded once, a byte per thread) staged in shared memory, then
    loaded into fragments. The accumulators go through shared memory to `part`, or straight to y
    when there is one slice; the slices' sum is a second, elementwise kernel."""
    from .cuda_wmma import intrinsics

    intrin = intrinsics("shared", "shared.dyn")
    part = sch.get_sblock("part")
    s, i, n, c = sch.get_loops(part)
    i, i16 = sch.split(i, [None, 16])
    n, n16 = sch.split(n, [None, 16])
    c, c16 = sch.split(c, [None, 16])
    sch.reorder(i, n, c, i16, n16, c16)
    outer = sch.blockize(i16)
    i0, i1, i2 = sch.split(i, [None, cfg.warps_m, cfg.frags_m])
    n0, n1, n2 = sch.split(n, [None, cfg.warps_n, cfg.frags_n])
    k0, k1 = sch.split(c, [None, cfg.k_frags])
    sch.reorder(s, i0, n0, i1, n1, k0, k1, i2, n2)
    sch.bind(s, "blockIdx.z")
    sch.bind(i0, "blockIdx.y")
    sch.bind(n0, "blockIdx.x")
    warp = sch.fuse(i1, n1)
    sch.bind(warp, "threadIdx.y")
    warps = cfg.warps_m * cfg.warps_n
    for index in (0, 1):  # activations (float4 loads), codes (a byte of codes per thread)
        stage = sch.cache_read(outer, index, "shared")
        sch.compute_at(stage, k0)
        per = 4 if index == 0 else 8 // int(sch.mod["main"].attrs["fq_bits"])
        _, ty, tx, inner = sch.split(sch.fuse(*sch.get_loops(stage)[-2:]), [None, warps, 32, per])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        if index == 0:
            sch.vectorize(inner)
        else:
            sch.unroll(inner)
        sch.storage_align(stage, 0, axis=-2, factor=16, offset=8)
    sch.compute_inline(sch.get_sblock("xh"))
    sch.compute_inline(sch.get_sblock("wh"))
    frag_a = sch.cache_read(outer, 0, "wmma.matrix_a")
    frag_b = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(frag_a, k1)
    sch.compute_at(frag_b, k1)
    staged = sch.cache_write(outer, 0, "shared.dyn")  # not "shared": StorageRewrite would reuse a float16 stage for it
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(staged, warp)
    init = sch.get_child_blocks(sch.decompose_reduction(outer, k0))[0]
    for block, name in ((frag_a, "load_a"), (frag_b, "load_b"), (store, "store")):
        sch.tensorize(_tiles16(sch, block), intrin[name])
    sch.tensorize(sch.get_loops(init)[-2], intrin["fill"])
    sch.tensorize(sch.get_loops(part)[-3], intrin["mma"])
    y = sch.get_sblock("y")
    if cfg.splits == 1:  # y straight from the staged accumulators
        sch.compute_inline(sch.get_sblock("part_shared.dyn"))
        sch.reverse_compute_at(y, warp)
        _, tx = sch.split(sch.fuse(*sch.get_loops(y)[-2:]), [None, 32])
        sch.bind(tx, "threadIdx.x")
    else:
        _, tx = sch.split(sch.fuse(*sch.get_loops(staged)[-2:]), [None, 32])
        sch.bind(tx, "threadIdx.x")
        one_thread_per_output(sch, y)


def _tiles16(sch, block):
    """Split a block's last two loops into 16 x 16 tiles; the loop a 16 x 16 intrinsic replaces."""
    a, b = sch.get_loops(block)[-2:]
    a0, a1 = sch.split(a, [None, 16])
    b0, b1 = sch.split(b, [None, 16])
    sch.reorder(a0, b0, a1, b1)
    return a1


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


TRANSFORM_THREADS = 512  # one block per row (H100, 4096 input side: 512 threads 0.018 ms, 1024 0.020, 256 0.019)
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
    frame = None
    if is_reduction(sch, out):  # a last frame step sums in a register, not in y
        sch.cache_write(out, 0, "local")
        frame, out = out, blocks(sch)[-1]
    row, col = sch.get_loops(out)[:2]
    sch.bind(row, "blockIdx.x")
    thread = sch.split(col, [None, TRANSFORM_THREADS])[1]
    sch.bind(thread, "threadIdx.x")
    if frame is not None:
        sch.compute_at(frame, thread)
    for block in reversed(blocks(sch)[:-1]):  # producers, last stage first
        if frame is not None and sch.get(block).same_as(sch.get(frame)):
            continue
        sch.compute_at(block, row)
        sch.set_scope(block, 0, scope)
        sch.bind(sch.split(sch.get_loops(block)[1], [None, TRANSFORM_THREADS])[1], "threadIdx.x")


def _is_copy(sch, block) -> bool:
    body = sch.get(block).body
    return isinstance(body, tvm.tirx.BufferStore) and type(body.value).__name__ == "BufferLoad"


# H100 (2026-11-27): 4096 input side 0.0177 -> 0.0162 ms, inverse 0.0066 -> 0.0049. Not the GEMV:
# its 4096 x 4608 2-bit kernel went 0.0089 -> 0.0113 ms at one row (8-bit 0.0166 -> 0.0134); not
# the tensor-core kernel, whose build failed narrowed (mismatched types int64 vs int32).
NARROWED = ("transform", "hadamard")


def finish(func):
    """The layer sides with 32-bit index arithmetic. Their int64 shapes (the symbolic row count)
    made every index an int64 (1350 int64 operations in the 4096 input side's CUDA source, which
    one block per row executes alone); rows x width stays far below 2^31 here."""
    if str(func.attrs["fq_kernel"]) not in NARROWED:
        return func
    return tvm.tirx.transform.ForceNarrowIndexToInt32()(tvm.IRModule({"main": func}))["main"]


RULES: dict = {"hadamard": transform, "dequant_matmul": dequant_matmul, "dequant_matmul_tiled": dequant_matmul_tiled,
               "dequant_matmul_tc": dequant_matmul_tc, "dequant_gemv": dequant_gemv, "transform": transform}
DEFAULT = elementwise


GEMV_ROWS = {2: 2, 4: 4, 8: 4}  # up to this many activation rows (by code bits) the GEMV form (H100,
# 4096 x 4608 2-bit: GEMV 0.009 ms at 1 row, 0.028 at 4; tensor cores 0.015 at 1-16; 8-bit: 0.027 both at 4)


def rewrite(mod: tvm.IRModule, _target=None, _act_bits: int = 8) -> tvm.IRModule:
    """Relax rewrites for GPUs: each run of row transforms (pad, Hadamard, frame, take) becomes one
    `transform` kernel, and each per-row quantized matmul a call to a small Relax function choosing
    by the row count at run time: the GEMV form up to GEMV_ROWS rows, tensor cores above (16-row
    tiles up to SMALL_ROWS, 64 x 64 beyond)."""
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
            rows, cols, bits = int(a["fq_rows"]), int(a["fq_cols"]), int(a["fq_bits"])
            gemv = self._add(f"{base}_gemv", lambda: _kernels().dequant_gemv(rows, cols, bits, GEMV_THREADS))
            few = self._add(f"{base}_tc16", lambda: tensor_core_kernel(
                rows, cols, bits, tensor_core_tiles(rows, cols, few_rows=True)))
            many = self._add(f"{base}_tc64", lambda: tensor_core_kernel(
                rows, cols, bits, tensor_core_tiles(rows, cols, few_rows=False)))
            return _row_switch(func, [(GEMV_ROWS[bits], gemv), (SMALL_ROWS, few), (None, many)], weights)

    return drop_unused(mutate_relax_functions(mod, _Rewrite(mod)))


def _kernels():
    from . import kernels

    return kernels


def _row_switch(func, buckets, weights):
    """A Relax function (x, packed, scale, zero) -> y calling the first bucket's kernel whose row
    limit the row count m does not pass (buckets: [(limit, kernel), ..., (None, kernel)])."""
    from tvm import relax, tirx

    a = func.attrs
    m = tirx.Var("m", "int64")
    params = [relax.Var("x", relax.TensorType([m, int(a["fq_cols"])], "float32"))]
    params += [relax.Var(name, ty) for name, ty in zip(("packed", "scale", "zero"), weights)]
    out = relax.TensorType([m, int(a["fq_rows"])], "float32")

    def choose(rest):
        (limit, kernel), rest = rest[0], rest[1:]
        call = relax.call_tir(kernel, params, out)
        if limit is None:
            return call
        return relax.If(relax.prim_value(m <= tirx.IntImm("int64", limit)), relax.SeqExpr([], call),
                        relax.SeqExpr([], choose(rest)))

    bb = relax.BlockBuilder()
    with bb.function("by_rows", params, private=True):
        bb.emit_func_output(bb.emit(choose(buckets)))
    return bb.get()["by_rows"]
