"""Recurrent ONNX ops (issue 10): LSTM, GRU and RNN have no TVM converter; fq_tvm/rnn.py unrolls
them once the sequence length is static. The unrolled graph is checked against ONNX Runtime's own
LSTM / GRU / RNN (onnx's reference evaluator for layout 1, which ORT lacks; it ignores `activations`); a torch CRNN
(Conv + bidirectional GRU, static width, dynamic batch) compiles on the first try as fp32 (ORT
within 1e-4 relative) and fq2 (the float simulation of its codes)."""

import contextlib
import io
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

SEQ, IN, HID, BATCH = 5, 6, 4, 3


def _reference(model, feed):
    if any(a.name == "layout" and a.i for a in model.graph.node[0].attribute):
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, feed)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _cell(kind, direction="forward", layout=0, initial=True, opset=14, seq_lens=False, dynamic=False, **attrs):
    """One LSTM / GRU / RNN node with random weights and all outputs; returns (model, feed)."""
    rng = np.random.default_rng(len(kind) + layout + 2 * initial)
    gates, dirs = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind], 2 if direction == "bidirectional" else 1
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             [("W", (dirs, gates * HID, IN)), ("R", (dirs, gates * HID, HID)), ("B", (dirs, 2 * gates * HID))]]
    seq = "time" if dynamic else SEQ
    x_dims = ["n", seq, IN] if layout else [seq, "n", IN]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)]
    feed = {"x": rng.standard_normal([{"n": BATCH, "time": SEQ}.get(d, d) for d in x_dims]).astype(np.float32)}
    names = ["x", "W", "R", "B", "lens" if seq_lens else ""]
    if seq_lens:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, ["n"]))
    states = ["h0", "c0"][:2 if kind == "LSTM" else 1] if initial else []
    for name in states:
        dims = ["n", dirs, HID] if layout else [dirs, "n", HID]
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        feed[name] = rng.standard_normal([BATCH if d == "n" else d for d in dims]).astype(np.float32)
    outs = ["y", "y_h", "y_c"][:3 if kind == "LSTM" else 2]
    node = helper.make_node(kind, names + states, outs, name="cell", hidden_size=HID, direction=direction,
                            **({"layout": 1} if layout else {}), **attrs)
    dims = [["n", seq, dirs, HID], ["n", dirs, HID]] if layout else [[seq, dirs, "n", HID], [dirs, "n", HID]]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, dims[min(i, 1)]) for i, o in enumerate(outs)]
    graph = helper.make_graph([node], "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feed


@pytest.mark.parametrize("kind,options", [
    ("GRU", {"linear_before_reset": 1}),  # torch's export
    ("GRU", {"linear_before_reset": 0}),
    ("GRU", {"linear_before_reset": 1, "initial": False, "direction": "bidirectional"}),
    ("GRU", {"linear_before_reset": 0, "initial": False, "direction": "reverse", "opset": 11}),
    ("GRU", {"layout": 1, "direction": "bidirectional"}),
    ("RNN", {"direction": "bidirectional"}),
    ("RNN", {"activations": ["Relu"], "initial": False}),
    ("LSTM", {"direction": "bidirectional"}),  # with initial_h and initial_c
    ("LSTM", {"layout": 1}),
    ("LSTM", {"activations": ["Sigmoid", "Relu", "Tanh"], "initial": False}),
])
def test_unrolled_cell_matches_reference(kind, options):
    model, feed = _cell(kind, **options)
    ref = _reference(model, feed)
    unrolled = prepare(onnx.ModelProto.FromString(model.SerializeToString()))
    assert kind not in {n.op_type for n in unrolled.graph.node}
    import onnxruntime as ort

    ours = ort.InferenceSession(unrolled.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and max_rel_err(a, b) < 1e-5


@pytest.mark.parametrize("options,message", [
    ({"dynamic": True}, "unsupported ONNX op 'GRU' at node 'cell' (its sequence length must be static to unroll it: "
                        "pin it with --input-shape time=N)"),
    ({"seq_lens": True}, "unsupported ONNX op 'GRU' at node 'cell' (not supported by the unroller: sequence_lens)"),
    ({"clip": 3.0}, "(not supported by the unroller: clip)"),
    ({"activations": ["HardSigmoid", "Tanh"]}, "activations other than Sigmoid / Tanh / Relu"),
])
def test_unsupported_cell_is_one_line(tmp_path, capsys, options, message):
    model, _ = _cell("GRU", **options)
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert compile_main([str(tmp_path / "g.onnx"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def _crnn(path):
    """A third-party-style text recognizer: Conv2d features over a fixed-size image, columns as
    the sequence (static width 6), a bidirectional GRU, a per-column classifier; dynamic batch."""
    torch = pytest.importorskip("torch")

    class Crnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 16, 4, stride=4)  # [b, 1, 16, 24] -> [b, 16, 4, 6]
            self.gru = torch.nn.GRU(64, 64, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(128, 64)

        def forward(self, image):
            f = torch.relu(self.conv(image))
            seq = f.flatten(1, 2).transpose(1, 2)  # [b, 6, 64]
            return self.fc(self.gru(seq)[0])

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Crnn().eval(), (torch.randn(2, 1, 16, 24),), str(path), dynamo=False, opset_version=14,
                          input_names=["image"], output_names=["y"],
                          dynamic_axes={"image": {0: "batch"}, "y": {0: "batch"}})
    return path


@pytest.mark.slow
def test_gru_crnn_first_try(tmp_path):
    path = _crnn(tmp_path / "crnn.onnx")
    assert "GRU" in {n.op_type for n in onnx.load(str(path)).graph.node}
    art = fq_tvm.load(fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True))
    for batch in (1, 3):
        x = {"image": np.random.default_rng(batch).standard_normal((batch, 1, 16, 24)).astype(np.float32)}
        assert max_rel_err(art.run(x)["y"], ort_run(path, x)[0]) < 1e-4
    np.savez(tmp_path / "c.npz", image=np.random.default_rng(9).standard_normal((16, 1, 16, 24)).astype(np.float32))
    records = {}
    art = fq_tvm.compile(path, "host", tmp_path / "fq2", scheme="fq2", calib=tmp_path / "c.npz", quiet=True,
                         records=records, act_bits=32)
    assert len(records) == 5, sorted(records)  # W and R (shared by the 6 steps) per direction, the head
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(path))), records), str(sim))
    x = {"image": np.random.default_rng(2).standard_normal((2, 1, 16, 24)).astype(np.float32)}
    assert max_rel_err(fq_tvm.load(art).run(x)["y"], ort_run(sim, x)[0]) < 1e-4


def test_dynamic_length_from_an_expression_lists_the_dims(tmp_path, capsys):
    """The GRU reads x twice along time (length 2*time): pinning is by the inputs' dims."""
    model, _ = _cell("GRU", dynamic=True, initial=False)
    g = model.graph
    g.node[0].input[0] = "xx"
    g.node.insert(0, helper.make_node("Concat", ["x", "x"], ["xx"], axis=0, name="twice"))
    g.output[0].type.tensor_type.shape.dim[0].dim_param = "time2"
    onnx.save(model, str(tmp_path / "g.onnx"))
    assert compile_main([str(tmp_path / "g.onnx"), "-o", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "pin it with --input-shape (the inputs' symbolic dims: n, time)" in err and err.count("\n") == 1, err
