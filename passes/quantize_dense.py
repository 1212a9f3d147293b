"""Rewrite dense ops with constant weights into frame transform + packed dequant-matmul + unrotate.

Matches both imported forms of a Linear layer, `matmul(x, permute_dims(W))` (Gemm transB=1) and
`matmul(x, W)` with W `[K, N]` (torch's dynamo exporter), where W is a named weight parameter of
`main` listed in `layers`. x may have any leading dims (dynamic batch/sequence). Layers reading the
same activation with the same input transform share one transform, and where their codes and
output rotations allow (`emit.joinable`) one dequant-matmul with their rows stacked, sliced apart
after it (Q/K/V, and an MLP's gate and up): fewer and larger kernels, the same numbers.
"""

from __future__ import annotations

from collections import Counter

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

    def visit_function_(self, func):
        self.groups = _siblings(func, self.layers, self.params)
        return super().visit_function_(func)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = match_dense(call, self.lookup_binding)
        if found is None or found[0] not in self.layers or found[0] not in self.params:
            return call
        name = found[0]
        self.rewritten.append(name)
        group = self.groups.get(name)
        if group is None:
            return emit.packed_linear(self.builder_, call.args[0], self.layers[name], self.shared)
        key = ("outputs", group[0])
        if key not in self.shared:  # the group's first call computes every member
            outs = emit.packed_linears(self.builder_, call.args[0], [self.layers[n] for n in group], self.shared)
            self.shared[key] = dict(zip(group, outs))
        return self.shared[key][name]


def _siblings(func, layers: dict, params: set) -> dict[str, list[str]]:
    """weight name -> the names of the joinable layers reading the same tensor, in order (only
    names in a group of two or more)."""
    bindings = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    readers: dict = {}
    for value in bindings.values():
        found = match_dense(value, bindings.get) if isinstance(value, relax.Call) else None
        if found is not None and found[0] in layers and found[0] in params:
            readers.setdefault(value.args[0], []).append(found[0])
    count = Counter(n for names in readers.values() for n in names)
    groups = {}
    for names in readers.values():
        names = [n for n in names if count[n] == 1]  # a weight read twice keeps its own kernels
        while names:
            first, rest = names[0], names[1:]
            group = [first] + [n for n in rest if emit.joinable(layers[first], layers[n])]
            names = [n for n in rest if n not in group]
            if len(group) > 1:
                groups.update({n: group for n in group})
    return groups


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
