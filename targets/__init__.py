"""Named hardware presets. Adding a target = one module here that calls `register(...)`.

A preset knows its TVM target dict, the CPU architecture its artifact runs on, the device kind,
and how to check tools / export a built executable (`family`: see base.py).
"""

from __future__ import annotations

import json

from ..errors import FqError
from .base import Preset, family

_PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    _PRESETS[preset.name] = preset
    return preset


def presets() -> list[Preset]:
    _load_builtin()
    return list(_PRESETS.values())


def resolve(spec: str, cuda_arch: str | None = None) -> Preset:
    """A preset from its name or from a raw TVM target JSON dict (a string starting with '{')."""
    _load_builtin()
    spec = spec.strip()
    if spec.startswith("{"):
        return _from_json(spec)
    if spec not in _PRESETS:
        names = ", ".join(sorted(_PRESETS))
        raise FqError(f"unknown target '{spec}'; known targets: {names} (or a TVM target JSON dict)")
    preset = _PRESETS[spec]
    if cuda_arch is not None:
        if preset.device != "cuda":
            raise FqError(f"--cuda-arch applies to CUDA targets only, not '{spec}'")
        preset = preset.with_cuda_arch(cuda_arch)
    return preset


def _from_json(spec: str) -> Preset:
    try:
        config = json.loads(spec)
    except json.JSONDecodeError as err:
        raise FqError(f"malformed target JSON: {err.msg} at character {err.pos}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise FqError('target JSON must be an object with a "kind", e.g. {"kind": "llvm", "mcpu": "znver4"}')
    import tvm

    try:
        tvm.target.Target(config)
    except Exception as err:
        raise FqError(f"invalid TVM target {spec}: {str(err).splitlines()[0]}") from None
    kind = config["kind"]
    if kind == "cuda":
        return Preset("custom", "custom CUDA target", config, arch="x86_64", device="cuda")
    if kind != "llvm":
        raise FqError(f"target kind '{kind}' is not supported (use llvm or cuda)")
    triple = str(config.get("mtriple", ""))
    arch = "aarch64" if triple.startswith(("aarch64", "arm64")) else _host_arch()
    return Preset("custom", "custom LLVM target", config, arch=arch, device="cpu")


def _host_arch() -> str:
    import platform

    return platform.machine()


def _load_builtin() -> None:
    from . import arm, cuda, x86  # noqa: F401  (each registers its presets on first import)


__all__ = ["Preset", "family", "presets", "register", "resolve"]
