"""Sequential calibration (numerics/sequential.py, quantize.quantize_sequential): each activation's
Hessian from the model with the layers before it already quantized. Checked against a numpy
forward pass of the same small graph, and against the plain calibration of the partly quantized
model built layer by layer."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from fq_tvm.numerics import calibrate, get_scheme, quantize_layer, seed_for, weight_matrix
from fq_tvm.numerics.calibrate import HOLDOUT_EVERY
from fq_tvm.numerics.sequential import segments, sequential_calibrate

RNG = np.random.default_rng(0)
W = {"w1": RNG.standard_normal((24, 32)), "w2": RNG.standard_normal((32, 32)) / 6,
     "w3": RNG.standard_normal((32, 16)) / 6, "w4": RNG.standard_normal((32, 16)) / 6,
     "w5": RNG.standard_normal((16, 8))}
B1 = RNG.standard_normal(32)


def _graph_model(seq=5):
    """x [B, T, 24], mask [B, T] (T = seq: 5, or a name for a dynamic axis) -> h1 = relu(x W1 + b1); h2 = tanh(h1 W2 + h1); m = (h2 W3) * (h2 W4)
    * mask; y = m W5. Four calibrated activations (x, h1, h2, m); W3 and W4 share h2; mask is live
    across every cut."""
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in W.items()]
    inits += [numpy_helper.from_array(B1.astype(np.float32), "b1"),
              numpy_helper.from_array(np.array([-1], np.int64), "axis")]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a1"], name="l1"),
        helper.make_node("Add", ["a1", "b1"], ["a2"]),
        helper.make_node("Relu", ["a2"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["c"], name="l2"),
        helper.make_node("Add", ["c", "h1"], ["c2"]),
        helper.make_node("Tanh", ["c2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["q"], name="l3"),
        helper.make_node("MatMul", ["h2", "w4"], ["k"], name="l4"),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Unsqueeze", ["mask", "axis"], ["mask3"]),
        helper.make_node("Mul", ["qk", "mask3"], ["m"]),
        helper.make_node("MatMul", ["m", "w5"], ["y"], name="l5"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", seq, 24]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", seq])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", seq, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _samples(n=12):
    rng = np.random.default_rng(1)
    return {"x": rng.standard_t(4, (n, 5, 24)).astype(np.float32),
            "mask": (rng.random((n, 5)) > 0.3).astype(np.float32)}


def _rounded(w):
    """The stand-in quantizer: W rounded to quarters (float32, like an initializer)."""
    return (np.round(np.asarray(w, np.float64) * 4) / 4).astype(np.float32)


def _numpy_acts(samples, quantized: bool):
    """{activation: array} from a float64 numpy forward pass, every weight rounded when quantized
    (each layer's input then comes from rounded weights before it)."""
    q = {k: (_rounded(v) if quantized else np.float32(v)).astype(np.float64) for k, v in W.items()}
    x, mask = samples["x"].astype(np.float64), samples["mask"].astype(np.float64)
    h1 = np.maximum(x @ q["w1"] + np.float32(B1), 0)
    h2 = np.tanh(h1 @ q["w2"] + h1)
    m = (h2 @ q["w3"]) * (h2 @ q["w4"]) * mask[..., None]
    return {"x": x, "h1": h1, "h2": h2, "m": m}


def _numpy_stats(samples, quantized: bool):
    """{activation: (xtx, count, held_xtx, held_count)} from _numpy_acts."""
    mask = samples["mask"].astype(np.float64)
    held = (np.arange(len(mask)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)[:, None] * np.ones_like(mask)
    out = {}
    for name, act in _numpy_acts(samples, quantized).items():
        rows, wts, hrow = act.reshape(-1, act.shape[-1]), mask.reshape(-1), held.reshape(-1).astype(bool)
        out[name] = ((rows * wts[:, None]).T @ rows, wts.sum(), (rows[hrow] * wts[hrow, None]).T @ rows[hrow],
                     wts[hrow].sum())
    return out


def _check(stats, ref):
    assert set(stats) == set(ref)
    for name, (xtx, count, held_xtx, held_count) in ref.items():
        s = stats[name]
        assert s.count == pytest.approx(count) and s.held_count == pytest.approx(held_count)
        scale = np.abs(xtx).max()
        np.testing.assert_allclose(s.xtx, xtx, atol=1e-5 * scale, err_msg=name)
        np.testing.assert_allclose(s.held_xtx, held_xtx, atol=1e-5 * scale, err_msg=name)


def test_segments_cut_after_each_producer():
    model = _graph_model()
    assert segments(model, ["h2", "x", "m", "h1"]) == [(0, 0, ["x"]), (0, 3, ["h1"]), (3, 6, ["h2"]),
                                                       (6, 11, ["m"])]


@pytest.mark.parametrize("memory_bytes", [1 << 30, 0])  # 0: every batch's live tensors on disk
def test_hessians_of_the_quantized_prefix_match_numpy(memory_bytes):
    calls = []

    def quantize(name, stat):
        calls.append(name)
        weights = {"x": ["w1"], "h1": ["w2"], "h2": ["w3", "w4"], "m": ["w5"]}[name]
        return {w: _rounded(W[w]) for w in weights}

    samples = _samples()
    stats = sequential_calibrate(_graph_model(), samples, ["x", "h1", "h2", "m"], quantize, batch_size=4,
                                 mask_input="mask", progress=False, memory_bytes=memory_bytes)
    assert calls == ["x", "h1", "h2", "m"]  # graph order
    _check(stats, _numpy_stats(samples, quantized=True))
    unquantized = _numpy_stats(samples, quantized=False)
    assert not np.allclose(stats["h2"].xtx, unquantized["h2"][0], rtol=1e-3)  # the rounding mattered
    seen = {}
    dropped = sequential_calibrate(_graph_model(), samples, ["x", "h1", "h2", "m"],
                                   lambda name, stat: seen.setdefault(name, stat) and quantize(name, stat),
                                   batch_size=4, mask_input="mask", progress=False, keep_stats=False)
    assert dropped == {}  # nothing kept: memory holds only the statistics still being summed
    _check(seen, _numpy_stats(samples, quantized=True))


def test_right_padding_is_cut_from_length_sorted_batches():
    """A right-padded mask over a dynamic sequence axis: samples ordered by length, each batch cut
    to its longest, the same held-out samples (by index) batched apart, and the same sums as numpy's over the
    whole padded arrays; a fixed axis or a mask with holes keeps the plain batches."""
    from fq_tvm.numerics.calibrate import batches, calibrate

    samples = _samples()
    lengths = np.array([5, 1, 3, 0, 2, 5, 4, 1, 3, 2, 4, 3])
    samples["mask"] = (np.arange(5) < lengths[:, None]).astype(np.float32)
    model = _graph_model(seq="T")
    plan = batches(model, samples, ["x", "mask"], "mask", 4)
    assert plan.cut == {"x", "mask"}
    # fit samples by length, then the held-out ones (4 and 9: index % 5 == 4) in batches of their own
    assert [list(b) for b in plan] == [[3, 1, 7, 2], [8, 11, 6, 10], [0, 5], [4, 9]]
    assert plan.arrays(samples, ["x", "mask"], plan[0])["x"].shape == (4, 3, 24)
    assert plan.arrays(samples, ["x", "mask"], plan[2])["mask"].shape == (2, 5)

    def quantize(name, stat):
        weights = {"x": ["w1"], "h1": ["w2"], "h2": ["w3", "w4"], "m": ["w5"]}[name]
        return {w: _rounded(W[w]) for w in weights}

    stats = sequential_calibrate(model, samples, ["x", "h1", "h2", "m"], quantize, batch_size=4,
                                 mask_input="mask", progress=False)
    _check(stats, _numpy_stats(samples, quantized=True))
    _check(calibrate(model, samples, ["x", "h1", "h2", "m"], batch_size=4, mask_input="mask", progress=False),
           _numpy_stats(samples, quantized=False))
    assert batches(_graph_model(), samples, ["x", "mask"], "mask", 4).cut == set()  # fixed axis
    holes = dict(samples, mask=samples["mask"][:, ::-1].copy())  # left padding
    assert [list(b) for b in batches(model, holes, ["x", "mask"], "mask", 4)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                                   [8, 9, 10, 11]]


@pytest.mark.parametrize("seq", [5, "T"])
def test_fp_target_sums_fp32_times_quantized_inputs(seq):
    """fp_target: the fp32 model runs alongside; cross = sum of (x_fp32 - x) x^T (mask-weighted).
    Also with a dynamic sequence axis and right padding (seq "T": length-sorted batches, the
    held-out samples in batches of their own)."""
    def quantize(name, stat):
        weights = {"x": ["w1"], "h1": ["w2"], "h2": ["w3", "w4"], "m": ["w5"]}[name]
        return {w: _rounded(W[w]) for w in weights}

    from fq_tvm.numerics import find_dense_layers
    from fq_tvm.numerics.sequential import residual_inputs

    model = _graph_model(seq=seq)
    residuals = residual_inputs(model, find_dense_layers(model))
    assert residuals == {"h1": "h1"}  # l2's output c is added to h1; l3/l4 share h2, l1 and l5 add nothing
    samples = _samples()
    if seq == "T":
        lengths = np.array([5, 1, 3, 0, 2, 5, 4, 1, 3, 2, 4, 3])
        samples["mask"] = (np.arange(5) < lengths[:, None]).astype(np.float32)
    stats = sequential_calibrate(model, samples, ["x", "h1", "h2", "m"], quantize, batch_size=4,
                                 mask_input="mask", progress=False, memory_bytes=0, fp_target=True,
                                 residuals=residuals)
    _check(stats, _numpy_stats(samples, quantized=True))  # the Hessians are unchanged
    fp, qd = _numpy_acts(samples, False), _numpy_acts(samples, True)
    wts = samples["mask"].reshape(-1, 1).astype(np.float64)

    def rows(a):
        return a.reshape(-1, a.shape[-1])

    for name in fp:
        ref = (rows(fp[name] - qd[name]) * wts).T @ rows(qd[name])
        np.testing.assert_allclose(stats[name].cross, ref, atol=1e-4 * np.abs(ref).max(), err_msg=name)
    ref = (rows(fp["h1"] - qd["h1"]) * wts).T @ rows(qd["h1"])
    np.testing.assert_allclose(stats["h1"].resid, ref, atol=1e-4 * np.abs(ref).max())
    assert stats["h2"].resid is None


def _side_threads_alive():
    import threading

    return [t for t in threading.enumerate() if t.name == "fq-fp32-side"]


def test_fp_target_errors_reach_the_caller_and_stop_the_side(monkeypatch):
    """The fp32 side runs on its own thread: an error in the caller's quantize, and one on the side
    (its target sums), both come out of sequential_calibrate, and no side thread is left behind."""
    from fq_tvm.numerics import sequential

    kw = dict(batch_size=4, mask_input="mask", progress=False, memory_bytes=0, fp_target=True)

    def fails_at_h1(name, stat):
        if name == "h1":
            raise ValueError("quantize failed")
        return {}

    with pytest.raises(ValueError, match="quantize failed"):
        sequential_calibrate(_graph_model(), _samples(), ["x", "h1", "h2", "m"], fails_at_h1, **kw)
    assert not _side_threads_alive()

    def broken_sums(stat, *args, **kwargs):
        raise RuntimeError("side failed")

    monkeypatch.setattr(sequential, "_accumulate_target", broken_sums)
    with pytest.raises(RuntimeError, match="side failed"):
        sequential_calibrate(_graph_model(), _samples(24), ["x", "h1", "h2", "m"], lambda n, s: {}, **kw)
    assert not _side_threads_alive()


def test_projected_target_is_weight_times_cross_plus_resid():
    """projections: the summed target (W (x_fp32 - x) + r_fp32 - r) x^T equals W cross + resid of the
    plain sums, and fp_target_weight gives the same weight from either."""
    from fq_tvm.numerics import find_dense_layers
    from fq_tvm.numerics.sequential import fp_target_weight, residual_inputs

    def quantize(name, stat):
        weights = {"x": ["w1"], "h1": ["w2"], "h2": ["w3", "w4"], "m": ["w5"]}[name]
        return {w: _rounded(W[w]) for w in weights}

    model = _graph_model()
    kw = dict(batch_size=4, mask_input="mask", progress=False, fp_target=True,
              residuals=residual_inputs(model, find_dense_layers(model)))
    names = ["x", "h1", "h2", "m"]
    plain = sequential_calibrate(model, _samples(), names, quantize, **kw)
    proj = {"h1": W["w2"].astype(np.float32), "m": W["w5"].astype(np.float32)}  # MatMul initializers: W^T [K, N]
    projected = sequential_calibrate(model, _samples(), names, quantize, projections=proj, **kw)
    for name, wt in proj.items():
        w, ref = wt.T.astype(np.float64), plain[name]
        want = w @ ref.cross + (ref.resid if ref.resid is not None else 0)
        got = projected[name]
        assert got.cross is None and got.resid is None
        np.testing.assert_allclose(got.target, want, atol=1e-5 * np.abs(want).max(), err_msg=name)
        np.testing.assert_allclose(fp_target_weight(w, got, 0.01), fp_target_weight(w, ref, 0.01), rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    assert projected["h2"].target is None and projected["h2"].cross is not None
    assert plain["h1"].resid is not None  # the residual went into h1's target


def test_a_target_sum_does_not_pool():
    """HessianStat.target is one layer's W E + D: pooling it over activations is refused in one line."""
    from fq_tvm.numerics.calibrate import HessianStat

    a = HessianStat(np.eye(3), 4.0, target=np.ones((2, 3)))
    with pytest.raises(ValueError, match="a target sum belongs to one activation's one layer"):
        HessianStat.pooled([a, HessianStat(np.eye(3), 4.0)])


def test_projections_take_the_layers_where_they_are_cheaper(tmp_path, monkeypatch):
    """quantize._projections: only a layer alone on its activation with 2 N < K (256 -> 64 here;
    64 -> 256 and 64 -> 40 cost more through the weight). quantize_sequential's records match those
    summed the plain way up to float32 rounding."""
    from fq_tvm import models, quantize as fq_quantize
    from fq_tvm.numerics import effective_weight
    from fq_tvm.quantize import _projections, plan_layers, quantize_sequential

    proto = onnx.load(str(models.mlp_gemm(tmp_path / "mlp.onnx", sizes=(64, 256, 64, 40))))
    plan = plan_layers(proto)
    acts = {layer.weight: {layer.activation} for layer in plan.chosen}
    got = _projections(proto, plan, acts, {})
    (layer,) = [layer for layer in plan.chosen if (layer.out_features, layer.in_features) == (64, 256)]
    assert list(got) == [layer.activation]
    np.testing.assert_array_equal(got[layer.activation], weight_matrix(proto, layer).T)
    x = np.random.default_rng(4).standard_t(3, (60, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    cfg = get_scheme("fq2")
    assert cfg.sequential and cfg.fp_target
    fast = quantize_sequential(proto, plan, cfg, tmp_path / "calib.npz", progress=False)
    monkeypatch.setattr(fq_quantize, "_projections", lambda *a: {})
    slow = quantize_sequential(proto, plan, cfg, tmp_path / "calib.npz", progress=False)
    for name in slow:
        a, b = effective_weight(fast[name]), effective_weight(slow[name])
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), name


def test_fp_target_weight_is_the_least_squares_fit():
    from fq_tvm.numerics import HessianStat
    from fq_tvm.numerics.sequential import fp_target_weight

    rng = np.random.default_rng(4)
    x_fp = rng.standard_normal((300, 12))
    x_q = x_fp + 0.2 * rng.standard_normal((300, 12))
    w = rng.standard_normal((5, 12))
    stat = HessianStat(x_q.T @ x_q, 300.0, cross=(x_fp - x_q).T @ x_q)
    ref = np.linalg.lstsq(x_q, x_fp @ w.T, rcond=None)[0].T  # argmin ||x_fp W^T - x_q V^T||
    np.testing.assert_allclose(fp_target_weight(w, stat, percdamp=0.0), ref, rtol=1e-8, atol=1e-10)
    same = HessianStat(x_fp.T @ x_fp, 300.0, cross=np.zeros((12, 12)))
    np.testing.assert_allclose(fp_target_weight(w, same), w, atol=1e-12)  # no upstream error: W itself
    r_fp = rng.standard_normal((300, 5))
    r_q = r_fp + 0.1 * rng.standard_normal((300, 5))
    stat.resid = (r_fp - r_q).T @ x_q
    ref = np.linalg.lstsq(x_q, x_fp @ w.T + r_fp - r_q, rcond=None)[0].T  # argmin ||x_fp W^T + r_fp - x_q V^T - r_q||
    np.testing.assert_allclose(fp_target_weight(w, stat, percdamp=0.0), ref, rtol=1e-8, atol=1e-10)


def test_fp_target_damp_is_the_config_field(tmp_path):
    """QuantConfig.fp_target_damp reaches fp_target_weight: the record equals quantizing the damped
    target by hand; a negative value is refused."""
    from fq_tvm import models
    from fq_tvm.numerics import HessianStat
    from fq_tvm.numerics.sequential import fp_target_weight
    from fq_tvm.quantize import _quantize_one, plan_layers

    proto = onnx.load(str(models.mlp_gemm(tmp_path / "mlp.onnx", sizes=(64, 48, 40))))
    plan = plan_layers(proto)
    layer = plan.chosen[0]
    rng = np.random.default_rng(5)
    x_q = rng.standard_normal((200, 64))
    x_fp = x_q + 0.3 * rng.standard_normal((200, 64))
    stat = HessianStat(x_q.T @ x_q, 200.0, (x_q[::5].T @ x_q[::5]), 40.0, cross=(x_fp - x_q).T @ x_q)
    w = weight_matrix(proto, layer)
    for damp in (0.01, 0.3):
        cfg = get_scheme("fq2", fp_target_damp=damp)
        rec = _quantize_one(proto, plan, layer, cfg, stat)
        ref = quantize_layer(plan.names[layer.node], fp_target_weight(w, stat, percdamp=damp), stat, cfg,
                             input_seed=seed_for(layer.activation + ":in", cfg.seed),
                             output_seed=seed_for(layer.weight + ":out", cfg.seed))
        np.testing.assert_array_equal(rec.packed, ref.packed)
        np.testing.assert_allclose(rec.scale, ref.scale, rtol=1e-7)
    low = _quantize_one(proto, plan, layer, get_scheme("fq2", fp_target_damp=0.01), stat)
    assert np.any(low.packed != rec.packed) or not np.allclose(low.scale, rec.scale)  # the damping matters
    with pytest.raises(ValueError, match="fp_target_damp must be >= 0"):
        get_scheme("fq2", fp_target_damp=-0.1)


def test_fp_target_damping_falls_with_the_rows():
    """fp_target_rows: the damping is fp_target_damp up to that many calibration rows, then falls as
    1 / rows; fp_target_weight is the ridge solve at that damping."""
    from fq_tvm.numerics import HessianStat
    from fq_tvm.numerics.sequential import fp_target_damping, fp_target_weight

    assert fp_target_damping(1.0, None, 1e6) == 1.0
    assert fp_target_damping(1.0, 32768.0, 32768.0) == 1.0  # up to the threshold: exactly fp_target_damp
    assert fp_target_damping(1.0, 32768.0, 4096.0) == 1.0  # few rows: never above fp_target_damp
    assert fp_target_damping(1.0, 32768.0, 131072.0) == 0.25
    assert fp_target_damping(0.5, 768.0, 3072.0) == 0.125
    cfg = get_scheme("fq2")  # the default: unchanged at SmolLM2's 64 x 512 tokens and MiniLM's 256 passages
    assert fp_target_damping(cfg.fp_target_damp, cfg.fp_target_rows, 64 * 512) == 1.0
    assert fp_target_damping(cfg.fp_target_damp, cfg.fp_target_rows, 25704.0) == 1.0
    assert fp_target_damping(cfg.fp_target_damp, cfg.fp_target_rows, 102336.0) == 32768.0 / 102336.0  # 1024 passages
    rng = np.random.default_rng(6)
    x_q = rng.standard_normal((3072, 12))
    x_fp = x_q + 0.3 * rng.standard_normal((3072, 12))
    w = rng.standard_normal((5, 12))
    stat = HessianStat(x_q.T @ x_q, 3072.0, cross=(x_fp - x_q).T @ x_q)
    A = x_q.T @ x_q
    d = 0.25 * np.mean(np.diag(A))  # 3072 rows, 4x the threshold of 768
    ref = np.linalg.solve(A + d * np.eye(12), x_q.T @ x_fp @ w.T + d * w.T).T  # argmin ||x_fp W^T - x_q V^T||^2 + d ||V - W||^2
    np.testing.assert_allclose(fp_target_weight(w, stat, 1.0, max_rows=768.0), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fp_target_weight(w, stat, 1.0, max_rows=768.0), fp_target_weight(w, stat, 0.25),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="fp_target_rows must be a positive number"):
        get_scheme("fq2", fp_target_rows=0.0)


def test_without_replacements_it_is_plain_calibration():
    samples = _samples(7)
    model = _graph_model()
    seq = sequential_calibrate(model, samples, ["x", "h1", "h2", "m"], lambda name, stat: {}, batch_size=3,
                               mask_input="mask", progress=False)
    plain = calibrate(model, samples, ["x", "h1", "h2", "m"], batch_size=3, mask_input="mask", progress=False)
    _check(seq, {k: (s.xtx, s.count, s.held_xtx, s.held_count) for k, s in plain.items()})
    _check(seq, _numpy_stats(samples, quantized=False))


def test_errors_are_value_errors():
    model = _graph_model()
    with pytest.raises(ValueError, match="samples lack model inputs: mask"):
        sequential_calibrate(model, {"x": _samples()["x"]}, ["x"], lambda n, s: {}, progress=False)
    with pytest.raises(ValueError, match="tensor 'nope' is produced by no node"):
        sequential_calibrate(model, _samples(), ["nope"], lambda n, s: {}, progress=False)


def test_quantize_sequential_equals_layer_by_layer_reference(tmp_path):
    """quantize_sequential vs the slow definition: for each layer in graph order, calibrate the
    simulated model whose earlier layers are quantized, then quantize the layer."""
    from fq_tvm import models
    from fq_tvm.quantize import plan_layers, quantize_sequential, simulated_model

    path = models.mlp_gemm(tmp_path / "mlp.onnx", sizes=(64, 48, 64, 40))
    proto = onnx.load(str(path))
    rng = np.random.default_rng(2)
    x = rng.standard_t(3, (40, 64)).astype(np.float32)
    x[:, ::9] *= 5
    np.savez(tmp_path / "calib.npz", x=x)
    plan = plan_layers(proto)
    assert len(plan.chosen) == 3
    cfg = get_scheme("fq2", sequential=True, fp_target=False)  # the fp32 target has its own tests
    records = quantize_sequential(proto, plan, cfg, tmp_path / "calib.npz", progress=False)
    ref = {}
    for layer in plan.chosen:
        stat = calibrate(simulated_model(proto, ref), {"x": x}, [layer.activation], progress=False)[layer.activation]
        ref[layer.weight] = quantize_layer(plan.names[layer.node], weight_matrix(proto, layer), stat, cfg,
                                           input_seed=seed_for(layer.activation + ":in", cfg.seed),
                                           output_seed=seed_for(layer.weight + ":out", cfg.seed))
    assert list(records) == list(ref)
    for name in ref:
        mismatch = np.mean(records[name].packed != ref[name].packed)
        assert mismatch == 0, (name, mismatch)
        np.testing.assert_allclose(records[name].scale, ref[name].scale, rtol=1e-6)
        assert records[name].guard["chosen"] == ref[name].guard["chosen"]


def test_cli_flag_mirrors_the_keyword():
    from fq_tvm.cli import _compile_parser

    parser = _compile_parser()
    assert parser.parse_args(["m.onnx"]).calib_sequential is None  # the scheme's default
    assert parser.parse_args(["m.onnx", "--calib-sequential"]).calib_sequential is True
    assert parser.parse_args(["m.onnx", "--no-calib-sequential"]).calib_sequential is False
    assert "--no-calib-sequential" in parser.format_help()
    assert parser.parse_args(["m.onnx"]).denoise is None
    assert parser.parse_args(["m.onnx", "--denoise"]).denoise is True
    assert parser.parse_args(["m.onnx", "--no-denoise"]).denoise is False
    assert parser.parse_args(["m.onnx"]).fp_target is None
    assert parser.parse_args(["m.onnx", "--no-fp-target"]).fp_target is False
    assert parser.parse_args(["m.onnx"]).refine is None
    assert parser.parse_args(["m.onnx", "--refine", "0"]).refine == 0


@pytest.mark.build
def test_compile_calibrates_sequentially(tmp_path):
    """compile(calib_sequential=True, denoise=True, fp_target=True, refine=1) stores what
    quantize_sequential gives under that config; the manifest says so."""
    import json

    import fq_tvm
    from fq_tvm import models
    from fq_tvm.quantize import plan_layers, quantize_sequential

    path = models.mlp_gemm(tmp_path / "mlp.onnx", sizes=(64, 48, 64, 40))
    x = np.random.default_rng(3).standard_t(3, (40, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    records = {}
    out = fq_tvm.compile(path, "host", tmp_path / "seq", scheme="gptq2", calib=tmp_path / "calib.npz", quiet=True,
                         records=records, calib_sequential=True, denoise=True, fp_target=True, refine=1)
    scheme = json.loads((out / "manifest.json").read_text())["scheme"]
    assert scheme["sequential"] is True and scheme["denoise"] is True
    assert scheme["fp_target"] is True and scheme["fp_residual"] is True and scheme["refine"] == 1
    proto = onnx.load(str(path))
    cfg = get_scheme("gptq2", denoise=True, fp_target=True, fp_residual=True, refine=1)
    ref = quantize_sequential(proto, plan_layers(proto), cfg, tmp_path / "calib.npz", progress=False)
    assert list(records) == list(ref)
    for name in ref:
        np.testing.assert_array_equal(records[name].packed, ref[name].packed)
