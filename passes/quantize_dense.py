"""Rewrite dense ops with constant weights into frame transform + packed dequant-matmul + unrotate.

Matches both imported forms of a Linear layer, `matmul(x, permute_dims(W))` (Gemm transB=1) and
`matmul(x, W)` with W `[K, N]` (torch's dynamo exporter), where W is a named weight parameter of
`main` listed in `layers`. x may have any leading dims (dynamic batch/sequence). Layers reading the
same activation with the same input transform share one transform (Q/K/V).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from .lowering import PackedLinear
from . import emit

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")


def match_dense(call, lookup) -> tuple[str, bool] | None:
    """(weight parameter name, transposed) if `call` is matmul(x, W) or matmul(x, permute_dims(W))."""
    if not isinstance(call, relax.Call) or call.op != _MATMUL:
        return None
    weight = call.args[1]
    bound = lookup(weight) if isinstance(weight, relax.Var) else None
    transposed = False
    if isinstance(bound, relax.Call) and bound.op == _PERMUTE:
        axes = bound.attrs.axes
        if len(bound.args[0].ty.shape) != 2 or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return None
        weight, transposed = bound.args[0], True
    if not isinstance(weight, relax.Var) or len(weight.ty.shape) != 2:
        return None
    return weight.name, transposed


@mutator
class _DenseRewriter(PyExprMutator):
    def __init__(self, mod, layers: dict[str, PackedLinear], params: set[str]):
        super().__init__(mod)
        self.layers = layers
        self.params = params
        self.rewritten: list[str] = []  # weight parameter names, one per rewritten call
        self.shared: dict = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = match_dense(call, self.lookup_binding)
        if found is None or found[0] not in self.layers or found[0] not in self.params:
            return call
        layer = self.layers[found[0]]
        x = call.args[0]
        self.rewritten.append(found[0])
        return emit.packed_linear(self.builder_, x, layer, self.shared)


@tvm.transform.module_pass(opt_level=0, name="fq.QuantizeDense")
class QuantizeDense:
    """Replace the listed dense layers (by weight parameter name) with packed low-bit kernels."""

    def __init__(self, layers: dict[str, PackedLinear]):
        self.layers = layers
        self.rewritten_params: list[str] = []
        self.num_input_transforms = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        func = mod["main"]
        params = {var.name for var in func.params}
        rewriter = _DenseRewriter(mod, self.layers, params)
        new_func = rewriter.visit_expr(func)
        self.rewritten_params = rewriter.rewritten
        self.num_input_transforms = sum(not isinstance(key[0], str) for key in rewriter.shared)  # not weights
        rewriter.builder_.update_func(mod.get_global_var("main"), new_func)
        out = rewriter.builder_.finalize()
        return relax.transform.RemoveUnusedParameters()(relax.transform.DeadCodeElimination()(out))
