"""A tied embedding / output head is stored once in the artifact (passes/tied_weights.py), and the
rewritten graph still computes what ONNX Runtime computes on the original model."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm

import fq_tvm
from fq_tvm import models
from fq_tvm.importer import bind_weights, to_relax
from fq_tvm.passes.tied_weights import StoreTiedWeightsOnce

VOCAB, HIDDEN = 20000, 64


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return models.tied_lm(tmp_path_factory.mktemp("tied") / "tied.onnx", VOCAB, HIDDEN)


def _constants(mod) -> list:
    sizes = []

    @tvm.relax.expr_functor.visitor
    class Count(tvm.relax.expr_functor.PyExprVisitor):
        def visit_generic_const_(self, const):
            sizes.append(tuple(const.value.shape))

    Count().visit_expr(mod["main"])
    return sizes


def test_pass_keeps_only_the_transpose(tied):
    mod, weights = to_relax(onnx.load(str(tied)))
    bound = bind_weights(mod, weights)
    rewrite = StoreTiedWeightsOnce()
    out = rewrite(bound)
    assert rewrite.tied == 1
    big = [s for s in _constants(out) if np.prod(s) == VOCAB * HIDDEN]
    assert big == [(HIDDEN, VOCAB)] * len(big) and big  # E^T only, never E itself


def test_untied_model_is_left_alone(tmp_path):
    mod, weights = to_relax(onnx.load(str(models.linear(tmp_path / "l.onnx", 64, 32))))
    bound = bind_weights(mod, weights)
    rewrite = StoreTiedWeightsOnce()
    tvm.ir.assert_structural_equal(rewrite(bound), bound)
    assert rewrite.tied == 0


@pytest.mark.parametrize("scheme", ["fp32", "int8"])
def test_compiled_tied_model_matches_ort_and_stores_the_table_once(tied, tmp_path, scheme):
    out = fq_tvm.compile(tied, "host", tmp_path / scheme, scheme=scheme, quiet=True)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 7)).astype(np.int64)
    ref = ort.InferenceSession(str(tied), providers=["CPUExecutionProvider"]).run(None, {"x": ids})[0]
    got = fq_tvm.load(out).run({"x": ids})["y"]
    tol = 1e-4 if scheme == "fp32" else 0.05 * np.abs(ref).max()
    assert np.abs(got - ref).max() < tol
    table = 4 * VOCAB * HIDDEN
    assert (out / "model.so").stat().st_size < 1.4 * table  # twice the table without the pass
