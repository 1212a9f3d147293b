import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper

from fq_tvm.numerics.calibrate import calibrate, find_dense_layers, weight_matrix


class Tiny:
    """A torch model with the shapes that matter: a Linear on a graph input, two Linears reading
    one tensor (Q/K-like, sharing a Hessian), a Linear without bias, [batch, seq, K] activations."""

    @staticmethod
    def build():
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = torch.nn.Linear(12, 16)
                self.q = torch.nn.Linear(16, 16)
                self.k = torch.nn.Linear(16, 16, bias=False)
                self.out = torch.nn.Linear(16, 8)

            def forward(self, x, mask):
                h = torch.relu(self.inp(x)) * mask.unsqueeze(-1)
                return self.out(torch.tanh(self.q(h)) * self.k(h))

        torch.manual_seed(0)
        return Model().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    model = Tiny.build()
    x, mask = torch.randn(2, 5, 12), torch.ones(2, 5)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x, mask), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: batch}, {0: batch}), verbose=False)
    rng = np.random.default_rng(0)
    samples = {
        "x": (rng.standard_t(4, (11, 5, 12)) * 2).astype(np.float32),
        "mask": (rng.random((11, 5)) > 0.3).astype(np.float32),
    }
    return model, path, samples


def _torch_hessians(model, samples, mask_rows=False):
    import torch

    sums = {}

    def hook(module, args):
        a = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
        if mask_rows:
            a = a * hook.mask.reshape(-1, 1)
        sums[module] = sums.get(module, 0) + a.T @ a

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i in range(0, 11, 4):
            hook.mask = samples["mask"][i : i + 4].astype(np.float64)
            model(torch.from_numpy(samples["x"][i : i + 4]), torch.from_numpy(samples["mask"][i : i + 4]))
    for h in handles:
        h.remove()
    return sums


def _module_for(model, proto, layer):
    import torch

    w = weight_matrix(proto, layer)
    hits = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape == w.shape
            and np.array_equal(m.weight.detach().numpy(), w)]
    assert len(hits) == 1
    return hits[0]


def test_find_layers_in_dynamo_export(exported):
    model, path, _ = exported
    layers = find_dense_layers(str(path))
    assert len(layers) == 4 and all(layer.op_type == "MatMul" and not layer.transposed for layer in layers)
    assert len({layer.activation for layer in layers}) == 3  # q and k share their input
    proto = onnx.load(str(path))
    by_module = {_module_for(model, proto, layer): layer for layer in layers}
    for module, layer in by_module.items():
        assert (layer.out_features, layer.in_features) == tuple(module.weight.shape)
        assert (layer.bias is None) == (module.bias is None)
        if layer.bias is not None:
            bias = next(t for t in proto.graph.initializer if t.name == layer.bias)
            assert np.array_equal(numpy_helper.to_array(bias), module.bias.detach().numpy())


@pytest.mark.parametrize("masked", [False, True])
def test_hessians_match_torch(exported, tmp_path, masked):
    model, path, samples = exported
    np.savez(tmp_path / "samples.npz", **samples)
    stats = calibrate(str(path), tmp_path / "samples.npz", batch_size=4, progress=False,
                      mask_input="mask" if masked else None)
    torch_sums = _torch_hessians(model, samples, mask_rows=masked)
    proto = onnx.load(str(path))
    layers = find_dense_layers(proto)
    assert set(stats) == {layer.activation for layer in layers}
    for layer in layers:
        ref = torch_sums[_module_for(model, proto, layer)]
        got = stats[layer.activation]
        assert got.xtx.dtype == np.float64 and got.xtx.shape == (layer.in_features,) * 2
        assert np.allclose(got.xtx, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        assert got.count == (samples["mask"].sum() if masked else 55)
    q_k = [layer.activation for layer in layers if layer.in_features == 16 and layer.out_features == 16]
    assert q_k[0] == q_k[1]


def _gemm_model():
    rng = np.random.default_rng(1)
    w1, b1 = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    w2 = rng.standard_normal((5, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["g1"], ["h"]),
        helper.make_node("Gemm", ["h", "w2"], ["y"], alpha=0.5, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, w1, b1, w2


def test_gemm_layers_and_hessians():
    model, w1, b1, w2 = _gemm_model()
    layers = find_dense_layers(model)
    fc1, fc2 = layers
    assert (fc1.node, fc1.op_type, fc1.transposed, fc1.in_features, fc1.out_features, fc1.bias) == \
        ("fc1", "Gemm", True, 6, 5, "b1")
    assert (fc2.transposed, fc2.in_features, fc2.out_features, fc2.alpha, fc2.activation) == (False, 5, 4, 0.5, "h")
    assert np.array_equal(weight_matrix(model, fc1), w1)
    assert np.allclose(weight_matrix(model, fc2), 0.5 * w2.T)
    x = np.random.default_rng(2).standard_normal((9, 6)).astype(np.float32)
    stats = calibrate(model, {"x": x}, batch_size=2, progress=False)
    h = np.maximum(x.astype(np.float64) @ w1.T + b1, 0)
    assert np.allclose(stats["x"].xtx, x.astype(np.float64).T @ x, rtol=1e-5, atol=1e-5)
    assert np.allclose(stats["h"].xtx, h.T @ h, rtol=1e-5)
    assert stats["h"].count == 9
    assert np.allclose(stats["h"].hessian(), 2 / 9 * stats["h"].xtx)


def test_calibrate_errors():
    model, *_ = _gemm_model()
    with pytest.raises(ValueError, match="samples lack model inputs: x"):
        calibrate(model, {"z": np.zeros((1, 6), np.float32)}, progress=False)
    with pytest.raises(ValueError, match="mask input 'm'"):
        calibrate(model, {"x": np.zeros((1, 6), np.float32)}, mask_input="m", progress=False)


def test_calibration_sessions_do_not_spin():
    """ORT's pool spinning after each run took the cores from the numpy products that follow it
    (MiniLM fq2 compile 103 -> 56 s without the spinning)."""
    from fq_tvm.numerics.calibrate import _session

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    session = _session(model)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    out = session.run(None, {"x": np.array([[-1, 2, -3], [4, -5, 6]], np.float32)})[0]
    np.testing.assert_array_equal(out, [[0, 2, 0], [4, 0, 6]])


def test_gram_float32_products_weighted_and_not():
    """calibrate._gram32: float32 rows and result; all-ones weights (the symmetric product) and
    general weights both match float64 numpy to float32 accuracy."""
    from fq_tvm.numerics.calibrate import _gram32 as _gram

    rows = np.random.default_rng(3).standard_normal((300, 24)).astype(np.float32)
    ref = rows.astype(np.float64).T @ rows
    got = _gram(rows, np.ones(300, np.float32))
    assert got.dtype == np.float32 and np.allclose(got, ref, rtol=1e-5, atol=1e-4)
    w = np.random.default_rng(4).random(300).astype(np.float32)
    assert np.allclose(_gram(rows, w), (rows.astype(np.float64) * w[:, None]).T @ rows, rtol=1e-5, atol=1e-4)
