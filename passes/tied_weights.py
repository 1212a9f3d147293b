"""Store a tied embedding once.

A language model whose output projection reuses the token embedding (SmolLM2, GPT-2, ...) imports as
`take(E, ids, axis=0)` and `matmul(h, permute_dims(E))` on one constant E [V, K]. Constant folding
then materialises E^T next to E, doubling the largest tensor of the model in the artifact. This pass
keeps only E^T: the head reads it directly, and the embedding becomes
`permute_dims(take(E^T, ids, axis=1))` (a gather of K-strided columns; cheap next to the head).
Runs on the bound module (weights as constants), before the build.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # a Relax tensor constant
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

_TAKE = tvm.ir.Op.get("relax.take")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_SHAPE_OF = tvm.ir.Op.get("relax.shape_of")


def _use_kind(call) -> str | None:
    """'gather', 'transpose' or 'shape' for the uses of E this pass can rewrite, else None."""
    if call.op == _TAKE and int(call.attrs.axis) == 0:
        return "gather"
    if call.op == _PERMUTE:
        axes = call.attrs.axes
        return "transpose" if axes is None or [int(a) for a in axes] == [1, 0] else None
    if call.op == _SHAPE_OF:
        return "shape"
    return None


@visitor
class _Uses(PyExprVisitor):
    """For each 2-D constant: the kinds of its uses (None for any use the pass cannot rewrite)."""

    def __init__(self):
        super().__init__()
        self.uses: dict = {}

    def visit_call_(self, call):
        for pos, arg in enumerate(call.args):
            if isinstance(arg, GenericConst) and len(arg.value.shape) == 2:
                kind = _use_kind(call) if pos == 0 else None
                self.uses.setdefault(arg, []).append(kind)
        super().visit_call_(call)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, tied: dict):
        super().__init__(mod)
        self.tied = tied  # E -> relax.Constant(E^T)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        table = call.args[0] if call.args else None
        if not isinstance(table, GenericConst) or table not in self.tied:
            return call
        kind, transposed = _use_kind(call), self.tied[table]
        if kind == "transpose":
            return transposed
        if kind == "shape":
            return relax.ShapeExpr([int(d) for d in table.value.shape])
        ids = call.args[1]
        cols = self.builder_.emit(relax.op.take(transposed, ids, axis=1, mode=call.attrs.mode))
        rank = len(ids.ty.shape)
        return relax.op.permute_dims(cols, list(range(1, rank + 1)) + [0])


@tvm.transform.module_pass(opt_level=0, name="fq.StoreTiedWeightsOnce")
class StoreTiedWeightsOnce:
    """Rewrite every 2-D constant that is both gathered (axis 0) and transposed, and used no other
    way, so that only its transpose is stored. `tied` counts them after the pass ran."""

    def __init__(self):
        self.tied = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        uses = _Uses()
        uses.visit_expr(mod["main"])
        tied = {const: relax.const(const.value.numpy().T.copy())
                for const, kinds in uses.uses.items()
                if None not in kinds and "gather" in kinds and "transpose" in kinds}
        self.tied = len(tied)
        if not tied:
            return mod
        rewriter = _Rewriter(mod, tied)
        rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(mod["main"]))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.finalize())
