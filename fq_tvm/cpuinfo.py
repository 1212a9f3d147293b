"""What a CPU can run: its model name and flags (from /proc/cpuinfo), and whether an artifact's
kernels need a feature it lacks. Stdlib and numpy only: the RPC server on a board imports it too."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

# LLVM target feature -> the /proc/cpuinfo flag that says the CPU has it
FEATURE_FLAGS = {
    "avx2": "avx2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vnni": "avx512_vnni",
    "avxvnni": "avx_vnni", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve",
}
SHOWN_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm", "sve")


def read_cpuinfo(text: str | None = None) -> dict:
    """{"model": CPU model name, "flags": [...]} from /proc/cpuinfo (x86 `flags`, Arm `Features`)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    # x86: "model name"; Raspberry Pi: "Model" (the board); other Arm boards: "Hardware"
    model = fields.get("model name") or (fields.get("model") if "features" in fields else None) \
        or fields.get("hardware") or ""
    flags = (fields.get("flags") or fields.get("features") or "").split()
    return {"model": model or platform.processor() or "unknown CPU", "flags": flags}


# aarch64 HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h): AT_HWCAP = 16, AT_HWCAP2 = 26
ARM_HWCAP = {16: {"fp": 0, "asimd": 1, "asimdhp": 10, "asimddp": 20, "sve": 22}, 26: {"i8mm": 13}}


def auxv_flags(data: bytes | None = None) -> list[str]:
    """aarch64 CPU flags from the auxiliary vector (/proc/self/auxv): what the kernel, or
    qemu-user, says this process may use. /proc/cpuinfo under qemu-user shows the host's CPU."""
    if data is None:
        try:
            data = Path("/proc/self/auxv").read_bytes()
        except OSError:
            return []
    words = np.frombuffer(data[: len(data) // 16 * 16], dtype=np.uint64).reshape(-1, 2) if data else []
    values = {int(k): int(v) for k, v in words}
    return [name for key, bits in ARM_HWCAP.items() for name, bit in bits.items() if values.get(key, 0) >> bit & 1]


def board_info() -> dict:
    """This machine: architecture, CPU model and flags, core count, glibc version."""
    cpu = read_cpuinfo()
    arch = platform.machine()
    model, flags = cpu["model"], cpu["flags"]
    if arch == "aarch64":
        if "asimd" not in flags:  # qemu-user: the host's /proc/cpuinfo
            model = f"aarch64 emulated by qemu-user on {model} (timings are not ARM speed)"
        flags = auxv_flags()
    libc = platform.libc_ver()
    return {"arch": arch, "cpu": model, "flags": flags,
            "cores": os.cpu_count() or 1, "glibc": libc[1] if libc[0] == "glibc" else ""}


def board_info_json() -> str:
    return json.dumps(board_info())


def describe(info: dict) -> str:
    """'AMD EPYC (x86_64, 2 cores; avx2)' for a report heading."""
    shown = [f for f in SHOWN_FLAGS if f in info.get("flags", [])]
    return f"{info['cpu']} ({info['arch']}, {info['cores']} cores; {' '.join(shown) or 'no listed SIMD flags'})"


def needed_features(target_dict: dict) -> list[str]:
    """The LLVM features of FEATURE_FLAGS that code built for this TVM target may use."""
    from tvm.target import Target, codegen

    target = Target(target_dict)
    if target.kind.name != "llvm":
        return []
    return [f for f in FEATURE_FLAGS if codegen.llvm_cpu_has_features(f, target)]


def missing_features(target_dict: dict, info: dict) -> list[str]:
    """Features the artifact's target has and the CPU described by `info` lacks."""
    flags = set(info.get("flags", []))
    if not flags:  # unknown CPU flags (no /proc/cpuinfo): nothing to say
        return []
    return [f for f in needed_features(target_dict) if FEATURE_FLAGS[f] not in flags]
