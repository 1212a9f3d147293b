"""Load and validate ONNX files, and read their input/output signatures."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import FqError

PROTOBUF_LIMIT = 2_000_000_000  # a model over it cannot be serialized (nor ByteSize()d) in one piece


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read `path` as an ONNX model and run the ONNX checker; raise FqError on any problem."""
    path = Path(path)
    if not path.exists():
        raise FqError(f"{path}: no such file")
    if path.is_dir():
        raise FqError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise FqError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, external data OSError, ...
        raise FqError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    if not model.graph.node:
        raise FqError(f"{path}: not an ONNX model (no graph nodes; truncated or another format?)")
    check_model(model, str(path))
    return model


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """Run the ONNX checker and reject NaN constants and non-finite dense weights.

    (Infinite constants elsewhere are legitimate: attention masks use -inf.)"""
    check_opset(model, where)
    if not model.graph.output:
        raise FqError(f"{where}: the graph has no outputs (it computes nothing)")
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(d.HasField("dim_value") and d.dim_value == 0 for d in dims):
            raise FqError(f"{where}: input '{value.name}' has a dim of size 0")
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.FLOAT and not np.isfinite(attr.f):
                raise FqError(f"{where}: node '{node.name or node.op_type}' ({node.op_type}) has {attr.name} = {attr.f}")
    big = is_big(model)  # near the protobuf limit: the checker reads the file (no shape inference)
    if not big or os.path.isfile(where):
        try:
            onnx.checker.check_model(where if big else model, full_check=not big)
        except Exception as err:
            raise FqError(f"{where}: fails the ONNX checker: {_first_line(err)}") from None
    dense = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1}
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            arr = numpy_helper.to_array(init)
            if np.isnan(arr).any():
                raise FqError(f"{where}: weight '{init.name}' contains NaN values")
            if init.name in dense and not np.isfinite(arr).all():
                raise FqError(f"{where}: dense weight '{init.name}' contains Inf values")


MIN_OPSET = 7  # TVM's importer has no converters for older default-domain opsets


def check_opset(model: onnx.ModelProto, where: str = "model") -> None:
    """Refuse default-domain opsets outside what onnx and TVM's importer know."""
    latest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not MIN_OPSET <= entry.version <= latest:
            raise FqError(f"{where}: ONNX opset {entry.version} is not supported (use {MIN_OPSET} to {latest})")


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
            for d in shape.dim]


def _dtype(value_info) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)).name


def signature(model: onnx.ModelProto) -> dict:
    """Graph inputs (excluding initializers) and outputs: name, dtype, shape (str = symbolic dim)."""
    inits = {i.name for i in model.graph.initializer}
    ins = [v for v in model.graph.input if v.name not in inits]
    return {
        "inputs": [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in ins],
        "outputs": [{"name": v.name, "dtype": _dtype(v), "shape": _dims(v)} for v in model.graph.output],
    }


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def is_big(model: onnx.ModelProto, limit: int | None = None) -> bool:
    """True if the model's weights come near `limit` (PROTOBUF_LIMIT): it must not be serialized.
    Counted from the initializers' dims (ModelProto.ByteSize() serializes, and raises over 2 GB)."""
    return weight_bytes(model) >= 0.9 * (limit or PROTOBUF_LIMIT)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all initializers as stored in the model."""
    return sum(tensor_bytes(init) for init in model.graph.initializer)


def tensor_bytes(init: onnx.TensorProto) -> int:
    """Bytes of one tensor, from its dims and type (reading its data would copy it)."""
    count = int(np.prod(init.dims, dtype=np.int64)) if init.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
