"""CUDA presets. Device code is compiled ahead of time by nvcc (cubin for the arch + PTX), so an
artifact holds real GPU code even when built on a machine without a GPU."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import FqError
from . import register
from .base import Preset

LIB_NAME = "model.so"
SOURCE, CUBIN, PTX = "device.cu", "device.cubin", "device.ptx"

register(Preset("cuda", "NVIDIA GPU, CUDA (default sm_80; set --cuda-arch)",
                {"kind": "cuda", "arch": "sm_80"}, arch="x86_64", device="cuda"))
register(Preset("cuda-sm90", "NVIDIA Hopper (H100/H200), CUDA sm_90",
                {"kind": "cuda", "arch": "sm_90"}, arch="x86_64", device="cuda"))


def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def check_tools(preset: Preset) -> None:
    if nvcc_path() is None:
        raise FqError(f"no CUDA compiler: nvcc not found on PATH or in $CUDA_HOME/bin; install the CUDA "
                      f"toolkit or 'pip install nvidia-cuda-nvcc' to build for '{preset.name}'")


def device_source(executable) -> str:
    """The CUDA C source TVM generated, found among the executable's imported modules."""
    stack = [executable.mod]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            return mod.inspect_source("")
        stack.extend(mod.imports)
    raise FqError("the CUDA build produced no device module (no kernel to compile?)")


def _nvcc(src: Path, out: Path, mode: str, arch: str) -> None:
    cmd = [nvcc_path(), f"--{mode}", "-O3", f"-arch={arch}", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise FqError(f"nvcc failed compiling the generated CUDA code for {arch}: {tail}")


def export(executable, out_dir: Path, preset: Preset) -> list[str]:
    """Host library plus device code: the CUDA source, a cubin for the arch, and PTX."""
    executable.export_library(str(out_dir / LIB_NAME))
    src = out_dir / SOURCE
    src.write_text(device_source(executable))
    arch = preset.cuda_arch or "sm_80"
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(_nvcc, src, out_dir / name, mode, arch)
                for name, mode in ((CUBIN, "cubin"), (PTX, "ptx"))]
        for job in jobs:
            job.result()
    return [LIB_NAME, SOURCE, CUBIN, PTX]


def load_runtime() -> None:
    """Load TVM's CUDA runtime library when only the runtime is installed (TVM_USE_RUNTIME_LIB=1 or a
    runtime-only wheel): that mode skips the backend autoload that registers the CUDA device."""
    import tvm.base

    if "tvm_runtime_cuda" in tvm.base._LOADED_LIBS:
        return
    from tvm_ffi.libinfo import load_lib_ctypes

    lib_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[lib_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError):
        pass  # no CUDA runtime in this TVM: the caller reports that no GPU is visible


def install_precompiled(artifact_dir: Path) -> None:
    """Make TVM's loader use our nvcc-built cubin (or PTX) instead of compiling at load time.

    TVM 0.27 keeps the CUDA source in the host library and calls `tvm_callback_cuda_compile` when
    the library is loaded; we answer with the stored binary when the source is the one we built.
    """
    import tvm_ffi

    expected = hashlib.sha256((artifact_dir / SOURCE).read_bytes()).hexdigest()
    binary = _binary_for_this_gpu(artifact_dir)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_):
        if hashlib.sha256(code.encode()).hexdigest() != expected:
            raise RuntimeError("CUDA source differs from the artifact's device.cu")
        return bytearray(binary)


def _binary_for_this_gpu(artifact_dir: Path) -> bytes:
    """The cubin when the GPU's major compute capability matches it, else PTX (JIT by the driver)."""
    import tvm

    ptx = (artifact_dir / PTX).read_bytes()
    built = _ptx_arch(ptx)
    have = tvm.cuda(0).compute_version if tvm.cuda(0).exist else ""
    if built and have and have.split(".")[0] == str(built // 10):
        return (artifact_dir / CUBIN).read_bytes()
    return ptx + b"\0"


def _ptx_arch(ptx: bytes) -> int | None:
    for line in ptx.decode(errors="replace").splitlines():
        if line.startswith(".target sm_"):
            return int("".join(ch for ch in line.split("sm_")[1] if ch.isdigit()))
    return None
