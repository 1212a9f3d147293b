"""aarch64 artifacts really run: fq-run under qemu-aarch64 (arm64 Python sysroot from
scripts/setup_arm64.sh) gives the same numbers as the x86 build and ONNX Runtime."""

from pathlib import Path

import numpy as np
import pytest

import fq_tvm
from fq_tvm.targets import qemu
from conftest import int8_rows_match, max_rel_err, ort_run
from elf import EM_AARCH64, machine

pytestmark = pytest.mark.slow
REPO = Path(fq_tvm.__file__).resolve().parent.parent


def _fq_run_under_qemu(artifact, inputs: dict, tmp_path) -> dict:
    np.savez(tmp_path / "in.npz", **inputs)
    code = ("import sys; from fq_tvm.cli import run_main; "
            "sys.exit(run_main([sys.argv[1], '-i', sys.argv[2], '-o', sys.argv[3]]))")
    done = qemu.run_python(["-c", code, artifact, tmp_path / "in.npz", tmp_path / "out.npz"], pythonpath=[REPO])
    assert done.returncode == 0, done.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as out:
        return {k: out[k] for k in out.files}


@pytest.mark.parametrize("scheme", ["fp32", "fq2"])
def test_encoder_runs_under_qemu_and_matches_x86(encoder_onnx, tmp_path, scheme):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 12, 64)).astype(np.float32))
    # float activations: the same float kernels on both sides (hidden 64 is shorter than an AVX2
    # vector of packed codes, so int8 kernels would run on one side only)
    arm = fq_tvm.compile(encoder_onnx, "rpi5", tmp_path / "enc.rpi5", scheme=scheme, calib=calib, quiet=True,
                         act_bits=32)
    x86 = fq_tvm.compile(encoder_onnx, "host", tmp_path / "enc.host", scheme=scheme, calib=calib, quiet=True,
                         act_bits=32)
    assert machine(arm / "model.so") == EM_AARCH64
    x = np.random.default_rng(1).standard_normal((2, 9, 64)).astype(np.float32)
    ours = _fq_run_under_qemu(arm, {"x": x}, tmp_path)["y"]
    host = fq_tvm.load(x86).run({"x": x})["y"]
    assert max_rel_err(ours, host) < 1e-5
    if scheme == "fp32":
        assert max_rel_err(ours, ort_run(encoder_onnx, {"x": x})[0]) < 1e-4


@pytest.mark.parametrize("target", ["rpi5", "rpi4"])
def test_int8_layer_under_qemu_matches_numpy(tmp_path, target):
    """The int8 kernels on aarch64 (rpi5: sdot; rpi4: NEON without dot products) against the numpy
    inference math with int8 activations, like the x86 build in test_int8_activations.py."""
    from fq_tvm import models
    from fq_tvm.numerics.record import apply

    onnx_path = models.linear(tmp_path / "linear.onnx", 1000, 384, bias=False)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 4, 1000)).astype(np.float32))
    records = {}
    arm = fq_tvm.compile(onnx_path, target, tmp_path / f"lin.{target}", scheme="fq2", calib=tmp_path / "calib.npz",
                         quiet=True, records=records)
    (record,) = records.values()
    for rows in (5, 70):  # 64 rows and more: the many-row path (rpi5)
        x = np.random.default_rng(rows).standard_normal((1, rows, 1000)).astype(np.float32)
        ours = _fq_run_under_qemu(arm, {"x": x}, tmp_path)["y"]
        assert int8_rows_match(ours, apply(record, x, act_bits=8)), rows
