"""The held-out guard (fq_tvm/numerics/guard.py): the calibration split, each candidate's held-out
error against a numpy computation from the held-out activations themselves, the choice, GPTQ never
worse than RTN on held-out rows, and the manifest entry."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import fq_tvm
from fq_tvm.numerics import (HessianStat, calibrate, candidates, effective_weight, get_scheme,
                             gptq, quantize_layer, rtn)
from fq_tvm.numerics.calibrate import _accumulate, held_out_samples
from fq_tvm.numerics.guard import FEW_ROWS_DAMP


def _heavy_inputs(rng, samples, tokens, K, df=2.0):
    """Full-rank Student-t inputs through a decaying mixing, 4 outlier channels x8: [samples, tokens, K]."""
    mix = np.random.default_rng(K).standard_normal((K, K)) * (np.arange(1, K + 1) ** -0.5)[None, :]
    x = rng.standard_t(df, (samples * tokens, K)) @ mix.T
    x[:, :: K // 4] *= 8.0
    return x.reshape(samples, tokens, K)


def _stat(X, batch=8):
    """HessianStat of X [samples, tokens, K] as calibrate() accumulates it, batch by batch."""
    stats = {}
    for start in range(0, len(X), batch):
        stop = min(start + batch, len(X))
        _accumulate(stats, "x", X[start:stop], None, held_out_samples(np.arange(start, stop), len(X)))
    return stats["x"]


def _split(X):
    """(fit rows, held-out rows): samples 4, 9, 14, ... are held out, whole."""
    held = np.arange(len(X)) % 5 == 4
    return X[~held].reshape(-1, X.shape[-1]), X[held].reshape(-1, X.shape[-1])


def _layer_case(seed, samples, K, N):
    """(W [N, K], HessianStat, fit rows, held-out rows) of a Gaussian layer on _heavy_inputs."""
    rng = np.random.default_rng(seed)
    X = _heavy_inputs(rng, samples, 4, K)
    W = rng.standard_normal((N, K)) / np.sqrt(K)
    return W, _stat(X), *_split(X)


def _out_err(X, W, W_hat):
    return float(np.linalg.norm(X @ (W - W_hat).T) ** 2 / np.linalg.norm(X @ W.T) ** 2)


def _dequant32(codes, scale, zero):
    """(q - zero) * scale in float32, as a kernel (and numerics.dequantize) computes it."""
    s, z = np.asarray(scale, np.float32), np.asarray(zero, np.float32)
    return ((codes.astype(np.float32) - z) * s).astype(np.float64)


def _reference_errors(W, X_fit, X_held, cfg):
    """The guard's search written out for gptq2 (damping 0.01 -> 0.1 -> 1 while the error falls,
    act order at the best damping, RTN), each candidate fitted on X_fit's Hessian and scored on the
    held-out activations. Returns {label: error} in the order tried."""
    H_fit = X_fit.T @ X_fit
    out = {}

    def err(damp=None, act_order=False):
        if damp is None:
            q, s, z = rtn(W, cfg)
            label = "rtn"
        else:
            q, s, z = gptq(W, H_fit, cfg, percdamp=damp, act_order=act_order)
            label = f"gptq{' act-order' if act_order else ''} damp {damp:g}"
        out[label] = _out_err(X_held, W, _dequant32(q, s, z))
        return out[label]

    assert len(X_fit) >= W.shape[1] / 2  # no auto damping: the ladder starts at 0.01
    best_d, best = 0.01, err(0.01)
    for d in (0.1, 1.0):
        e = err(d)
        if e >= best:
            break
        best_d, best = d, e
    err(best_d, act_order=True)
    err()
    return out


def test_calibration_split_keeps_samples_whole():
    """12 samples of 3 tokens in batches of 5: samples 4 and 9 are held out; a mask weights both parts.
    Products are float32 per batch (summed in float64): float32 tolerances."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 3, 6))
    mask = (rng.random((12, 3)) < 0.7).astype(np.int64)
    stats = {}
    for start in range(0, 12, 5):
        _accumulate(stats, "x", X[start:start + 5], mask[start:start + 5], held_out_samples(np.arange(start, min(start + 5, 12)), 12))
    stat = stats["x"]
    rows, w = X.reshape(-1, 6), mask.reshape(-1).astype(float)
    held = np.repeat(np.arange(12) % 5 == 4, 3)
    assert np.allclose(stat.xtx, (rows * w[:, None]).T @ rows, rtol=1e-5, atol=1e-5)
    assert np.allclose(stat.held_xtx, (rows[held] * w[held, None]).T @ rows[held], rtol=1e-5, atol=1e-5)
    assert stat.count == w.sum() and stat.held_count == w[held].sum()
    fit = ~held
    assert np.allclose(stat.fit_hessian(), 2 / w[fit].sum() * (rows[fit] * w[fit, None]).T @ rows[fit], rtol=1e-5, atol=1e-5)
    assert np.allclose(stat.held_hessian(), 2 / w[held].sum() * stat.held_xtx, rtol=1e-12)
    assert stat.has_holdout


def test_calibrate_splits_by_sample_and_by_row_when_few():
    """calibrate() on a Gemm: 2-D activations [batch, K]; with under 5 samples every 5th row."""
    w = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(2).standard_normal((11, 6)).astype(np.float32)
    stat = calibrate(model, {"x": x}, batch_size=3, progress=False)["x"]
    h = x[[4, 9]].astype(np.float64)
    assert stat.held_count == 2 and stat.count == 11
    assert np.allclose(stat.held_xtx, h.T @ h, rtol=1e-5, atol=1e-5)
    few = calibrate(model, {"x": x[:4]}, batch_size=8, progress=False)["x"]
    assert few.held_count == 0 and few.fit_count == 4 and not few.has_holdout  # row 4 would be the first held
    stats = {}
    _accumulate(stats, "x", np.ones((3, 4, 6)), None, held_out_samples(np.arange(3), 3))  # 3 samples: by row
    assert stats["x"].held_count == 2 and stats["x"].count == 12  # rows 4 and 9 of 12


def test_guard_choice_where_gptq_overfits_matches_numpy_reference():
    """Few rows (40 samples x 4 tokens for K = 192: 128 fit rows, under K), heavy tails: GPTQ at its
    own damping fits the fit rows far better than it does the held-out ones; the guard's held-out
    errors equal the numpy computation from the held-out activations, and it picks their minimum."""
    K = 192
    W, stat, X_fit, X_held = _layer_case(3, 40, K, 96)
    assert (stat.fit_count, stat.held_count) == (len(X_fit), len(X_held)) == (128, 32)
    cfg = get_scheme("gptq2")
    ref = _reference_errors(W, X_fit, X_held, cfg)
    record = quantize_layer("layer", W, stat, cfg)
    guard = record.guard
    print("held-out errors:", guard["held_out_err"], "chosen:", guard["chosen"])
    assert list(guard["held_out_err"]) == list(ref)
    for label, err in ref.items():
        assert guard["held_out_err"][label] == pytest.approx(err, rel=1e-5, abs=2e-6), label
    assert guard["chosen"] == min(ref, key=ref.get)
    # GPTQ at the scheme's damping overfits: its held-out error is well above its fit-row error,
    # and the guard does not choose it
    q, s, z = gptq(W, X_fit.T @ X_fit, cfg, percdamp=cfg.percdamp)
    fit_err = _out_err(X_fit, W, _dequant32(q, s, z))
    assert ref["gptq damp 0.01"] > 2 * fit_err
    assert guard["chosen"] != "gptq damp 0.01"
    assert ref[guard["chosen"]] < 0.9 * ref["gptq damp 0.01"]
    # the record is the chosen option refitted on all rows (numbers as the guard's own path)
    chosen = next(c for c in candidates(cfg, stat.fit_count, K) if c.label == guard["chosen"])
    assert guard["chosen"] != "rtn"
    assert guard["refit"] and guard["fit_rows"] == 128 and guard["held_rows"] == 32
    if chosen.solver == "gptq":
        q, s, z = gptq(W, stat.hessian(), cfg, percdamp=chosen.percdamp, act_order=chosen.act_order)
    else:
        q, s, z = rtn(W, cfg)
    assert np.array_equal(effective_weight(record), _dequant32(q, s, z))


@pytest.mark.parametrize("seed,df,samples", [(0, 2.0, 30), (1, 4.0, 60), (2, 30.0, 100), (3, 2.0, 200)])
def test_gptq_never_worse_than_rtn_on_held_out_rows(seed, df, samples):
    """Per layer, on held-out rows: gptq2 <= rtn2 and fq2 <= its own frame-domain RTN, by
    construction; without refit the stored record itself is the scored one."""
    rng = np.random.default_rng(seed)
    K, N = 128, 64
    X = _heavy_inputs(rng, samples, 4, K, df)
    W = rng.standard_normal((N, K)) / np.sqrt(K)
    W[rng.random(W.shape) < 0.01] *= 10.0
    stat = _stat(X)
    _, X_held = _split(X)
    rtn2 = _out_err(X_held, W, effective_weight(quantize_layer("l", W, None, "rtn2")))
    for name in ("gptq2", "fq2"):
        record = quantize_layer("l", W, stat, get_scheme(name, guard_refit=False))
        errs = record.guard["held_out_err"]
        assert errs[record.guard["chosen"]] == min(errs.values()) <= errs["rtn"]
        stored = _out_err(X_held, W, effective_weight(record))
        assert stored == pytest.approx(errs[record.guard["chosen"]], rel=1e-5, abs=2e-6)
        if name == "gptq2":
            assert errs["rtn"] == pytest.approx(rtn2, rel=1e-5, abs=2e-6)
            assert stored <= rtn2 + 2e-6
        refit = quantize_layer("l", W, stat, get_scheme(name))
        assert refit.guard["held_out_err"] == errs and refit.guard["chosen"] == record.guard["chosen"]


def test_guard_off_and_auto_damping():
    """guard=False quantizes on all rows at the scheme's damping, raised to FEW_ROWS_DAMP under K / 2
    rows; a Hessian without a held-out part (or a plain array) gets no guard."""
    rng = np.random.default_rng(5)
    K, N = 128, 32
    W = rng.standard_normal((N, K)) / np.sqrt(K)
    many, few = _stat(_heavy_inputs(rng, 40, 8, K)), _stat(_heavy_inputs(rng, 10, 4, K))  # 320 and 40 rows
    off = get_scheme("gptq2", guard=False)
    for stat, damp in ((many, 0.01), (few, FEW_ROWS_DAMP)):
        record = quantize_layer("l", W, stat, off)
        q, s, z = gptq(W, stat.hessian(), off, percdamp=damp)
        assert record.guard is None
        assert np.array_equal(effective_weight(record), _dequant32(q, s, z))
    assert quantize_layer("l", W, many.hessian(), "gptq2").guard is None
    no_split = HessianStat(many.xtx, many.count)
    assert quantize_layer("l", W, no_split, "gptq2").guard is None
    assert candidates(get_scheme("gptq2"), 40, K)[0].percdamp == FEW_ROWS_DAMP


def test_act_order_codes_in_column_order():
    """act_order permutes the processing order only: with an identity-like Hessian (no feedback to
    reorder) the codes equal those without it."""
    rng = np.random.default_rng(6)
    W = rng.standard_normal((16, 64))
    H = np.diag(rng.random(64) + 0.5)
    cfg = get_scheme("gptq2")
    a, b = gptq(W, H, cfg), gptq(W, H, cfg, act_order=True)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="per-row"):
        gptq(W, H, get_scheme("gptq2", group_size=16), act_order=True)


def test_framequant_tries_act_order_in_the_frame_domain():
    """fq2 (per-row grids on the frame coefficients C = T_N W T_K^T) tries GPTQ in act order too,
    the order of the frame-domain Hessian's diagonal; its held-out error equals GPTQ run by hand on
    the permuted columns (codes put back in column order) and scored on the held-out activations."""
    from fq_tvm.numerics.framequant import _Layer

    K = 96
    W, stat, X_fit, X_held = _layer_case(9, 60, K, 48)
    cfg = get_scheme("fq2", guard_refit=False)
    assert any(c.act_order for c in candidates(cfg, stat.fit_count, K))
    record = quantize_layer("l", W, stat, cfg)
    (label,) = [k for k in record.guard["held_out_err"] if "act-order" in k]
    damp = float(label.rsplit(" ", 1)[1])
    layer = _Layer("l", W, cfg, None, None)
    Hc = layer.hessian(X_fit.T @ X_fit)
    perm = np.argsort(-np.diag(Hc), kind="stable")
    assert not np.array_equal(perm, np.arange(len(perm)))
    q, s, z = gptq(layer.C[:, perm], Hc[np.ix_(perm, perm)], cfg, percdamp=damp)
    codes = np.empty_like(q)
    codes[:, perm] = q
    W_hat = effective_weight(layer.record(codes, s, z))
    assert record.guard["held_out_err"][label] == pytest.approx(_out_err(X_held, W, W_hat), rel=1e-5, abs=2e-6)
    # outlier channels survive the rotation on the diagonal: act order wins here (.016 against .021)
    assert record.guard["chosen"] == label
    assert np.array_equal(effective_weight(record), W_hat)


def test_manifest_records_the_choice(mlp_onnx, tmp_path):
    """gptq2 on the MLP (fc0: 64 x 32; 40 samples, 8 held out): the manifest's layer entry has the
    record's guard; rtn2 (no calibration) has none."""
    x = _heavy_inputs(np.random.default_rng(7), 40, 1, 32)[:, 0].astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    records = {}
    out = fq_tvm.compile(mlp_onnx, "host", tmp_path / "gptq2", scheme="gptq2", calib=tmp_path / "calib.npz",
                         quiet=True, records=records)
    (entry,) = json.loads((out / "manifest.json").read_text())["layers"]
    guard = entry["guard"]
    assert guard == records["fc0.weight"].guard
    assert guard["fit_rows"] == 32 and guard["held_rows"] == 8 and guard["refit"] is True
    assert guard["chosen"] == min(guard["held_out_err"], key=guard["held_out_err"].get)
    assert set(guard["held_out_err"]) <= {c.label for c in candidates(get_scheme("gptq2"), 32, 32)}
    assert {"gptq damp 0.01", "gptq damp 0.1", "rtn"} <= set(guard["held_out_err"])
    _, X_held = _split(x[:, None, :].astype(np.float64))
    w0 = _mlp_w0(mlp_onnx)
    rtn2 = _out_err(X_held, w0, effective_weight(quantize_layer("fc0", w0, None, "rtn2")))
    assert guard["held_out_err"]["rtn"] == pytest.approx(rtn2, rel=1e-5, abs=2e-6)
    rtn_out = fq_tvm.compile(mlp_onnx, "host", tmp_path / "rtn2", scheme="rtn2", quiet=True)
    assert "guard" not in json.loads((rtn_out / "manifest.json").read_text())["layers"][0]


def _mlp_w0(mlp_onnx):
    import onnx

    init = next(t for t in onnx.load(str(mlp_onnx)).graph.initializer if t.name == "fc0.weight")
    return numpy_helper.to_array(init).astype(np.float64)


def test_record_state_keeps_the_guard():
    from fq_tvm.numerics import from_state, to_state

    rng = np.random.default_rng(8)
    W = rng.standard_normal((32, 64))
    record = quantize_layer("l", W, _stat(_heavy_inputs(rng, 20, 4, 64)), "fq2")
    arrays, meta = to_state(record)
    assert json.loads(json.dumps(meta))["guard"] == record.guard
    assert from_state(arrays, meta).guard == record.guard
