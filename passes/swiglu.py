"""The gated MLP activation on a stacked gate / up projection as one kernel.

A stacked gate / up layer (passes/emit.py `packed_linears`) gives `gate = strided_slice(s, last
axis, [0, n])` and `up = strided_slice(s, last axis, [n, 2n])`, and the model then computes
`silu(gate) * up` (ONNX exports write silu as `gate * sigmoid(gate)`). That becomes one call of
the `swiglu` kernel (schedules/kernels.py) on the rows of s, [rows, 2n] -> [rows, n]: a row
transform like the inverse Hadamard that writes s, so a target family can fuse the two (and the
next layer's input side) into one kernel. Where s is a reshape of a 2-D tensor, the kernel reads
that tensor, and a reshape of the result back to 2-D reads the kernel's output: no reshape stands
between the row transforms. Anything else is left.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm_ffi import structural_equal

from . import int_tuple, rewrite_functions

_RESHAPE = tvm.ir.Op.get("relax.reshape")
_SLICE = tvm.ir.Op.get("relax.strided_slice")
_MULTIPLY = tvm.ir.Op.get("relax.multiply")
_SIGMOID = tvm.ir.Op.get("relax.sigmoid")
_SILU = tvm.ir.Op.get("relax.nn.silu")


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.count, self.kernels, self.flat = 0, {}, set()

    def visit_var_binding_(self, binding):
        """A reshape of our result back to 2-D is dropped: its uses read the kernel's output."""
        value = binding.value
        if isinstance(binding.var, relax.DataflowVar) and isinstance(value, relax.Call) and value.op == _RESHAPE:
            source = self._unflattened(self.visit_expr(value))
            if source is not None:
                self.set_var_remap(binding.var, source)
                return
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _MULTIPLY:
            return call
        found = self._gated(call.args[0], call.args[1]) or self._gated(call.args[1], call.args[0])
        if found is None:
            return call
        stacked, width = found
        shape = list(stacked.ty.shape)
        rows = self._flat(stacked, shape, width)
        kernel = self._kernel(width)
        out = self.builder_.emit(relax.call_tir(kernel, [rows], relax.TensorType(
            [rows.ty.shape[0], width // 2], "float32")))
        self.count += 1
        if len(shape) == 2:
            return out
        self.flat.add(out)
        return relax.op.reshape(out, shape[:-1] + [width // 2])

    def _gated(self, activated, up):
        """(s, 2n) where `activated` is silu(s[..., :n]) and `up` is s[..., n:2n]; else None."""
        u = self._slice(up)
        if u is None:
            return None
        stacked, begin, end, width = u
        gate = self._silu_of(activated)
        g = self._slice(gate) if gate is not None else None
        if g is None or not g[0].same_as(stacked) or (g[1], g[2]) != (0, begin) or (begin, end) != (width // 2, width) \
                or width % 2 or stacked.ty.dtype != "float32":
            return None
        return stacked, width

    def _silu_of(self, expr):
        """g where `expr` is silu(g) or g * sigmoid(g) (either order); else None."""
        value = self._bound(expr)
        if not isinstance(value, relax.Call):
            return None
        if value.op == _SILU:
            return value.args[0]
        if value.op != _MULTIPLY:
            return None
        for g, sig in ((value.args[0], value.args[1]), (value.args[1], value.args[0])):
            s = self._bound(sig)
            if isinstance(s, relax.Call) and s.op == _SIGMOID and s.args[0].same_as(g):
                return g
        return None

    def _slice(self, expr):
        """(x, begin, end, width) where `expr` is x[..., begin:end] on x's static last axis, stride 1."""
        value = self._bound(expr)
        if not isinstance(value, relax.Call) or value.op != _SLICE or not isinstance(value.args[0], relax.Var):
            return None
        x = value.args[0]
        shape = getattr(x.ty, "shape", None)
        if shape is None or not isinstance(shape[-1], tvm.tirx.IntImm):
            return None
        axes, begin, end = (int_tuple(a) for a in value.args[1:4])
        strides = int_tuple(value.args[4]) if len(value.args) > 4 else [1]
        if None in (axes, begin, end, strides) or axes[0] % len(shape) != len(shape) - 1 or strides != [1]:
            return None
        return x, begin[0], end[0], int(shape[-1])

    def _bound(self, expr):
        return self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr

    def _flat(self, stacked, shape: list, width: int):
        """The rows of `stacked` as [rows, width]: the 2-D tensor it reshapes, or a reshape."""
        if len(shape) == 2:
            return stacked
        value = self._bound(stacked)
        if isinstance(value, relax.Call) and value.op == _RESHAPE:
            source = value.args[0]
            old = getattr(source.ty, "shape", None)
            if old is not None and len(old) == 2 and isinstance(old[-1], tvm.tirx.IntImm) and int(old[-1]) == width:
                return source
        rows = 1
        for d in shape[:-1]:
            rows = rows * d
        return self.builder_.emit(relax.op.reshape(stacked, [rows, width]))

    def _unflattened(self, call):
        """y where `call` is reshape(reshape(y, s), shape of y) for a result y of this pass; else None."""
        value = self._bound(call.args[0]) if isinstance(call, relax.Call) else None
        if isinstance(value, relax.Call) and value.op == _RESHAPE:
            source = value.args[0]
            old, new = getattr(source.ty, "shape", None), getattr(call.ty, "shape", None)
            if source in self.flat and old is not None and new is not None and len(old) == len(new) \
                    and all(structural_equal(a, b) for a, b in zip(old, new)):
                return source
        return None

    def _kernel(self, width: int):
        if width not in self.kernels:
            from ..schedules import kernels

            name = f"fq_swiglu_{width}"
            self.kernels[width] = self.builder_.add_func(kernels.swiglu(width).with_attr("global_symbol", name), name)
        return self.kernels[width]


@tvm.transform.module_pass(opt_level=0, name="fq.FuseSwiGLU")
class FuseSwiGLU:
    """Every `silu(s[..., :n]) * s[..., n:2n]` becomes a call of the `swiglu` kernel; `count`
    says how many after the pass ran."""

    def __init__(self):
        self.count = 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod, self.count = rewrite_functions(mod, _Rewriter(mod))
        return mod
