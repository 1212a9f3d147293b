"""The CPU attention scores: o[b, h, i, j] = sum_d q[b, i, h, d] k[b, j, h, d].

Transformer exports compute them as `R.matmul(permute_dims(q, [0, 2, 1, 3]), permute_dims(k,
[0, 2, 3, 1]))` on the heads as the projections wrote them ([batch, seq, heads, head_dim]); the
fallback schedule materialised both transposes and ran the matmul one output row at a time with
the accumulator row in memory. Here q and k are read in place: per (batch, head) task, k's rows
are copied once into k^T [head_dim, seq]; a register tile of MR query rows x NV vectors of keys then
takes per head-dim step MR broadcasts of q, NV vector loads of k^T and MR x NV fused multiply-adds.
The last seq % C keys and seq % MR queries run as narrower tiles. Query and key lengths may differ
(a decoding step against a cache). Under MR query rows (decoding) k is read in place, DK keys at a
time, each a vector dot over head_dim: the k^T copy of the whole cache per head cost more than
the products (SmolLM2 decode, 190 keys: 77 us per layer).

Either operand may also come heads-major [batch, heads, seq, head_dim] (Llama exports transpose
before RoPE), and k may be shared by a group of query heads (grouped-query attention: the export's
expand_dims + broadcast_to + reshape copy is read through, head h reads k head h // group).

`dispatch` is the Relax rewrite (CPU, before legalization) that routes the pattern here;
`heads_view` is the operand matcher it shares with `cpu_attention_values`.
"""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import relax
from tvm_ffi import structural_equal
from tvm.script import tirx as T

from .common import AHEAD, LINE, STACK, dispatch_pass, prefetch
from .kernels import OPAQUE, at, layout

KIND = "attention_scores"
MR, NV = 4, 2  # query rows x key vectors: 8 accumulators
DK = 4  # keys per step of the few-query-rows path (independent dot products)


def prefetch_rows(D: int, seq_major: bool):
    """A macro fetch(buf, b, j, h, rows): prefetch the D values of row j + ahead of head h of a heads
    tensor (the last row past the end). A decoding step reads the cache once, from DRAM, and in a
    seq-major cache one head's rows lie apart, where the hardware prefetcher falls behind."""
    ahead = max(1, AHEAD // (4 * D))

    @T.macro
    def fetch(buf, b, j, h, rows):
        for line in T.unroll(max(1, 4 * D // LINE)):
            prefetch(at(buf, seq_major, b, T.min(j + ahead, rows - 1), h, line * LINE // 4))

    return fetch


def scores(H: int, D: int, lanes: int, q_seq: bool = True, k_seq: bool = True, group: int = 1) -> tvm.tirx.PrimFunc:
    """q [batch, sq, H, D] (q_seq) or [batch, H, sq, D]; k likewise with H // group heads."""
    L = lanes
    C = NV * L
    HK = H // group

    @T.macro
    def tile(R, W, i0, j0, b, h, q, kt, o, acc, sk):  # R query rows x W key vectors
        for r in T.unroll(R):
            for v in T.unroll(W):
                acc[T.ramp((r * NV + v) * L, 1, L)] = T.Broadcast(T.float32(0), L)
        for d in range(D):
            for r in T.unroll(R):
                for v in T.unroll(W):
                    acc[T.ramp((r * NV + v) * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)] + T.Broadcast(
                        at(q, q_seq, b, i0 + r, h, d), L) * kt[T.ramp(d * sk + j0 + v * L, 1, L)]
        for r in T.unroll(R):
            for v in T.unroll(W):
                o[b, h, i0 + r, T.ramp(j0 + v * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)]

    @T.macro
    def tail_keys(i, b, h, q, kt, o, acc, sk):  # query row i against the last sk % C keys, one dot each
        for j in range(sk % C):
            acc[0] = T.float32(0)
            for d in range(D):
                acc[0] = acc[0] + at(q, q_seq, b, i, h, d) * kt[d * sk + sk // C * C + j]
            o[b, h, i, sk // C * C + j] = acc[0]

    @T.macro
    def row(i, b, h, q, kt, o, acc, sk):  # one query row against every key
        for jt in range(sk // C):
            tile(1, NV, i, jt * C, b, h, q, kt, o, acc, sk)
        tail_keys(i, b, h, q, kt, o, acc, sk)

    def qk(q, k, b, i, j, h, d0):  # L products of q row i and key j from head dim d0
        return at(q, q_seq, b, i, h, T.ramp(d0, 1, L)) * at(k, k_seq, b, j, h // group, T.ramp(d0, 1, L))

    def total(acc, a):
        return T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fadd", T.float32(0), acc[T.ramp(a * L, 1, L)])

    @T.macro
    def keys(n, j0, i, b, h, q, k, o, acc):  # query row i against keys j0 .. j0 + n, each a dot over D
        for a in T.unroll(n):
            acc[T.ramp(a * L, 1, L)] = qk(q, k, b, i, j0 + a, h, 0)
        for d in range(1, D // L):
            for a in T.unroll(n):
                acc[T.ramp(a * L, 1, L)] = acc[T.ramp(a * L, 1, L)] + qk(q, k, b, i, j0 + a, h, d * L)
        for a in T.unroll(n):
            o[b, h, i, j0 + a] = total(acc, a)

    fetch = prefetch_rows(D, k_seq)

    @T.macro
    def dots(i, b, h, q, k, o, acc, sk):  # few query rows: DK independent dots at a time
        for jb in range(sk // DK):
            for a in T.unroll(DK):
                fetch(k, b, jb * DK + a, h // group, sk)
            keys(DK, jb * DK, i, b, h, q, k, o, acc)
        for j in range(sk % DK):
            keys(1, sk // DK * DK + j, i, b, h, q, k, o, acc)

    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, sq, sk = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, layout(q_seq, batch, sq, H, D), "float32")
        k = T.match_buffer(k_h, layout(k_seq, batch, sk, HK, D), "float32")
        o = T.match_buffer(o_h, (batch, H, sq, sk), "float32")
        for bh in T.parallel(batch * H):
            acc = T.alloc_buffer((MR * C,), "float32", annotations=STACK)
            if sq < MR and D % L == 0:  # a decoding step: no k^T copy of the whole cache
                for i in range(sq):
                    dots(i, bh // H, bh % H, q, k, o, acc, sk)
            else:
                kt = T.alloc_buffer((D * sk,), "float32")
                for j in range(sk):
                    for d in range(D):
                        kt[d * sk + j] = at(k, k_seq, bh // H, j, bh % H // group, d)
                for it in range(sq // MR):
                    for jt in range(sk // C):
                        tile(MR, NV, it * MR, jt * C, bh // H, bh % H, q, kt, o, acc, sk)
                    for r in range(MR):
                        tail_keys(it * MR + r, bh // H, bh % H, q, kt, o, acc, sk)
                for i in range(sq % MR):
                    row(sq // MR * MR + i, bh // H, bh % H, q, kt, o, acc, sk)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


def dispatch(lanes: int, counts: dict | None = None):
    """A module pass: `R.matmul(q, permute_dims(k))` on float32 heads with static heads and head_dim
    becomes a call of `scores`; q is [batch, heads, seq, head_dim] as `heads_view` reads it, k is
    `permute_dims(x, [0, 2, 3, 1])` of [batch, seq, heads, head_dim] or `permute_dims(y, [0, 1, 3,
    2])` of a heads view; `counts[KIND]` receives how many."""
    return dispatch_pass("fq.DispatchAttentionScores", KIND, lambda mod: _Dispatch(mod, lanes), counts)


class View(NamedTuple):
    """expr[b, h, s, d] = x[b, s, h // group, d] (seq_major) or x[b, h // group, s, d]."""
    x: relax.Expr
    seq_major: bool
    group: int
    heads: int
    dim: int


def heads_view(mutator, expr) -> View | None:
    """How a float32 [batch, heads, seq, head_dim] operand with static heads and head_dim reads
    the tensor it was copied from: through `permute_dims(x, [0, 2, 1, 3])` of x [batch, seq, heads,
    head_dim], and through grouped-query attention's `reshape(broadcast_to(expand_dims(y, 2)))`."""
    if not _static_heads(expr):
        return None
    bound = _bound(mutator, expr)
    if _is(bound, "relax.permute_dims") and _axes(bound) == [0, 2, 1, 3] and _static_heads(bound.args[0], 2):
        heads, dim = _dims(bound.args[0], 2)
        return View(bound.args[0], True, 1, heads, dim)
    repeated = _repeated(mutator, bound)
    if repeated is not None:
        inner, group = repeated
        view = heads_view(mutator, inner)
        if view is not None and view.group == 1:
            return View(view.x, view.seq_major, group, view.heads * group, view.dim)
    heads, dim = _dims(expr, 1)
    return View(expr, False, 1, heads, dim)


def key_view(mutator, expr) -> View | None:
    """The heads view of k behind k^T: `permute_dims(x, [0, 2, 3, 1])` of x [batch, seq, heads,
    head_dim], or `permute_dims(y, [0, 1, 3, 2])` of a heads view y."""
    bound = _bound(mutator, expr)
    if not _is(bound, "relax.permute_dims"):
        return None
    if _axes(bound) == [0, 2, 3, 1] and _static_heads(bound.args[0], 2):
        heads, dim = _dims(bound.args[0], 2)
        return View(bound.args[0], True, 1, heads, dim)
    if _axes(bound) == [0, 1, 3, 2]:
        return heads_view(mutator, bound.args[0])
    return None


def _repeated(mutator, bound):
    """(y, group) when `bound` is `reshape(broadcast_to(expand_dims(y, [2]), [b, hk, group, s, d]),
    [b, hk * group, s, d])`: grouped-query attention's copy of y [b, hk, s, d] per query head."""
    if not _is(bound, "relax.reshape"):
        return None
    wide = _bound(mutator, bound.args[0])
    if not _is(wide, "relax.broadcast_to"):
        return None
    one = _bound(mutator, wide.args[0])
    if not (_is(one, "relax.expand_dims") and [int(a) for a in one.attrs.axis] == [2]):
        return None
    y, shape = one.args[0], wide.ty.shape
    if not (_static_heads(y) and shape is not None and len(shape) == 5 and isinstance(shape[2], tvm.tirx.IntImm)):
        return None
    same = structural_equal
    src, out = y.ty.shape, bound.ty.shape
    if not (same(shape[0], src[0]) and same(shape[1], src[1]) and same(shape[3], src[2]) and same(shape[4], src[3])
            and same(out[0], src[0]) and same(out[2], src[2]) and same(out[3], src[3])
            and int(out[1]) == int(src[1]) * int(shape[2])):
        return None
    return y, int(shape[2])


def _bound(mutator, expr):
    return mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None


def _is(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op == tvm.ir.Op.get(name)


def _axes(call):
    return None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]


def _static_heads(expr, heads_axis: int = 1) -> bool:
    """A float32 4-D tensor whose heads (at heads_axis) and head_dim (last) are constants."""
    ty = expr.ty
    return (isinstance(ty, relax.TensorType) and ty.dtype == "float32" and ty.shape is not None
            and len(ty.shape) == 4 and all(isinstance(ty.shape[a], tvm.tirx.IntImm) for a in (heads_axis, 3)))


def _dims(expr, heads_axis: int) -> tuple[int, int]:
    shape = expr.ty.shape
    return int(shape[heads_axis]), int(shape[3])


def _seq(view: View):
    shape = view.x.ty.shape
    return shape[1] if view.seq_major else shape[2]


@relax.expr_functor.mutator
class _Dispatch(relax.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = {}
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not _is(call, "relax.matmul"):
            return call
        q, k = heads_view(self, call.args[0]), key_view(self, call.args[1])
        if q is None or k is None or q.group != 1 or (q.heads, q.dim) != (k.heads, k.dim) or \
                not structural_equal(q.x.ty.shape[0], k.x.ty.shape[0]):
            return call
        key = (q.heads, q.dim, q.seq_major, k.seq_major, k.group)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(scores(q.heads, q.dim, self.lanes, *key[2:]), _name(*key))
        self.count += 1
        batch, sq, sk = q.x.ty.shape[0], _seq(q), _seq(k)
        return relax.call_tir(self.kernels[key], [q.x, k.x], relax.TensorType([batch, q.heads, sq, sk], "float32"))


def _name(heads, dim, q_seq, k_seq, group) -> str:
    layouts = "" if (q_seq, k_seq, group) == (True, True, 1) else \
        f"_{'s' if q_seq else 'h'}{'s' if k_seq else 'h'}" + (f"_g{group}" if group > 1 else "")
    return f"fq_attention_scores_{heads}_{dim}{layouts}"
