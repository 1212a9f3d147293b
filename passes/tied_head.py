"""Quantize a tied embedding / LM head once (`--quantize-head`).

A tied table E [V, K] imports as a weight parameter read by `take(E, ids, axis=0)` (the embedding),
`matmul(h, permute_dims(E))` (the head) and perhaps `shape_of(E)`. Given its packed record (stored
without an output rotation, so stored row v is token v), this pass makes the head a packed linear
layer (emit.packed_linear) and the embedding a gather of the same code rows (emit.code_gather:
decode, then the inverse input transform). Both read one set of constants; E itself is dropped.
A table with any other use is left alone (not in `rewritten`). Runs before the weights are bound.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, PyExprVisitor, mutator, visitor

from . import emit
from .lowering import PackedLinear
from .quantize_dense import match_dense

_TAKE = tvm.ir.Op.get("relax.take")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_SHAPE_OF = tvm.ir.Op.get("relax.shape_of")
_MATMUL = tvm.ir.Op.get("relax.matmul")


def _use_kind(call, pos: int) -> str | None:
    """How `call` uses the table passed as its argument `pos`: 'gather', 'transpose', 'shape' or None."""
    if pos != 0:
        return None
    if call.op == _TAKE and int(call.attrs.axis) == 0:
        return "gather"
    if call.op == _PERMUTE:
        axes = call.attrs.axes
        return "transpose" if axes is None or [int(a) for a in axes] == [1, 0] else None
    return "shape" if call.op == _SHAPE_OF else None


@visitor
class _Uses(PyExprVisitor):
    """For each table parameter: the kinds of its uses, and the uses of its transposes."""

    def __init__(self, names: set):
        super().__init__()
        self.names = names
        self.kinds: dict = {}  # table name -> [kind or None]
        self.transposes: dict = {}  # var bound to permute_dims(table) -> table name
        self.bad: set = set()  # tables whose transpose is read other than as a matmul weight

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Call) and value.op == _PERMUTE and value.args \
                and isinstance(value.args[0], relax.Var) and value.args[0].name in self.names:
            self.transposes[binding.var] = value.args[0].name
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        for pos, arg in enumerate(call.args):
            if isinstance(arg, relax.Var) and arg.name in self.names:
                self.kinds.setdefault(arg.name, []).append(_use_kind(call, pos))
            if arg in self.transposes and not (call.op == _MATMUL and pos == 1):
                self.bad.add(self.transposes[arg])
        super().visit_call_(call)

    def rewritable(self) -> set:
        return {name for name, kinds in self.kinds.items()
                if None not in kinds and {"gather", "transpose"} <= set(kinds) and name not in self.bad}


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod, heads: dict):
        super().__init__(mod)
        self.heads = heads  # table name -> PackedLinear
        self.shared: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = match_dense(call, self.lookup_binding)
        if found is not None and found[1] and found[0] in self.heads:
            return emit.packed_linear(self.builder_, call.args[0], self.heads[found[0]], self.shared)
        table = call.args[0] if call.args else None
        if not isinstance(table, relax.Var) or table.name not in self.heads:
            return call
        kind = _use_kind(call, 0)
        if kind == "gather":
            return emit.code_gather(self.builder_, call.args[1], self.heads[table.name], self.shared)
        if kind == "shape":
            return relax.ShapeExpr([int(d) for d in table.ty.shape])
        return call  # the transpose: dead once its matmul is rewritten


@tvm.transform.module_pass(opt_level=0, name="fq.QuantizeTiedHead")
class QuantizeTiedHead:
    """Replace tied tables (weight parameter name -> PackedLinear without an output rotation) by
    their packed codes: the head by a packed linear layer, the embedding by a code gather.
    `rewritten` lists the table names done after the pass ran."""

    def __init__(self, heads: dict[str, PackedLinear]):
        self.heads = heads
        self.rewritten: list[str] = []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"]
        uses = _Uses(set(self.heads))
        uses.visit_expr(func)
        names = {var.name for var in func.params}
        heads = {name: layer for name, layer in self.heads.items() if name in uses.rewritable() and name in names}
        self.rewritten = sorted(heads)
        if not heads:
            return mod
        rewriter = _Rewriter(mod, heads)
        rewriter.builder_.update_func(mod.get_global_var("main"), rewriter.visit_expr(func))
        out = rewriter.builder_.finalize()
        return relax.transform.RemoveUnusedParameters()(relax.transform.DeadCodeElimination()(out))
