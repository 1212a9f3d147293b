"""Run Python under qemu-aarch64 with the arm64 sysroot built by scripts/setup_arm64.sh: how the
tests (and users without a board) run aarch64 artifacts on an x86-64 machine. Stdlib only.

    from fq_tvm.targets import qemu
    qemu.check_cross_compiler()                       # aarch64-linux-gnu-g++ is there (for export)
    done = qemu.run_python(["script.py", "arg"], pythonpath=[repo])   # builds the sysroot if needed
    done.returncode, done.stdout, done.stderr

One run costs ~5 s of `import tvm` under emulation plus the model's own (emulated) time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CROSS_CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
PYTHON = "python3.11"  # the sysroot's Python: Debian bookworm's, the wheels are cp311
SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "setup_arm64.sh"
SETUP_CMD = f"bash {SETUP_SCRIPT}"
_MARKER = ".complete"  # first line: the STAMP line of setup_arm64.sh the sysroot was built with


def sysroot_path() -> Path:
    """$FQ_ARM64_SYSROOT, else ~/.cache/fq-tvm/arm64-sysroot (the setup script's default too)."""
    env = os.environ.get("FQ_ARM64_SYSROOT")
    return Path(env) if env else Path.home() / ".cache" / "fq-tvm" / "arm64-sysroot"


def site_packages() -> Path:
    return sysroot_path() / "site-packages"


def cross_compiler() -> str:
    """The C++ cross compiler aarch64 libraries are linked with (tvm.support.cc.cross_compiler)."""
    return CROSS_CXX


def check_cross_compiler() -> str:
    """Full path of aarch64-linux-gnu-g++; RuntimeError saying what to install when missing."""
    found = shutil.which(CROSS_CXX)
    if found is None:
        raise RuntimeError(f"{CROSS_CXX} not found: apt-get install g++-aarch64-linux-gnu "
                           f"(or run {SETUP_CMD}, which also sets up qemu)")
    return found


def check_qemu() -> str:
    """Full path of qemu-aarch64; RuntimeError saying what to install when missing."""
    found = shutil.which(QEMU)
    if found is None:
        raise RuntimeError(f"{QEMU} not found: apt-get install qemu-user (or run {SETUP_CMD})")
    return found


def _expected_stamp() -> str | None:
    """The STAMP line of the setup script next to this checkout (None when it is not there)."""
    try:
        text = SETUP_SCRIPT.read_text()
    except OSError:
        return None
    match = re.search(r'^STAMP="([^"$`]*)"', text, re.M)
    return match.group(1) if match else None


def is_ready() -> bool:
    """qemu-aarch64 is installed and the sysroot is complete and current (the script's pins)."""
    root = sysroot_path()
    try:
        first = (root / _MARKER).read_text().splitlines()[0]
    except (OSError, IndexError):
        return False
    expected = _expected_stamp()
    return ((expected is None or first == expected) and (root / "usr" / "bin" / PYTHON).exists()
            and shutil.which(QEMU) is not None)


def ensure_sysroot(*, with_cross_compiler: bool = False) -> Path:
    """The sysroot, built first by scripts/setup_arm64.sh when missing or stale (~20 s to a few
    minutes, ~120 MB download, ~420 MB on disk; needs root or sudo for apt). with_cross_compiler:
    also make sure aarch64-linux-gnu-g++ is installed (the same script installs it). RuntimeError
    (one line, with the command to run by hand) when that fails."""
    def ok() -> bool:
        return is_ready() and (not with_cross_compiler or shutil.which(CROSS_CXX) is not None)

    if ok():
        return sysroot_path()
    custom = os.environ.get("FQ_ARM64_SYSROOT")
    how = f"run: {f'FQ_ARM64_SYSROOT={custom} ' if custom else ''}{SETUP_CMD}"
    if not SETUP_SCRIPT.exists():
        raise RuntimeError(f"the arm64 sysroot {sysroot_path()} is missing and {SETUP_SCRIPT} is not "
                           f"there; from an fq-tvm checkout, {how}")
    env = dict(os.environ)
    if "FQ_HOST_PYTHON" not in env and importlib.util.find_spec("pip") is not None:
        env["FQ_HOST_PYTHON"] = sys.executable  # this Python's pip does the `pip download`
    print(f"fq_tvm.targets.qemu: building the arm64 sysroot: {SETUP_CMD}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(["bash", str(SETUP_SCRIPT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # progress lines go on to stderr as they come
        sys.stderr.write(line)
        lines.append(line.rstrip())
    proc.wait()
    if proc.returncode != 0 or not ok():
        last = next((ln for ln in reversed(lines) if ln.strip()), "no output")
        raise RuntimeError(f"building the arm64 sysroot failed ({last}); {how}")
    return sysroot_path()


def run_python(args: list[str], *, pythonpath: list[str] = (), env: dict | None = None,
               timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
    """`python3.11 *args` from the arm64 sysroot under qemu-aarch64; output captured as text.

    PYTHONPATH is `pythonpath` (e.g. the repo root, for fq_tvm) then the sysroot's site-packages.
    The child gets a small environment (PATH, HOME, LANG, TMPDIR) plus `env`; a `PYTHONPATH` in
    `env` is put in front. Does not raise on a non-zero exit: check .returncode (and .stderr).
    subprocess.TimeoutExpired after `timeout` seconds."""
    check_qemu()
    root = ensure_sysroot()
    extra = dict(env or {})
    paths = [str(p) for p in pythonpath]
    if extra.get("PYTHONPATH"):
        paths.insert(0, extra.pop("PYTHONPATH"))
    paths.append(str(root / "site-packages"))
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    child = {"PATH": "/usr/bin:/bin", **{k: os.environ[k] for k in keep if k in os.environ}}
    child.update({"PYTHONNOUSERSITE": "1", **extra, "PYTHONPATH": os.pathsep.join(paths)})
    cmd = [QEMU, "-L", str(root), str(root / "usr" / "bin" / PYTHON), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=child, timeout=timeout, cwd=cwd)
