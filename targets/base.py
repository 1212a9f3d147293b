"""The Preset record and the per-family build hooks (check tools, export)."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    target: dict  # a TVM target JSON dict
    arch: str  # CPU architecture the artifact runs on: "x86_64" or "aarch64"
    device: str  # "cpu" or "cuda"
    board: str = ""  # free text for --list-targets
    extra: dict = field(default_factory=dict)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def with_cuda_arch(self, arch: str) -> "Preset":
        from ..errors import FqError

        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise FqError(f"bad --cuda-arch '{arch}': expected e.g. sm_80, sm_86, sm_90")
        return dataclasses.replace(self, target={**self.target, "arch": arch})

    @property
    def cuda_arch(self) -> str | None:
        return self.target.get("arch") if self.device == "cuda" else None

    @property
    def runs_here(self) -> bool:
        return self.arch == platform.machine()


def family(preset: Preset):
    """The module holding build hooks for this preset: check_tools(preset), export(ex, dir, preset)."""
    from . import arm, cuda, x86

    if preset.device == "cuda":
        return cuda
    return arm if preset.arch == "aarch64" else x86
