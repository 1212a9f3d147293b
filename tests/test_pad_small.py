"""Odd layer sizes: a layer that padding would make store over 1.5x the scheme's nominal bits per
weight stays fp32, listed with the reason (progress lines, summary, manifest), unless --pad-small
(pad_small=True) quantizes it anyway, with a warning.

fq2 on the issue's 100 -> 37 -> 100 MLP: fc0 (37x100) is stored as 64x144 codes (outputs padded
to 64 for the output Hadamard, inputs 100 -> 128 -> 144 by the frame), fc1 (100x37) as 128x72:
6.09 and 7.20 bits per weight against fq2's 2.2 + 64 / K for a K-input layer without padding.
"""

import json

import numpy as np
import onnx
import pytest

import fq_tvm
from fq_tvm import models
from fq_tvm.cli import compile_main
from fq_tvm.errors import FqWarning
from fq_tvm.numerics import apply, bits_per_weight, quantize_layer
from fq_tvm.quantize import nominal_bits, plan_layers, scheme_config, stored_bits_per_weight

FC0_REASON = ("padded to 64x144 it would store 6.09 bits per weight, over 1.5x fq2's nominal 2.84 "
              "(--pad-small quantizes it)")
FC1_REASON = ("padded to 128x72 it would store 7.20 bits per weight, over 1.5x fq2's nominal 3.93 "
              "(--pad-small quantizes it)")
FC0_WARNING = "fc0 [37, 100]: padded to 64x144 it stores 6.09 bits per weight, over 1.5x fq2's nominal 2.84 (--pad-small)"
FC1_WARNING = "fc1 [100, 37]: padded to 128x72 it stores 7.20 bits per weight, over 1.5x fq2's nominal 3.93 (--pad-small)"


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """(model, calibration file) for the 100 -> 37 -> 100 MLP."""
    work = tmp_path_factory.mktemp("odd")
    calib = work / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 100)).astype(np.float32))
    return models.mlp_gemm(work / "odd.onnx", (100, 37, 100)), calib


@pytest.mark.parametrize("scheme", ["int8", "rtn2", "gptq2", "had2", "fq2", "fq4"])
@pytest.mark.parametrize("n,k", [(37, 100), (100, 37), (64, 64), (384, 1000), (48, 64)])
def test_predicted_bits_are_the_records(scheme, n, k):
    """The planner's bits, from shapes alone, are what the quantized record stores."""
    cfg = scheme_config(scheme)
    w = np.random.default_rng(n * k).standard_normal((n, k))
    record = quantize_layer("w", w, np.eye(k), cfg)
    rows, cols, bits = stored_bits_per_weight(cfg, n, k)
    assert (rows, cols) == (record.rows, record.cols)
    assert bits == pytest.approx(bits_per_weight(record), abs=1e-12)


def test_nominal_bits():
    assert nominal_bits(scheme_config("fq2"), 100) == pytest.approx(2.2 + 64 / 100)
    assert nominal_bits(scheme_config("rtn2"), 32) == pytest.approx(4.0)  # scales are not padding
    assert nominal_bits(scheme_config("int8"), 64) == pytest.approx(9.0)


def test_plan_keeps_padded_layers_fp32(odd):
    proto = onnx.load(str(odd[0]))
    plan = plan_layers(proto, cfg=scheme_config("fq2"))
    assert plan.chosen == [] and plan.padded == []
    assert [(layer.node, reason) for layer, reason in plan.skipped] == [("fc0", FC0_REASON), ("fc1", FC1_REASON)]


def test_plan_pad_small_quantizes_with_warnings(odd):
    proto = onnx.load(str(odd[0]))
    plan = plan_layers(proto, cfg=scheme_config("fq2"), pad_small=True)
    assert [layer.node for layer in plan.chosen] == ["fc0", "fc1"] and plan.skipped == []
    assert [text for _, text in plan.padded] == [FC0_WARNING, FC1_WARNING]


def test_plan_other_schemes_and_no_scheme(odd):
    """rtn2 pads nothing (100x37 stores 2.69 against 2.64 without its scales' padding); without a
    scheme the planner does not check (benchmarks' callers)."""
    proto = onnx.load(str(odd[0]))
    assert [layer.node for layer in plan_layers(proto, cfg=scheme_config("rtn2")).chosen] == ["fc0", "fc1"]
    assert [layer.node for layer in plan_layers(proto).chosen] == ["fc0", "fc1"]


def test_cli_default_keeps_them_fp32_and_lists_why(odd, tmp_path, capsys):
    model, calib = odd
    out = tmp_path / "fq2"
    assert compile_main([str(model), "--scheme", "fq2", "--calib", str(calib), "-o", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    kept = [line.strip() for line in captured.err.splitlines() if "kept fp32:" in line]
    assert kept == [f"kept fp32: fc0 [37, 100]: {FC0_REASON}", f"kept fp32: fc1 [100, 37]: {FC1_REASON}"]
    assert "warning" not in captured.err and "calibrating" not in captured.err  # nothing left to calibrate
    info = json.loads(captured.out)
    assert info["layers_quantized"] == 0 and info["layers_kept_fp32"] == 2
    assert info["kept_fp32"] == [{"name": "fc0", "shape": [37, 100], "reason": FC0_REASON},
                                 {"name": "fc1", "shape": [100, 37], "reason": FC1_REASON}]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"] == []
    assert [(e["weight"], e["reason"]) for e in manifest["skipped"]] == [("fc0.weight", FC0_REASON),
                                                                         ("fc1.weight", FC1_REASON)]


def test_api_pad_small_quantizes_them(odd, tmp_path):
    """Quantized with a warning each, stored at the predicted bits, and computing what the records
    compute (float activations, so the check is exact)."""
    model, calib = odd
    records = {}
    with pytest.warns(FqWarning) as warned:
        out = fq_tvm.compile(model, "host", tmp_path / "fq2", scheme="fq2", calib=calib, pad_small=True, quiet=True,
                             act_bits=32, records=records)
    assert [str(w.message) for w in warned] == [FC0_WARNING, FC1_WARNING]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == []
    assert [(e["name"], e["stored_shape"], e["bits_per_weight"]) for e in manifest["layers"]] == [
        ("fc0", [64, 144], 6.0886), ("fc1", [128, 72], 7.1957)]
    assert manifest["weights"]["quantized_dense_bits_per_weight"] == 6.6422
    x = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    h = np.maximum(apply(records["fc0.weight"], x) + inits["fc0.bias"], 0)
    ref = apply(records["fc1.weight"], h) + inits["fc1.bias"]
    ours = fq_tvm.load(out).run({"x": x})["y"]
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
