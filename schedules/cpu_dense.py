"""The CPU fp32 dense layer: y[m, N] = x[m, K] @ W[K, N] for a constant W.

W is packed when the model is compiled into column panels `wp[N / C, K, C]` (C = NV vectors of
the target's float lanes), so that a register tile of MR rows x C columns reads one contiguous
panel row per step of the reduction: NV vector loads, MR broadcasts of x and MR x NV fused
multiply-adds, with the MR x NV accumulators in registers. The reduction runs in cache blocks of
KC columns (a panel block stays in L1 while every row tile passes over it); parallel tasks take
column panels.

A tied embedding table (`W = E^T [K, N]` after passes/tied_weights.py) is packed too, and its
gathers `take(W, ids, axis=1)` read the packed panels (`gather_columns`: column n is
`wp[n / C, :, n % C]`, as strided as the column of W was). SmolLM2's 576 x 49152 head, two
threads, AMD EPYC Zen 4: 42.0 -> 36.2 ms at 128 rows, 6.4 -> 5.1 ms at one row. A weight other
ops read any other way is read in place, `W [K, N]`: with MR rows or more each task first copies
its block of W into a panel buffer; with fewer (a decode step) each task streams its 2048 columns
of every row of W once, the few rows of y staying in cache (`few_rows`).

`dispatch` is the Relax rewrite that routes `R.matmul(x, W)` with a constant 2-D float32 W here,
as TVM's backends route ops to a vendor library before legalization.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # a Relax tensor constant
from tvm.script import tirx as T

from .common import STACK, dispatch_pass, parsed_once
from .kernels import OPAQUE

KIND = "dense_fp32"
KC = 256  # reduction columns per cache block
TASK_COLS = 64  # output columns per parallel task, at most
MIN_TASKS = 8  # narrower tasks where a layer would have fewer (192 columns: 3 tasks load 2 threads 2:1)
FEW_ROWS_COLS = 2048  # W read in place by fewer than MR rows: columns per task (8 KB of each W row)
TILES = {4: (6, 4), 8: (6, 2), 16: (6, 2)}  # float lanes -> (MR <= 6 rows, NV vectors): 12-24 accumulators


def tile(lanes: int) -> tuple[int, int]:
    return TILES.get(lanes, (4, 2))


def panel_cols(lanes: int) -> int:
    return tile(lanes)[1] * lanes


def panels_per_task(panels: int, cols: int) -> int:
    """The most panels per parallel task (up to TASK_COLS columns) that still give MIN_TASKS tasks."""
    per = max(1, TASK_COLS // cols)
    while per > 1 and -(-panels // per) < MIN_TASKS:
        per -= 1
    return per


def pack(w: np.ndarray, lanes: int) -> np.ndarray:
    """W [K, N] -> wp [N / C, K, C]."""
    k, n = w.shape
    c = panel_cols(lanes)
    return np.ascontiguousarray(w.reshape(k, n // c, c).transpose(1, 0, 2))


@parsed_once
def dense(K: int, N: int, lanes: int, packed: bool = True) -> tvm.tirx.PrimFunc:
    """The kernel for W packed (`wp [N / C, K, C]`), or read in place (`W [K, N]`, for a weight
    that other ops use too)."""
    L = lanes
    MR, NV = tile(L)
    C = NV * L
    NP = N // C  # column panels
    PT = panels_per_task(NP, C)
    NKC = -(-K // KC)

    def row(buf, i, col):
        return buf[i, T.ramp(col, 1, L)]

    def panel(w, wloc, pt, p, kc, k, col):  # L columns of panel p at step k of block kc
        return w[p, kc * KC + k, T.ramp(col, 1, L)] if packed else wloc[T.ramp((pt * KC + k) * C + col, 1, L)]

    @T.macro
    def rows(R, i0, pt, p, kc, x, wp, wloc, y, acc):
        for r in T.unroll(R):
            for v in T.unroll(NV):
                acc[T.ramp((r * NV + v) * L, 1, L)] = T.if_then_else(
                    kc == 0, T.Broadcast(T.float32(0), L), row(y, i0 + r, p * C + v * L))
        for k in range(T.min(KC, K - kc * KC)):
            for r in T.unroll(R):
                for v in T.unroll(NV):
                    acc[T.ramp((r * NV + v) * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)] + T.Broadcast(
                        x[i0 + r, kc * KC + k], L) * panel(wp, wloc, pt, p, kc, k, v * L)
        for r in T.unroll(R):
            for v in T.unroll(NV):
                y[i0 + r, T.ramp(p * C + v * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)]

    @T.macro
    def tail(rest, i0, pt, p, kc, x, wp, wloc, y, acc):  # the last m % MR rows as one tile
        if rest == 1:  # (a 1-row tile chains one FMA per accumulator: latency-bound)
            rows(1, i0, pt, p, kc, x, wp, wloc, y, acc)
        if rest == 2:
            rows(2, i0, pt, p, kc, x, wp, wloc, y, acc)
        if rest == 3:
            rows(3, i0, pt, p, kc, x, wp, wloc, y, acc)
        if rest == 4:
            rows(4, i0, pt, p, kc, x, wp, wloc, y, acc)
        if rest == 5:
            rows(5, i0, pt, p, kc, x, wp, wloc, y, acc)

    @T.macro
    def gather(task, kc, wp, wloc):  # in place: this task's block of W, packed (strided reads cost 2.5x)
        if not packed:
            for pt in range(T.min(PT, NP - task * PT)):
                for k in range(T.min(KC, K - kc * KC)):
                    for c in T.vectorized(C):
                        wloc[(pt * KC + k) * C + c] = wp[kc * KC + k, (task * PT + pt) * C + c]

    @T.macro
    def blocked(m, x, wp, y):  # register tiles of MR rows over cache blocks of W
        for task in T.parallel(-(-NP // PT)):
            acc = T.alloc_buffer((6 * C,), "float32", annotations=STACK)
            wloc = T.alloc_buffer((1 if packed else PT * KC * C,), "float32")
            for kc in range(NKC):
                gather(task, kc, wp, wloc)
                for pt in range(T.min(PT, NP - task * PT)):
                    for it in range(m // MR):
                        rows(MR, it * MR, pt, task * PT + pt, kc, x, wp, wloc, y, acc)
                    tail(m % MR, m // MR * MR, pt, task * PT + pt, kc, x, wp, wloc, y, acc)

    PG = max(1, min(-(-NP // MIN_TASKS), FEW_ROWS_COLS // C))  # panels per task, few rows

    @T.macro
    def few_rows(m, x, w, y):  # W [K, N] in place, m < MR: each row of W read once, contiguously
        for task in T.parallel(-(-NP // PG)):
            for i in range(m):
                for pt in range(T.min(PG, NP - task * PG)):
                    for v in T.unroll(NV):
                        y[i, T.ramp((task * PG + pt) * C + v * L, 1, L)] = T.Broadcast(T.float32(0), L)
            for k in range(K):
                for i in range(m):
                    for pt in range(T.min(PG, NP - task * PG)):
                        for v in T.unroll(NV):
                            y[i, T.ramp((task * PG + pt) * C + v * L, 1, L)] = y[
                                i, T.ramp((task * PG + pt) * C + v * L, 1, L)] + T.Broadcast(
                                x[i, k], L) * w[k, T.ramp((task * PG + pt) * C + v * L, 1, L)]

    @T.prim_func(private=True)
    def func(x_h: T.handle, wp: T.Buffer(((NP, K, C) if packed else (K, N)), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        if packed:  # resolved when the kernel is written
            blocked(m, x, wp, y)
        elif m < MR:
            few_rows(m, x, wp, y)
        else:
            blocked(m, x, wp, y)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


@parsed_once
def gather_columns(K: int, N: int, lanes: int, ids_dtype: str) -> tvm.tirx.PrimFunc:
    """out [K, T] = W[:, ids] for W packed as `wp [N / C, K, C]`: `take(W, ids, axis=1)` on the
    flattened ids. An id outside [0, N) reads column 0 or N - 1 (take's "fast" mode leaves that
    undefined; this reads nothing outside the table)."""
    C = panel_cols(lanes)
    NP = N // C

    @T.prim_func(private=True)
    def func(ids_h: T.handle, wp: T.Buffer((NP, K, C), "float32"), out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        t = T.int64()
        ids = T.match_buffer(ids_h, (t,), ids_dtype)
        out = T.match_buffer(out_h, (K, t), "float32")
        for j in range(t):
            n: T.let = T.Cast("int64", T.max(T.min(ids[j], T.Cast(ids_dtype, N - 1)), T.Cast(ids_dtype, 0)))
            for k in range(K):
                out[k, j] = wp[n // C, k, n % C]

    return func.with_attrs({"fq_kernel": "gather_columns", "op_pattern": OPAQUE, "tirx.is_scheduled": True})


def _dims(expr) -> tuple | None:
    """(rows, cols) of a 2-D float32 constant, else None; its values are read only to pack them."""
    if isinstance(expr, GenericConst) and expr.value.dtype == "float32" and len(expr.value.shape) == 2:
        return tuple(int(d) for d in expr.value.shape)
    return None


def _shape(expr) -> list | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None or len(ty.shape) < 2:
        return None
    return list(ty.shape)


def _column_gather(call) -> bool:
    return call.op == tvm.ir.Op.get("relax.take") and int(call.attrs.axis) == 1


@relax.expr_functor.visitor
class _Uses(relax.PyExprVisitor):
    """For each 2-D constant (directly or through a variable bound to it), how many call arguments
    it is that are not a matmul's weight (nor the transpose feeding one) nor a column gather
    (`take(W, ids, axis=1)`, a tied embedding): a table read any other way."""

    def __init__(self):
        super().__init__()
        self.count: dict = {}
        self.bound: dict = {}  # var -> the 2-D constant it is bound to
        self.weights: set = set()  # constants that are a matmul's weight as they are (not transposed)

    def visit_var_binding_(self, binding):
        if isinstance(binding.value, GenericConst) and len(binding.value.value.shape) == 2:
            self.bound[binding.var] = binding.value
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        weight = {"relax.matmul": 1, "relax.permute_dims": 0}.get(getattr(call.op, "name", None))
        weight = 0 if _column_gather(call) else weight
        for pos, arg in enumerate(call.args):
            const = self.bound.get(arg, arg)
            if isinstance(const, GenericConst) and len(const.value.shape) == 2 and pos != weight:
                self.count[const] = self.count.get(const, 0) + 1
            elif isinstance(const, GenericConst) and call.op == tvm.ir.Op.get("relax.matmul"):
                self.weights.add(const)
        super().visit_call_(call)


@relax.expr_functor.mutator
class _Dispatch(relax.PyExprMutator):
    """Weights are packed once (a weight of several matmuls, in `main` and `main_last`, shares the
    packed constant), a tied table's column gathers included; a weight read any other way too is
    read in place, since packing a copy would store it twice."""

    def __init__(self, mod, lanes: int, uses: "_Uses"):
        super().__init__(mod)
        self.lanes = lanes
        self.uses = uses.count  # constant -> its reads other than as a weight or a column gather
        self.weights = uses.weights
        self.kernels = {}
        self.packed = {}  # constant -> its packed constant
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _column_gather(call):
            return self._gather(call)
        if call.op != tvm.ir.Op.get("relax.matmul"):
            return call
        const, transposed = self._constant(call.args[1])
        dims, shape = _dims(const), _shape(call.args[0])
        if dims is None or shape is None:
            return call
        K, N = dims[::-1] if transposed else dims
        shared = self.uses.get(const, 0) != 0
        if int(shape[-1]) != K or N % panel_cols(self.lanes) or (shared and transposed):
            return call
        return self._dense(call.args[0], shape, (K, N), const, transposed, shared)

    def _constant(self, expr):
        """(the constant, whether transposed) behind a matmul's weight: a constant, a variable bound
        to one, or `permute_dims` of one (ONNX Gemm with transB), which is left unused and removed."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if isinstance(bound, GenericConst):  # a variable bound to the constant (a tied head)
                return bound, False
            if (isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.permute_dims")
                    and isinstance(bound.args[0], GenericConst) and len(bound.args[0].value.shape) == 2
                    and (bound.attrs.axes is None or [int(a) for a in bound.attrs.axes] == [1, 0])):
                return bound.args[0], True
        return expr, False

    def _dense(self, x, shape, dims, const, transposed: bool, shared: bool):
        K, N = dims
        key = (K, N, not shared)
        if key not in self.kernels:
            name = f"fq_dense_{K}_{N}" + ("_in_place" if shared else "")
            self.kernels[key] = self.builder_.add_func(dense(K, N, self.lanes, packed=not shared), name)
        weight = const if shared else self._packed(const, transposed)
        flat = self.builder_.emit(relax.op.reshape(x, [-1, K])) if len(shape) != 2 else x
        rows = flat.ty.shape[0]
        y = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, weight],
                                              relax.TensorType([rows, N], "float32")))
        self.count += 1
        return y if len(shape) == 2 else relax.op.reshape(y, shape[:-1] + [N])

    def _packed(self, const, transposed: bool = False):
        """The packed constant of `const` (W, or W^T where transposed), packed on first use."""
        if const not in self.packed:
            w = const.value.numpy()
            self.packed[const] = relax.const(pack(w.T if transposed else w, self.lanes))
        return self.packed[const]

    def _gather(self, call):
        """take(W, ids, axis=1) on a table the head reads packed: `gather_columns` on the panels.
        The table is packed here if the gather comes first; a table that no matmul reads packed
        (its columns not whole panels, or read some other way too) keeps TVM's take."""
        const, transposed = self._constant(call.args[0])
        dims, ids = _dims(const), call.args[1]
        ids_ty = ids.ty
        if (dims is None or transposed or self.uses.get(const, 0) or const not in self.weights
                or dims[1] % panel_cols(self.lanes) or not isinstance(ids_ty, relax.TensorType)
                or ids_ty.shape is None or not len(ids_ty.shape) or ids_ty.dtype not in ("int32", "int64")):
            return call
        K, N = dims
        key = ("gather", K, N, ids_ty.dtype)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(gather_columns(K, N, self.lanes, ids_ty.dtype),
                                                       f"fq_gather_columns_{K}_{N}")
        shape = list(ids_ty.shape)
        count = shape[0]
        for extent in shape[1:]:
            count = count * extent
        flat = self.builder_.emit(relax.op.reshape(ids, [count])) if len(shape) != 1 else ids
        cols = self.builder_.emit(relax.call_tir(self.kernels[key], [flat, self._packed(const)],
                                                 relax.TensorType([K, count], "float32")))
        return cols if len(shape) == 1 else relax.op.reshape(cols, [K] + shape)


def dispatch(lanes: int, counts: dict | None = None):
    """A module pass: every `R.matmul(x, W)` with a constant float32 W whose columns are whole
    panels becomes a call of `dense`; `counts[KIND]` receives how many."""
    return dispatch_pass("fq.DispatchDense", KIND, lambda mod: _Dispatch(mod, lanes, _uses(mod)), counts)


def _uses(mod) -> _Uses:
    uses = _Uses()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            uses.visit_expr(func)
    return uses
