"""fq-bench: latency, size and accuracy of a model's fq-tvm builds (fp32 / int8 / fq2 ...) beside
ONNX Runtime fp32, dynamic int8 and MatMulNBits on the same inputs and thread count.

    import fq_tvm
    result = fq_tvm.bench("model.onnx", calib="calib.npz", schemes=("fp32", "int8", "fq2"))
    result["rows"][0]["latency"]["median_ms"]

Everything is written to a staging directory beside the report directory and renamed into place
at the end (report.md, report.json, report.png, the built artifacts under artifacts/): an error
or Ctrl-C leaves nothing behind. With `rpc="HOST:PORT"` or `tracker=..., key=...` the fq-tvm
builds run on a remote board through TVM RPC (fq_tvm.rpc), timed there by the VM's time evaluator.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import FqError

DEFAULT_SCHEMES = ("fp32", "int8", "fq2")
ORT_INT8 = "ORT int8 (dynamic)"
EVAL_SAMPLES = 8  # eval inputs taken from the calibration file when --inputs is not given
REPORT_FILES = ("report.md", "report.json", "report.png")
FP32_MISMATCH = 1e-3  # an fp32 build further than this from ORT fp32 gets a note in the report


@dataclass
class Entry:
    """One thing being measured: an fq-tvm build or an ONNX Runtime model."""

    label: str
    runtime: str  # "fq-tvm" or "onnxruntime"
    scheme: str
    path: Path
    run: Callable  # {input: array} -> {output: array}
    block: Callable  # (feeds, seconds) -> [seconds per call]
    size_bytes: int
    bits_per_weight: float
    dense_bits_per_weight: float | None = None
    where: str = "local"
    peak_bytes: int | None = None  # resident memory added by loading it and one call (local only)


class Progress:
    """One line per step on stderr: 'fq-bench: [2/6] compile int8 ... done in 12.3 s'."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.step, self.quiet = total, 0, quiet

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.step += 1
        start = time.monotonic()
        self.say(f"[{self.step}/{self.total}] {what} ...")
        yield
        self.say(f"[{self.step}/{self.total}] {what}: done in {time.monotonic() - start:.1f} s")

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"fq-bench: {line}", file=sys.stderr, flush=True)


def bench(model, calib=None, schemes=DEFAULT_SCHEMES, *, target: str | None = None, inputs=None,
          threads: int | None = None, out_dir=None, artifacts=(), rpc: str | None = None,
          tracker: str | None = None, key: str | None = None, seconds: float = 2.0, ort: bool = True,
          force: bool = False, quiet: bool = False, timeout: float = 60.0) -> dict:
    """Build (or take `artifacts`), run and time each build, compare with ONNX Runtime; write the
    report directory `out_dir` (default MODEL.bench beside the model) and return the report dict
    (also in report.json). See `fq-bench --help` for the meaning of each option."""
    from . import onnx_io

    model = Path(model)
    proto = onnx_io.load_model(model)
    schemes = list(dict.fromkeys(schemes))
    artifacts = list(dict.fromkeys(Path(a) for a in artifacts))
    remote = _remote_spec(rpc, tracker, key, target, artifacts)
    board_threads = threads  # on a board: its own default unless given
    threads = _threads(threads)
    out_dir = _report_path(out_dir, model, force)
    steps = 4 + (0 if artifacts else len(schemes)) + (1 if remote else 0) + (2 if ort and not remote else 0)
    log = Progress(steps, quiet)
    if remote:
        from . import rpc as rpc_client

        rpc_client.check_reachable(remote)
    with _staging(out_dir, force) as tmp, contextlib.ExitStack() as stack:
        with log("check the eval inputs against ONNX Runtime fp32"):
            session = _ort_session(model, threads)
            feeds, source = eval_inputs(inputs, calib, onnx_io.signature(proto))
            reference = ort_reference(session, feeds, source)
        paths = artifacts or [_build(model, s, target or "host", calib, tmp, log) for s in schemes]
        manifests = check_artifacts(paths, model, target, local=remote is None)
        if remote:
            with log(f"request a board ({remote.describe()})"):
                board = stack.enter_context(rpc_client.open_board(remote, timeout))
            entries = [board.entry(p, m, board_threads) for p, m in zip(paths, manifests)]
        else:
            board = None
            if board_threads is not None:
                set_tvm_threads(threads)
            entries = [with_peak(lambda p=p, m=m: _local_entry(p, m), feeds) for p, m in zip(paths, manifests)]
        notes = []
        if not remote:
            entries += _ort_entries(model, feeds, tmp / "ort", threads, log, notes, quantized=ort)
        _unique_labels(entries)
        with log(f"run {len(entries)} builds on the eval inputs"):
            accuracy = _accuracy(entries, feeds, reference)
        with log(f"time {len(entries)} builds ({seconds:g} s each, interleaved blocks)"):
            latency = _time_all(entries, feeds, seconds)
        shown = threads if board is None else (board_threads or "the board's default")
        result = _result(model, entries, accuracy, latency, shown, source, feeds, board, tmp)
        result["notes"] += notes
        with log("write report.md, report.json, report.png"):
            from .bench_report import write_report

            write_report(tmp, result)
    result["report_dir"] = str(out_dir)
    log.say(f"report: {out_dir / 'report.md'}")
    return result


# ---- arguments and output -------------------------------------------------------------------

def _remote_spec(rpc, tracker, key, target, artifacts):
    if not (rpc or tracker):
        if key:
            raise FqError("--key names the board kind in a tracker's pool; give --tracker HOST:PORT too")
        if target is not None:
            _check_target_runs_here(target)
        return None
    from . import rpc as rpc_client

    if target is None and not artifacts:
        raise FqError("a remote board needs --target (its preset, e.g. rpi5) or --artifacts built for it")
    return rpc_client.Remote.parse(rpc, tracker, key)


def _check_target_runs_here(target: str) -> None:
    """Before any compile: a target whose builds this machine cannot run needs a board."""
    from .targets import resolve

    preset = resolve(target)
    if preset.device != "cpu":
        raise FqError(f"target '{target}' is a {preset.device} target; fq-bench measures CPU builds")
    if not preset.runs_here:
        raise FqError(f"target '{target}' builds for {preset.arch}, which this machine cannot run: add "
                      f"--rpc HOST:PORT or --tracker HOST:PORT --key KEY to run them on a board")


def _threads(threads) -> int:
    if threads is None:
        from . import _physical_cores

        return _physical_cores()
    if threads < 1:
        raise FqError(f"--threads must be at least 1, not {threads}")
    return threads


def set_tvm_threads(threads: int) -> None:
    """This process's TVM thread pool: `threads` workers (also when the pool already runs)."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(threads)
    tvm.get_global_func("runtime.config_threadpool")(1, threads)  # 1: big cores first


def _report_path(out_dir, model: Path, force: bool) -> Path:
    out_dir = Path(out_dir) if out_dir else model.with_name(model.stem + ".bench")
    if os.path.lexists(out_dir):
        if not force:
            raise FqError(f"{out_dir} already exists; pass --force to replace it (only a report directory)")
        if out_dir.is_symlink() or not (out_dir / "report.json").is_file():
            raise FqError(f"{out_dir} exists and is not an fq-bench report; choose another -o")
    if out_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise FqError(f"-o {out_dir} is the current directory or above it; name a new directory")
    return out_dir


@contextlib.contextmanager
def _staging(out_dir: Path, force: bool):
    """A temporary sibling directory renamed to out_dir on success, removed on any error."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as err:
        raise FqError(f"cannot create {out_dir}: {err.strerror}") from None
    try:
        yield tmp
        if os.path.lexists(out_dir):
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name[-8:]}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- eval inputs and the ONNX Runtime reference ---------------------------------------------------

def eval_inputs(inputs, calib, signature: dict) -> tuple[dict, str]:
    """The eval feeds ({input name: array}) and where they came from; FqError when they do not
    fit the model's inputs (names, dtypes, ranks, fixed dimensions)."""
    from .npz import read_npz

    if inputs is not None:
        data, source = read_npz(inputs), str(inputs)
    elif calib is not None:
        data = {k: v[:EVAL_SAMPLES] for k, v in read_npz(calib).items()}
        source = f"first {EVAL_SAMPLES} samples of {calib}"
    else:
        raise FqError("no eval inputs: give --inputs EVAL.npz (keyed by input name) or --calib CALIB.npz "
                      f"(its first {EVAL_SAMPLES} samples are used)")
    names = [spec["name"] for spec in signature["inputs"]]
    extra = sorted(set(data) - set(names))
    if extra:
        raise FqError(f"eval inputs ({source}) do not fit the model: unexpected {extra}; it takes {names}")
    return {spec["name"]: _fit(spec, data, source) for spec in signature["inputs"]}, source


def _fit(spec: dict, data: dict, source: str) -> np.ndarray:
    name, want = spec["name"], np.dtype(spec["dtype"])
    if name not in data:
        raise FqError(f"eval inputs ({source}) do not fit the model: no array '{name}' (it takes "
                      f"{spec['dtype']} {spec['shape']})")
    value = np.asarray(data[name])
    if value.dtype != want and not np.can_cast(value.dtype, want, casting="same_kind"):
        raise FqError(f"eval inputs ({source}) do not fit the model: '{name}' is {value.dtype}, it takes {want}")
    shape = spec["shape"]
    if value.ndim != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(shape, value.shape)):
        raise FqError(f"eval inputs ({source}) do not fit the model: '{name}' has shape {list(value.shape)}, "
                      f"it takes {shape}")
    if value.size == 0:
        raise FqError(f"eval inputs ({source}) do not fit the model: '{name}' is empty")
    return np.ascontiguousarray(value.astype(want, copy=False))


def _ort_session(model: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise FqError(f"{model}: ONNX Runtime cannot load it ({_first_line(err)})") from None


def ort_reference(session, feeds: dict, source: str) -> dict:
    """ONNX Runtime fp32 outputs on the feeds; FqError when ORT refuses them."""
    try:
        values = session.run(None, feeds)
    except Exception as err:
        raise FqError(f"eval inputs ({source}) do not fit the model: ONNX Runtime says "
                      f"{_first_line(err)}") from None
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


# ---- fq-tvm builds ------------------------------------------------------------------------------

def _build(model: Path, scheme: str, target: str, calib, tmp: Path, log: Progress) -> Path:
    import fq_tvm

    from .compiler import uses_calibration

    with log(f"compile {scheme} for {target}"):
        return fq_tvm.compile(model, target, tmp / "artifacts" / scheme, scheme=scheme, quiet=True,
                              calib=calib if uses_calibration(scheme) else None)


def check_artifacts(paths, model: Path, target: str | None, local: bool) -> list[dict]:
    """The manifests, after checking each artifact is one of this model's, for `target` (when
    given; else all for one target), and runnable here when `local`."""
    from .artifact import read_manifest, sha256_input

    if not paths:
        raise FqError("nothing to measure: no schemes and no --artifacts")
    digest = sha256_input(model)
    manifests = [read_manifest(p) for p in paths]
    for path, m in zip(paths, manifests):
        name = m["target"]["name"]
        if m.get("source", {}).get("sha256") != digest:
            raise FqError(f"{path}: built from another model than {model} (source checksum differs)")
        if target is not None and name != target:
            raise FqError(f"{path}: built for target '{name}', not '{target}'")
        if local:
            _check_local(path, m)
    names = sorted({m["target"]["name"] for m in manifests})
    if len(names) > 1:
        raise FqError(f"the artifacts are built for different targets ({', '.join(names)}); bench one target at once")
    return manifests


def _check_local(path: Path, manifest: dict) -> None:
    import platform

    from .cpuinfo import board_info, missing_features

    target = manifest["target"]
    if target["device"] != "cpu":
        raise FqError(f"{path}: built for {target['device']} (target '{target['name']}'); fq-bench measures CPU builds")
    here = board_info()
    if target["arch"] != platform.machine():
        raise FqError(f"{path}: built for target '{target['name']}' ({target['arch']}); this {platform.machine()} "
                      f"machine cannot run it: use --rpc HOST:PORT or --tracker HOST:PORT --key KEY for a board")
    missing = missing_features(target["tvm"], here)
    if missing:
        raise FqError(f"{path}: built for target '{target['name']}', whose kernels use {', '.join(missing)}; "
                      f"this CPU ({here['cpu']}) lacks it")


def artifact_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def weight_bits(manifest: dict) -> tuple[float, float]:
    """(bits per weight over all weights, bits per weight of the quantized dense layers)."""
    weights = manifest["weights"]
    fp32 = weights.get("fp32_bytes", weights["bytes"])
    overall = 32 * weights["bytes"] / fp32 if fp32 else 32.0
    return round(overall, 4), float(weights.get("quantized_dense_bits_per_weight", 32.0))


def _local_entry(path: Path, manifest: dict) -> Entry:
    from . import timing
    from .artifact import load

    model = load(path)
    overall, dense = weight_bits(manifest)
    scheme = manifest["scheme"]["name"]

    def block(feeds: dict, seconds: float) -> list[float]:
        return timing.local_block(lambda: model.run(feeds))(seconds)

    return Entry(f"fq-tvm {scheme}", "fq-tvm", scheme, Path(path), model.run, block, artifact_size(path),
                 overall, dense)


def with_peak(make, feeds: dict) -> Entry:
    """make() and one run on the feeds, with the resident memory they added at their peak."""
    def load_and_run():
        entry = make()
        entry.run(feeds)
        return entry

    entry, peak = peak_rss(load_and_run)
    entry.peak_bytes = peak
    return entry


def peak_rss(fn):
    """(fn(), bytes): the peak resident set size while fn ran, above the size before it (Linux:
    the high-water mark is reset through /proc/self/clear_refs); bytes None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    except OSError:
        return fn(), None
    result = fn()
    return result, max(0, _status_bytes("VmHWM") - before)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"no {field} in /proc/self/status")


# ---- ONNX Runtime baselines -----------------------------------------------------------------------

def _ort_entries(model: Path, feeds: dict, work: Path, threads: int, log: Progress, notes: list,
                 quantized: bool = True) -> list[Entry]:
    """ORT fp32, and with `quantized` dynamic int8 and MatMulNBits, each in its own session."""
    from . import onnx_io

    fp32_bytes = onnx_io.weight_bytes(onnx_io.load_model(model))

    def entry(label, scheme, path):
        return with_peak(lambda: _ort_entry(label, scheme, path, _ort_session(path, threads), fp32_bytes), feeds)

    entries = [entry("ORT fp32", "fp32", model)]
    if not quantized:
        return entries
    work.mkdir(parents=True, exist_ok=True)
    with log("quantize for ONNX Runtime: dynamic int8"):
        path = _ort_int8(model, work / "model.int8.onnx")
        entries.append(entry(ORT_INT8, "int8", path))
    with log("quantize for ONNX Runtime: MatMulNBits 4-bit and 2-bit"):
        for bits in (4, 2):
            path = _ort_nbits(model, work / f"model.nbits{bits}.onnx", bits)
            if path is None:
                notes.append(f"no ORT MatMulNBits {bits}-bit row: ORT's quantizer rewrites no layer of this model "
                             f"(it takes MatMul by a constant weight with K a multiple of 32, not Gemm)")
                continue
            entries.append(entry(f"ORT MatMulNBits {bits}-bit", f"nbits{bits}", path))
    return entries


def _ort_entry(label: str, scheme: str, path: Path, session, fp32_bytes: int) -> Entry:
    from . import onnx_io, timing

    names = [o.name for o in session.get_outputs()]

    def run(feeds):
        return dict(zip(names, session.run(None, feeds)))

    def block(feeds: dict, seconds: float) -> list[float]:
        return timing.local_block(lambda: session.run(None, feeds))(seconds)

    wbytes = onnx_io.weight_bytes(onnx_io.load_model(path))
    return Entry(label, "onnxruntime", scheme, Path(path), run, block, Path(path).stat().st_size,
                 round(32 * wbytes / fp32_bytes, 4) if fp32_bytes else 32.0)


def _ort_int8(model: Path, out: Path) -> Path:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice
    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8, per_channel=True)
    return out


def _ort_nbits(model: Path, out: Path, bits: int) -> Path | None:
    """MatMulNBits (blocks of 32, asymmetric, accuracy_level 4) where ORT's quantizer applies; None
    when it rewrites no MatMul (Gemm layers, K not a multiple of 32 ...) or fails."""
    import onnx

    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), bits=bits, block_size=32, is_symmetric=False,
                                         accuracy_level=4)
        quantizer.process()
        proto = quantizer.model.model
    except Exception:  # an optional baseline: leave it out
        return None
    if not any(n.op_type == "MatMulNBits" for n in proto.graph.node):
        return None
    onnx.save(proto, str(out))
    return out


# ---- accuracy and timing --------------------------------------------------------------------------

def compare(ours: dict, ref: dict) -> dict:
    """Max relative error (max |a - b| / max |b|, worst output) and cosine (flattened, worst output)."""
    missing = set(ref) - set(ours)
    if missing:
        raise FqError(f"outputs {sorted(missing)} are missing from the build's results")
    errs, coss = [], []
    for name, b in ref.items():
        a = np.asarray(ours[name], np.float64).ravel()
        b = np.asarray(b, np.float64).ravel()
        if a.shape != b.shape:
            raise FqError(f"output '{name}' has {a.size} values, ONNX Runtime gives {b.size}")
        scale = np.abs(b).max()
        errs.append(float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max()))
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        coss.append(float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b)))
    return {"max_rel_err": max(errs), "cosine": min(coss)}


def _accuracy(entries: list[Entry], feeds: dict, reference: dict) -> dict:
    """{label: {"vs_ort_fp32": compare(...), "vs_fp32_build": compare(...) or None}}."""
    outputs = {e.label: e.run(feeds) for e in entries}
    fp32 = next((outputs[e.label] for e in entries if e.runtime == "fq-tvm" and e.scheme == "fp32"), None)
    return {label: {"vs_ort_fp32": compare(out, reference),
                    "vs_fp32_build": compare(out, fp32) if fp32 is not None else None}
            for label, out in outputs.items()}


def _unique_labels(entries: list[Entry]) -> None:
    """Two builds of one scheme (e.g. --artifacts with different options): label them by directory."""
    labels = [e.label for e in entries]
    for i, e in enumerate(entries):
        if labels.count(e.label) > 1:
            e.label = f"{e.label} ({i + 1}: {e.path.name})"


def _time_all(entries: list[Entry], feeds: dict, seconds: float) -> dict:
    import functools

    from . import timing

    return timing.interleaved({e.label: functools.partial(e.block, feeds) for e in entries}, seconds=seconds)


# ---- the result -----------------------------------------------------------------------------------

def _result(model: Path, entries, accuracy, latency, threads, source, feeds, board, tmp: Path) -> dict:
    from . import __version__
    from .artifact import sha256_input
    from .cpuinfo import board_info, describe

    import onnxruntime
    import tvm

    host = board_info()
    rows = [_row(e, accuracy[e.label], latency[e.label], tmp) for e in entries]
    base = next((r for r in rows if r["label"] == "ORT fp32"), None)
    for row in rows:
        row["vs_ort_fp32_latency"] = row["latency"]["median_ms"] / base["latency"]["median_ms"] if base else None
    return {
        "model": str(model), "model_sha256": sha256_input(model),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {**host, "description": describe(host)},
        "board": board.describe() if board is not None else None,
        "threads": threads, "eval_inputs": {"source": source, "shapes": {k: list(v.shape) for k, v in feeds.items()}},
        "versions": {"fq_tvm": __version__, "tvm": tvm.__version__, "onnxruntime": onnxruntime.__version__},
        "rows": rows, "notes": _notes(rows, board, host),
    }


def _row(entry: Entry, accuracy: dict, latency: dict, tmp: Path) -> dict:
    path = Path(entry.path)
    shown = path.relative_to(tmp) if path.is_relative_to(tmp) else path
    return {"label": entry.label, "runtime": entry.runtime, "scheme": entry.scheme, "path": str(shown),
            "where": entry.where, "latency": latency, "size_bytes": entry.size_bytes, "peak_bytes": entry.peak_bytes,
            "bits_per_weight": entry.bits_per_weight, "dense_bits_per_weight": entry.dense_bits_per_weight,
            **accuracy}


def ort_int8_saturates(info: dict) -> bool:
    """Whether ONNX Runtime's dynamic int8 runs `vpmaddubsw` without VNNI on this CPU (x86 with no
    avx512_vnni / avx_vnni), whose int16 sum of two uint8 x int8 products saturates."""
    flags = set(info.get("flags", ()))
    return info.get("arch") == "x86_64" and not flags & {"avx512_vnni", "avx_vnni"}


def _notes(rows: list[dict], board, host: dict) -> list[str]:
    """Lines under the table; `host`: this machine's `cpuinfo.board_info()`, where ORT ran."""
    notes = []
    for row in rows:
        if row["scheme"] == "fp32" and row["vs_ort_fp32"]["max_rel_err"] > FP32_MISMATCH:
            notes.append(f"{row['label']} differs from ONNX Runtime fp32 by {row['vs_ort_fp32']['max_rel_err']:.2e} "
                         f"(relative): more than float rounding")
    if any(row["label"] == ORT_INT8 for row in rows) and ort_int8_saturates(host):
        notes.append(f"{ORT_INT8} on this CPU (x86 without VNNI) sums pairs of uint8 x int8 products in int16 "
                     "(vpmaddubsw), which saturate: part of its error is overflow, not quantization "
                     "(benchmarks/int8_exactness.py); fq-tvm's integer sums do not overflow (scheme int7, 7-bit "
                     "codes, keeps them exact without the sign correction 8-bit codes need here: faster, a "
                     "little less accurate)")
    if board is not None:
        notes.append("fq-tvm builds ran on the remote board (timed there by TVM's time evaluator, network "
                     "excluded); ONNX Runtime ran here only as the accuracy reference")
    return notes
