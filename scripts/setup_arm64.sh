#!/usr/bin/env bash
# Tools to build and run aarch64 artifacts on an x86-64 Debian (bookworm) machine:
#   1. the aarch64 GNU cross-compiler and qemu-user (apt-get install, as root or through sudo),
#   2. an arm64 Python 3.11 sysroot with tvm + numpy, for running artifacts under qemu-aarch64:
#      Debian arm64 .debs (apt-get download, dpkg -x) + the aarch64 wheels (pip download).
# Idempotent: does nothing when both are there. The sysroot is built in a temporary directory next
# to it, checked (imports tvm under qemu) and renamed into place, so an interrupted run leaves
# nothing half-made. Concurrent runs wait for each other (flock).
#
#   bash scripts/setup_arm64.sh [--force]      # --force: rebuild the sysroot
#
# Sysroot:  ${FQ_ARM64_SYSROOT:-$HOME/.cache/fq-tvm/arm64-sysroot}: ~420 MB on disk; downloads
#           12 MB of .debs + 110 MB of wheels (the tools, when missing: ~70 MB more). ~20 s here.
# Host Python used for pip: $FQ_HOST_PYTHON, else python3 (needs pip; any version).
# Run:      qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.11 script.py
#           with PYTHONPATH=SYSROOT/site-packages (targets/qemu.py: run_python does this).
set -euo pipefail

HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
SYSROOT="${FQ_ARM64_SYSROOT:-$HOME/.cache/fq-tvm/arm64-sysroot}"
HOST_PY="${FQ_HOST_PYTHON:-python3}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

# What the sysroot is; written to SYSROOT/.complete. targets/qemu.py reads this literal line to tell
# a stale sysroot from a current one: change the pins here, and the next ensure_sysroot() rebuilds.
STAMP="fq-tvm arm64 sysroot 2: python3.11 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy==2.4.6 ml_dtypes==0.6.0 typing_extensions==4.16.0 packaging==26.3 psutil==7.2.2"
# import tvm needs tvm_ffi, numpy, ml_dtypes, typing_extensions; packaging and psutil are cheap
# extras (tvm.support.popen_pool, tvm.rpc.server, tvm.script.highlight import them).
read -r -a WHEELS <<< "${STAMP#*python3.11 }"
# python3.11-minimal + libpython3.11-stdlib and their shared-library dependencies (bookworm names).
# Left out on purpose: libnsl2/libtirpc3 (the deprecated `nis` module; they pull in Kerberos).
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib
      libc6 libstdc++6 libgcc-s1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5
      libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libdb5.3 libcrypt1)

say() { printf 'setup_arm64: [%3ds] %s\n' "$SECONDS" "$*"; }
die() { printf 'setup_arm64: error: %s\n' "$*" >&2; exit 1; }
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo -n "$@"
    else die "needs root for: $* (run this script as root, or install sudo)"; fi
}
sysroot_ok() { [ -f "$SYSROOT/.complete" ] && [ "$(head -n1 "$SYSROOT/.complete")" = "$STAMP" ] \
               && [ -x "$SYSROOT/usr/bin/python3.11" ]; }
tools_ok() { command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; }
has_arm64() { dpkg --print-foreign-architectures | grep -qx arm64; }

need_sysroot=1
if [ "$FORCE" = 0 ] && sysroot_ok; then need_sysroot=0; fi

# ---- 1. apt: cross compiler, qemu-user, and the arm64 package lists (one apt-get update for all)
updated=0
if ! tools_ok || { [ "$need_sysroot" = 1 ] && ! has_arm64; }; then
    if [ "$need_sysroot" = 1 ] && ! has_arm64; then
        say "dpkg --add-architecture arm64"
        as_root dpkg --add-architecture arm64
    fi
    say "apt-get update"
    as_root apt-get update -qq
    updated=1
fi
if ! tools_ok; then
    say "apt-get install g++-aarch64-linux-gnu qemu-user"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        g++-aarch64-linux-gnu qemu-user >/dev/null
    tools_ok || die "aarch64-linux-gnu-g++ or qemu-aarch64 still missing after apt-get install"
fi
say "tools: $(command -v aarch64-linux-gnu-g++), $(command -v qemu-aarch64)"

if [ "$need_sysroot" = 0 ]; then
    say "sysroot ready at $SYSROOT"
    exit 0
fi

# ---- 2. the sysroot, built in $TMP and renamed into place
PARENT="$(dirname "$SYSROOT")"
mkdir -p "$PARENT"
exec 9>"$SYSROOT.lock"
if command -v flock >/dev/null && ! flock -n 9; then
    say "another setup_arm64 is building $SYSROOT; waiting for it"
    flock 9
    if [ "$FORCE" = 0 ] && sysroot_ok; then say "sysroot ready at $SYSROOT"; exit 0; fi
fi
"$HOST_PY" -m pip --version >/dev/null 2>&1 \
    || die "$HOST_PY has no pip (set FQ_HOST_PYTHON to a Python with pip, e.g. the project's venv)"

say "building the arm64 Python sysroot in $SYSROOT"
NAME="$(basename "$SYSROOT")"
rm -rf "$PARENT/.$NAME.tmp."*          # left by a killed run (we hold the lock: none is in use)
TMP="$(mktemp -d "$PARENT/.$NAME.tmp.XXXXXX")"
PIP_PID=""
trap '[ -n "$PIP_PID" ] && kill "$PIP_PID" 2>/dev/null; rm -rf "$TMP"' EXIT
mkdir -p "$TMP/debs" "$TMP/wheels" "$TMP/root/site-packages"

# wheels download in the background while apt works
say "pip download (aarch64, cp311): ${WHEELS[*]}"
"$HOST_PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 \
    -d "$TMP/wheels" "${WHEELS[@]}" >"$TMP/pip.log" 2>&1 &
PIP_PID=$!

APT_DL=(apt-get download -q)
[ "$(id -u)" = 0 ] && APT_DL+=(-o APT::Sandbox::User=root)   # no "_apt cannot write" warning
if [ "$updated" = 0 ] && ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
    say "apt-get update (no arm64 package lists yet)"
    as_root apt-get update -qq
    updated=1
fi
say "apt-get download ${#DEBS[@]} arm64 packages"
if ! (cd "$TMP/debs" && "${APT_DL[@]}" "${DEBS[@]/%/:arm64}" >"$TMP/apt.log" 2>&1); then
    [ "$updated" = 1 ] && { cat "$TMP/apt.log" >&2; die "apt-get download failed (above)"; }
    say "apt-get download failed (stale package lists?); apt-get update and retry"
    as_root apt-get update -qq
    (cd "$TMP/debs" && "${APT_DL[@]}" "${DEBS[@]/%/:arm64}" >"$TMP/apt.log" 2>&1) \
        || { cat "$TMP/apt.log" >&2; die "apt-get download failed (above)"; }
fi
for deb in "$TMP"/debs/*.deb; do dpkg -x "$deb" "$TMP/root"; done
rm -rf "$TMP"/root/usr/share/{doc,man,info,lintian}
# dpkg -x keeps absolute symlinks, which would point into the host's / (the kernel resolves them,
# not qemu): make them relative to the sysroot (python3.11/sitecustomize.py -> /etc/python3.11/...).
find "$TMP/root" -type l -lname '/*' | while read -r link; do
    target="$(readlink "$link")"
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$TMP/root$target")" "$link"
done
[ -x "$TMP/root/usr/bin/python3.11" ] && [ -e "$TMP/root/lib/ld-linux-aarch64.so.1" ] \
    || die "the arm64 packages did not give usr/bin/python3.11 and lib/ld-linux-aarch64.so.1"
say "debs: $(ls "$TMP"/debs/*.deb | wc -l) packages, $(du -sm "$TMP/debs" | cut -f1) MB"

wait "$PIP_PID" || { PIP_PID=""; cat "$TMP/pip.log" >&2; die "pip download failed (above)"; }
PIP_PID=""
say "wheels: $(ls "$TMP"/wheels/*.whl | wc -l) files, $(du -sm "$TMP/wheels" | cut -f1) MB"
for whl in "$TMP"/wheels/*.whl; do "$HOST_PY" -m zipfile -e "$whl" "$TMP/root/site-packages"; done

# check it under qemu: the full tvm (compiler library too, not the silent runtime-only fallback),
# numpy, and the stdlib extension modules whose libraries come from the .debs. This first run also
# writes the __pycache__ of everything imported, so later runs start faster.
say "checking the sysroot under qemu-aarch64 (import tvm, tvm.relax, numpy)"
CHECK='
import importlib, sys
import numpy, tvm, tvm.base, tvm.relax
assert not tvm.base._RUNTIME_ONLY, "libtvm_compiler.so did not load"
for m in "ctypes ssl hashlib sqlite3 lzma bz2 zlib pyexpat decimal uuid readline curses dbm.ndbm".split():
    importlib.import_module(m)
print("python", sys.version.split()[0], "tvm", tvm.__version__, "numpy", numpy.__version__)
'
got="$(env -i PATH="$PATH" HOME="${HOME:-/tmp}" PYTHONPATH="$TMP/root/site-packages" PYTHONNOUSERSITE=1 \
       qemu-aarch64 -L "$TMP/root" "$TMP/root/usr/bin/python3.11" -c "$CHECK" 2>&1)" \
    || { printf '%s\n' "$got" >&2; die "the new sysroot does not work under qemu-aarch64 (above)"; }
say "qemu-aarch64: $(printf '%s\n' "$got" | tail -n1)"

{
    echo "$STAMP"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "debs:"; for deb in "$TMP"/debs/*.deb; do echo "  $(basename "$deb")"; done
    echo "wheels:"; for whl in "$TMP"/wheels/*.whl; do echo "  $(basename "$whl")"; done
} > "$TMP/root/.complete"

if [ -e "$SYSROOT" ]; then
    mv "$SYSROOT" "$TMP/old"        # removed with $TMP by the EXIT trap
fi
mv "$TMP/root" "$SYSROOT"
say "sysroot ready at $SYSROOT ($(du -sm "$SYSROOT" | cut -f1) MB on disk)"
