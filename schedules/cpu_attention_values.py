"""The CPU attention output: o[b, i, h, d] = sum_j p[b, h, i, j] v[b, j, h // group, d].

Exports compute it as `permute_dims(R.matmul(p, v), [0, 2, 1, 3])` with v a transposed (and, for
grouped-query attention, repeated) copy of the heads the projection wrote; the fallback
materialised v's copies and the product before transposing it. Here v is read in place (either
layout, `cpu_attention.heads_view`) and o is written as [batch, seq, heads, head_dim], ready for
the output projection: per (batch, head) task a register tile of MR rows of p x NV vectors of
head_dim takes per key MR broadcasts of p, NV vector loads of v's row and MR x NV fused
multiply-adds. The last seq % MR rows run as one-row tiles. A tile stops after the last block of
keys where one of its rows of p is not zero: under a causal mask, half the products. (A value
row past that is then not read: an inf or NaN there reaches the rows that attend to it, not the
earlier ones, which multiplied it by 0.)

`dispatch` is the Relax rewrite (CPU, before legalization) that routes the pattern here.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import tvm
from tvm import relax
from tvm_ffi import structural_equal
from tvm.script import tirx as T

from .common import STACK, dispatch_pass, parsed_once
from .cpu_attention import heads_view, prefetch_rows
from .kernels import OPAQUE, at, layout

KIND = "attention_values"
MR = 4  # rows of p per tile


def vectors(D: int, lanes: int) -> int:
    """Vectors of head_dim per tile: 2 where they divide it (8 accumulators), else 1."""
    return 2 if D % (2 * lanes) == 0 else 1


class Parts(NamedTuple):
    """The values kernel's macros, shared with `cpu_attention_fused`: `extent(R, i0, b, h, p, sk,
    ext)`, then `tile(R, i0, c0, b, h, p, vloc, o, acc, sk, ext)` over the head's values copied
    contiguous by `copy(b, h, v, vloc, sk)`; `row_in_place(i, b, h, p, v, o, acc, sk)` for few rows.
    They read p[b, h, i, j] and write o[b, i, h, c]; `C` columns per tile."""
    extent: object
    tile: object
    copy: object
    row_in_place: object
    C: int


def parts(H: int, D: int, lanes: int, v_seq: bool = True, group: int = 1) -> Parts:
    """The macros of `values` for these arguments."""
    L = lanes
    NV = vectors(D, L)
    C = NV * L

    def nonzero(p, b, h, i, j):  # whether any of the L entries of row i of p from key j is not 0
        bits = T.reinterpret(f"int32x{L}", p[b, h, i, T.ramp(j, 1, L)]) & T.Broadcast(T.int32(0x7FFFFFFF), L)
        return T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.or", bits) != 0

    @T.macro
    def extent(R, i0, b, h, p, sk, ext):  # keys up to the last block with a nonzero p in rows i0 ..
        ext[0] = 0
        for jb in range(sk // L):
            for r in T.unroll(R):
                if nonzero(p, b, h, i0 + r, jb * L):
                    ext[0] = (jb + 1) * L
        for j in range(sk % L):
            for r in T.unroll(R):
                if T.reinterpret("int32", p[b, h, i0 + r, sk // L * L + j]) & T.int32(0x7FFFFFFF) != 0:
                    ext[0] = sk  # (bits, not `!= 0.0`, which LLVM's ordered compare makes false for NaN)

    @T.macro
    def tile(R, i0, c0, b, h, p, vloc, o, acc, sk, ext):  # R rows x NV vectors of columns from c0
        for r in T.unroll(R):
            for w in T.unroll(NV):
                acc[T.ramp((r * NV + w) * L, 1, L)] = T.Broadcast(T.float32(0), L)
        for j in range(ext[0]):
            for r in T.unroll(R):
                for w in T.unroll(NV):
                    acc[T.ramp((r * NV + w) * L, 1, L)] = acc[T.ramp((r * NV + w) * L, 1, L)] + T.Broadcast(
                        p[b, h, i0 + r, j], L) * vloc[T.ramp(j * D + c0 + w * L, 1, L)]
        for r in T.unroll(R):
            for w in T.unroll(NV):
                o[b, i0 + r, h, T.ramp(c0 + w * L, 1, L)] = acc[T.ramp((r * NV + w) * L, 1, L)]

    fetch = prefetch_rows(D, v_seq)

    @T.macro
    def row_in_place(i, b, h, p, v, o, acc, sk):  # one row of p (decoding): v read in place, prefetched
        for w in T.unroll(D // L):
            acc[T.ramp(w * L, 1, L)] = T.Broadcast(T.float32(0), L)
        for j in range(sk):
            fetch(v, b, j, h // group, sk)
            for w in T.unroll(D // L):
                acc[T.ramp(w * L, 1, L)] = acc[T.ramp(w * L, 1, L)] + T.Broadcast(p[b, h, i, j], L) * at(
                    v, v_seq, b, j, h // group, T.ramp(w * L, 1, L))
        for w in T.unroll(D // L):
            o[b, i, h, T.ramp(w * L, 1, L)] = acc[T.ramp(w * L, 1, L)]

    @T.macro
    def copy(b, h, v, vloc, sk):  # the head's values, contiguous: in place, their rows HK * D apart
        for j in range(sk):  # fall into few L1 sets and were re-read from L2 per tile
            for c in T.vectorized(D):
                vloc[j * D + c] = at(v, v_seq, b, j, h // group, c)

    return Parts(extent, tile, copy, row_in_place, C)


@parsed_once
def values(H: int, D: int, lanes: int, v_seq: bool = True, group: int = 1) -> tvm.tirx.PrimFunc:
    """p [batch, H, sq, sk], v [batch, sk, H // group, D] (v_seq) or [batch, H // group, sk, D]
    -> o [batch, sq, H, D]; D a multiple of lanes."""
    C = vectors(D, lanes) * lanes
    HK = H // group
    extent, tile, copy, row_in_place, _ = parts(H, D, lanes, v_seq, group)

    @T.prim_func(private=True)
    def func(p_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, sq, sk = T.int64(), T.int64(), T.int64()
        p = T.match_buffer(p_h, (batch, H, sq, sk), "float32")
        v = T.match_buffer(v_h, layout(v_seq, batch, sk, HK, D), "float32")
        o = T.match_buffer(o_h, (batch, sq, H, D), "float32")
        for bh in T.parallel(batch * H):
            acc = T.alloc_buffer((max(MR * C, D),), "float32", annotations=STACK)
            if sq < MR:  # decoding: each value row is used once per query row, so no copy
                for i in range(sq):
                    row_in_place(i, bh // H, bh % H, p, v, o, acc, sk)
            else:
                vloc = T.alloc_buffer((sk * D,), "float32")
                copy(bh // H, bh % H, v, vloc, sk)
                ext = T.alloc_buffer((1,), "int32", annotations=STACK)
                for it in range(sq // MR):
                    extent(MR, it * MR, bh // H, bh % H, p, sk, ext)
                    for ct in range(D // C):
                        tile(MR, it * MR, ct * C, bh // H, bh % H, p, vloc, o, acc, sk, ext)
                for i in range(sq % MR):
                    extent(1, sq // MR * MR + i, bh // H, bh % H, p, sk, ext)
                    for ct in range(D // C):
                        tile(1, sq // MR * MR + i, ct * C, bh // H, bh % H, p, vloc, o, acc, sk, ext)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True,
                            "fq_args": json.dumps([H, D, lanes, v_seq, group])})


def dispatch(lanes: int, counts: dict | None = None):
    """A module pass: `permute_dims(R.matmul(p, v), [0, 2, 1, 3])` with p float32 [batch, heads,
    sq, sk] and v a heads view (`cpu_attention.heads_view`) whose head_dim is whole vectors becomes
    a call of `values`; `counts[KIND]` receives how many."""
    return dispatch_pass("fq.DispatchAttentionValues", KIND, lambda mod: _Dispatch(mod, lanes), counts)


@relax.expr_functor.mutator
class _Dispatch(relax.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = {}
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (call.op == tvm.ir.Op.get("relax.permute_dims") and call.attrs.axes is not None
                and [int(a) for a in call.attrs.axes] == [0, 2, 1, 3] and isinstance(call.args[0], relax.Var)):
            return call
        product = self.lookup_binding(call.args[0])
        if not (isinstance(product, relax.Call) and product.op == tvm.ir.Op.get("relax.matmul")):
            return call
        p, v = product.args[0], heads_view(self, product.args[1])
        lanes = _lanes_dividing(v.dim, self.lanes) if v is not None else None
        if lanes is None or not _probabilities(p, v):
            return call
        key = (v.heads, v.dim, v.seq_major, v.group)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(values(v.heads, v.dim, lanes, *key[2:]), _name(*key))
        self.count += 1
        batch, sq = p.ty.shape[0], p.ty.shape[2]
        return relax.call_tir(self.kernels[key], [p, v.x], relax.TensorType([batch, sq, v.heads, v.dim], "float32"))


def _lanes_dividing(dim: int, lanes: int) -> int | None:
    """The widest vector, at most `lanes` and at least 4, whose lanes divide a head's width (head
    width 8 on AVX-512: 8 lanes); None if there is none."""
    while lanes >= 4 and dim % lanes:
        lanes //= 2
    return lanes if lanes >= 4 else None


def _probabilities(p, v) -> bool:
    """p is float32 [batch, heads, sq, sk] with v's batch, heads and sk."""
    ty = p.ty
    if not (isinstance(ty, relax.TensorType) and ty.dtype == "float32" and ty.shape is not None and len(ty.shape) == 4):
        return False
    batch, heads, _, sk = ty.shape
    v_sk = v.x.ty.shape[1] if v.seq_major else v.x.ty.shape[2]
    same = structural_equal
    return (isinstance(heads, tvm.tirx.IntImm) and int(heads) == v.heads and same(batch, v.x.ty.shape[0])
            and same(sk, v_sk))


def _name(heads, dim, seq_major, group) -> str:
    return f"fq_attention_values_{heads}_{dim}" + ("" if seq_major else "_h") + (f"_g{group}" if group > 1 else "")
