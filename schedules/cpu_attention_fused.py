"""The CPU attention in one kernel: o[b, i, h, :] = softmax_j(scores[b, h, i, j]) v[b, j, h // group, :].

`cpu_attention`, `softmax_rows` and `cpu_attention_values` as three calls wrote the scores of every
head to memory, read them back twice and wrote the probabilities between (four passes over
batch x heads x sq x sk floats: 12.6 MB a layer for MiniLM at 16 x 128, past the L2). Here one task
takes a head: per tile of MR query rows
the scores kernel's register tiles write the rows into the task's own buffer, the softmax row
macro turns them into probabilities in place, and the values kernel's tile multiplies them by
the head's values, while the rows are in L1. The macros are the three kernels' own (`parts`,
`row_macro`), so the products, the masking and the skipped tiles are theirs: for finite values
the output is the three calls' output, bit for bit. A decoding step (sq < MR) runs each row the
same way through the few-row paths.

The task's buffer is viewed as [batch, heads, sq, sk] with zero strides on batch and heads, so the
macros index it as they index the full tensors.

`dispatch` is the Relax rewrite (CPU, after the scores and values dispatches) that fuses
`values(softmax(scores(...), axis=-1), v)` where the scores and probabilities have no other use.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.script import tirx as T

from . import cpu_attention, cpu_attention_values
from .chains import bindings
from .common import STACK, dispatch_pass, parsed_once
from .cpu_softmax import row_macro
from .kernels import OPAQUE, layout

KIND = "attention"
MR, NV = cpu_attention.MR, cpu_attention.NV  # the scores kernel's register tile
# One task per head: the scores kernel's two interleaved parts per head copied k^T and v twice here
# (MiniLM 16 x 128 alone: 6.32 -> 5.55 ms with one; SmolLM2's 9 heads, 1 x 512: 6.52 -> 5.81 ms).


@parsed_once
def attention(H: int, D: int, lanes: int, v_lanes: int, q_seq: bool = True, k_seq: bool = True,
              v_seq: bool = True, group: int = 1, mask: cpu_attention.Mask | None = None) -> tvm.tirx.PrimFunc:
    """q, k (and m) as `cpu_attention.scores` takes them, v as `cpu_attention_values.values` does
    (same group) -> o [batch, sq, H, D]."""
    L = lanes
    C = NV * L
    HK = H // group
    s_tile, tail_keys, row, dots, transpose_keys = cpu_attention.parts(H, D, lanes, q_seq, k_seq, group, mask)
    extent, v_tile, copy, row_in_place, VC = cpu_attention_values.parts(H, D, v_lanes, v_seq, group)
    softmax_row = row_macro(lanes)
    ACC = max(MR * C, MR * VC, D)

    @T.macro
    def one_row(i, b, h, q, kt, m, s, s2, vloc, o, acc, top, ext, sk):  # a query row past the last tile
        row(i, b, h, q, kt, m, s, acc, sk)
        softmax_row(i, s2, s2, sk, acc, top)
        extent(1, i, b, h, s, sk, ext)
        for ct in range(D // VC):
            v_tile(1, i, ct * VC, b, h, s, vloc, o, acc, sk, ext)

    @T.macro
    def body(batch, sq, sk, q, k, m, v, o):
        for bh in T.parallel(batch * H):
            acc = T.alloc_buffer((ACC,), "float32", annotations=STACK)
            top = T.alloc_buffer((2,), "float32", annotations=STACK)
            ext = T.alloc_buffer((1,), "int32", annotations=STACK)
            flat = T.alloc_buffer((sq * sk,), "float32")
            s = T.decl_buffer((batch, H, sq, sk), "float32", data=flat.data, strides=[0, 0, sk, 1])
            s2 = T.decl_buffer((sq, sk), "float32", data=flat.data)
            if sq < MR and D % L == 0:  # a decoding step: keys and values read in place
                for i in range(sq):
                    dots(i, bh // H, bh % H, q, k, m, s, acc, sk)
                    softmax_row(i, s2, s2, sk, acc, top)
                    row_in_place(i, bh // H, bh % H, s, v, o, acc, sk)
            else:
                kt = T.alloc_buffer((D * sk,), "float32")
                vloc = T.alloc_buffer((sk * D,), "float32")
                transpose_keys(bh // H, bh % H // group, k, kt, sk)
                copy(bh // H, bh % H, v, vloc, sk)
                for it in range(sq // MR):
                    i0: T.let = it * MR
                    for jt in range(sk // C):
                        s_tile(MR, NV, i0, jt * C, bh // H, bh % H, q, kt, m, s, acc, sk)
                    for r in range(MR):
                        tail_keys(i0 + r, bh // H, bh % H, q, kt, m, s, acc, sk)
                        softmax_row(i0 + r, s2, s2, sk, acc, top)
                    extent(MR, i0, bh // H, bh % H, s, sk, ext)
                    for ct in range(D // VC):
                        v_tile(MR, i0, ct * VC, bh // H, bh % H, s, vloc, o, acc, sk, ext)
                for i in range(sq % MR):
                    one_row(sq // MR * MR + i, bh // H, bh % H, q, kt, m, s, s2, vloc, o, acc, top, ext, sk)

    if mask is None:
        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch, sq, sk = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, layout(q_seq, batch, sq, H, D), "float32")
            k = T.match_buffer(k_h, layout(k_seq, batch, sk, HK, D), "float32")
            v = T.match_buffer(v_h, layout(v_seq, batch, sk, HK, D), "float32")
            o = T.match_buffer(o_h, (batch, sq, H, D), "float32")
            body(batch, sq, sk, q, k, None, v, o)
    else:
        ones = mask.ones

        @T.prim_func(private=True)
        def func(q_h: T.handle, k_h: T.handle, m_h: T.handle, v_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            batch, sq, sk = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, layout(q_seq, batch, sq, H, D), "float32")
            k = T.match_buffer(k_h, layout(k_seq, batch, sk, HK, D), "float32")
            m = T.match_buffer(m_h, [1 if one else n for one, n in zip(ones, (batch, H, sq, sk))], "float32")
            v = T.match_buffer(v_h, layout(v_seq, batch, sk, HK, D), "float32")
            o = T.match_buffer(o_h, (batch, sq, H, D), "float32")
            body(batch, sq, sk, q, k, m, v, o)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


def dispatch(counts: dict | None = None):
    """A module pass: `values(softmax(scores(q, k[, m]), axis=-1), v)` (our kernels' calls, the
    scores and probabilities used once, one group) becomes one call of `attention`;
    `counts[KIND]` receives how many, taken off the scores' and values' counts."""

    @tvm.transform.module_pass(opt_level=0, name="fq.FuseAttention")
    def _pass(mod, _ctx):
        tally = {}
        mod = dispatch_pass("fq.FuseAttention", KIND, _Dispatch, tally)(mod)
        if counts is not None and tally:
            for kind in (cpu_attention.KIND, cpu_attention_values.KIND):
                counts[kind] = counts.get(kind, 0) - tally[KIND]
                if not counts[kind]:
                    del counts[kind]
            counts[KIND] = counts.get(KIND, 0) + tally[KIND]
        return mod

    return _pass


@relax.expr_functor.mutator
class _Dispatch(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.mod_ = mod
        self.kernels = {}
        self.count = 0
        self.uses = {}
        for func in mod.functions.values():
            if isinstance(func, relax.Function):
                self.uses.update(bindings(func)[1])

    def visit_call_(self, call):
        call = super().visit_call_(call)
        values = self._kernel_call(call, cpu_attention_values.KIND)
        if values is None:
            return call
        p, v = values[1]
        probs = self._bound_once(p)
        if not (isinstance(probs, relax.Call) and probs.op == tvm.ir.Op.get("relax.nn.softmax")
                and int(probs.attrs.axis) in (-1, 3)):
            return call
        scores = self._kernel_call(self._bound_once(probs.args[0]), cpu_attention.KIND)
        if scores is None:
            return call
        H, D, lanes, q_seq, k_seq, group, mask = scores[0]
        _, _, v_lanes, v_seq, v_group = values[0]
        if v_group != group:
            return call
        mask = None if mask is None else cpu_attention.Mask(tuple(mask[0]), mask[1], mask[2])
        key = (H, D, lanes, v_lanes, q_seq, k_seq, v_seq, group, mask)
        if key not in self.kernels:
            self.kernels[key] = self.builder_.add_func(attention(*key), _name(scores[2], mask))
        self.count += 1
        q, k, *m = scores[1]
        return relax.call_tir(self.kernels[key], [q, k, *m, v], call.ty)

    def _kernel_call(self, call, kind):
        """(its fq_args, its tensor arguments, the kernel's name) for a call_tir of our `kind`."""
        if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.call_tir")):
            return None
        func = self.mod_.functions.get(call.args[0])
        attrs = func.attrs if isinstance(func, tvm.tirx.PrimFunc) else None
        if attrs is None or str(attrs.get("fq_kernel", "")) != kind or "fq_args" not in attrs:
            return None
        return json.loads(str(attrs["fq_args"])), list(call.args[1].fields), call.args[0].name_hint

    def _bound_once(self, expr):
        if not isinstance(expr, relax.Var) or self.uses.get(expr, 0) != 1:
            return None
        return self.lookup_binding(expr)


def _name(scores_name: str, mask) -> str:
    return scores_name.replace("fq_attention_scores", "fq_attention").replace("_masked", "") + \
        ("" if mask is None else "_masked")
