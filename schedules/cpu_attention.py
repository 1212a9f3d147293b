"""The CPU attention scores: o[b, h, i, j] = sum_d q[b, i, h, d] k[b, j, h, d].

Transformer exports compute them as `R.matmul(permute_dims(q, [0, 2, 1, 3]), permute_dims(k,
[0, 2, 3, 1]))` on the heads as the projections wrote them ([batch, seq, heads, head_dim]); the
fallback schedule materialised both transposes and ran the matmul one output row at a time with
the accumulator row in memory. Here q and k are read in place: per (batch, head) task, k's rows
are copied once into k^T [head_dim, seq]; a register tile of MR query rows x NV vectors of keys then
takes per head-dim step MR broadcasts of q, NV vector loads of k^T and MR x NV fused multiply-adds.
The last seq % C keys and seq % MR queries run as narrower tiles. Query and key lengths may differ
(a decoding step against a cache).

`dispatch` is the Relax rewrite (CPU, before legalization) that routes the pattern here.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from .common import mutate_relax_functions
from .kernels import OPAQUE

KIND = "attention_scores"
MR, NV = 4, 2  # query rows x key vectors: 8 accumulators


def scores(H: int, D: int, lanes: int) -> tvm.tirx.PrimFunc:
    L = lanes
    C = NV * L

    @T.macro
    def tile(R, W, i0, j0, b, h, q, kt, o, acc, sk):  # R query rows x W key vectors
        for r in T.unroll(R):
            for v in T.unroll(W):
                acc[T.ramp((r * NV + v) * L, 1, L)] = T.Broadcast(T.float32(0), L)
        for d in range(D):
            for r in T.unroll(R):
                for v in T.unroll(W):
                    acc[T.ramp((r * NV + v) * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)] + T.Broadcast(
                        q[b, i0 + r, h, d], L) * kt[T.ramp(d * sk + j0 + v * L, 1, L)]
        for r in T.unroll(R):
            for v in T.unroll(W):
                o[b, h, i0 + r, T.ramp(j0 + v * L, 1, L)] = acc[T.ramp((r * NV + v) * L, 1, L)]

    @T.macro
    def tail_keys(i, b, h, q, kt, o, acc, sk):  # query row i against the last sk % C keys, one dot each
        for j in range(sk % C):
            acc[0] = T.float32(0)
            for d in range(D):
                acc[0] = acc[0] + q[b, i, h, d] * kt[d * sk + sk // C * C + j]
            o[b, h, i, sk // C * C + j] = acc[0]

    @T.macro
    def row(i, b, h, q, kt, o, acc, sk):  # one query row against every key
        for jt in range(sk // C):
            tile(1, NV, i, jt * C, b, h, q, kt, o, acc, sk)
        tail_keys(i, b, h, q, kt, o, acc, sk)

    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        batch, sq, sk = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (batch, sq, H, D), "float32")
        k = T.match_buffer(k_h, (batch, sk, H, D), "float32")
        o = T.match_buffer(o_h, (batch, H, sq, sk), "float32")
        for bh in T.parallel(batch * H):
            kt = T.alloc_buffer((D * sk,), "float32")
            acc = T.alloc_buffer((MR * C,), "float32", scope="local")
            for j in range(sk):
                for d in range(D):
                    kt[d * sk + j] = k[bh // H, j, bh % H, d]
            for it in range(sq // MR):
                for jt in range(sk // C):
                    tile(MR, NV, it * MR, jt * C, bh // H, bh % H, q, kt, o, acc, sk)
                for r in range(MR):
                    tail_keys(it * MR + r, bh // H, bh % H, q, kt, o, acc, sk)
            for i in range(sq % MR):
                row(sq // MR * MR + i, bh // H, bh % H, q, kt, o, acc, sk)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


def dispatch(lanes: int, counts: dict | None = None):
    """A module pass: `R.matmul(permute_dims(q, [0, 2, 1, 3]), permute_dims(k, [0, 2, 3, 1]))` on
    float32 [batch, seq, heads, head_dim] tensors with static heads and head_dim becomes a call of
    `scores`; `counts[KIND]` receives how many."""

    @tvm.transform.module_pass(opt_level=0, name="fq.DispatchAttentionScores")
    def _pass(mod, _ctx):
        mutator = _Dispatch(mod, lanes)
        mod = mutate_relax_functions(mod, mutator)
        if counts is not None and mutator.count:
            counts[KIND] = counts.get(KIND, 0) + mutator.count
        return mod

    return _pass


@relax.expr_functor.mutator
class _Dispatch(relax.PyExprMutator):
    def __init__(self, mod, lanes: int):
        super().__init__(mod)
        self.lanes = lanes
        self.kernels = {}
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.matmul"):
            return call
        q, k = self._permuted(call.args[0], [0, 2, 1, 3]), self._permuted(call.args[1], [0, 2, 3, 1])
        if q is None or k is None:
            return call
        (batch, sq, heads, dim), (_, sk, k_heads, k_dim) = q.ty.shape, k.ty.shape
        if not all(isinstance(x, tvm.tirx.IntImm) for x in (heads, dim, k_heads, k_dim)) or \
                (int(heads), int(dim)) != (int(k_heads), int(k_dim)):
            return call
        key = (int(heads), int(dim))
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(scores(*key, self.lanes), f"fq_attention_scores_{key[0]}_{key[1]}")
        self.count += 1
        return relax.call_tir(self.kernels[key], [q, k], relax.TensorType([batch, heads, sq, sk], "float32"))

    def _permuted(self, expr, axes):
        """x when expr is bound to `permute_dims(x, axes)` with x a float32 4-D tensor of known shape."""
        if not isinstance(expr, relax.Var):
            return None
        bound = self.lookup_binding(expr)
        if not (isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.permute_dims")
                and bound.attrs.axes is not None and [int(a) for a in bound.attrs.axes] == axes):
            return None
        x = bound.args[0]
        ty = x.ty
        if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.shape is None or len(ty.shape) != 4:
            return None
        return x
