"""The import front end on small hand-made graphs (issue 10 items 2-5, issue 11 calibration and
invalid-model items): weights in any form, a ViT-style Conv + Resize graph, --input-shape, import
errors that name the node, calibration data checked against the model. Numbers are checked
against ONNX Runtime (fp32) and the float simulation of the same codes (fq2, act_bits 32).
"""

import json
import time
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fq_tvm
from fq_tvm.cli import compile_main
from fq_tvm.frontend import prepare
from fq_tvm.quantize import simulated_model
from conftest import max_rel_err, ort_run

K = 64


def _model(nodes, inits, path, inputs=None, outputs=None, opset=17):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", K])]
    graph = helper.make_graph(nodes, "m", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _w(shape, seed=0, name="W", dtype=np.float32):
    arr = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])
    return numpy_helper.from_array(arr.astype(dtype), name)


def _calib(tmp_path, n=32, k=K, **extra):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.random.default_rng(5).standard_normal((n, k)).astype(np.float32), **extra)
    return path


def _x(rows=3, k=K):
    return np.random.default_rng(rows).standard_normal((rows, k)).astype(np.float32)


def _ort_plain(path, feed):
    """ORT without graph optimizations: its QDQ fusions would quantize the activations too."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _fp32_matches(path, tmp_path, feed=None):
    feed = feed or {"x": _x()}
    art = fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True)
    ours = list(fq_tvm.load(art).run(feed).values())[0]
    assert max_rel_err(ours, _ort_plain(path, feed)[0]) < 1e-4


def _fq2(path, tmp_path, **options):
    records = {}
    art = fq_tvm.compile(path, "host", tmp_path / "fq2", scheme="fq2", calib=_calib(tmp_path), quiet=True,
                         records=records, act_bits=32, **options)
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(path))), records), str(sim))
    x = _x()
    ours = list(fq_tvm.load(art).run({"x": x}).values())[0]
    assert max_rel_err(ours, ort_run(sim, {"x": x})[0]) < 1e-4
    return json.loads((art / "manifest.json").read_text()), records


# ---- weights in any form -------------------------------------------------------------------------

def test_constant_node_weight(tmp_path):
    const = helper.make_node("Constant", [], ["W"], value=_w((K, K)), name="w_const")
    path = _model([const, helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [], tmp_path / "c.onnx")
    _fp32_matches(path, tmp_path)
    manifest, records = _fq2(path, tmp_path)
    assert [e["name"] for e in manifest["layers"]] == ["fc"] and len(records) == 1


def test_qdq_weight_is_requantized(tmp_path):
    q = numpy_helper.from_array(np.random.default_rng(1).integers(-127, 128, (K, K)).astype(np.int8), "Wq")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], name="dq"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    path = _model(nodes, [q, scale], tmp_path / "qdq.onnx")
    _fp32_matches(path, tmp_path)
    manifest, _ = _fq2(path, tmp_path)
    assert [e["name"] for e in manifest["layers"]] == ["fc"]


def test_constant_subgraph_weight_is_folded(tmp_path):
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0], name="t"),
             helper.make_node("Mul", ["W", "two"], ["W2"], name="scale"),
             helper.make_node("MatMul", ["x", "W2"], ["y"], name="fc")]
    inits = [_w((K, K), name="Wt"), numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    path = _model(nodes, inits, tmp_path / "sub.onnx")
    manifest, _ = _fq2(path, tmp_path)
    assert [e["name"] for e in manifest["layers"]] == ["fc"]


def test_shared_weight_is_one_layer(tmp_path):
    """An unrolled recurrence: one matrix read by 6 MatMuls is quantized once, counted once."""
    nodes, cur = [], "x"
    for i in range(6):
        nodes += [helper.make_node("MatMul", [cur, "W"], [f"h{i}"], name=f"step{i}"),
                  helper.make_node("Tanh", [f"h{i}"], [f"t{i}"], name=f"tanh{i}")]
        cur = f"t{i}"
    out = [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["n", K])]
    path = _model(nodes, [_w((K, K))], tmp_path / "rnn.onnx", outputs=out)
    manifest, records = _fq2(path, tmp_path)
    assert len(manifest["layers"]) == 1 and list(records) == ["W"]
    assert 0 < manifest["weights"]["bytes"] < 4 * K * K


def test_gemm_transa_and_constant_on_the_left(tmp_path):
    """Gemm(transA=1) and MatMul(W, x) are rewritten into the planner's form: both quantized."""
    nodes = [helper.make_node("Gemm", ["xt", "W"], ["g"], transA=1, name="gemm_ta"),
             helper.make_node("MatMul", ["W2", "g"], ["y"], name="left")]
    inp = [helper.make_tensor_value_info("xt", TensorProto.FLOAT, [K, 40])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, K])]
    path = _model(nodes, [_w((K, K)), _w((K, 40), name="W2")], tmp_path / "odd.onnx", inputs=inp, outputs=out)
    feed = {"xt": np.random.default_rng(0).standard_normal((K, 40)).astype(np.float32)}
    _fp32_matches(path, tmp_path, feed)
    np.savez(tmp_path / "c.npz", xt=np.random.default_rng(1).standard_normal((K, 40)).astype(np.float32))
    records = {}
    art = fq_tvm.compile(path, "host", tmp_path / "q", scheme="fq2", calib=tmp_path / "c.npz", quiet=True,
                         records=records, act_bits=32)
    assert sorted(e["name"] for e in json.loads((art / "manifest.json").read_text())["layers"]) == ["gemm_ta", "left"]
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(path))), records), str(sim))
    assert max_rel_err(fq_tvm.load(art).run(feed)["y"], ort_run(sim, feed)[0]) < 1e-4


def test_batched_constant_weight_is_listed(tmp_path):
    path = _model([helper.make_node("MatMul", ["x3", "W3"], ["y"], name="batched")], [_w((2, K, K), name="W3")],
                  tmp_path / "b.onnx", inputs=[helper.make_tensor_value_info("x3", TensorProto.FLOAT, [2, 5, K])],
                  outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, K])])
    art = fq_tvm.compile(path, "host", tmp_path / "a", scheme="rtn2", quiet=True)
    (entry,) = json.loads((art / "manifest.json").read_text())["skipped"]
    assert entry["name"] == "batched" and "rank 3" in entry["reason"]


def test_gemm_alpha_beta(tmp_path):
    gemm = helper.make_node("Gemm", ["x", "W", "b"], ["y"], alpha=0.5, beta=2.0, transB=1, name="fc")
    b = numpy_helper.from_array(np.linspace(-1, 1, K).astype(np.float32), "b")
    path = _model([gemm], [_w((K, K)), b], tmp_path / "gemm.onnx")
    _fp32_matches(path, tmp_path)
    _fq2(path, tmp_path)


def test_fp16_model_computes_fp32(tmp_path):
    """fp16 weights and I/O: the artifact keeps fp16 inputs and outputs and computes in fp32."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"])]
    inp = [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", K])]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", K])]
    path = _model(nodes, [_w((K, K), dtype=np.float16)], tmp_path / "h.onnx", inputs=inp, outputs=out)
    x = _x().astype(np.float16)
    art = fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True)
    ours = fq_tvm.load(art).run({"x": x})["y"]
    assert ours.dtype == np.float16 and max_rel_err(ours, _ort_plain(path, {"x": x})[0].astype(np.float32)) < 2e-3
    records = {}
    art = fq_tvm.compile(path, "host", tmp_path / "fq2", scheme="fq2", calib=_calib(tmp_path), quiet=True,
                         records=records, act_bits=32)
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(path))), records), str(sim))
    ours = fq_tvm.load(art).run({"x": x})["y"].astype(np.float32)
    assert len(records) == 1 and max_rel_err(ours, ort_run(sim, {"x": x})[0].astype(np.float32)) < 2e-3


def test_external_data_model(tmp_path):
    path = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_w((K, K))], tmp_path / "e.onnx")
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, location="e.onnx.data", size_threshold=0)
    assert (tmp_path / "e.onnx.data").is_file()
    _fp32_matches(path, tmp_path)


# ---- ViT-style graph, --input-shape --------------------------------------------------------------

def _vit(path, dynamic):
    torch = pytest.importorskip("torch")

    class Vit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.patch = torch.nn.Conv2d(3, 64, 4, 4)
            self.pos = torch.nn.Parameter(torch.randn(1, 64, 4, 4))
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, pixel_values):
            x = self.patch(pixel_values)
            pos = torch.nn.functional.interpolate(self.pos, size=x.shape[-2:], mode="bicubic")  # Resize
            return self.fc((x + pos).flatten(2).transpose(1, 2))

    axes = {"pixel_values": {0: "batch"}, "out": {0: "batch"}} if dynamic else None
    torch.onnx.export(Vit().eval(), (torch.randn(2, 3, 32, 32),), str(path), dynamo=False, opset_version=14,
                      input_names=["pixel_values"], output_names=["out"], dynamic_axes=axes)
    return path


def test_vit_conv_resize_dynamic_batch(tmp_path):
    path = _vit(tmp_path / "vit.onnx", dynamic=True)
    model = fq_tvm.load(fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True))
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        assert max_rel_err(model.run({"pixel_values": x})["out"], ort_run(path, {"pixel_values": x})[0]) < 1e-4


@pytest.mark.parametrize("pin", ["pixel_values=1,3,32,32", "batch=1"])
def test_input_shape_option(tmp_path, capsys, pin):
    path = _vit(tmp_path / "vit.onnx", dynamic=True)
    out = tmp_path / "pinned"
    assert compile_main([str(path), "-o", str(out), "-q", "--input-shape", pin]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 3, 32, 32]
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    ours = fq_tvm.load(out).run({"pixel_values": x})["out"]
    assert max_rel_err(ours, ort_run(path, {"pixel_values": x})[0]) < 1e-4


@pytest.mark.parametrize("pin,message", [
    ("nope=1", "no input or symbolic dim of that name"),
    ("pixel_values=1,3,32", "3 dims given, the input has rank 4"),
    ("pixel_values=1,4,32,32", "dim 3 is fixed in the model, not 4"),
    ("batch=x", "dims must be positive integers"),
])
def test_input_shape_errors(tmp_path, capsys, pin, message):
    path = _vit(tmp_path / "vit.onnx", dynamic=True)
    assert compile_main([str(path), "-o", str(tmp_path / "o"), "-q", "--input-shape", pin]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


# ---- import errors: one line, naming the node, before calibration -------------------------------

def _unimportable(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
             helper.make_node("Reshape", ["h", "s"], ["y"], name="bad_reshape")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K]),
              helper.make_tensor_value_info("s", TensorProto.INT64, ["r"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    outputs[0].type.tensor_type.shape.SetInParent()  # unknown rank is not allowed; a shape of no dims
    return _model(nodes, [_w((K, K))], tmp_path / "bad.onnx", inputs=inputs, outputs=outputs)


def test_fq_debug_shows_tvm_detail(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("FQ_DEBUG", "1")
    assert compile_main([str(_unimportable(tmp_path)), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fq-compile: error: cannot import")


def test_import_failure_names_node_fast_and_quiet(tmp_path, capfd):
    """Reshape to a shape read from a run-time input of unknown length cannot be imported; the
    error names the node, comes before calibration (the calibration file lacks inputs on
    purpose), and nothing else reaches stdout / stderr."""
    path = _unimportable(tmp_path)
    np.savez(tmp_path / "c.npz", wrong=np.ones(3))
    start = time.time()
    code = compile_main([str(path), "-o", str(tmp_path / "o"), "-q", "--scheme", "fq2", "--calib",
                         str(tmp_path / "c.npz")])
    assert code == 1 and time.time() - start < 10
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert "ONNX node 'bad_reshape' (Reshape)" in err and "BlockBuilder" not in err


def test_unknown_domain_op_is_one_line_and_leaves_no_files(tmp_path, capsys, monkeypatch):
    """ORT's symbolic shape inference saves sym_shape_infer_temp.onnx into the working directory
    when it cannot infer every shape (here: an op of another domain); ours runs in a temp dir."""
    nodes = [helper.make_node("FusedMatMul", ["x", "W"], ["y"], name="fused", domain="com.microsoft")]
    path = _model(nodes, [_w((K, K))], tmp_path / "ms.onnx")
    model = onnx.load(str(path))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert compile_main([str(path), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "unsupported ONNX op 'FusedMatMul' (domain 'com.microsoft') at node 'fused'" in err and err.count("\n") == 1
    assert not list((tmp_path / "cwd").iterdir())


# ---- calibration data and invalid models ---------------------------------------------------------

def _linear(tmp_path, batch="n"):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, K])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, K])]
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [_w((K, K))], tmp_path / "l.onnx",
                  inputs=inputs, outputs=outputs)


def _calib_fails(tmp_path, capsys, x, message, batch="n", *extra):
    np.savez(tmp_path / "c.npz", x=x)
    code = compile_main([str(_linear(tmp_path, batch)), "-o", str(tmp_path / "bad_out"), "-q", "--scheme", "gptq2",
                         "--calib", str(tmp_path / "c.npz"), *extra])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("x,message", [
    (np.ones((4, 8, K), np.float32), "calibration input 'x': rank 3 [4, 8, 64], the model expects rank 2 [n, 64]"),
    (np.ones((4, 32), np.float32), "calibration input 'x': shape [4, 32], the model expects [n, 64]"),
    (np.ones((4, K), np.complex64), "calibration input 'x': dtype complex64, the model expects float32"),
    (np.where(np.arange(4)[:, None] == 2, np.nan, np.ones((4, K))).astype(np.float32),
     "calibration input 'x': sample 2 contains NaN"),
    (np.where(np.arange(4)[:, None] == 1, np.inf, np.ones((4, K))).astype(np.float32),
     "calibration input 'x': sample 1 contains Inf"),
])
def test_bad_calibration_data(tmp_path, capsys, x, message):
    _calib_fails(tmp_path, capsys, x, message)


def test_calibration_static_batch_float64_and_sample_count(tmp_path, capsys):
    """A model with its batch fixed at 4 calibrates in batches of 4; float64 is cast with a note;
    --calib-samples 9 uses 8 samples (whole batches)."""
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((10, K)))
    out = tmp_path / "o"
    assert compile_main([str(_linear(tmp_path, 4)), "-o", str(out), "--scheme", "gptq2", "--calib",
                         str(tmp_path / "c.npz"), "--calib-samples", "9"]) == 0
    err = capsys.readouterr().err
    assert "cast float64 to the model's float32" in err and "using 8 of 9 samples" in err
    _calib_fails(tmp_path, capsys, np.ones((3, K), np.float32), "has 3 samples; the model's batch dim is fixed at 4", 4)


def _invalid(tmp_path, capsys, model, message):
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert compile_main([str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("opset", [1, 999])
def test_unsupported_opset(tmp_path, capsys, opset):
    model = onnx.load(str(_linear(tmp_path)))
    model.opset_import[0].version = opset
    _invalid(tmp_path, capsys, model, f"ONNX opset {opset} is not supported")


def test_no_outputs_zero_dim_and_shape_inference_failure(tmp_path, capsys):
    model = onnx.load(str(_linear(tmp_path)))
    del model.graph.output[:]
    _invalid(tmp_path, capsys, model, "the graph has no outputs")
    model = onnx.load(str(_linear(tmp_path)))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    _invalid(tmp_path, capsys, model, "input 'x' has a dim of size 0")
    model = onnx.load(str(_linear(tmp_path)))
    del model.graph.input[0].type.tensor_type.shape.dim[0]  # x becomes rank 1: MatMul shapes clash
    model.graph.initializer[0].CopyFrom(_w((K + 1, K)))
    _invalid(tmp_path, capsys, model, "fails the ONNX checker")


def test_gemm_alpha_nan_refused(tmp_path, capsys):
    gemm = helper.make_node("Gemm", ["x", "W"], ["y"], alpha=float("nan"), name="fc")
    model = onnx.load(str(_model([gemm], [_w((K, K))], tmp_path / "g.onnx")))
    _invalid(tmp_path, capsys, model, "node 'fc' (Gemm) has alpha = nan")


def test_qdq_source_weights_are_dropped(tmp_path):
    q = numpy_helper.from_array(np.ones((K, K), np.int8), "Wq")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s"], ["W"], name="dq"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")]
    path = _model(nodes, [q, numpy_helper.from_array(np.array(0.5, np.float32), "s")], tmp_path / "q.onnx")
    assert [t.name for t in prepare(onnx.load(str(path))).graph.initializer] == ["W"]


def _token_model(tmp_path):
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="fc"),
             helper.make_node("Unsqueeze", ["attention_mask", "axis"], ["m"], name="unsq"),
             helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["h", "mf"], ["y"], name="masked")]
    inits = [_w((40, K), name="E"), _w((K, K)), numpy_helper.from_array(np.array([2], np.int64), "axis")]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", K])]
    return _model(nodes, inits, tmp_path / "tok.onnx", inputs=inputs, outputs=out)


def _word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the a cat dog sat on mat and ran far away quick brown fox jumps over lazy".split()
    tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_calibration_from_text(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\n\nthe quick brown fox jumps over the lazy dog\n\na dog ran far away\n")
    out = tmp_path / "o"
    assert compile_main([str(_token_model(tmp_path)), "-o", str(out), "-q", "--scheme", "gptq2", "--calib-text",
                         str(text), "--tokenizer", str(_word_tokenizer(tmp_path))]) == 0
    assert [e["name"] for e in json.loads((out / "manifest.json").read_text())["layers"]] == ["fc"]
    assert compile_main([str(_linear(tmp_path)), "-o", str(tmp_path / "o2"), "-q", "--scheme", "gptq2",
                         "--calib-text", str(text), "--tokenizer", str(tmp_path)]) == 1
    assert "--calib-text builds only input_ids" in capsys.readouterr().err


def _crnn(path):
    torch = pytest.importorskip("torch")

    class Crnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv1d(16, 64, 3, padding=1)
            self.lstm = torch.nn.LSTM(64, 64, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(128, 40)

        def forward(self, x):
            return self.fc(self.lstm(torch.relu(self.conv(x)).transpose(1, 2))[0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Crnn().eval(), (torch.randn(2, 16, 12),), str(path), dynamo=False, opset_version=14,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 2: "time"}, "y": {0: "batch", 1: "time"}})
    return path


def test_lstm_unrolled_when_time_is_pinned(tmp_path, capsys):
    """A bidirectional LSTM (no TVM converter) is unrolled once its length is static: fp32 matches
    ORT; fq2 quantizes W and R of each direction once (R is shared by the 6 steps) and the head."""
    path = _crnn(tmp_path / "crnn.onnx")
    assert compile_main([str(path), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "pin it with --input-shape" in capsys.readouterr().err
    x = np.random.default_rng(0).standard_normal((3, 16, 6)).astype(np.float32)
    art = fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True, input_shapes=["time=6"])
    assert max_rel_err(fq_tvm.load(art).run({"x": x})["y"], _ort_plain(path, {"x": x})[0]) < 1e-4
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).standard_normal((16, 16, 6)).astype(np.float32))
    records = {}
    art = fq_tvm.compile(path, "host", tmp_path / "fq2", scheme="fq2", calib=tmp_path / "c.npz", quiet=True,
                         records=records, act_bits=32, input_shapes=["time=6"], pad_small=True)  # head: 40 rows
    assert len(records) == 5
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(path)), {"time": [6]}), records), str(sim))
    assert max_rel_err(fq_tvm.load(art).run({"x": x})["y"], ort_run(sim, {"x": x})[0]) < 1e-4
