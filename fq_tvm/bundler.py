"""fq-bundle: an artifact, TVM's runtime libraries and a C++ runner in one tarball that runs the
model on a board without Python. (This module is not bundle.py: importing it would replace the
function `fq_tvm.bundle` with the module.)

    fq_tvm.bundle("model.rpi5", "model-rpi5.tar.gz")     # = fq-bundle model.rpi5 -o model-rpi5.tar.gz

The tarball holds one directory (named as the tarball without .tar.gz):

    run.sh              checks the machine (architecture, glibc, libstdc++, checksums), then runs
                        bin/fq-runner model "$@" with LD_LIBRARY_PATH=lib
    README.txt          how to run it, what the board needs
    bundle.json         what was packed: versions, target, inputs/outputs, the glibc / libstdc++
                        versions every binary requires (from its ELF .gnu.version_r)
    SHA256SUMS          of bin/, lib/ and bundle.json (run.sh checks them when sha256sum exists)
    bin/fq-runner       fq_tvm/runner/fq_runner.cc, compiled for the artifact's architecture
    lib/                libtvm_runtime.so, libtvm_ffi.so of the same apache-tvm wheels
    model/              the artifact: manifest.json and the files it lists (verified by the runner)

Runtime libraries: for an artifact of this machine's architecture, the installed wheels'; for
aarch64 on another machine, the aarch64 wheels in the arm64 sysroot of scripts/setup_arm64.sh.
The runner is compiled with g++ (aarch64-linux-gnu-g++ for aarch64) against tvm-ffi's headers and
cached under ~/.cache/fq-tvm/runner by a hash of its source, compiler and libraries.

The tarball is written to a temporary file beside the output and renamed when complete.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import cache_dir
from .artifact import MANIFEST, _signals_exit, build_time, open_regular, read_manifest
from .errors import FqError

FORMAT = "fq-tvm-bundle"
FORMAT_VERSION = 1
RUNNER_SOURCE = Path(__file__).resolve().parent / "runner" / "fq_runner.cc"
RUNNER = "fq-runner"
LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so")  # libtvm_runtime's RUNPATH $ORIGIN finds libtvm_ffi
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++"}
SETUP_CMD = "bash scripts/setup_arm64.sh"
SUFFIXES = (".tar.gz", ".tgz")
_MACHINES = {62: "x86_64", 183: "aarch64", 3: "i386", 40: "arm"}  # ELF e_machine


# ---- ELF: what a binary needs from the system ----------------------------------------------------

def elf_requirements(path) -> dict:
    """{"machine", "needed": [DT_NEEDED libraries], "versions": {library: [GLIBC_2.17, ...]}} of an
    ELF shared library or executable, read from its section headers (.dynamic and .gnu.version_r,
    what `objdump -p` prints under "Version References"). FqError when it is not ELF."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise FqError(f"{path}: not an ELF file")
    wide, end = data[4] == 2, "<" if data[5] == 1 else ">"

    def unpack(fmt, offset):
        return struct.unpack_from(end + fmt, data, offset)

    machine = unpack("H", 18)[0]
    if wide:
        shoff, = unpack("Q", 0x28)
        shentsize, shnum, shstrndx = unpack("HHH", 0x3A)
        fields = "IIQQQQIIQQ"
    else:
        shoff, = unpack("I", 0x20)
        shentsize, shnum, shstrndx = unpack("HHH", 0x2E)
        fields = "IIIIIIIIII"
    sections = []  # (type, offset, size, link, info)
    try:
        for i in range(shnum):
            _, sh_type, _, _, offset, size, link, info, _, _ = unpack(fields, shoff + i * shentsize)
            sections.append((sh_type, offset, size, link, info))
    except struct.error:
        raise FqError(f"{path}: truncated ELF file") from None

    def string(section, offset):
        start = sections[section][1] + offset
        return data[start:data.index(b"\0", start)].decode("ascii", "replace")

    needed, versions = [], {}
    for sh_type, offset, size, link, info in sections:
        if sh_type == 6:  # SHT_DYNAMIC: DT_NEEDED entries
            entry, fmt = (16, "qQ") if wide else (8, "iI")
            for at in range(offset, offset + size, entry):
                tag, value = unpack(fmt, at)
                if tag == 0:
                    break
                if tag == 1:
                    needed.append(string(link, value))
        elif sh_type == 0x6FFFFFFE:  # SHT_GNU_verneed: Verneed entries, each with Vernaux entries
            at = offset
            for _ in range(info):
                _, count, file_name, aux, next_need = unpack("HHIII", at)
                names, aux_at = versions.setdefault(string(link, file_name), []), at + aux
                for _ in range(count):
                    _, _, _, name, next_aux = unpack("IHHII", aux_at)
                    names.append(string(link, name))
                    if not next_aux:
                        break
                    aux_at += next_aux
                if not next_need:
                    break
                at += next_need
    return {"machine": _MACHINES.get(machine, f"e_machine {machine}"), "needed": needed,
            "versions": {lib: sorted(set(v), key=_version_key) for lib, v in versions.items()}}


def _version_key(name: str):
    """GLIBC_2.17 -> ("GLIBC", (2, 17)); names without a number (GLIBC_PRIVATE) sort first."""
    prefix, _, number = name.partition("_")
    parts = tuple(int(p) for p in number.split(".")) if re.fullmatch(r"\d+(\.\d+)*", number) else ()
    return prefix, parts


def max_version(requirements: dict, prefix: str) -> tuple[str | None, list[str]]:
    """The highest PREFIX_x.y version any of `requirements` ({file: elf_requirements(file)}) needs,
    as "x.y", and the files that need exactly it; (None, []) when none needs PREFIX."""
    best, where = (), []
    for file, req in requirements.items():
        for names in req["versions"].values():
            for name in names:
                tag, parts = _version_key(name)
                if tag != prefix or not parts:
                    continue
                if parts > best:
                    best, where = parts, [file]
                elif parts == best and file not in where:
                    where.append(file)
    return (".".join(map(str, best)) if best else None), where


def version_at_least(have: str, need: str) -> bool:
    """Dotted versions compared numerically: 2.36 >= 2.34, 2.4 < 2.17 (what run.sh does in sh)."""
    def parts(text):
        return [int(p) for p in re.findall(r"\d+", text)]

    a, b = parts(have), parts(need)
    width = max(len(a), len(b))
    return a + [0] * (width - len(a)) >= b + [0] * (width - len(b))


# ---- where the pieces come from ---------------------------------------------------------------------

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FqError(f"the Python package {name} is not installed; pip install -e . installs it")
    return Path(list(spec.submodule_search_locations)[0])


def _wheel_versions(site: Path | None) -> dict:
    """apache-tvm and apache-tvm-ffi versions: of the installed wheels, or in the sysroot `site`."""
    out = {}
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm_ffi")):
        if site is None:
            try:
                out[key] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                out[key] = None
        else:
            found = sorted(site.glob(f"{dist.replace('-', '_')}-*.dist-info"))
            out[key] = found[0].name[len(dist) + 1:-len(".dist-info")] if found else None
    return out


def runtime_source(arch: str) -> dict:
    """Where the runtime libraries, headers and compiler for `arch` come from; FqError (one line,
    with the command to run) when something is missing."""
    here = platform.machine()
    include = _package_dir("tvm_ffi") / "include"
    host = _wheel_versions(None)
    if arch == here:
        tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
        where, versions = "the installed apache-tvm wheels", host
        cxx = os.environ.get("CXX") or "g++"
        missing_cxx = f"{cxx} not found: install a C++ compiler (apt-get install g++) to build the runner"
    elif arch in CROSS_CXX:
        from .targets import qemu

        site = qemu.site_packages()
        tvm_dir, ffi_dir = site / "tvm", site / "tvm_ffi"
        where, versions = f"the arm64 sysroot {qemu.sysroot_path()}", _wheel_versions(site)
        cxx = CROSS_CXX[arch]
        missing_cxx = f"{cxx} (the {arch} cross-compiler) not found: run {SETUP_CMD}"
    else:
        raise FqError(f"fq-bundle packs x86_64 and aarch64 artifacts (built here: {here}); "
                      f"this one is for {arch}")
    if shutil.which(cxx) is None:
        raise FqError(missing_cxx)
    libs = {"libtvm_runtime.so": tvm_dir / "lib" / "libtvm_runtime.so",
            "libtvm_ffi.so": ffi_dir / "lib" / "libtvm_ffi.so"}
    absent = [str(p) for p in libs.values() if not p.is_file()]
    if absent:
        raise FqError(f"the {arch} TVM runtime libraries are not in {where} ({absent[0]} is missing)"
                      + (f"; run {SETUP_CMD}" if arch != here else "; reinstall apache-tvm"))
    if versions != host:
        raise FqError(f"{where} has apache-tvm {versions['tvm']} / apache-tvm-ffi {versions['tvm_ffi']}, this "
                      f"Python has {host['tvm']} / {host['tvm_ffi']}; run {SETUP_CMD} to match them")
    if not (include / "tvm" / "ffi" / "function.h").is_file():
        raise FqError(f"tvm-ffi's C++ headers are not in {include}; reinstall apache-tvm-ffi")
    for name, path in libs.items():
        machine = elf_requirements(path)["machine"]
        if machine != arch:
            raise FqError(f"{path} is a {machine} library, not {arch}; run {SETUP_CMD}")
    return {"arch": arch, "cxx": cxx, "include": include, "libs": libs, "where": where, "versions": versions}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_runner(source: dict, quiet: bool = True) -> Path:
    """bin/fq-runner for source["arch"], compiled once per source / compiler / libraries and cached."""
    cxx = source["cxx"]
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FqError(f"{cxx} does not run: {err}") from None
    lib_dirs = sorted({str(p.parent) for p in source["libs"].values()})
    flags = ["-std=c++17", "-O2", "-fPIE", "-pie", f"-I{source['include']}", *(f"-L{d}" for d in lib_dirs),
             *(f"-Wl,-rpath-link,{d}" for d in lib_dirs), "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi",
             "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN/../lib"]
    key = hashlib.sha256("\0".join([RUNNER_SOURCE.read_text(), version, *flags,
                                    *(_sha256(p) for p in source["libs"].values())]).encode()).hexdigest()[:24]
    cached = cache_dir() / "runner" / f"{source['arch']}-{key}" / RUNNER
    if cached.is_file():
        return cached
    if not quiet:
        print(f"fq-bundle: compiling the runner with {cxx}", file=sys.stderr, flush=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        binary = Path(tmp) / RUNNER
        done = subprocess.run([cxx, str(RUNNER_SOURCE), "-o", str(binary), *flags],
                              capture_output=True, text=True)
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["?"]
            raise FqError(f"compiling the runner with {cxx} failed: {errors[0].strip()}")
        os.replace(binary, cached)
    return cached


# ---- the bundle ------------------------------------------------------------------------------------

def _check_out(out, artifact: Path, force: bool) -> Path:
    if str(out) == "":
        raise FqError("the output path is empty; name a new .tar.gz, e.g. -o model-rpi5.tar.gz")
    out = Path(out)
    if not out.name.endswith(SUFFIXES) or out.name in SUFFIXES:
        raise FqError(f"output '{out}' must be a file name ending in .tar.gz or .tgz, e.g. -o model-rpi5.tar.gz")
    if out.is_dir() and not out.is_symlink():
        raise FqError(f"{out} is a directory; name a new .tar.gz file")
    resolved = out.resolve()
    if resolved == artifact.resolve() or artifact.resolve() in resolved.parents:
        raise FqError(f"output '{out}' is inside the artifact {artifact}; write the bundle elsewhere")
    if os.path.lexists(out):
        if not force:
            raise FqError(f"{out} already exists; pass --force (force=True) to replace it")
        if not out.is_file() or out.is_symlink():
            raise FqError(f"{out} exists and is not a regular file; --force replaces only a file")
    blocking = next((p for p in reversed(out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FqError(f"cannot create {out}: {blocking} is not a directory")
    return out


class _HashingReader:
    """Reads a file into the tarball while hashing it: what is packed is what was verified."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size=-1):
        chunk = self.handle.read(size)
        self.digest.update(chunk)
        return chunk


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644, mtime: float = 0) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, mtime
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
    tar.addfile(info)


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mode: int, mtime: float,
              expected: str | None = None) -> str:
    with open_regular(path) as handle:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = os.fstat(handle.fileno()).st_size, mode, mtime
        reader = _HashingReader(handle)
        tar.addfile(info, reader)
    digest = reader.digest.hexdigest()
    if expected is not None and digest != expected:
        raise FqError(f"{path} changed while it was packed (checksum mismatch); run fq-bundle again")
    return digest


def bundle(artifact, out, *, force: bool = False, quiet: bool = False) -> dict:
    """Pack the CPU artifact directory `artifact` with TVM's runtime libraries for its architecture
    and the C++ runner into the tarball `out` (.tar.gz). Returns a summary dict: path, arch,
    requires (glibc, glibcxx, per-binary versions), bytes. FqError on any problem; nothing is
    left behind then."""
    directory = Path(artifact)
    manifest = read_manifest(directory)  # not an artifact / tampered: FqError
    target = manifest["target"]
    if target["device"] != "cpu":
        raise FqError(f"{directory}: built for {target['device']} (target '{target['name']}'); fq-bundle packs "
                      f"CPU artifacts (x86_64, aarch64) only")
    out = _check_out(out, directory, force)
    created = build_time()  # a bad SOURCE_DATE_EPOCH fails before any work
    arch = target["arch"]
    source = runtime_source(arch)
    built_with = manifest.get("versions", {}).get("tvm")
    if built_with and built_with != source["versions"]["tvm"]:
        raise FqError(f"{directory} was built with TVM {built_with}; the runtime libraries are TVM "
                      f"{source['versions']['tvm']}: recompile the model with this fq-tvm")
    runner = build_runner(source, quiet=quiet)

    binaries = {f"bin/{RUNNER}": runner, **{f"lib/{name}": path for name, path in source["libs"].items()}}
    binaries.update({f"model/{name}": directory / name for name in manifest["files"] if _is_elf(directory / name)})
    requires = {name: elf_requirements(path) for name, path in binaries.items()}
    wrong = [n for n, r in requires.items() if r["machine"] != arch]
    if wrong:
        raise FqError(f"{wrong[0]} is built for {requires[wrong[0]]['machine']}, the artifact for {arch}")
    glibc, glibc_from = max_version(requires, "GLIBC")
    glibcxx, glibcxx_from = max_version(requires, "GLIBCXX")
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": created.isoformat(timespec="seconds"),
        "arch": arch, "target": target["name"], "scheme": manifest.get("scheme", {}).get("name"),
        "versions": {"fq_tvm": _fq_version(), **source["versions"]},
        "requires": {"glibc": glibc, "glibc_from": glibc_from, "glibcxx": glibcxx, "glibcxx_from": glibcxx_from,
                     "binaries": requires},
        "inputs": manifest["inputs"], "outputs": manifest["outputs"],
    }
    top = out.name[:-len(next(s for s in SUFFIXES if out.name.endswith(s)))]
    result = _write(out, top, directory, manifest, runner, source, info, created.timestamp())
    summary = {"path": str(out), "arch": arch, "target": target["name"], "requires": info["requires"],
               "bytes": out.stat().st_size, "files": result}
    if not quiet:
        print(f"fq-bundle: {out} ({summary['bytes'] / 1e6:.1f} MB, {arch}, target {target['name']}): "
              f"needs glibc >= {glibc} ({', '.join(glibc_from)})"
              + (f" and libstdc++ with GLIBCXX_{glibcxx} ({', '.join(glibcxx_from)})" if glibcxx else ""),
              file=sys.stderr)
    return summary


def _is_elf(path: Path) -> bool:
    with open_regular(path) as handle:
        return handle.read(4) == b"\x7fELF"


def _fq_version() -> str:
    from . import __version__

    return __version__


def _write(out: Path, top: str, directory: Path, manifest: dict, runner: Path, source: dict, info: dict,
           now: float) -> list:
    out.parent.mkdir(parents=True, exist_ok=True)
    with _signals_exit():
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        try:
            names = []
            with os.fdopen(fd, "wb") as raw:  # gzip's own time stamp too: SOURCE_DATE_EPOCH gives one bundle
                with (gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=int(now)) as gz,
                      tarfile.open(fileobj=gz, mode="w") as tar):
                    sums = {}
                    for name in ("", "/bin", "/lib", "/model"):
                        _add_dir(tar, top + name, now)
                    sums[f"bin/{RUNNER}"] = _add_file(tar, f"{top}/bin/{RUNNER}", runner, 0o755, now)
                    for name, path in source["libs"].items():
                        sums[f"lib/{name}"] = _add_file(tar, f"{top}/lib/{name}", path, 0o755, now)
                    for name, digest in sorted(manifest["files"].items()):
                        mode = 0o755 if name == manifest["library"] else 0o644
                        _add_file(tar, f"{top}/model/{name}", directory / name, mode, now, expected=digest)
                    _add_file(tar, f"{top}/model/{MANIFEST}", directory / MANIFEST, 0o644, now)
                    bundle_json = (json.dumps(info, indent=2) + "\n").encode()
                    _add_bytes(tar, f"{top}/bundle.json", bundle_json, mtime=now)
                    sums["bundle.json"] = hashlib.sha256(bundle_json).hexdigest()
                    _add_bytes(tar, f"{top}/SHA256SUMS",
                               "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())).encode(), mtime=now)
                    _add_bytes(tar, f"{top}/run.sh", run_sh(info).encode(), 0o755, now)
                    _add_bytes(tar, f"{top}/README.txt", readme(top, info).encode(), mtime=now)
                    names = tar.getnames()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return names


# ---- the files written into the bundle -----------------------------------------------------------

RUN_SH = r"""#!/bin/sh
# fq-tvm bundle: runs the model with bin/fq-runner, no Python needed. See README.txt.
#   ./run.sh -i inputs.npz -o outputs [--repeat N] [--warmup N]
# Before running it checks this machine: architecture, glibc, libstdc++, the bundle's checksums.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ARCH=@ARCH@
NEED_GLIBC=@GLIBC@
NEED_GLIBCXX=@GLIBCXX@

die() { echo "fq-bundle: $*" >&2; exit 1; }

# ver_ge A B: dotted version A >= B, compared number by number
ver_ge() {
    a=$1; b=$2
    while [ -n "$a$b" ]; do
        x=${a%%.*}; y=${b%%.*}
        if [ "$a" = "$x" ]; then a=; else a=${a#*.}; fi
        if [ "$b" = "$y" ]; then b=; else b=${b#*.}; fi
        x=${x:-0}; y=${y:-0}
        [ "$x" -gt "$y" ] && return 0
        [ "$x" -lt "$y" ] && return 1
    done
    return 0
}

# glibc_version: this machine's glibc, e.g. 2.36 (empty when it cannot tell)
glibc_version() {
    v=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc \([0-9][0-9.]*\).*/\1/p')
    [ -n "$v" ] || v=$(ldd --version 2>/dev/null | sed -n '1s/.* \([0-9][0-9]*\.[0-9][0-9.]*\)$/\1/p')
    echo "$v"
}

machine=$(uname -m)
[ "$machine" = "$ARCH" ] || die "this bundle is for $ARCH, this machine is $machine;" \
    "build one for it (fq-compile --target ..., then fq-bundle)"

if [ -n "$NEED_GLIBC" ]; then
    have=$(glibc_version)
    [ -n "$have" ] || die "cannot tell this machine's glibc version (getconf GNU_LIBC_VERSION, ldd --version);" \
        "the bundle needs glibc >= $NEED_GLIBC"
    ver_ge "$have" "$NEED_GLIBC" || die "this machine has glibc $have, older than the $NEED_GLIBC" \
        "the bundled runner and TVM libraries need; use a newer OS@HINT_GLIBC@"
fi

if [ -n "$NEED_GLIBCXX" ]; then
    lib=
    for d in /usr/lib/$ARCH-linux-gnu /lib/$ARCH-linux-gnu /usr/lib64 /lib64 /usr/lib /lib; do
        if [ -f "$d/libstdc++.so.6" ]; then lib=$d/libstdc++.so.6; break; fi
    done
    [ -n "$lib" ] || die "libstdc++.so.6 not found; install it (apt-get install libstdc++6)"
    grep -q "GLIBCXX_$NEED_GLIBCXX" "$lib" || die "this machine's libstdc++ ($lib) lacks GLIBCXX_$NEED_GLIBCXX," \
        "which the bundled runner and TVM libraries need; use a newer OS@HINT_GLIBCXX@"
fi

if command -v sha256sum >/dev/null 2>&1; then
    bad=$(cd "$HERE" && sha256sum -c SHA256SUMS 2>/dev/null | grep -v ': OK$' | head -n 1)
    [ -z "$bad" ] || die "bundle file changed or corrupt: $bad"
fi

LD_LIBRARY_PATH="$HERE/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$HERE/bin/fq-runner" "$HERE/model" "$@"
"""


def run_sh(info: dict) -> str:
    req = info["requires"]
    pi = info["arch"] == "aarch64"
    return (RUN_SH.replace("@ARCH@", info["arch"]).replace("@GLIBC@", req["glibc"] or "")
            .replace("@GLIBCXX@", req["glibcxx"] or "")
            .replace("@HINT_GLIBC@", " (Raspberry Pi OS bookworm has 2.36)" if pi else "")
            .replace("@HINT_GLIBCXX@", " (Raspberry Pi OS bookworm has it)" if pi else ""))


def _dims(spec: dict) -> str:
    return "[" + ", ".join(str(d) for d in spec["shape"]) + "]"


def readme(top: str, info: dict) -> str:
    req = info["requires"]
    inputs = "\n".join(f"    {s['name']}: {s['dtype']} {_dims(s)}" for s in info["inputs"])
    outputs = "\n".join(f"    {s['name']}: {s['dtype']} {_dims(s)}" for s in info["outputs"])
    first = info["inputs"][0]["name"]
    cxx = f" and libstdc++ with GLIBCXX_{req['glibcxx']}" if req["glibcxx"] else ""
    board = "\n(a Raspberry Pi 4 or 5: the 64-bit Raspberry Pi OS, bookworm)" if info["arch"] == "aarch64" else ""
    examples = [(f"tar xzf {top}.tar.gz && cd {top}", ""),
                ("./run.sh -i inputs.npz -o outputs --repeat 20", "# an .npz keyed by input name"),
                (f"./run.sh {first}=x.npy -o outputs", "# one input from a .npy file"),
                ("./run.sh -i inputs_dir -o outputs", "# a directory of NAME.npy files")]
    width = max(len(cmd) for cmd, _ in examples) + 2
    run_lines = "\n".join(f"    {cmd:<{width}}{note}".rstrip() for cmd, note in examples)
    versions = info["versions"]
    return f"""{top}: an fq-tvm model that runs without Python
target {info['target']} ({info['arch']}), scheme {info['scheme']}; fq-tvm {versions['fq_tvm']}, TVM {versions['tvm']}

Needs: Linux on {info['arch']} with glibc >= {req['glibc']}{cxx}{board}.
Nothing else: TVM's runtime libraries are in lib/, the runner in bin/. run.sh checks the machine
first and says in one line what is missing.

Run:
{run_lines}

It verifies the sha256 of every model file against model/manifest.json before loading, reads the
inputs, runs the model, writes each output as outputs/NAME.npy, and prints the latency: a warm-up
(--warmup N, default 2), then --repeat N timed runs (default 10), median / min / max in ms.
Threads: TVM_NUM_THREADS=N ./run.sh ... (default: one per physical core).

Inputs (an .npz written by np.savez, not np.savez_compressed; or .npy files), by name:
{inputs}
Outputs:
{outputs}
A named dim (e.g. batch) takes any size, the same across the inputs. dtypes must match exactly.

Make inputs with numpy anywhere and copy them over, e.g.
    python3 -c "import numpy as np; np.savez('inputs.npz', {first}=np.zeros(..., np.{info['inputs'][0]['dtype']}))"

Files: run.sh, bin/fq-runner, lib/ (libtvm_runtime.so, libtvm_ffi.so), model/ (the artifact),
bundle.json (what was packed and what each binary needs), SHA256SUMS (of bin/, lib/ and
bundle.json; run.sh checks it when sha256sum is installed).
"""
