"""The artifact: a directory holding the compiled library, device code and a JSON manifest.

Writing is atomic (a temporary sibling directory renamed into place); `--force` replaces only an
existing artifact, never the input model, a directory holding it, the current directory or
anything else. Loading trusts nothing: the manifest is a bounded, regular, validated JSON file,
and the loader opens only regular files inside the directory that the manifest lists with a
sha256 it has just verified. Only tvm and numpy are imported here, so a bare board (or qemu) can
load and run an artifact.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np

from .errors import FqError

FORMAT = "fq-tvm-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 8 << 20  # a 1000-layer model's manifest is about 0.3 MB
DEVICES = ("cpu", "cuda")
CUDA_FILES = ("device.cu", "device.cubin", "device.ptx")  # what targets.cuda.install_precompiled reads
_SHA256 = re.compile(r"[0-9a-f]{64}")


def build_time() -> datetime.datetime:
    """Now, in UTC, or `SOURCE_DATE_EPOCH` (reproducible-builds.org) where it is set: manifests
    and bundles then depend on their inputs alone (the libraries do anyway)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    try:
        if not epoch.strip().isdigit():
            raise ValueError
        return datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise FqError(f"SOURCE_DATE_EPOCH={epoch!r} is not a count of seconds since 1970") from None


def sha256_file(path: Path) -> str:
    with open_regular(path) as handle:
        return _sha256(handle)


def sha256_input(path: Path) -> str:
    """sha256 of a user's input file (a model, its tokenizer), symbolic links followed: a model in
    the Hugging Face cache is one. (Artifact files are read with `sha256_file`, which refuses links.)"""
    with open(path, "rb") as handle:
        return _sha256(handle)


def _sha256(handle) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def open_regular(path: Path):
    """Open `path` for reading only if it is a regular file and not a symbolic link (no FIFO,
    device or link out of the directory); FqError otherwise. Never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise FqError(f"{path}: is a symbolic link; an artifact holds regular files only") from None
        raise FqError(f"{path}: cannot open ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FqError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int) -> bytes:
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FqError(f"{path}: larger than {limit} bytes")
    return data


# ---- writing: the rules of --force and the staging directory ----

def check_output(out_dir, force: bool, keep=()) -> Path:
    """The output directory, or FqError if writing it could lose data. `keep`: input files
    (model, calibration data) that must survive. An existing path is replaced only when it is an
    fq-tvm artifact and `force` is set."""
    out_dir = _check_placement(out_dir, keep)
    if not os.path.lexists(out_dir):
        return out_dir
    if out_dir.is_symlink() or not is_artifact(out_dir):
        raise FqError(f"{out_dir} exists and is not an fq-tvm artifact; --force replaces only artifacts: "
                      f"choose another output or remove it yourself")
    if not force:
        raise FqError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    return out_dir


def _check_placement(out_dir, keep) -> Path:
    """Not empty, '.', '..', the current directory or above, an input or above, or below a file."""
    if str(out_dir) == "":
        raise FqError("the output path is empty; name a new directory, e.g. -o model.host")
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):
        raise FqError(f"output '{out_dir}' is not a new directory name; give one, e.g. -o model.host")
    target = out_dir.resolve()
    if _is_or_holds(target, Path.cwd()):
        raise FqError(f"output '{out_dir}' is the current directory or one above it; name a new directory")
    for path in keep:
        if _is_or_holds(target, Path(path)):
            raise FqError(f"output '{out_dir}' would replace the input {path}; choose another output")
    blocking = next((p for p in reversed(out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise FqError(f"cannot create {out_dir}: {blocking} is not a directory")
    return out_dir


def _is_or_holds(directory: Path, path: Path) -> bool:
    path = path.resolve()
    return path == directory or directory in path.parents


def is_artifact(directory: Path) -> bool:
    """A real directory whose manifest.json says it is an fq-tvm artifact."""
    try:
        manifest = _parse(read_bounded(Path(directory) / MANIFEST, MAX_MANIFEST_BYTES), directory)
    except FqError:
        return False
    return not Path(directory).is_symlink() and isinstance(manifest, dict) and manifest.get("format") == FORMAT


@contextlib.contextmanager
def staging_dir(out_dir: Path, force: bool, keep=()):
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir` atomically.
    On any error, Ctrl-C, SIGTERM or SIGHUP the temporary directory is removed."""
    out_dir = check_output(out_dir, force, keep)
    with _signals_exit():
        tmp = _make_staging(out_dir)
        try:
            yield tmp
            check_output(out_dir, force, keep)  # again: the path may have changed meanwhile
            _replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _make_staging(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as err:
        raise FqError(f"cannot create {out_dir}: {err.strerror} ({err.filename})") from None


@contextlib.contextmanager
def _signals_exit():
    """While staging, SIGTERM and SIGHUP raise SystemExit (128 + signal) so cleanup runs; only in
    the main thread and only for signals whose handler is still the default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            old[sig] = signal.signal(sig, _exit_on_signal)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _replace(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(directory: Path, manifest: dict, files: list[str]) -> dict:
    """Add checksums of `files` to `manifest` and write it; return the written manifest."""
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION)
    manifest["files"] = {name: sha256_file(directory / name) for name in sorted(files)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---- reading: a manifest is untrusted input ----

def read_manifest(directory: Path) -> dict:
    """Read, validate and verify the manifest and every file it lists; FqError on any problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FqError(f"{directory}: no such artifact directory")
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise FqError(f"{directory}: not an fq-tvm artifact (no {MANIFEST})")
    manifest = validate_manifest(_parse(read_bounded(path, MAX_MANIFEST_BYTES), path), path)
    for name, expected in manifest["files"].items():
        if not os.path.lexists(directory / name):
            raise FqError(f"{directory}: file '{name}' listed in the manifest is missing")
        if sha256_file(directory / name) != expected:
            raise FqError(f"{directory}: checksum mismatch for '{name}' (file changed or corrupt)")
    return manifest


def _parse(data: bytes, path) -> object:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0]
        raise FqError(f"{path}: corrupt manifest ({reason})") from None


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def validate_manifest(manifest, path) -> dict:
    """The checks the loader relies on: types of every key it reads, files with checksums."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FqError(f"{path}: not an fq-tvm manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FqError(f"{path}: artifact format version {version} is not supported (this fq-tvm reads "
                      f"version {FORMAT_VERSION}); recompile the model")
    bad = _manifest_problem(manifest)
    if bad:
        raise FqError(f"{path}: invalid manifest: {bad}")
    return manifest


def _manifest_problem(m: dict) -> str | None:
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return "'files' (the sha256 of every file) is missing or empty"
    for name, digest in files.items():
        if not _plain_name(name) or name == MANIFEST:
            return f"file name {name!r} is not a plain file name inside the artifact"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"checksum of '{name}' is not a sha256 hex digest"
    if not isinstance(m.get("library"), str) or m["library"] not in files:
        return "'library' must name a file listed in 'files'"
    target = m.get("target")
    if not isinstance(target, dict) or not all(isinstance(target.get(k), str) for k in ("name", "arch", "device")):
        return "'target' must be an object with string 'name', 'arch' and 'device'"
    if target["device"] not in DEVICES:
        return f"unknown target device {target['device']!r} (expected {' or '.join(DEVICES)})"
    if target["device"] == "cuda" and not set(CUDA_FILES) <= set(files):
        return f"a CUDA artifact must list {', '.join(CUDA_FILES)} in 'files'"
    if not isinstance(target.get("tvm"), dict):
        return "'target.tvm' must be an object"
    bad = _signature_problem(m, "inputs") or _signature_problem(m, "outputs")
    if bad or "generation" not in m:
        return bad
    return generation_problem(m["generation"], files, [s["name"] for s in m["inputs"]],
                              [s["name"] for s in m["outputs"]])


GENERATION_INTS = ("layers", "kv_heads", "heads", "head_dim", "context", "vocab")


def generation_problem(g, files: dict, inputs: list, outputs: list) -> str | None:
    """What is wrong with a manifest's `generation` section (a causal LM with a KV cache), or None."""
    if not isinstance(g, dict) or g.get("kind") != "causal_lm" or g.get("kv_cache") is not True:
        return "'generation' must be an object with kind 'causal_lm' and kv_cache true"
    for key in GENERATION_INTS:
        if not isinstance(g.get(key), int) or isinstance(g[key], bool) or g[key] < 1:
            return f"'generation.{key}' must be a positive integer"
    eos = g.get("eos_ids")
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < g["vocab"]
                                            for i in eos):
        return "'generation.eos_ids' must be a list of token ids below the vocabulary size"
    bos = g.get("bos_id")
    if bos is not None and not (isinstance(bos, int) and not isinstance(bos, bool) and 0 <= bos < g["vocab"]):
        return "'generation.bos_id' must be a token id or null"
    tokenizer = g.get("tokenizer")
    if tokenizer is not None and not (isinstance(tokenizer, dict) and tokenizer.get("file") in files
                                      and tokenizer.get("sha256") == files[tokenizer["file"]]):
        return "'generation.tokenizer' must name a file listed in 'files' with its sha256"
    if g.get("last_logits", "main_last") != "main_last":
        return "'generation.last_logits' must be 'main_last' (the function computing only the last position's logits)"
    if g.get("kv_in_place", "main_kv") != "main_kv":
        return "'generation.kv_in_place' must be 'main_kv' (the function appending to the KV cache in place)"
    if g.get("kv_step", "main_kv1") != "main_kv1" or ("kv_step" in g and "kv_in_place" not in g):
        return "'generation.kv_step' must be 'main_kv1' (main_kv for one token), beside 'kv_in_place'"
    past = [f"past_{kind}.{i}" for i in range(g["layers"]) for kind in ("key", "value")]
    if inputs[:2] != ["input_ids", "position_ids"] or inputs[2:] != past:
        return "a causal LM's inputs must be input_ids, position_ids, past_key.0, past_value.0, ..."
    if outputs != ["logits"] + [name.replace("past_", "present_") for name in past]:
        return "a causal LM's outputs must be logits, present_key.0, present_value.0, ..."
    return None


def _plain_name(name: str) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name


def _signature_problem(m: dict, key: str) -> str | None:
    specs = m.get(key)
    if not isinstance(specs, list) or not specs:
        return f"'{key}' must be a non-empty list"
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _dtype_ok(spec.get("dtype")):
            return f"each of '{key}' needs a string 'name' and a numeric 'dtype'"
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(_dim_ok(d) for d in shape):
            return f"'{key}' entry '{spec['name']}' needs a 'shape' list of sizes or names"
        if "range" in spec and not _range_ok(spec["range"]):
            return f"'{key}' entry '{spec['name']}' has a 'range' that is not [low, high] integers"
    return None


def _range_ok(bounds) -> bool:
    return isinstance(bounds, list) and len(bounds) == 2 and all(_dim_ok(b) for b in bounds) \
        and all(isinstance(b, int) for b in bounds) and bounds[0] < bounds[1]


def _dtype_ok(dtype) -> bool:
    try:
        return isinstance(dtype, str) and np.dtype(dtype).kind in "biuf"
    except TypeError:
        return False


def _dim_ok(dim) -> bool:
    return isinstance(dim, str) or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)


class Model:
    """A loaded artifact: `run({input_name: array}) -> {output_name: array}`."""

    def __init__(self, directory: Path, manifest: dict, vm, device):
        self.directory = directory
        self.manifest = manifest
        self._vm = vm
        self._main = vm["main"]  # (looked up once: 1 us a call)
        self._device = device
        import tvm

        self._cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()  # arrays by DLPack (_on_cpu)
        self.inputs = manifest["inputs"]
        self.outputs = manifest["outputs"]
        self._names = [spec["name"] for spec in self.inputs]
        self._name_set = set(self._names)
        self._plain = [_plain_check(spec) for spec in self.inputs]

    def generate(self, prompt, **options):
        """Generate text (or token ids) from a causal LM artifact with a KV cache; see
        `fq_tvm.generate.generate` (`fq-generate`)."""
        from .generate import generate

        return generate(self, prompt, **options)

    def run(self, inputs: dict) -> dict:
        names = self._names
        if inputs.keys() != self._name_set:
            extra = set(inputs) - self._name_set
            missing = [name for name in names if name not in inputs]
            raise FqError(f"inputs do not match the model: missing {missing}, unexpected "
                          f"{sorted(extra)}; the model takes {names}")
        arrays = [_input(spec, plain, inputs[name]) for spec, plain, name in zip(self.inputs, self._plain, names)]
        tensors = [self._tensor(a) for a in arrays]
        result = self._main(*tensors)
        values = [result] if hasattr(result, "numpy") else list(result)
        if len(values) != len(self.outputs):
            raise FqError(f"{self.directory}: the library returned {len(values)} outputs, the manifest lists "
                          f"{len(self.outputs)}")
        if not self._cpu:
            return {spec["name"]: value.numpy() for spec, value in zip(self.outputs, values)}
        spans = [(t.data_ptr(), t.data_ptr() + a.nbytes) for t, a in zip(tensors, arrays)]
        return {spec["name"]: _from_cpu(value, spans) for spec, value in zip(self.outputs, values)}

    __call__ = run

    def _tensor(self, array: np.ndarray):
        """`array` as a TVM tensor on the model's device (on a CPU without a copy where it can)."""
        if self._cpu:
            return _on_cpu(array)
        import tvm

        return tvm.runtime.tensor(array, self._device)


ALIGN = 64  # bytes: TVM's own allocations, which its kernels may assume (tvm_ffi checks it)


def _on_cpu(array: np.ndarray):
    """The array as a TVM CPU tensor without a copy (DLPack) where TVM can take it as it is
    (aligned, writeable), else an aligned copy: `tvm.runtime.tensor` took 30-54 us for a 16 KB
    row, more than a 4096 x 4096 2-bit layer's inverse Hadamard."""
    import tvm_ffi

    if array.flags.writeable and array.size:  # (numpy's `ctypes.data` took 1 us of a 17 us call; this 0.4)
        tensor = tvm_ffi.from_dlpack(array, require_alignment=0, require_contiguous=True)
        if tensor.data_ptr() % ALIGN == 0:
            return tensor
    import tvm

    if array.size == 0:
        return tvm.runtime.tensor(array)
    return tvm.runtime.from_dlpack(_aligned_copy(array))


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def _from_cpu(value, spans: list) -> np.ndarray:
    """An output as numpy without a copy (it keeps the TVM tensor alive), copied only where it
    overlaps an input tensor (`spans`: their [start, end) addresses; an input passed through, or a
    view of one), which may be the caller's array."""
    out = np.from_dlpack(value)
    lo = value.data_ptr()
    hi = lo + out.nbytes
    for start, end in spans:
        if lo < end and start < hi:
            return out.copy()
    return out


def _plain_check(spec: dict) -> tuple:
    """What an input that needs no conversion looks like: (dtype, rank, [(axis, size) fixed]),
    worked out once at load so that `run` checks a well-formed input in a few attribute reads."""
    fixed = [(axis, d) for axis, d in enumerate(spec["shape"]) if isinstance(d, int)]
    return np.dtype(spec["dtype"]), len(spec["shape"]), fixed


def _input(spec: dict, plain: tuple, value) -> np.ndarray:
    """`_check_input`, with a quick path for a C-contiguous array of the right dtype and shape."""
    dtype, rank, fixed = plain
    if type(value) is not np.ndarray or value.dtype != dtype or value.ndim != rank \
            or not value.flags.c_contiguous or "range" in spec:
        return _check_input(spec, value)
    shape = value.shape
    for axis, size in fixed:
        if shape[axis] != size:
            return _check_input(spec, value)  # (raises)
    return value


def _check_input(spec: dict, value) -> np.ndarray:
    name = spec["name"]
    value = np.asarray(value)
    if value.dtype != spec["dtype"]:  # (not `dtype.name`: 2 us a call)
        if not np.can_cast(value.dtype, spec["dtype"], casting="same_kind"):
            raise FqError(f"input '{name}' has dtype {value.dtype}, expected {spec['dtype']}")
        value = value.astype(spec["dtype"])
    shape = spec["shape"]
    if value.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, value.shape)):
        raise FqError(f"input '{name}' has shape {list(value.shape)}, expected {shape}")
    if spec.get("range") is not None:
        _check_range(name, spec["range"], value)
    return value if value.flags.c_contiguous else np.ascontiguousarray(value)


def _check_range(name: str, bounds, value: np.ndarray) -> None:
    """Indices into a table (token ids): the library reads them unchecked, so refuse any outside."""
    if bounds is None or value.size == 0:
        return
    low, high = int(value.min()), int(value.max())
    if low < bounds[0] or high >= bounds[1]:
        raise FqError(f"input '{name}' has values from {low} to {high}; it indexes a table of {bounds[1]} rows, "
                      f"so each must be in [{bounds[0]}, {bounds[1]})")


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
    try:
        vm = VirtualMachine(tvm.runtime.load_module(str(directory / manifest["library"])), device)
    except Exception as err:  # a library that is not one TVM built
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise FqError(f"{directory}: cannot load '{manifest['library']}': {lines[-1]}") from None
    return Model(directory, manifest, vm, device)
