"""aarch64 artifacts really run: fq-run under qemu-aarch64 (arm64 Python sysroot from
scripts/setup_arm64.sh) gives the same numbers as the x86 build and ONNX Runtime.

Every artifact is built first and all of them run in ONE emulated Python (importing TVM under
qemu takes 15-30 s, more than running the models): the `runs` fixture returns each case's outputs.
"""

from pathlib import Path

import numpy as np
import pytest

import fq_tvm
from fq_tvm import models
from fq_tvm.targets import qemu
from conftest import int8_rows_match, max_rel_err, ort_run
from elf import EM_AARCH64, machine

pytestmark = pytest.mark.slow
REPO = Path(fq_tvm.__file__).resolve().parent.parent
ENCODER_SCHEMES = ("fp32", "fq2")
INT8_TARGETS = ("rpi5", "rpi4")  # rpi5: sdot; rpi4: NEON without dot products
INT8_ROWS = (5, 70)  # 64 rows and more: the many-row path (rpi5)
RUN_ALL = """
import sys
from fq_tvm.cli import run_main
jobs = sys.argv[1:]
for artifact, inp, out in zip(jobs[::3], jobs[1::3], jobs[2::3]):
    if run_main([artifact, '-i', inp, '-o', out]) != 0:
        sys.exit(f'fq-run failed on {artifact}')
"""


def _encoder_builds(encoder_onnx, work: Path) -> dict:
    """{scheme: (rpi5 artifact, host artifact)}, float activations: the same float kernels on both
    sides (hidden 64 is shorter than an AVX2 vector of packed codes, so int8 kernels would run on
    one side only)."""
    calib = work / "enc_calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 12, 64)).astype(np.float32))
    builds = {}
    for scheme in ENCODER_SCHEMES:
        opts = dict(scheme=scheme, calib=calib, quiet=True, act_bits=32)
        builds[scheme] = (fq_tvm.compile(encoder_onnx, "rpi5", work / f"enc.{scheme}.rpi5", **opts),
                          fq_tvm.compile(encoder_onnx, "host", work / f"enc.{scheme}.host", **opts))
    return builds


def _int8_builds(work: Path) -> dict:
    """{target: (artifact, quantization record)} of one fq2 1000 -> 384 layer, int8 activations."""
    onnx_path = models.linear(work / "linear.onnx", 1000, 384, bias=False)
    calib = work / "lin_calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 4, 1000)).astype(np.float32))
    builds = {}
    for target in INT8_TARGETS:
        records = {}
        arm = fq_tvm.compile(onnx_path, target, work / f"lin.{target}", scheme="fq2", calib=calib, quiet=True,
                             records=records)
        (record,) = records.values()
        builds[target] = (arm, record)
    return builds


@pytest.fixture(scope="module")
def runs(encoder_onnx, tmp_path_factory):
    """Builds, inputs and the outputs of one qemu run over all of them: {case: (inputs, outputs)}
    plus the builds under 'encoder' and 'int8'."""
    work = tmp_path_factory.mktemp("qemu")
    encoder, int8 = _encoder_builds(encoder_onnx, work), _int8_builds(work)
    cases = {}
    x = np.random.default_rng(1).standard_normal((2, 9, 64)).astype(np.float32)
    for scheme, (arm, _) in encoder.items():
        cases[("encoder", scheme)] = (arm, {"x": x})
    for target, (arm, _) in int8.items():
        for rows in INT8_ROWS:
            xr = np.random.default_rng(rows).standard_normal((1, rows, 1000)).astype(np.float32)
            cases[("int8", target, rows)] = (arm, {"x": xr})
    jobs = []
    for i, (arm, inputs) in enumerate(cases.values()):
        np.savez(work / f"in{i}.npz", **inputs)
        jobs += [arm, work / f"in{i}.npz", work / f"out{i}.npz"]
    done = qemu.run_python(["-c", RUN_ALL, *jobs], pythonpath=[REPO])
    assert done.returncode == 0, done.stderr[-2000:]
    outputs = {}
    for i, (case, (_, inputs)) in enumerate(cases.items()):
        with np.load(work / f"out{i}.npz") as out:
            outputs[case] = (inputs, {k: out[k] for k in out.files})
    return {"encoder": encoder, "int8": int8, **outputs}


@pytest.mark.parametrize("scheme", ENCODER_SCHEMES)
def test_encoder_runs_under_qemu_and_matches_x86(runs, encoder_onnx, scheme):
    arm, x86 = runs["encoder"][scheme]
    assert machine(arm / "model.so") == EM_AARCH64
    inputs, outputs = runs[("encoder", scheme)]
    host = fq_tvm.load(x86).run(inputs)["y"]
    assert max_rel_err(outputs["y"], host) < 1e-5
    if scheme == "fp32":
        assert max_rel_err(outputs["y"], ort_run(encoder_onnx, inputs)[0]) < 1e-4


@pytest.mark.parametrize("target", INT8_TARGETS)
def test_int8_layer_under_qemu_matches_numpy(runs, target):
    """The int8 kernels on aarch64 against the numpy inference math with int8 activations, like
    the x86 build in test_int8_activations.py."""
    from fq_tvm.numerics.record import apply

    _, record = runs["int8"][target]
    for rows in INT8_ROWS:
        inputs, outputs = runs[("int8", target, rows)]
        assert int8_rows_match(outputs["y"], apply(record, inputs["x"], act_bits=8)), rows
