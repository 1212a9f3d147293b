"""The aarch64 emulation harness itself (fq_tvm.targets.qemu + scripts/setup_arm64.sh), on a plain
TVM module and nothing of fq_tvm's compiler: y = x @ W + b with a dynamic batch, compiled for
aarch64, cross-linked, then loaded and run by TVM's Relax VM inside qemu-aarch64."""

import sys
import time

import numpy as np
import pytest

from fq_tvm.targets import qemu
from elf import EM_AARCH64, machine

pytestmark = pytest.mark.slow

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
K, N = 24, 10

RUN_UNDER_QEMU = """
import platform, sys, time
t0 = time.time()
import numpy as np
import tvm
from tvm import relax
t1 = time.time()
lib = tvm.runtime.load_module(sys.argv[1])
vm = relax.VirtualMachine(lib, tvm.cpu())
out = {}
with np.load(sys.argv[2]) as inputs:
    for name in inputs.files:
        out[name] = vm["main"](tvm.runtime.tensor(inputs[name])).numpy()
np.savez(sys.argv[3], **out)
print(f"machine={platform.machine()} import={t1 - t0:.2f}s run={time.time() - t1:.2f}s")
"""


def _linear_module(w: np.ndarray, b: np.ndarray):
    import tvm
    from tvm import relax

    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, w.shape[0]), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(w)))
            out = bb.emit_output(relax.op.add(y, relax.const(b)))
        bb.emit_func_output(out)
    return bb.get()


def test_linear_runs_under_qemu(tmp_path):
    import tvm

    qemu.ensure_sysroot(with_cross_compiler=True)  # builds it on a fresh machine (CI); never skips
    cxx = qemu.check_cross_compiler()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)

    ex = tvm.compile(_linear_module(w, b), tvm.target.Target(AARCH64))
    lib = tmp_path / "linear.so"
    ex.export_library(str(lib), fcompile=tvm.support.cc.cross_compiler(cxx))
    with open(lib, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and head[4] == 2, "not a 64-bit ELF"  # EI_CLASS 2: ELFCLASS64
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64 == machine(lib)

    # two batch sizes through the same function: the first dimension really is dynamic
    inputs = {f"x{n}": rng.standard_normal((n, K)).astype(np.float32) for n in (1, 5)}
    np.savez(tmp_path / "in.npz", **inputs)
    (tmp_path / "run.py").write_text(RUN_UNDER_QEMU)
    t = time.time()
    done = qemu.run_python([tmp_path / "run.py", lib, tmp_path / "in.npz", tmp_path / "out.npz"],
                           timeout=300)
    wall = time.time() - t
    assert done.returncode == 0, f"under qemu:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    print(f"qemu run: {wall:.1f}s wall; {done.stdout.strip()}", file=sys.stderr)
    assert "machine=aarch64" in done.stdout

    with np.load(tmp_path / "out.npz") as out:
        assert sorted(out.files) == sorted(inputs)
        for name, x in inputs.items():
            ref = x.astype(np.float64) @ w + b
            assert out[name].shape == ref.shape and out[name].dtype == np.float32
            np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=1e-5)
