"""A decomposed RMS norm gathers into one `R.nn.rms_norm` (passes/rms_norm.py) and runs as the CPU
row kernel (`cpu_layer_norm.rms_norm`), matching numpy and ONNX Runtime."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import fq_tvm
from fq_tvm.passes.rms_norm import FuseRMSNorm
from fq_tvm.schedules import relax_pipeline

HOST = tvm.target.Target({"kind": "llvm"})
EPS = float(np.float32(1e-5))  # the float32 constant of the graph, read back


def _decomposed(form: str, eps: float = 1e-5):
    """main(x [b, 8], w [8]) with the norm written out the way the exporters do."""
    n = 8
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("b", "int64"), n], "float32"))
    w = relax.Var("w", relax.TensorType([n], "float32"))
    bb = relax.BlockBuilder()
    f32 = "float32"
    with bb.function("main", [x, w]):
        with bb.dataflow():
            sq = bb.emit(relax.op.power(x, relax.const(2.0, f32)) if form != "x*x" else relax.op.multiply(x, x))
            mean = bb.emit(relax.op.mean(sq, axis=[-1], keepdims=True))
            total = bb.emit(relax.op.add(mean, relax.const(eps, f32)))
            if form == "rsqrt":
                normed = bb.emit(relax.op.multiply(bb.emit(relax.op.rsqrt(total)), x))
            elif form == "divide":
                normed = bb.emit(relax.op.divide(x, bb.emit(relax.op.sqrt(total))))
            else:
                r = bb.emit(relax.op.divide(relax.const(1.0, f32), bb.emit(relax.op.sqrt(total))))
                normed = bb.emit(relax.op.multiply(x, r))
            y = bb.emit_output(relax.op.multiply(w, normed))
        bb.emit_func_output(y)
    return bb.get()


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor(("b", 8), "float32"), w: R.Tensor((8,), "float32")) -> R.Tensor(("b", 8), "float32"):
        b = T.int64()
        with R.dataflow():
            y: R.Tensor((b, 8), "float32") = R.nn.rms_norm(x, w, axes=[-1], epsilon=EPS)
            R.output(y)
        return y


@pytest.mark.parametrize("form", ["reciprocal", "rsqrt", "divide", "x*x"])
def test_each_exported_form_becomes_one_rms_norm(form):
    fuse = FuseRMSNorm()
    out = fuse(_decomposed(form))
    assert fuse.count == 1
    tvm.ir.assert_structural_equal(out, Expected)


def test_other_forms_are_left_alone():
    """A mean over another axis, a cube, or a factor read elsewhere too is not an RMS norm here."""
    n = 8
    x = relax.Var("x", relax.TensorType([4, n], "float32"))
    w = relax.Var("w", relax.TensorType([n], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w]):
        with bb.dataflow():
            cube = bb.emit(relax.op.power(x, relax.const(3.0, "float32")))
            mean = bb.emit(relax.op.mean(cube, axis=[-1], keepdims=True))
            r = bb.emit(relax.op.rsqrt(bb.emit(relax.op.add(mean, relax.const(1e-5, "float32")))))
            y = bb.emit_output(relax.op.multiply(w, bb.emit(relax.op.multiply(x, r))))
        bb.emit_func_output(y)
    before = bb.get()
    fuse = FuseRMSNorm()
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.count == 0


def test_rms_norm_rows_match_numpy():
    """The row kernel (a width with a vector tail too, any row count); the views are VM reshapes."""
    for n in (576, 37):
        x = relax.Var("x", relax.TensorType([tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64"), n], "float32"))
        w = relax.Var("w", relax.TensorType([n], "float32"))
        bb = relax.BlockBuilder()
        with bb.function("main", [x, w]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.rms_norm(x, w, axes=[-1], epsilon=1e-5))
                y = bb.emit_output(relax.op.multiply(h, relax.const(2.0, "float32")))
            bb.emit_func_output(y)
        lib = tvm.compile(bb.get(), HOST, relax_pipeline=relax_pipeline(HOST))
        calls = re.findall(r"call\s+(\S+)", lib.mod["as_text"]())
        assert "rms_norm_rows" in calls and not [c for c in calls if c.startswith("reshape")], sorted(set(calls))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        rng = np.random.default_rng(n)
        w = rng.standard_normal(n).astype(np.float32)
        for rows in (1, 5, 64):
            x = (rng.standard_normal((1, rows, n)) * 3).astype(np.float32)
            ours = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
            x64 = x.astype(np.float64)
            ref = 2 * x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w
            assert np.abs(ours - ref).max() < 2e-6 * np.abs(ref).max()


def test_compiled_llama_norm_matches_ort(tmp_path):
    """An ONNX graph with the torch exporter's node sequence (Pow, ReduceMean, Add, Sqrt,
    Reciprocal, Mul, Mul) compiles to the row kernel and agrees with ONNX Runtime."""
    n = 64
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "w")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["total"]),
             helper.make_node("Sqrt", ["total"], ["root"]),
             helper.make_node("Reciprocal", ["root"], ["rstd"]),
             helper.make_node("Mul", ["x", "rstd"], ["normed"]),
             helper.make_node("Mul", ["w", "normed"], ["y"])]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "norm.onnx"
    onnx.save(model, path)
    out = fq_tvm.compile(path, "host", tmp_path / "fp32", scheme="fp32", quiet=True)
    x = (rng.standard_normal((2, 5, n)) * 4).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = fq_tvm.load(out).run({"x": x})["y"]
    assert np.abs(got - ref).max() < 2e-6 * np.abs(ref).max()
    counts = __import__("json").loads((out / "manifest.json").read_text())["kernels"]["counts"]
    assert counts.get("rms_norm_rows") == 1, counts
