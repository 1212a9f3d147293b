#!/usr/bin/env bash
# Tools to build and run aarch64 artifacts on an x86-64 Debian machine:
#   1. the aarch64 GNU cross-compiler and qemu-user (apt),
#   2. an arm64 Python 3.11 sysroot with tvm + numpy, for running artifacts under qemu-aarch64.
# Idempotent; built in a temporary directory and renamed into place when complete.
# Sysroot: ${FQ_ARM64_SYSROOT:-$HOME/.cache/fq-tvm/arm64-sysroot}
set -euo pipefail

SYSROOT="${FQ_ARM64_SYSROOT:-$HOME/.cache/fq-tvm/arm64-sysroot}"
STAMP="tvm=0.27.0.post1 tvm-ffi=0.1.14.post1 python=3.11"
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 numpy ml_dtypes typing_extensions packaging psutil)
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libstdc++6 libgcc-s1 zlib1g
      libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 libtinfo6
      libreadline8 libdb5.3 libgdbm6 libnsl2 libtirpc3 libcrypt1)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
    echo "setup_arm64: installing g++-aarch64-linux-gnu qemu-user"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null
fi

if [ -f "$SYSROOT/.complete" ] && [ "$(cat "$SYSROOT/.complete")" = "$STAMP" ]; then
    echo "setup_arm64: sysroot ready at $SYSROOT"
    exit 0
fi

echo "setup_arm64: building the arm64 Python sysroot in $SYSROOT"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    as_root dpkg --add-architecture arm64
fi
as_root apt-get update -qq
mkdir -p "$(dirname "$SYSROOT")"
TMP="$(mktemp -d "$(dirname "$SYSROOT")/.arm64-sysroot.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
(cd "$TMP" && apt-get download -qq "${DEBS[@]/%/:arm64}" 2>/dev/null)
for deb in "$TMP"/*.deb; do dpkg -x "$deb" "$TMP/root"; done
PIP="${PIP:-python3 -m pip}"
$PIP download -q --disable-pip-version-check --platform manylinux_2_28_aarch64 --python-version 3.11 \
    --only-binary=:all: --no-deps -d "$TMP/wheels" "${WHEELS[@]}"
mkdir -p "$TMP/root/site-packages"
for whl in "$TMP"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$TMP/root/site-packages" >/dev/null; done
echo "$STAMP" > "$TMP/root/.complete"
rm -rf "$SYSROOT"
mv "$TMP/root" "$SYSROOT"
echo "setup_arm64: sysroot ready at $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
