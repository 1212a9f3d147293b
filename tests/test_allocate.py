"""Per-group option choice under a bit budget (numerics/allocate.py, quantize.quantize_allocated,
`--bits`)."""

import itertools

import numpy as np
import pytest

from fq_tvm.errors import FqError
from fq_tvm.numerics import get_scheme, layer_bits
from fq_tvm.numerics.allocate import allocate, allocation_options


def _exhaustive(groups, budget):
    """The least total error within the budget, over every combination."""
    names = list(groups)
    best = None
    for combo in itertools.product(*(groups[g].items() for g in names)):
        bits, err = sum(c[1][0] for c in combo), sum(c[1][1] for c in combo)
        if bits <= budget and (best is None or err < best[0]):
            best = (err, {g: c[0] for g, c in zip(names, combo)})
    return best


def test_greedy_takes_the_best_rate_first():
    groups = {"a": {"lo": (10, 1.0), "hi": (12, 0.5)},  # 0.25 per bit
              "b": {"lo": (10, 1.0), "hi": (12, 0.9)},  # 0.05 per bit
              "c": {"lo": (20, 2.0), "mid": (22, 1.0), "top": (30, 0.9)}}  # 0.5 per bit, then 0.0125
    assert allocate(groups, 40) == {"a": "lo", "b": "lo", "c": "lo"}
    assert allocate(groups, 42) == {"a": "lo", "b": "lo", "c": "mid"}
    assert allocate(groups, 44) == {"a": "hi", "b": "lo", "c": "mid"}
    assert allocate(groups, 1e9) == {"a": "hi", "b": "hi", "c": "top"}
    for budget in range(40, 56):
        choice = allocate(groups, budget)
        bits = sum(groups[g][o][0] for g, o in choice.items())
        err = sum(groups[g][o][1] for g, o in choice.items())
        assert bits <= budget
        assert err <= _exhaustive(groups, budget)[0] + 0.1  # greedy: near the optimum here


def test_useless_options_are_never_taken_and_a_short_budget_is_an_error():
    groups = {"a": {"lo": (8, 1.0), "worse": (9, 1.5), "same": (10, 1.0)}}
    assert allocate(groups, 100) == {"a": "lo"}
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(groups, 7)


def test_options_of_fq2():
    opts = allocation_options(get_scheme("fq2"))
    assert list(opts) == ["fq2 r=1.1", "fq2 r=1", "fq2 r=1.25", "fq2 r=1.5", "4-bit r=1"]
    assert opts["4-bit r=1"].bits == 4 and opts["fq2 r=1.5"].redundancy == 1.5
    assert list(allocation_options(get_scheme("fq2r1"))) == ["fq2r1 r=1", "fq2r1 r=1.25", "fq2r1 r=1.5", "4-bit r=1"]
    with pytest.raises(ValueError, match="needs a FrameQuant scheme"):
        allocation_options(get_scheme("gptq2"))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    import onnx

    from fq_tvm import models

    tmp = tmp_path_factory.mktemp("alloc")
    path = models.mlp_gemm(tmp / "mlp.onnx", sizes=(64, 128, 64, 48))
    x = np.random.default_rng(4).standard_t(3, (60, 64)).astype(np.float32)
    x[:, ::7] *= 6
    np.savez(tmp / "calib.npz", x=x)
    return onnx.load(str(path)), path, tmp / "calib.npz"


@pytest.mark.parametrize("bits", [3.2, 3.6, 8.0])
def test_quantize_allocated_fits_the_budget(mlp, bits):
    from fq_tvm.quantize import calibrate_layers, plan_layers, quantize_allocated, quantize_layers

    proto, _, calib = mlp
    plan = plan_layers(proto)
    cfg = get_scheme("fq2")
    hess = calibrate_layers(proto, plan.chosen, calib, progress=False)
    configs, report = quantize_allocated(proto, plan, cfg, hess, bits, progress=False)
    records = quantize_layers(proto, plan, cfg, hess, progress=False, configs=configs)
    weights = sum(layer.out_features * layer.in_features for layer in plan.chosen)
    used = sum(layer_bits(r) for r in records.values()) / weights
    assert used <= bits and report["bits_per_weight"] == pytest.approx(used, abs=1e-4)
    for layer in plan.chosen:
        rec, want = records[layer.weight], configs[layer.weight]
        assert rec.bits == want.bits and (rec.input_frame.r if rec.input_frame else 1.0) == pytest.approx(
            want.redundancy if want.redundancy > 1.0 else 1.0)
    if bits == 8.0:  # room for everything: each group takes its least-error option
        options = allocation_options(cfg)
        for layer in plan.chosen:
            errs = {}
            for label, ocfg in options.items():
                g = quantize_layers(proto, plan, ocfg, hess, progress=False)[layer.weight].guard
                errs[label] = g["held_out_err"][g["chosen"]]
            assert configs[layer.weight] == options[min(errs, key=errs.get)]


def test_bits_errors_are_one_line(mlp):
    from fq_tvm.quantize import calibrate_layers, plan_layers, quantize_allocated

    proto, path, calib = mlp
    plan = plan_layers(proto)
    hess = calibrate_layers(proto, plan.chosen, calib, progress=False)
    with pytest.raises(FqError, match=r"--bits 2 is below the fewest bits these layers can take: 2.9\d\d per weight"):
        quantize_allocated(proto, plan, get_scheme("fq2"), hess, 2.0, progress=False)
    from fq_tvm.compiler import check_bits

    with pytest.raises(FqError, match="scheme gptq2 is not FrameQuant"):
        check_bits(get_scheme("gptq2"), 2.5)
    with pytest.raises(FqError, match="between 0 and 32"):
        check_bits(get_scheme("fq2"), -1)


@pytest.mark.build
def test_compiled_mixed_options_match_the_simulation(mlp, tmp_path):
    """--bits gives layers different frames and code widths; the artifact runs what the records say."""
    import json

    import onnx

    import fq_tvm
    from fq_tvm.quantize import simulated_model
    from conftest import max_rel_err, ort_run

    _, path, calib = mlp
    records = {}
    out = fq_tvm.compile(path, "host", tmp_path / "alloc", scheme="fq2", calib=calib, quiet=True, records=records,
                         bits=3.6, act_bits=32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["allocation"]["bits_per_weight"] <= 3.6
    assert len({(r.bits, r.cols) for r in records.values()}) > 1  # really mixed
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(onnx.load(str(path)), records), str(sim))
    x = np.random.default_rng(5).standard_normal((7, 64)).astype(np.float32)
    ours = fq_tvm.load(out).run({"x": x})["y"]
    assert max_rel_err(ours, ort_run(sim, {"x": x})[0]) < 1e-4
