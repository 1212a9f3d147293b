"""The artifact: a directory holding the compiled library, device code and a JSON manifest.

Writing is atomic (a temporary sibling directory renamed into place). Loading verifies the format
version, every file's sha256 and the CPU architecture before touching the library. Only tvm and
numpy are imported here, so a bare board (or qemu) can load and run an artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import FqError

FORMAT = "fq-tvm-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staging_dir(out_dir: Path, force: bool):
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FqError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_manifest(directory: Path, manifest: dict, files: list[str]) -> dict:
    """Add checksums of `files` to `manifest` and write it; return the written manifest."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {name: sha256_file(directory / name) for name in sorted(files)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict:
    """Read and verify the manifest and every file it lists; raise FqError on any mismatch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FqError(f"{directory}: no such artifact directory")
    path = directory / MANIFEST
    if not path.exists():
        raise FqError(f"{directory}: not an fq-tvm artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FqError(f"{path}: corrupt manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise FqError(f"{path}: not an fq-tvm manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FqError(f"{path}: artifact format version {manifest.get('format_version')} is not "
                      f"supported (this fq-tvm reads version {FORMAT_VERSION}); recompile the model")
    for name, expected in manifest.get("files", {}).items():
        file = directory / name
        if not file.exists():
            raise FqError(f"{directory}: file '{name}' listed in the manifest is missing")
        if sha256_file(file) != expected:
            raise FqError(f"{directory}: checksum mismatch for '{name}' (file changed or corrupt)")
    return manifest


class Model:
    """A loaded artifact: `run({input_name: array}) -> {output_name: array}`."""

    def __init__(self, directory: Path, manifest: dict, vm, device):
        self.directory = directory
        self.manifest = manifest
        self._vm = vm
        self._device = device
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]

    def run(self, inputs: dict) -> dict:
        import tvm

        names = [spec["name"] for spec in self.inputs]
        extra = set(inputs) - set(names)
        missing = [name for name in names if name not in inputs]
        if extra or missing:
            raise FqError(f"inputs do not match the model: missing {missing}, unexpected "
                          f"{sorted(extra)}; the model takes {names}")
        args = [tvm.runtime.tensor(_check_input(spec, inputs[spec["name"]]), self._device)
                for spec in self.inputs]
        result = self._vm["main"](*args)
        values = [result] if hasattr(result, "numpy") else list(result)
        return {spec["name"]: value.numpy() for spec, value in zip(self.outputs, values)}

    __call__ = run


def _check_input(spec: dict, value) -> np.ndarray:
    name = spec["name"]
    value = np.asarray(value)
    if value.dtype != np.dtype(spec["dtype"]):
        if not np.can_cast(value.dtype, spec["dtype"], casting="same_kind"):
            raise FqError(f"input '{name}' has dtype {value.dtype}, expected {spec['dtype']}")
        value = value.astype(spec["dtype"])
    shape = spec["shape"]
    if value.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, value.shape)):
        raise FqError(f"input '{name}' has shape {list(value.shape)}, expected {shape}")
    return np.ascontiguousarray(value)


def load(path, device_id: int = 0) -> Model:
    """Verify and load an artifact built for this machine."""
    directory = Path(path)
    manifest = read_manifest(directory)
    target = manifest["target"]
    here = platform.machine()
    if target["arch"] != here:
        raise FqError(f"{directory}: built for {target['arch']} (target '{target['name']}'), cannot run "
                      f"on this {here} machine; copy it to a matching board (or run it under qemu)")
    import tvm
    from tvm.runtime.vm import VirtualMachine  # runtime only: works without TVM's compiler library

    device = tvm.cpu(device_id)
    if target["device"] == "cuda":
        from .targets.cuda import install_precompiled, load_runtime

        load_runtime()
        device = tvm.cuda(device_id)
        if not device.exist:
            raise FqError(f"{directory}: built for CUDA ({target['tvm'].get('arch')}), but no CUDA GPU is visible")
        install_precompiled(directory)
    lib = tvm.runtime.load_module(str(directory / manifest["library"]))
    return Model(directory, manifest, VirtualMachine(lib, device), device)
