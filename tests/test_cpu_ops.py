"""CPU legalization overrides (schedules/cpu_ops.py) against numpy."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fq_tvm.schedules import cpu_ops

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def test_sigmoid_matches_numpy_and_keeps_nan():
    @I.ir_module
    class Sigmoid:
        @R.function
        def main(x: R.Tensor((3, 37), "float32")):
            with R.dataflow():
                y = R.sigmoid(x)
                R.output(y)
            return y

    mod = relax.transform.LegalizeOps(cpu_ops.overrides())(Sigmoid)
    assert "sigmoid" in [g.name_hint for g in mod.get_global_vars()]
    x = np.random.default_rng(0).standard_normal((3, 37)).astype(np.float32) * 8
    x[0, :6] = [np.nan, -np.inf, np.inf, -100.0, 100.0, 0.0]
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.isnan(ours[0, 0]) and np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.abs(ours[finite] - ref[finite]).max() < 1e-7  # values in [0, 1]: about 2 ulp at 1
