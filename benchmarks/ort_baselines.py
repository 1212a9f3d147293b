"""ONNX Runtime baselines for one dense layer: fp32 MatMul, dynamic int8, MatMulNBits (2/4-bit).

Used by bench_layer.py; each builder writes an ONNX file with input `x` [M, K] (dynamic M) and
output `y` [M, N] computing x @ W^T for the given float32 W [N, K].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _io(k: int, n: int):
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])])


def fp32_matmul(path: Path, w: np.ndarray) -> Path:
    n, k = w.shape
    ins, outs = _io(k, n)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "dense", ins, outs, [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def dynamic_int8(path: Path, fp32_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True)
    return path


def matmul_nbits(path: Path, w: np.ndarray, bits: int, block: int = 32, accuracy_level: int = 4) -> Path:
    """Blockwise asymmetric round-to-nearest weights in ORT's MatMulNBits layout."""
    n, k = w.shape
    assert k % block == 0, "K must be a multiple of the block size"
    nblk, levels = k // block, 2**bits - 1
    wb = w.reshape(n, nblk, block).astype(np.float64)
    lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
    q = np.clip(np.round(wb / scale[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    per = 8 // bits
    shifts = (bits * np.arange(per)).astype(np.uint8)
    packed = (q.reshape(n, nblk, block // per, per) << shifts).sum(-1).astype(np.uint8)
    zp = np.zeros((n, -(-nblk * bits // 8) * per), np.uint8)
    zp[:, :nblk] = zero
    zp_packed = (zp.reshape(n, -1, per) << shifts).sum(-1).astype(np.uint8)
    ins, outs = _io(k, n)
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zp"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(packed, "B"),
             numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "scales"),
             numpy_helper.from_array(zp_packed.reshape(-1), "zp")]
    graph = helper.make_graph([node], "dense_nbits", ins, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def dequantized_nbits(w: np.ndarray, bits: int, block: int = 32) -> np.ndarray:
    """The weight MatMulNBits applies (for checking the layout)."""
    n, k = w.shape
    nblk, levels = k // block, 2**bits - 1
    wb = w.reshape(n, nblk, block).astype(np.float64)
    lo, hi = np.minimum(wb.min(-1), 0), np.maximum(wb.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, levels)
    q = np.clip(np.round(wb / scale[..., None]) + zero[..., None], 0, levels)
    return ((q - zero[..., None]) * scale[..., None]).reshape(n, k)
