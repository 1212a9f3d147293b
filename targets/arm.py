"""aarch64 NEON presets (generic and boards). Cross-compiled and exported with the GNU toolchain."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import FqError
from . import register
from .base import Preset
from .qemu import CROSS_CXX

LIB_NAME = "model.so"


def _neon(name: str, description: str, mcpu: str | None, cores: int, board: str) -> Preset:
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": cores}
    if mcpu:
        target["mcpu"] = mcpu
    return register(Preset(name, description, target, arch="aarch64", device="cpu", board=board))


_neon("arm-neon", "generic aarch64 with NEON", None, 4, "any ARMv8-A Linux board")
_neon("rpi4", "Raspberry Pi 4 (Cortex-A72)", "cortex-a72", 4, "Raspberry Pi 4")
_neon("rpi5", "Raspberry Pi 5 (Cortex-A76)", "cortex-a76", 4, "Raspberry Pi 5")
_neon("jetson-orin", "NVIDIA Jetson AGX Orin, CPU side (Cortex-A78AE)", "cortex-a78ae", 12, "Jetson AGX Orin")


def check_tools(preset: Preset) -> None:
    if shutil.which(CROSS_CXX) is None:
        raise FqError(f"cross-compiler {CROSS_CXX} not found: install it with "
                      f"'apt-get install g++-aarch64-linux-gnu' to build for '{preset.name}'")


def export(executable, out_dir: Path, preset: Preset) -> list[str]:
    from tvm.support import cc

    executable.export_library(str(out_dir / LIB_NAME), fcompile=cc.cross_compiler(CROSS_CXX))
    return [LIB_NAME]
