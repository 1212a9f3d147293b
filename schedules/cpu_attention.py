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

When the graph then scales the scores by a constant and adds a mask (Hugging Face exports), the
kernel takes both in (`Mask`): o = s * c + mask, and a register tile the mask hides entirely
(every entry below MASKED: a causal mask's upper triangle, padded keys) is not computed. So an
inf or NaN in a key reaches the rows that see that key, not the earlier rows of a causal model
(ONNX Runtime, computing every product before masking, spreads it to all rows). A head's row
tiles run as SPLIT interleaved parallel tasks.

`dispatch` is the Relax rewrite (CPU, before legalization) that routes the pattern here;
`heads_view` is the operand matcher it shares with `cpu_attention_values`.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # a Relax tensor constant
from tvm_ffi import structural_equal
from tvm.script import tirx as T

from .common import AHEAD, LINE, STACK, dispatch_pass, parsed_once, prefetch, transposed, wide
from .kernels import OPAQUE, at, layout

KIND = "attention_scores"
MR, NV = 6, 2  # query rows x key vectors: 12 accumulators (4 x 2 before: with head_dim 32 a tile's 32 steps
# paid its mask and stores over fewer rows; MiniLM's scores 1.08-1.13x faster on a Zen 3, SmolLM2's 0.99-1.04x)
DK = 4  # keys per step of the few-query-rows path (independent dot products)
SPLIT = 2  # parallel tasks per head, taking alternate row tiles (9 heads on 2 threads: 5 + 4 was 10% idle;
# under a causal mask later tiles have more keys, so interleaved, not halves)


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


class Mask(NamedTuple):
    """What follows the product in the kernel: `o = (s op scale) + mask` (op "multiply", "divide"
    or None), the mask broadcast over the axes where `ones` says its extent is 1."""
    ones: tuple  # four bools: mask extent 1 on (batch, heads, sq, sk)
    op: str | None
    scale: float


MASKED = -1e30  # a mask entry below this hides its score (its exp is 0 after any score)


class Parts(NamedTuple):
    """The scores kernel's macros, shared with `cpu_attention_fused`: `tile(R, W, i0, j0, b, h, q,
    kt, m, o, acc, sk)`, `tail_keys(i, ...)` and `row(i, ...)` over the keys copied by
    `transpose_keys(b, hk, k, kt, sk)`; `dots(i, b, h, q, k, m, o, acc, sk)` for few query rows.
    They write o[b, h, i, j]."""
    tile: object
    tail_keys: object
    row: object
    dots: object
    transpose_keys: object


def parts(H: int, D: int, lanes: int, q_seq: bool = True, k_seq: bool = True, group: int = 1,
          mask: Mask | None = None) -> Parts:
    """The macros of `scores` for these arguments."""
    L = lanes
    C = NV * L
    HK = H // group

    def mask_at(m, b, h, i, j, n=1):  # n mask entries from key j (a vector for n > 1)
        bb, hh, ii = (0 if one else ix for one, ix in zip(mask.ones[:3], (b, h, i)))
        if mask.ones[3]:
            return wide(m[bb, hh, ii, 0], n)
        return m[bb, hh, ii, T.ramp(j, 1, n) if n > 1 else j]

    def out(s, m, b, h, i, j, n=1):  # the value written for score(s) s
        if mask is None:
            return s
        c = wide(T.float32(mask.scale), n)
        scaled = s * c if mask.op == "multiply" else s / c if mask.op == "divide" else s
        return scaled + mask_at(m, b, h, i, j, n)

    def hidden(m, R, W, b, h, i0, j0):  # whether every mask entry of the tile is below MASKED
        top = None  # (a NaN entry, whether max keeps it or not, is written as it is or computed)
        for r in range(R):
            for v in range(W):
                vec = mask_at(m, b, h, i0 + r, j0 + v * L, L)
                top = vec if top is None else T.max(top, vec)
        return T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fmax", top) < T.float32(MASKED)

    @T.macro
    def products(R, W, i0, j0, b, h, q, kt, m, o, acc, sk):
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
                o[b, h, i0 + r, T.ramp(j0 + v * L, 1, L)] = out(acc[T.ramp((r * NV + v) * L, 1, L)], m, b, h,
                                                                i0 + r, j0 + v * L, L)

    @T.macro
    def masked_tile(R, W, i0, j0, b, h, q, kt, m, o, acc, sk):  # a hidden tile takes the mask's values
        if hidden(m, R, W, b, h, i0, j0):
            for r in T.unroll(R):
                for v in T.unroll(W):
                    o[b, h, i0 + r, T.ramp(j0 + v * L, 1, L)] = mask_at(m, b, h, i0 + r, j0 + v * L, L)
        else:
            products(R, W, i0, j0, b, h, q, kt, m, o, acc, sk)

    tile = products if mask is None else masked_tile  # R query rows x W key vectors

    @T.macro
    def tail_keys(i, b, h, q, kt, m, o, acc, sk):  # query row i against the last sk % C keys, one dot each
        for j in range(sk % C):
            acc[0] = T.float32(0)
            for d in range(D):
                acc[0] = acc[0] + at(q, q_seq, b, i, h, d) * kt[d * sk + sk // C * C + j]
            o[b, h, i, sk // C * C + j] = out(acc[0], m, b, h, i, sk // C * C + j)

    @T.macro
    def row(i, b, h, q, kt, m, o, acc, sk):  # one query row against every key
        for jt in range(sk // C):
            tile(1, NV, i, jt * C, b, h, q, kt, m, o, acc, sk)
        tail_keys(i, b, h, q, kt, m, o, acc, sk)

    def qk(q, k, b, i, j, h, d0):  # L products of q row i and key j from head dim d0
        return at(q, q_seq, b, i, h, T.ramp(d0, 1, L)) * at(k, k_seq, b, j, h // group, T.ramp(d0, 1, L))

    def total(acc, a):
        return T.call_llvm_pure_intrin("float32", "llvm.vector.reduce.fadd", T.float32(0), acc[T.ramp(a * L, 1, L)])

    @T.macro
    def keys(n, j0, i, b, h, q, k, m, o, acc):  # query row i against keys j0 .. j0 + n, each a dot over D
        for a in T.unroll(n):
            acc[T.ramp(a * L, 1, L)] = qk(q, k, b, i, j0 + a, h, 0)
        for d in range(1, D // L):
            for a in T.unroll(n):
                acc[T.ramp(a * L, 1, L)] = acc[T.ramp(a * L, 1, L)] + qk(q, k, b, i, j0 + a, h, d * L)
        for a in T.unroll(n):
            o[b, h, i, j0 + a] = out(total(acc, a), m, b, h, i, j0 + a)

    fetch = prefetch_rows(D, k_seq)

    @T.macro
    def dots(i, b, h, q, k, m, o, acc, sk):  # few query rows: DK independent dots at a time
        for jb in range(sk // DK):
            for a in T.unroll(DK):
                fetch(k, b, jb * DK + a, h // group, sk)
            keys(DK, jb * DK, i, b, h, q, k, m, o, acc)
        for j in range(sk % DK):
            keys(1, sk // DK * DK + j, i, b, h, q, k, m, o, acc)

    store_block = _block_stores(L, k_seq)

    @T.macro
    def transpose_keys(b, hk, k, kt, sk):  # kt [D, sk] = k^T of one head: L x L blocks in registers
        if D % L == 0:
            for jb in range(sk // L):
                for db in T.unroll(D // L):
                    store_block(k, kt, b, hk, jb, db, sk)
            for j in range(sk % L):
                for d in range(D):
                    kt[d * sk + sk // L * L + j] = at(k, k_seq, b, sk // L * L + j, hk, d)
        else:
            for j in range(sk):
                for d in range(D):
                    kt[d * sk + j] = at(k, k_seq, b, j, hk, d)

    return Parts(tile, tail_keys, row, dots, transpose_keys)


@parsed_once
def scores(H: int, D: int, lanes: int, q_seq: bool = True, k_seq: bool = True, group: int = 1,
           mask: Mask | None = None) -> tvm.tirx.PrimFunc:
    """q [batch, sq, H, D] (q_seq) or [batch, H, sq, D]; k likewise with H // group heads. With
    `mask`, a third input m and o = (q k^T op scale) + m: a register tile whose mask entries are
    all below MASKED (a causal mask's upper triangle) is not computed but takes the mask's values,
    which is what the sum rounds to for any score under 1e22 in magnitude (and exactly for -inf)."""
    L = lanes
    C = NV * L
    HK = H // group
    tile, tail_keys, row, dots, transpose_keys = parts(H, D, lanes, q_seq, k_seq, group, mask)

    @T.macro
    def body(batch, sq, sk, q, k, m, o):
        for task in T.parallel(batch * H * SPLIT):  # a head's row tiles in SPLIT interleaved parts
            bh: T.let = task // SPLIT
            part: T.let = task % SPLIT
            acc = T.alloc_buffer((MR * C,), "float32", annotations=STACK)
            if sq < MR and D % L == 0:  # a decoding step: no k^T copy of the whole cache
                if part == 0:
                    for i in range(sq):
                        dots(i, bh // H, bh % H, q, k, m, o, acc, sk)
            else:
                kt = T.alloc_buffer((D * sk,), "float32")
                transpose_keys(bh // H, bh % H // group, k, kt, sk)
                for it2 in range((sq // MR + SPLIT - 1 - part) // SPLIT):
                    for jt in range(sk // C):
                        tile(MR, NV, (it2 * SPLIT + part) * MR, jt * C, bh // H, bh % H, q, kt, m, o, acc, sk)
                    for r in range(MR):
                        tail_keys((it2 * SPLIT + part) * MR + r, bh // H, bh % H, q, kt, m, o, acc, sk)
                if part == 0:
                    for i in range(sq % MR):
                        row(sq // MR * MR + i, bh // H, bh % H, q, kt, m, o, acc, sk)

    if mask is None:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch, sq, sk = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, layout(q_seq, batch, sq, H, D), "float32")
            k = T.match_buffer(k_h, layout(k_seq, batch, sk, HK, D), "float32")
            o = T.match_buffer(o_h, (batch, H, sq, sk), "float32")
            body(batch, sq, sk, q, k, None, o)
    else:
        ones = mask.ones

        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch, sq, sk = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, layout(q_seq, batch, sq, H, D), "float32")
            k = T.match_buffer(k_h, layout(k_seq, batch, sk, HK, D), "float32")
            m = T.match_buffer(m_h, [1 if one else n for one, n in zip(ones, (batch, H, sq, sk))], "float32")
            o = T.match_buffer(o_h, (batch, H, sq, sk), "float32")
            body(batch, sq, sk, q, k, m, o)

    args = [H, D, lanes, q_seq, k_seq, group, None if mask is None else [list(mask.ones), mask.op, mask.scale]]
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True,
                            "fq_args": json.dumps(args)})


def _block_stores(L: int, k_seq: bool):
    """macro(k, kt, b, hk, jb, db, sk): the L x L block of keys jb * L .. and head dims db * L .. of
    head hk transposed into kt [D, sk] (`common.transposed`; one store per column, the loads and
    shuffles they share merged by the compiler). A copy lane by lane was 20% of SmolLM2's scores."""

    def column(c):
        @T.macro
        def store(k, kt, b, hk, jb, db, sk):
            kt[T.ramp((db * L + c) * sk + jb * L, 1, L)] = transposed(
                [at(k, k_seq, b, jb * L + r, hk, T.ramp(db * L, 1, L)) for r in range(L)])[c]

        return store

    def both(first, rest):
        @T.macro
        def store(k, kt, b, hk, jb, db, sk):
            first(k, kt, b, hk, jb, db, sk)
            rest(k, kt, b, hk, jb, db, sk)

        return store

    stores = column(L - 1)
    for c in range(L - 2, -1, -1):
        stores = both(column(c), stores)
    return stores


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
        self.kernels = {}  # (key, mask) -> gvar
        self.keys = {}  # gvar -> key
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _is(call, "relax.add"):
            masked = self._masked(call)
            return call if masked is None else masked
        if not _is(call, "relax.matmul"):
            return call
        q, k = heads_view(self, call.args[0]), key_view(self, call.args[1])
        if q is None or k is None or q.group != 1 or (q.heads, q.dim) != (k.heads, k.dim) or \
                not structural_equal(q.x.ty.shape[0], k.x.ty.shape[0]):
            return call
        self.count += 1
        batch, sq, sk = q.x.ty.shape[0], _seq(q), _seq(k)
        key = (q.heads, q.dim, q.seq_major, k.seq_major, k.group)
        return relax.call_tir(self._kernel(key), [q.x, k.x], relax.TensorType([batch, q.heads, sq, sk], "float32"))

    def _kernel(self, key, mask=None):
        if (key, mask) not in self.kernels:
            name = _name(*key) + ("" if mask is None else "_masked")
            gvar = self.builder_.add_func(scores(key[0], key[1], self.lanes, *key[2:], mask=mask), name)
            self.kernels[(key, mask)] = gvar
            self.keys[gvar] = key
        return self.kernels[(key, mask)]

    def _masked(self, add):
        """`add(scores [op scale], m)` (either order) with a mask m broadcast to the scores: one call
        of the masked kernel (the scores call and the scaling are left unused)."""
        for x, m in (add.args, add.args[::-1]):
            op, scale, product = _scaled(self, x)
            key = self.keys.get(product.args[0]) if _is(product, "relax.call_tir") else None
            ones = _broadcast(m, product.ty.shape) if key is not None else None
            if ones is not None and structural_equal(add.ty.shape, product.ty.shape):
                q, k = product.args[1].fields
                return relax.call_tir(self._kernel(key, Mask(ones, op, scale)), [q, k, m], product.ty)
        return None


def _scaled(mutator, x):
    """(op, scale, the product) for x bound to `multiply(product, c)` or `divide(product, c)` with a
    float32 scalar constant c, else (None, 1.0, what x is bound to)."""
    bound = _bound(mutator, x)
    for op in ("multiply", "divide"):
        if _is(bound, f"relax.{op}") and isinstance(bound.args[1], GenericConst):
            c = bound.args[1].value.numpy()
            if c.dtype == np.float32 and c.size == 1 and c.ndim <= 1:
                return op, float(c.reshape(())), _bound(mutator, bound.args[0])
    return None, 1.0, bound


def _broadcast(m, shape):
    """Per axis, whether a float32 4-D mask m has extent 1 where it broadcasts to `shape`; None where
    m is not such a mask (another extent, dtype or rank)."""
    ty = m.ty
    if not (isinstance(ty, relax.TensorType) and ty.dtype == "float32" and ty.shape is not None
            and len(ty.shape) == 4 and shape is not None and len(shape) == 4):
        return None
    ones = tuple(isinstance(a, tvm.tirx.IntImm) and int(a) == 1 for a in ty.shape)
    if all(one or structural_equal(a, b) for one, a, b in zip(ones, ty.shape, shape)):
        return ones
    return None


def _name(heads, dim, q_seq, k_seq, group) -> str:
    layouts = "" if (q_seq, k_seq, group) == (True, True, 1) else \
        f"_{'s' if q_seq else 'h'}{'s' if k_seq else 'h'}" + (f"_g{group}" if group > 1 else "")
    return f"fq_attention_scores_{heads}_{dim}{layouts}"
