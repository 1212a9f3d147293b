"""Cross builds: aarch64 libraries and CUDA device code, checked for what they really contain."""

import json

import numpy as np
import pytest

from fq_tvm import FqError, load
from fq_tvm.cli import compile_main, run_main
from fq_tvm.targets import cuda as cuda_target
from elf import EM_AARCH64, EM_X86_64, cuda_sm, machine


@pytest.fixture(scope="module")
def arm_artifact(encoder_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("arm") / "encoder.rpi5"
    assert compile_main([str(encoder_onnx), "--target", "rpi5", "-o", str(out), "-q"]) == 0
    return out


def test_aarch64_library_is_an_aarch64_elf(arm_artifact):
    assert machine(arm_artifact / "model.so") == EM_AARCH64
    manifest = json.loads((arm_artifact / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64"
    assert manifest["target"]["tvm"]["mcpu"] == "cortex-a76"


def test_aarch64_artifact_refused_on_x86(arm_artifact, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 4, 64), np.float32))
    assert run_main([str(arm_artifact), "-i", str(tmp_path / "in.npz")]) == 1
    assert "built for aarch64 (target 'rpi5'), cannot run on this x86_64 machine" in capsys.readouterr().err


def test_host_library_is_x86(mlp_onnx, tmp_path):
    out = tmp_path / "mlp.avx512"
    assert compile_main([str(mlp_onnx), "--target", "x86-avx512", "-o", str(out), "-q"]) == 0
    assert machine(out / "model.so") == EM_X86_64


@pytest.mark.skipif(cuda_target.nvcc_path() is None, reason="nvcc not installed: CUDA device code cannot be built")
@pytest.mark.parametrize("model, target, extra, sm", [("encoder_onnx", "cuda", [], 80),
                                                      ("mlp_onnx", "cuda", ["--cuda-arch", "sm_86"], 86),
                                                      ("mlp_onnx", "cuda-sm90", [], 90)])
def test_cuda_artifact_holds_device_code(request, tmp_path, model, target, extra, sm):
    """The encoder once; the other archs on the small MLP (only the arch differs between presets)."""
    out = tmp_path / "model.cuda"
    assert compile_main([str(request.getfixturevalue(model)), "--target", target, "-o", str(out), "-q", *extra]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.so", "device.cu", "device.cubin", "device.ptx"}
    assert cuda_sm(out / "device.cubin") == sm
    ptx = (out / "device.ptx").read_text()
    assert f".target sm_{sm}" in ptx and ".entry " in ptx
    assert "__global__" in (out / "device.cu").read_text()
    assert cuda_target._ptx_arch(ptx.encode()) == sm


@pytest.mark.skipif(cuda_target.nvcc_path() is None, reason="nvcc not installed")
def test_cuda_artifact_needs_a_gpu_to_load(mlp_onnx, tmp_path):
    import tvm

    out = tmp_path / "mlp.cuda"
    assert compile_main([str(mlp_onnx), "--target", "cuda", "-o", str(out), "-q"]) == 0
    if tvm.cuda(0).exist:
        x = np.ones((2, 32), np.float32)
        assert load(out).run({"x": x})["y"].shape == (2, 16)
    else:
        with pytest.raises(FqError, match="built for CUDA \\(sm_80\\), but no CUDA GPU is visible"):
            load(out)


@pytest.mark.skipif(cuda_target.nvcc_path() is None, reason="nvcc not installed")
def test_cuda_fq2_encoder_holds_device_code(encoder_onnx, tmp_path):
    """At sm_80 only: the presets differ in the arch alone (test_cuda_artifact_holds_device_code)."""
    target, sm = "cuda", 80
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 12, 64)).astype(np.float32))
    out = tmp_path / "encoder.fq2"
    assert compile_main([str(encoder_onnx), "--target", target, "--scheme", "fq2", "--calib",
                         str(tmp_path / "calib.npz"), "-o", str(out), "-q"]) == 0
    assert cuda_sm(out / "device.cubin") == sm
    source = (out / "device.cu").read_text()
    for kernel in ("fq_dequant_matmul", "fq_hadamard", "_frame_"):  # the frame fused into the input side
        assert f"{kernel}" in source, kernel
    assert "threadIdx.x" in source
    assert len(json.loads((out / "manifest.json").read_text())["layers"]) == 6
