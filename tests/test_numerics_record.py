import json

import numpy as np
import pytest

from fq_tvm.numerics.bits import (
    bits_per_weight,
    layer_bits,
    model_bits_per_weight,
    nominal_bits_per_weight,
)
from fq_tvm.numerics.framequant import quantize_layer
from fq_tvm.numerics.quantize import get_scheme
from fq_tvm.numerics.record import (
    QuantizedLinear,
    apply,
    codes,
    dequantize,
    effective_weight,
    from_state,
    to_state,
)


def _layer(N, K, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((4 * K, K))
    return rng.standard_normal((N, K)), X.T @ X


@pytest.fixture(scope="module")
def records():
    out = {}
    for scheme, (N, K) in {"rtn2": (12, 40), "gptq2": (12, 40), "int8": (12, 40), "fq2": (40, 100),
                           "had2": (33, 64), "fq4": (16, 48)}.items():
        W, H = _layer(N, K)
        out[scheme] = quantize_layer(f"layer.{scheme}", W, H, scheme)
    out["fq2-g32"] = quantize_layer("g", *_layer(20, 96), get_scheme("fq2", group_size=32))
    out["rtn3"] = quantize_layer("r3", *_layer(6, 10), get_scheme("rtn2", bits=3))
    return out


def test_shapes_and_transforms(records):
    fq = records["fq2"]
    assert (fq.rows, fq.cols) == (64, 144)  # N 40 -> 64; K 100 -> 128 -> 8 blocks of 16 -> 18
    assert fq.input_hadamard.to_meta()["dp"] == 128 and fq.input_frame.k == 9
    assert fq.packed.shape == (64, 36) and fq.scale.shape == (64, 1) and fq.scale.dtype == np.float32
    assert records["had2"].input_frame is None and records["had2"].output_hadamard.dp == 64
    assert records["rtn2"].input_hadamard is None and records["rtn2"].output_hadamard is None
    assert records["fq2-g32"].scale.shape == (32, 4)  # K_f = 96 * 9/8 = 108 columns, groups of 32
    assert records["rtn3"].packed.shape == (6, 5)
    i8 = records["int8"]
    assert np.all(i8.zero == 128) and codes(i8).dtype == np.uint8


@pytest.mark.parametrize("scheme", ["rtn2", "gptq2", "int8", "fq2", "had2", "fq4", "fq2-g32", "rtn3"])
def test_apply_equals_effective_weight(records, scheme):
    rec = records[scheme]
    x = np.random.default_rng(1).standard_normal((3, 5, rec.in_features))
    y = apply(rec, x)
    assert y.shape == (3, 5, rec.out_features)
    assert np.allclose(y, x @ effective_weight(rec).T, rtol=1e-10, atol=1e-10)


def test_effective_weight_by_definition(records):
    rec = records["fq2"]
    Tk = rec.input_transform().matrix()
    Tn = rec.output_transform().matrix()
    assert np.allclose(effective_weight(rec), Tn.T @ dequantize(rec).astype(np.float64) @ Tk, atol=1e-10)
    assert dequantize(rec).dtype == np.float32 and dequantize(rec).shape == (rec.rows, rec.cols)


def test_high_bits_reconstruct():
    W, H = _layer(24, 64, seed=3)
    for scheme in ("int8", "fq4"):
        rec = quantize_layer("x", W, H, scheme)
        rel = np.linalg.norm(effective_weight(rec) - W) / np.linalg.norm(W)
        assert rel < (0.01 if scheme == "int8" else 0.2), (scheme, rel)


@pytest.mark.parametrize("scheme", ["rtn2", "fq2", "had2", "fq2-g32", "int8"])
def test_state_round_trip_through_npz_and_json(records, scheme, tmp_path):
    rec = records[scheme]
    arrays, meta = to_state(rec, prefix="l0.")
    np.savez(tmp_path / "w.npz", **arrays)
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with np.load(tmp_path / "w.npz") as data:
        back = from_state({k: data[k] for k in data.files}, json.loads((tmp_path / "m.json").read_text()), prefix="l0.")
    for key in ("packed", "scale", "zero"):
        assert np.array_equal(getattr(back, key), getattr(rec, key))
        assert getattr(back, key).dtype == getattr(rec, key).dtype
    assert (back.name, back.bits, back.group_size, back.scheme) == (rec.name, rec.bits, rec.group_size, rec.scheme)
    assert back.input_hadamard == rec.input_hadamard and back.input_frame == rec.input_frame
    assert back.output_hadamard == rec.output_hadamard
    assert np.array_equal(effective_weight(back), effective_weight(rec))


def test_record_validation(records):
    rec = records["fq2"]
    arrays, meta = to_state(rec)
    with pytest.raises(ValueError, match="packed has shape"):
        from_state({**arrays, "packed": arrays["packed"][:, :-1]}, meta)
    with pytest.raises(ValueError, match="must be uint8"):
        from_state({**arrays, "packed": arrays["packed"].astype(np.int32)}, meta)
    with pytest.raises(ValueError, match="not a fq-quantized-linear"):
        from_state(arrays, {**meta, "version": 99})
    with pytest.raises(ValueError, match="chain"):
        from_state(arrays, {**meta, "in_features": 99})


def test_bits_accounting_by_hand():
    rec = QuantizedLinear.from_codes("a", 3, 10, 2, np.zeros((3, 10), np.uint8), np.ones((3, 1)), np.zeros((3, 1)))
    # codes 3 rows x 3 bytes = 72 bits; scale and zero 3 x 32 bits each
    assert layer_bits(rec) == 72 + 96 + 96
    assert bits_per_weight(rec) == 264 / 30
    assert layer_bits(rec, scale_bits=16, zero_bits=2) == 72 + 48 + 6


def test_bits_accounting_framequant():
    W, H = _layer(32, 64)
    rec = quantize_layer("f", W, H, "fq2")
    # K_f = 4 blocks * 18 = 72 -> 18 bytes per row; 32 rows; per-row fp32 scale and zero
    assert (rec.rows, rec.cols, rec.packed.shape) == (32, 72, (32, 18))
    assert layer_bits(rec) == 32 * 18 * 8 + 32 * 32 * 2 == 6656
    assert bits_per_weight(rec) == 6656 / 2048 == 3.25
    other = QuantizedLinear.from_codes("b", 4, 8, 4, np.zeros((4, 8), np.uint8), np.ones((4, 2)), np.ones((4, 2)),
                                       group_size=4)
    assert layer_bits(other) == 4 * 4 * 8 + 2 * 8 * 32 == 640
    assert model_bits_per_weight([rec, other]) == (6656 + 640) / (2048 + 32)
    assert nominal_bits_per_weight(2, 1.1, 4096) == pytest.approx(2.2 + 18 / 4096)


def test_simulation_refuses_records_the_model_does_not_hold(mlp_onnx):
    """A record whose weight is not an initializer (the raw export, where compile quantized the
    weights frontend.prepare folded) is an error, not a silently unquantized layer."""
    import onnx

    from fq_tvm import FqError
    from fq_tvm.quantize import simulated_model

    W, H = _layer(16, 32)
    record = quantize_layer("fc0.weight", W, H, get_scheme("rtn2"))
    with pytest.raises(FqError, match="1 quantized weights are not initializers of this model .*'folded.weight'"):
        simulated_model(onnx.load(str(mlp_onnx)), {"fc0.weight": record, "folded.weight": record})
