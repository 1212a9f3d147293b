"""Split heads before slicing them out of a stacked projection.

A stacked Q/K/V layer (passes/emit.py `packed_linears`) gives `strided_slice(qkv, last axis,
[a, b])` per projection, and the export then reshapes each slice into heads: `reshape(slice,
[..., H, D])`. The reshape is a view, but between the slice and its consumer it keeps the slice
a kernel of its own (a copy; two launches per layer and decoding step in SmolLM2). Written as
`strided_slice(reshape(qkv, [..., N / D, D]), heads axis, [a / D, b / D])` (the same elements in
the same order) the reshape comes first and the slice can fuse into whatever reads it (the
rotary embedding). Applies where D divides a, b and the stacked width N; anything else is left.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal

from . import int_tuple, rewrite_functions, static_ints

_RESHAPE = tvm.ir.Op.get("relax.reshape")
_SLICE = tvm.ir.Op.get("relax.strided_slice")


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _RESHAPE or not isinstance(call.args[0], relax.Var):
            return call
        sliced = self.lookup_binding(call.args[0])
        found = self._heads(sliced, call) if isinstance(sliced, relax.Call) and sliced.op == _SLICE else None
        if found is None:
            return call
        x, begin, end, dim = found
        shape = list(x.ty.shape)
        heads = self.builder_.emit(relax.op.reshape(x, shape[:-1] + [int(shape[-1]) // dim, dim]))
        self.count += 1
        return relax.op.strided_slice(heads, axes=[len(shape) - 1], begin=[begin // dim], end=[end // dim],
                                      assume_inbound=True)

    @staticmethod
    def _heads(sliced, reshape):
        """(x, begin, end, D) where `sliced` takes [begin, end) of x's static last axis (stride 1)
        and `reshape` splits it into heads of D, both dividing by D; else None."""
        x = sliced.args[0]
        old, new = getattr(x.ty, "shape", None), getattr(reshape.ty, "shape", None)
        old, new = (None if v is None else list(v) for v in (old, new))
        if old is None or new is None or len(new) != len(old) + 1 or x.ty.dtype != reshape.ty.dtype:
            return None
        axes, begin, end = (int_tuple(arg) for arg in sliced.args[1:4])
        strides = int_tuple(sliced.args[4]) if len(sliced.args) > 4 else [1]
        width, tail = static_ints([old[-1]]), static_ints(new[-2:])
        if None in (axes, begin, end, strides, width, tail) or axes != [len(old) - 1] or strides != [1]:
            return None
        (a,), (b,), (n,), (h, d) = begin, end, width, tail
        same = all(structural_equal(p, q) for p, q in zip(old[:-1], new[:-2]))
        if not same or not 0 <= a < b <= n or (b - a) != h * d or a % d or b % d or n % d:
            return None
        return x, a, b, d


@tvm.transform.module_pass(opt_level=0, name="fq.SliceHeads")
class SliceHeads:
    """Every `reshape(strided_slice(x, last axis, [a, b]), [..., H, D])` becomes
    `strided_slice(reshape(x, [..., N / D, D]), heads axis, [a / D, b / D])`; `count` says how
    many after the pass ran."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = rewrite_functions(mod, _Rewriter(mod))
        return mod
