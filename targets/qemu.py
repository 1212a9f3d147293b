"""Run Python under qemu-aarch64 with the arm64 sysroot built by scripts/setup_arm64.sh: how the
tests (and users without a board) run aarch64 artifacts on an x86-64 machine. Stdlib only."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parent.parent / "scripts" / "setup_arm64.sh"


def sysroot_path() -> Path:
    default = Path.home() / ".cache" / "fq-tvm" / "arm64-sysroot"
    return Path(os.environ.get("FQ_ARM64_SYSROOT", default))


def is_ready() -> bool:
    return (sysroot_path() / ".complete").exists() and shutil.which("qemu-aarch64") is not None


def ensure_sysroot() -> Path:
    """Build the sysroot if needed (a few minutes, ~400 MB); raise RuntimeError if impossible."""
    if not is_ready():
        if not SETUP.exists():
            raise RuntimeError("arm64 sysroot missing and scripts/setup_arm64.sh not found; run it from a checkout")
        done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True)
        if done.returncode != 0 or not is_ready():
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise RuntimeError(f"could not build the arm64 sysroot ({tail}); run: bash {SETUP}")
    return sysroot_path()


def run_python(args: list[str], *, pythonpath=(), env: dict | None = None, timeout: float = 600,
               cwd=None) -> subprocess.CompletedProcess:
    """`python3.11 *args` inside the arm64 sysroot under qemu-aarch64, output captured as text."""
    if shutil.which("qemu-aarch64") is None:
        raise RuntimeError("qemu-aarch64 not found: apt-get install qemu-user")
    root = ensure_sysroot()
    paths = [str(p) for p in pythonpath] + [str(root / "site-packages")]
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
                "PYTHONPATH": os.pathsep.join(paths), "PYTHONNOUSERSITE": "1", **(env or {})}
    cmd = ["qemu-aarch64", "-L", str(root), str(root / "usr" / "bin" / "python3.11"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
