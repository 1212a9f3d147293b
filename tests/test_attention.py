"""The CPU attention-scores kernel (schedules/cpu_attention.py) against numpy on the definition,
and its Relax dispatch: the transposes it reads through are gone from the graph."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fq_tvm.schedules import cpu_attention

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


@pytest.mark.parametrize("lanes", [8, 4])
@pytest.mark.parametrize("batch, sq, sk, heads, dim", [
    (1, 128, 128, 12, 32),  # MiniLM: whole tiles
    (2, 37, 53, 3, 16),  # query rows and keys not whole tiles
    (1, 1, 77, 9, 64),  # one decoding step against a cache of 77 keys
    (3, 6, 5, 2, 8),  # fewer keys than one vector
])
def test_scores_match_numpy(batch, sq, sk, heads, dim, lanes):
    lib = tvm.compile(tvm.IRModule({"main": cpu_attention.scores(heads, dim, lanes).with_attr("global_symbol", "main")}),
                      HOST)
    rng = np.random.default_rng(sq * sk)
    q = rng.standard_normal((batch, sq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, sk, heads, dim)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((batch, heads, sq, sk), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
    ref = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6


def test_dispatch_reads_through_the_transposes():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", "s", 4, 8), "float32"), k: R.Tensor(("b", "s", 4, 8), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                kt = R.permute_dims(k, axes=[0, 2, 3, 1])
                o = R.matmul(qt, kt)
                R.output(o)
            return o

    counts = {}
    after = cpu_attention.dispatch(8, counts)(Before)
    text = after["main"].script()
    assert counts == {cpu_attention.KIND: 1}
    assert "permute_dims" not in text and "R.matmul" not in text and "fq_attention_scores_4_8" in text
    assert "R.Tensor((b, 4, s, s), dtype=\"float32\")" in text


def test_dispatch_leaves_other_matmuls():
    @I.ir_module
    class Other:
        @R.function
        def main(q: R.Tensor((2, 5, 4, 8), "float32"), k: R.Tensor((2, 4, 8, 5), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                o = R.matmul(qt, k)  # k not a transpose of [batch, seq, heads, dim]
                R.output(o)
            return o

    counts = {}
    after = cpu_attention.dispatch(8, counts)(Other)
    assert counts == {} and "R.matmul" in after["main"].script()
    tvm.ir.assert_structural_equal(after["main"], relax.analysis.remove_all_unused(Other["main"]))
