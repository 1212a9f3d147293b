"""Gather a decomposed RMS norm back into one `R.nn.rms_norm`.

ONNX has no RMS norm before opset 23, so a Llama-style model exports it as elementwise ops:
`w * (x * (1 / sqrt(mean(x ** 2, -1) + eps)))` (the torch exporters), or with `rsqrt`, or as
`x / sqrt(...)`. Imported as is, that is a power kernel and a fused reduction per norm; as one op
a backend can run it as a row kernel (SmolLM2 has 61 of them). Runs on the bound module (the
exponent and epsilon are constants). Any other form, or a factor used elsewhere as well, is left
alone: the intermediate bindings stay where something else reads them.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # a Relax tensor constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import rewrite_functions

_OPS = {name: tvm.ir.Op.get(f"relax.{name}")
        for name in ("multiply", "divide", "power", "mean", "add", "sqrt", "rsqrt")}


def _scalar(expr) -> float | None:
    """The value of a one-element float constant, else None."""
    if isinstance(expr, GenericConst) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


def _is(call, name: str) -> bool:
    return isinstance(call, relax.Call) and call.op == _OPS[name]


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def _value(self, expr):
        """What a variable is bound to (itself where not bound in a dataflow block here)."""
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return expr if bound is None else bound

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not _is(call, "multiply"):
            return call
        for w, normed in (call.args, call.args[::-1]):
            found = self._normed(normed)
            if found is not None and self._weight_fits(w, found[0]):
                self.count += 1
                return relax.op.nn.rms_norm(found[0], w, axes=[-1], epsilon=found[1])
        return call

    def _normed(self, expr):
        """(x, eps) where expr is x * rstd(x), rstd(x) * x or x / rms(x), else None."""
        value = self._value(expr)
        if _is(value, "divide"):
            x, rms = value.args
            eps = self._mean_square(x, self._value(rms), "sqrt")
            return None if eps is None else (x, eps)
        if not _is(value, "multiply"):
            return None
        for x, r in (value.args, value.args[::-1]):
            eps = self._rstd(x, self._value(r))
            if eps is not None:
                return x, eps
        return None

    def _rstd(self, x, r):
        """eps where r is 1 / sqrt(mean(x^2) + eps) or rsqrt(mean(x^2) + eps), else None."""
        if _is(r, "divide") and _scalar(r.args[0]) == 1.0:
            return self._mean_square(x, self._value(r.args[1]), "sqrt")
        return self._mean_square(x, r, "rsqrt")

    def _mean_square(self, x, root, op: str):
        """eps where root is op(mean(x^2, last axis, keepdims) + eps), else None."""
        if not _is(root, op):
            return None
        total = self._value(root.args[0])
        if not _is(total, "add"):
            return None
        for mean, eps in (total.args, total.args[::-1]):
            mean, eps = self._value(mean), _scalar(eps)
            if eps is not None and eps >= 0 and _is(mean, "mean") and self._squares(x, mean) \
                    and np.isfinite(eps):
                return eps
        return None

    def _squares(self, x, mean) -> bool:
        """mean is mean(x^2) (or mean(x * x)) over the last axis of float32 x, keeping it."""
        ndim = len(x.ty.shape) if getattr(x.ty, "shape", None) is not None else 0
        axes = mean.attrs.axis
        if ndim < 1 or x.ty.dtype != "float32" or not mean.attrs.keepdims or axes is None \
                or [int(a) % ndim for a in axes] != [ndim - 1]:
            return False
        square = self._value(mean.args[0])
        if _is(square, "power"):
            return square.args[0].same_as(x) and _scalar(square.args[1]) == 2.0
        return _is(square, "multiply") and square.args[0].same_as(x) and square.args[1].same_as(x)

    @staticmethod
    def _weight_fits(w, x) -> bool:
        """w is a 1-D float32 vector as long as x's last axis (R.nn.rms_norm's weight)."""
        shape = getattr(w.ty, "shape", None)
        n = x.ty.shape[-1]
        return (shape is not None and len(shape) == 1 and w.ty.dtype == "float32"
                and isinstance(n, tvm.tirx.IntImm) and isinstance(shape[0], tvm.tirx.IntImm)
                and int(shape[0]) == int(n))


@tvm.transform.module_pass(opt_level=0, name="fq.FuseRMSNorm")
class FuseRMSNorm:
    """Every `w * (x * rstd(x))` (either order, or `w * (x / rms(x))`) over the last axis becomes
    `R.nn.rms_norm(x, w, axes=[-1], epsilon)`; `count` says how many after the pass ran."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = rewrite_functions(mod, _Rewriter(mod))
        return mod
