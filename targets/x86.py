"""x86-64 CPU presets: the running host and AVX-512 servers."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from . import register
from .base import Preset

LIB_NAME = "model.so"


def _host() -> Preset:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    target = {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}
    if platform.machine() == "aarch64":
        target["mtriple"] = "aarch64-linux-gnu"
    return Preset("host", f"this machine ({platform.machine()}, {cpu})", target,
                  arch=platform.machine(), device="cpu")


register(Preset("x86-avx512", "x86-64 with AVX-512 (x86-64-v4: Skylake-SP, Ice Lake, Zen 4/5)",
                {"kind": "llvm", "mcpu": "x86-64-v4", "num-cores": os.cpu_count() or 1},
                arch="x86_64", device="cpu"))


def _register_host() -> None:
    register(_host())


_register_host()


def check_tools(preset: Preset) -> None:
    """Nothing beyond TVM's own LLVM and the system C compiler used by export_library."""


def export(executable, out_dir: Path, preset: Preset) -> list[str]:
    """Write the host shared library; return the file names written."""
    executable.export_library(str(out_dir / LIB_NAME))
    return [LIB_NAME]
