"""passes/swiglu.py: silu(gate) * up on the halves of a stacked gate / up output becomes one call
of the `swiglu` kernel (Before/Expected), where the slices are the two halves; same results."""

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fq_tvm.passes.swiglu import FuseSwiGLU
from fq_tvm.schedules import kernels


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor(("n", 768), "float32")):
        n = T.int64()
        with R.dataflow():
            s = R.reshape(x, R.shape([n, 1, 768]))
            gate = R.strided_slice(s, axes=[2], begin=[0], end=[384], assume_inbound=True)
            sig = R.sigmoid(gate)
            silu = R.multiply(gate, sig)
            up = R.strided_slice(s, axes=[2], begin=[384], end=[768], assume_inbound=True)
            y = R.multiply(up, silu)
            rows = R.reshape(y, R.shape([n, 384]))
            out = R.multiply(rows, R.const(2.0, "float32"))
            R.output(out)
        return out


def _expected():
    """What the pass should make of Before: the kernel reads x, and what read the reshape back to
    2-D reads the kernel's output."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 768], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gvar = bb.add_func(kernels.swiglu(768).with_attr("global_symbol", "fq_swiglu_768"), "fq_swiglu_768")
            rows = bb.emit(relax.call_tir(gvar, [x], relax.TensorType([n, 384], "float32")))
            out = bb.emit_output(relax.op.multiply(rows, relax.const(2.0, "float32")))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_gated_halves_become_one_kernel_call():
    rewrite = FuseSwiGLU()
    after = rewrite(Before)
    assert rewrite.count == 1
    tvm.ir.assert_structural_equal(after, _expected())
    x = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32)
    g, u = x[:, :384].astype(np.float64), x[:, 384:]
    ref = 2 * g / (1 + np.exp(-g)) * u
    for mod in (Before, after):
        assert np.abs(_run(mod, x) - ref).max() < 1e-5


def test_silu_op_and_three_dimensional_output():
    @I.ir_module
    class Silu:
        @R.function
        def main(s: R.Tensor(("b", "t", 64), "float32")):
            with R.dataflow():
                gate = R.strided_slice(s, axes=[2], begin=[0], end=[32], assume_inbound=True)
                up = R.strided_slice(s, axes=[2], begin=[32], end=[64], assume_inbound=True)
                y = R.multiply(R.nn.silu(gate), up)
                R.output(y)
            return y

    rewrite = FuseSwiGLU()
    after = rewrite(Silu)
    assert rewrite.count == 1
    names = [gvar.name_hint for gvar in after.get_global_vars()]
    assert "fq_swiglu_64" in names
    x = np.random.default_rng(1).standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(after, x), _run(Silu, x), rtol=1e-5, atol=1e-6)


def test_slices_that_are_not_the_two_halves_are_left_alone():
    @I.ir_module
    class Odd:
        @R.function
        def main(s: R.Tensor((4, 96), "float32")):
            with R.dataflow():
                gate = R.strided_slice(s, axes=[1], begin=[0], end=[32], assume_inbound=True)
                up = R.strided_slice(s, axes=[1], begin=[64], end=[96], assume_inbound=True)  # not s[:, 32:64]
                y = R.multiply(R.multiply(gate, R.sigmoid(gate)), up)
                R.output(y)
            return y

    rewrite = FuseSwiGLU()
    after = rewrite(Odd)
    assert rewrite.count == 0
    tvm.ir.assert_structural_equal(after, Odd)
