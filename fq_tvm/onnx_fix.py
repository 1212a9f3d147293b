"""Per-node fixes around TVM 0.27's Relax ONNX importer, and errors that name the ONNX node.

`Hooks` wraps `ONNXGraphImporter._convert_operator` while one model is imported:
- it remembers the node being converted, so a failure names it;
- it replaces a few converters that mishandle real exports (FIXES below);
- after each node it compares the Relax result's shape with ONNX's inferred shape
  (frontend.infer_shapes) and, where Relax lost it (unknown shape, or dims made of fresh
  variables an Expand / Range invented), binds the ONNX shape with `R.match_cast`. Most of
  the upstream failures on dynamo and legacy exports come from that: a broadcast of
  (batch, seq, 64) with (x_0, x_1, 64) has an unknown shape, and the next Reshape with -1 fails.
  match_cast is checked at run time, so a wrong hint fails loudly, never silently.
"""

from __future__ import annotations

import ast
import contextlib

import numpy as np
import onnx
import tvm
from tvm import relax, tirx
from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx


class NodeError(Exception):
    """A converter failed on `node`; `reason` is the last line of TVM's message."""

    def __init__(self, node, reason: str):
        super().__init__(f"ONNX node '{node.name}' ({node.op_type}): {reason}")
        self.node, self.reason = node, reason


def _last_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    return text.removeprefix("Check failed: ")[:300]


# ---- converter fixes -------------------------------------------------------------------------------

def _constant_of_shape(bb, inputs, attr, params, opset):
    """Upstream: the `value` attribute (a 1-element tensor) is broadcast with its rank 1, so an
    empty shape (a scalar result, common in legacy exports) fails in broadcast_to; and only rank-1
    constant shapes are folded."""
    value = attr.get("value")
    value = tvm_onnx.get_numpy(value).reshape(()) if value is not None else np.float32(0)
    shape = tvm_onnx.get_constant(inputs[0], params)
    if isinstance(shape, tvm.ir.GenericConst):
        return relax.const(np.full(shape.value.numpy().astype(np.int64), value), str(value.dtype))
    if isinstance(shape, relax.ShapeExpr) and all(isinstance(d, tirx.IntImm) for d in shape.values):
        return relax.const(np.full([int(d) for d in shape.values], value), str(value.dtype))
    if not isinstance(shape, relax.ShapeExpr):
        # upstream passes tensor_to_shape(...) straight to broadcast_to, whose legalization then
        # asserts (the target is a Var not bound to a ShapeExpr); bind fresh dims instead
        ty = shape.ty
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) and ty.ndim == 1:
            shape = bb.normalize(relax.op.astype(shape, "int64"))
            shape = tvm_onnx._tensor_to_shape_expr(bb, shape, int(ty.shape.values[0]), "fill_dim")
        else:
            shape = relax.op.tensor_to_shape(shape)
    return relax.op.broadcast_to(relax.const(value, str(value.dtype)), shape)


def _prim_to_tensor(data):
    """A scalar PrimValue (a shape computation TVM keeps symbolic) as an int64 tensor [1]."""
    return relax.op.shape_to_tensor(relax.ShapeExpr([data]))


def _shape_values(data):
    """The int64 dims a ShapeExpr or a scalar int64 PrimExpr (a computed dim) holds, else None."""
    if isinstance(data, relax.ShapeExpr):
        return list(data.values)
    if isinstance(getattr(data, "ty", None), tvm.ir.PrimType) and str(data.ty.dtype) == "int64":
        return [data]
    return None


FIXES = {"ConstantOfShape": _constant_of_shape}
SHAPED = ("Reshape", "Expand")  # ops whose output shape is taken from ONNX shape inference when known


# ---- shape hints ------------------------------------------------------------------------------------

def _onnx_dims(value_info):
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.tensor_type.shape.dim]


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.FloorDiv: lambda a, b: tirx.floordiv(a, b)}


def dim_expr(dim, symbols):
    """An ONNX dim (int, or a symbolic name / expression such as 'seq + 1' or 'batch*seq' over
    the graph inputs' dims) as a TIR int64 expression; None if it names anything else."""
    if isinstance(dim, int):
        return tirx.IntImm("int64", dim)
    if not dim:
        return None
    if dim in symbols:
        return symbols[dim]
    try:
        return _expr(ast.parse(dim, mode="eval").body, symbols)
    except (SyntaxError, KeyError, TypeError, ValueError, RecursionError):
        return None


def _expr(node, symbols):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return tirx.IntImm("int64", node.value)
    if isinstance(node, ast.Name):
        return symbols[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_expr(node.left, symbols), _expr(node.right, symbols))
    raise ValueError("not a dim expression")


class Hooks:
    """State for one import: ONNX nodes by name, inferred shapes by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = {n.name: n for n in g.node}
        self.shapes = {v.name: _onnx_dims(v) for v in list(g.value_info) + list(g.output)}
        self.node = None
        self.symbols = None  # dim name -> tir.Var of the graph inputs
        self.fresh: dict = {}
        self.hints = 0
        self.unknown: list = []  # (node, onnx dims, relax dims) that needed a hint (debugging)

    def convert(self, importer, original, op_name, inputs, attrs, opset):
        self.node = self.nodes.get(attrs.get("tvm_custom", {}).get("name"))
        try:
            sym = self._shaped(importer, op_name, inputs) if op_name in SHAPED else None
            if sym is not None:
                sym = importer.bb.normalize(sym)
            elif op_name in FIXES:
                sym = importer.bb.normalize(FIXES[op_name](importer.bb, inputs, attrs,
                                                           [importer._nodes, importer._params], opset))
            else:
                sym = original(importer, op_name, inputs, attrs, opset)
        except NodeError:
            raise
        except Exception as err:
            if self.node is None:
                raise
            raise NodeError(self.node, _last_line(err)) from err
        return self._hint(importer, sym)

    def _shaped(self, importer, op_name, inputs):
        """Reshape / Expand to the ONNX-inferred output shape when it is made of constants and
        input dims. Upstream: a shape computed as a tensor (legacy exports), -1 with symbolic
        dims, or a data input that is a PrimValue fail; Expand to a computed shape invents fresh
        dims (`'NoneType' object is not iterable` on grouped-query attention)."""
        dims = self.shapes.get(self.node.output[0]) if self.node is not None else None
        symbols = self._input_symbols(importer)
        if dims is None:
            return None
        shape = [dim_expr(d, symbols) for d in dims]
        if any(d is None for d in shape):
            computed = self._computed_shape(importer, inputs[1], len(dims)) if op_name == "Reshape" else None
            if computed is None:
                return None
            shape = [d if d is not None else c for d, c in zip(shape, computed)]
        data = inputs[0]
        if op_name == "Reshape" and len(shape) == 1:
            values = _shape_values(data)
            if values is not None and isinstance(shape[0], tirx.IntImm) and len(values) == int(shape[0]):
                # a shape computation (a KV cache's past + seq) stays a shape, so the Concat that
                # builds an Expand target from it folds to a ShapeExpr
                return relax.ShapeExpr(values)
        if isinstance(data, relax.ShapeExpr):
            data = relax.op.shape_to_tensor(data)
        elif isinstance(data.ty, tvm.ir.PrimType):
            data = _prim_to_tensor(data)
        if data is None or not isinstance(importer.bb.normalize(data).ty, relax.TensorType):
            return None
        if op_name == "Reshape":
            return relax.op.reshape(data, shape)
        return relax.op.broadcast_to(data, shape)

    @staticmethod
    def _computed_shape(importer, shape, ndim):
        """A Reshape target computed at run time (an int64 tensor [ndim]) as fresh shape vars."""
        shape = tvm_onnx.get_constant(shape, [importer._nodes, importer._params])
        ty = getattr(shape, "ty", None)
        if isinstance(shape, tvm.ir.GenericConst) or not isinstance(ty, relax.TensorType):
            return None
        if not isinstance(ty.shape, relax.ShapeExpr) or [int(d) for d in ty.shape.values] != [ndim]:
            return None
        shape = importer.bb.normalize(relax.op.astype(shape, "int64"))
        return list(tvm_onnx._tensor_to_shape_expr(importer.bb, shape, ndim, "reshape_dim").values)

    def _input_symbols(self, importer) -> dict:
        if self.symbols is None:
            self.symbols = {}
            for var in importer._inputs.values():
                shape = getattr(var.ty, "shape", None)
                for dim in getattr(shape, "values", None) or []:
                    if isinstance(dim, tirx.Var):
                        self.symbols[dim.name] = dim
        return self.symbols

    def _hint(self, importer, sym):
        node = self.node
        if node is None or len(node.output) != 1 or not isinstance(sym, relax.Expr):
            return sym
        ty = sym.ty
        dims = self.shapes.get(node.output[0])
        if not isinstance(ty, relax.TensorType) or dims is None or (ty.ndim != -1 and ty.ndim != len(dims)):
            return sym
        symbols = self._input_symbols(importer)
        have = list(ty.shape.values) if isinstance(ty.shape, relax.ShapeExpr) else None
        if have is not None and all(self._known(d, symbols) for d in have):
            return sym
        self.unknown.append((node.name, dims, have))
        want = [self._dim(d, have[i] if have else None, symbols) for i, d in enumerate(dims)]
        if have is not None and all(a.same_as(b) for a, b in zip(want, have)):
            return sym
        self.hints += 1
        return importer.bb.match_cast(sym, relax.TensorType(want, ty.dtype))

    @staticmethod
    def _known(dim, symbols) -> bool:
        if isinstance(dim, tirx.IntImm):
            return True
        return all(v.name in symbols and symbols[v.name].same_as(v) for v in tirx.analysis.undefined_vars(dim))

    def _dim(self, onnx_dim, relax_dim, symbols):
        known = dim_expr(onnx_dim, symbols)
        if known is not None:
            return known
        if relax_dim is not None and self._known(relax_dim, symbols):
            return relax_dim
        key = onnx_dim or f"_anon{len(self.fresh)}"
        if key not in self.fresh:
            self.fresh[key] = tirx.Var(f"d{len(self.fresh)}", "int64")
        return self.fresh[key]


@contextlib.contextmanager
def installed(hooks: Hooks):
    """Route TVM's per-node conversion through `hooks` for the duration of one import.

    Also skips the onnx checker that `from_onnx` runs on the in-memory model, whose failures it
    only warns about: onnx_io.load_model has checked the file, and the check serializes the whole
    model (2.5 s for 268 MB of weights; over 2 GB, a failed encode that raised peak memory of a
    2.15 GB model's import from 4.8 to 6.1 GB)."""
    cls = tvm_onnx.ONNXGraphImporter
    original, check = cls._convert_operator, onnx.checker.check_model

    def convert(self, op_name, inputs, attrs, opset):
        return hooks.convert(self, original, op_name, inputs, attrs, opset)

    cls._convert_operator = convert
    onnx.checker.check_model = _checked_already
    try:
        yield hooks
    finally:
        cls._convert_operator, onnx.checker.check_model = original, check


def _checked_already(model, *args, **kwargs) -> None:
    """onnx.checker.check_model while TVM imports (see `installed`)."""
