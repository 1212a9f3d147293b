"""passes/slice_heads.py: a slice of a stacked projection reshaped into heads becomes a slice of
heads (Before/Expected), only where the head width divides the slice bounds; same results."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fq_tvm.passes.slice_heads import SliceHeads


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("b", "s", 960), "float32")):
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            k = R.strided_slice(x, axes=[2], begin=[576], end=[768], assume_inbound=True)
            heads = R.reshape(k, R.shape([b, s, 3, 64]))
            R.output(heads)
        return heads


def test_a_slice_reshaped_into_heads_becomes_a_slice_of_heads():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor(("b", "s", 960), "float32")):
            b = T.int64()
            s = T.int64()
            with R.dataflow():
                split = R.reshape(x, R.shape([b, s, 15, 64]))
                heads = R.strided_slice(split, axes=[2], begin=[9], end=[12], assume_inbound=True)
                R.output(heads)
            return heads

    rewrite = SliceHeads()
    after = rewrite(Before)
    assert rewrite.count == 1
    tvm.ir.assert_structural_equal(after["main"], Expected["main"])
    x = np.random.default_rng(0).standard_normal((2, 3, 960)).astype(np.float32)
    outs = []
    for mod in (Before, after):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], x[:, :, 576:768].reshape(2, 3, 3, 64))


def test_bounds_that_split_a_head_are_left_alone():
    @I.ir_module
    class Odd:
        @R.function
        def main(x: R.Tensor((2, 3, 960), "float32")):
            with R.dataflow():
                k = R.strided_slice(x, axes=[2], begin=[32], end=[224], assume_inbound=True)  # not whole heads of 64
                heads = R.reshape(k, R.shape([2, 3, 3, 64]))
                R.output(heads)
            return heads

    rewrite = SliceHeads()
    after = rewrite(Odd)
    assert rewrite.count == 0
    tvm.ir.assert_structural_equal(after, Odd)
