"""CUDA artifacts checked and timed on a real GPU, built on a machine without one.

    python benchmarks/cuda_check.py prepare DIR [--arch sm_90] [--minilm] [--kernels [--sweep]]   # here
    python benchmarks/cuda_check.py pack DIR .gpu [--leave-out 4096x4096.int8]   # here: what to carry
    python benchmarks/cuda_check.py run DIR                                  # on the GPU machine

`prepare` compiles the layer cases (out x in: 4096x4096, 11008x4096, 1536x384) for CUDA and for
the host, runs the host artifact on fixed inputs (M = 1, 16, 128 rows) and stores inputs and
expected outputs beside the CUDA artifacts (rows 0-7 and the last 8 of M = 128, to fit the
transfer limit); `--minilm` does all-MiniLM-L6-v2 fq2 on 1 and 16 Lee documents instead. `run`
needs only TVM's runtime, numpy and torch: it loads every CUDA artifact, compares its outputs with
the stored ones (relative L2 error) and times it with TVM's evaluator, next to cuBLAS fp32 / fp16
and torch int8 (`torch._int_mm`, rows padded to a multiple of 8 and at least 32) matmuls of the
same layer shape in the same run, and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROWS = (1, 16, 128)
CASES = [  # name, model builder kwargs, schemes, input row counts
    ("4096x4096", {"kind": "linear", "in": 4096, "out": 4096}, ("fq2", "int8"), ROWS),
    ("11008x4096", {"kind": "linear", "in": 4096, "out": 11008}, ("fq2",), ROWS),
    ("1536x384", {"kind": "linear", "in": 384, "out": 1536}, ("fq2", "int8", "fp32"), ROWS),
]
# all-MiniLM-L6-v2 (real weights): rows = number of Lee documents per batch
MINILM = ("minilm", {"kind": "minilm"}, ("fq2",), (1, 16))
KEEP = 8  # rows kept from each end of a large expected output


def _build_onnx(work: Path, name: str, spec: dict) -> Path:
    from fq_tvm import models

    if spec["kind"] == "minilm":
        from fq_tvm import realmodels

        return realmodels.export_minilm(work)
    path = work / f"{name}.onnx"
    return models.linear(path, spec["in"], spec["out"], bias=False)


def _width(spec: dict) -> int:
    """Input width of a layer case (0 for MiniLM, whose inputs are token ids)."""
    return spec.get("in", 0)


def _calib(work: Path, spec: dict) -> Path:
    path = work / f"calib_{spec['kind']}.npz"
    if spec["kind"] == "minilm":
        from fq_tvm import realmodels

        return realmodels.minilm_calib(path)
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.standard_normal((32, 8, _width(spec))).astype(np.float32))
    return path


def _inputs(spec: dict, rows: int, seed: int) -> dict:
    if spec["kind"] == "minilm":
        from fq_tvm import realmodels

        docs, _ = realmodels.lee_corpus()
        return realmodels.tokenize_minilm(realmodels.minilm_tokenizer(), docs[:rows])
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((1, rows, _width(spec))).astype(np.float32)}


def prepare(out: Path, arch: str, minilm: bool = False) -> None:
    import onnxruntime as ort

    import fq_tvm
    from fq_tvm.schedules.gpu import GEMV_ROWS

    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    index = []
    for name, spec, schemes, rows in ([MINILM] if minilm else CASES):
        onnx_path = _build_onnx(work, name, spec)
        calib = _calib(work, spec)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        for scheme in schemes:
            entry = {"case": name, "scheme": scheme, "artifact": f"{name}.{scheme}", "rows": list(rows),
                     "in": _width(spec), "out": spec.get("out", 0), "kind": spec["kind"],
                     "gemv_rows": GEMV_ROWS[2 if scheme == "fq2" else 8]}
            index.append(entry)
            if all((out / f"{name}.{scheme}.m{m}.npz").exists() for m in rows):
                continue  # prepared by an earlier call: delete its files to redo it
            opts = dict(scheme=scheme, calib=calib, quiet=True, force=True, act_bits=32)  # as the GPU kernels
            gpu = fq_tvm.compile(onnx_path, "cuda", out / f"{name}.{scheme}", cuda_arch=arch, **opts)
            host = fq_tvm.load(fq_tvm.compile(onnx_path, "host", work / f"{name}.{scheme}.host", **opts))
            for m in rows:
                feed = _inputs(spec, m, seed=m)
                expected = next(iter(host.run(feed).values()))
                extra = {"ort": _ends(session.run(None, feed)[0])} if scheme == "fp32" else {}
                inputs = {f"in_{k}": v for k, v in feed.items()}
                if not (out / f"{name}.m{m}.npz").exists():
                    np.savez(out / f"{name}.m{m}.npz", **inputs)
                np.savez(out / f"{name}.{scheme}.m{m}.npz", expected=_ends(expected), **extra)
            print(f"prepared {name} {scheme}", file=sys.stderr)
    (out / "index.json").write_text(json.dumps(index, indent=1))


def _ends(y: np.ndarray) -> np.ndarray:
    """The first and last KEEP rows (axis -2) of a large output, all of a small one."""
    if y.shape[-2] <= 2 * KEEP:
        return y
    return np.concatenate([y[..., :KEEP, :], y[..., -KEEP:, :]], axis=-2)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _time_artifact(model, feed: dict) -> float:
    import tvm

    dev = model._device
    args = [tvm.runtime.tensor(np.ascontiguousarray(feed[s["name"]]), dev) for s in model.inputs]
    timer = model._vm.time_evaluator("main", dev, number=20, repeat=7, min_repeat_ms=50)
    return 1e3 * float(np.median(timer(*args).results))


def _cuda_ms(fn, reps: int = 50) -> float:
    import torch

    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / reps)
    return float(np.median(times))


def _baselines(k: int, n: int, rows: int) -> list[float]:
    """cuBLAS fp32 (TF32 off) and fp16, and torch int8 (`_int_mm` wants more than 16 rows, a
    multiple of 8: padded), for x [rows, k] @ w [k, n]."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    times = []
    for dtype in (torch.float32, torch.float16):
        a = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(k, n, device="cuda", dtype=dtype)
        times.append(_cuda_ms(lambda: a @ w))
    padded = max(32, -(-rows // 8) * 8)
    a = torch.randint(-127, 128, (padded, k), device="cuda", dtype=torch.int8)
    w = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
    try:
        times.append(_cuda_ms(lambda: torch._int_mm(a, w)))
    except RuntimeError:
        times.append(float("nan"))
    return times


def _check(entry: dict, m: int, model, directory: Path):
    """(inputs, rel. error vs the host artifact, vs ORT or nan) for one row count, or None."""
    inputs = directory / f"{entry['case']}.m{m}.npz"
    expected = directory / f"{entry['case']}.{entry['scheme']}.m{m}.npz"
    if not (inputs.exists() and expected.exists()):  # left out to fit a transfer limit
        return None
    feed = {k[3:]: v for k, v in np.load(inputs).items()}
    data = dict(np.load(expected))
    got = next(iter(model.run(feed).values()))
    if not np.isfinite(got).all():
        return feed, float("inf"), float("inf")
    got = _ends(got)
    return feed, _rel(got, data["expected"]), _rel(got, data["ort"]) if "ort" in data else float("nan")


def _tolerance(entry: dict, m: int) -> float:
    """Against the host artifact: float32 rounding, or float16 products where quantized layers
    run on tensor cores (more than gemv_rows rows)."""
    return 2e-3 if entry["scheme"] != "fp32" and m > entry.get("gemv_rows", 0) else 1e-4


def _ms(lib, name: str, dev, args) -> float:
    """Median ms of one call of `name` in a loaded library (TVM's evaluator, 20 calls a repeat)."""
    timer = lib.time_evaluator(name, dev, number=20, repeat=5, min_repeat_ms=20)
    return 1e3 * float(np.median(timer(*args).results))


def _kernel_lib(model):
    """The loaded library module holding the artifact's compiled PrimFuncs."""
    import tvm

    stack = [tvm.runtime.load_module(str(Path(model.directory) / model.manifest["library"]))]
    while stack:
        mod = stack.pop()
        if any(mod.implements_function(f"{n}_gemv") for n in _bucket_names(model)):
            return mod
        stack.extend(mod.imports)
    return None


def _bucket_names(model) -> list[str]:
    import re

    source = (Path(model.directory) / "device.cu")
    text = source.read_text() if source.exists() else ""
    return sorted(set(re.findall(r"(fq_dequant_matmul_\d+_\d+_b\d+_g\d+)_gemv_kernel\b", text)))


def _bucket_times(model, rows) -> list[str]:
    """Each per-row layer's two bucket kernels (GEMV and tensor cores) timed alone at each row count on
    random codes: where the row-count threshold should sit."""
    import re

    import tvm

    names = _bucket_names(model)
    lib = _kernel_lib(model) if names else None
    if lib is None:
        return []
    dev, lines = model._device, []
    rng = np.random.default_rng(0)
    for base in names:
        n, k, bits = (int(v) for v in re.match(r"fq_dequant_matmul_(\d+)_(\d+)_b(\d+)", base).groups())
        consts = [rng.integers(0, 256, (n, -(-k * bits // 8)), dtype=np.uint8),
                  rng.uniform(0.01, 0.1, (n, 1)).astype(np.float32), np.ones((n, 1), np.float32)]
        for m in rows:
            args = [tvm.runtime.tensor(a, dev) for a in
                    [rng.standard_normal((m, k)).astype(np.float32), *consts, np.zeros((m, n), np.float32)]]
            ms = [_ms(lib, f"{base}_{form}", dev, args) for form in ("gemv", "tc16", "tc64")]
            lines.append(f"{base:38}{m:>5}" + "".join(f"{v:10.4f}" for v in ms))
    return lines


def _transform_steps(name: str) -> list[tuple] | None:
    """The steps of a fused transform kernel from its name (`schedules.chains.transform_name`), a lone
    Hadamard (fq_hadamard[_inv]_DIM_BLOCK) as one step; None for other kernels."""
    import re

    lone = re.fullmatch(r"fq_hadamard(_inv)?_(\d+)_(\d+)", name)
    if lone:
        return [("hadamard", int(lone.group(2)), int(lone.group(3)), int(bool(lone.group(1))))]
    words = re.findall(r"(pad|take|frame|hadamard_inv|hadamard)_(\d+(?:x\d+)+)", name)
    if not words or "_".join(f"{k}_{v}" for k, v in words) != name[3:]:
        return None
    return [("hadamard", *map(int, v.split("x"))) if k.startswith("hadamard") else (k, *map(int, v.split("x")))
            for k, v in words]


def _transform_args(steps: list[tuple], m: int, rng) -> list[np.ndarray]:
    """Random x, each step's signs / F, and a zero output, shaped as `kernels.transform` wants."""
    first = steps[0]
    width = first[1] * first[2] + first[4] if first[0] == "frame" else first[1]
    args = [rng.standard_normal((m, width)).astype(np.float32)]
    for step in steps:
        if step[0] == "hadamard":
            args.append(rng.choice([-1.0, 1.0], step[1]).astype(np.float32))
        elif step[0] == "frame":
            args.append(rng.standard_normal((step[3], step[2])).astype(np.float32))
            width = step[1] * step[3] + step[4]
        if step[0] in ("pad", "take"):
            width = step[2]
    return args + [np.zeros((m, width), np.float32)]


def _transform_times(model, rows) -> list[str]:
    """Each fused row-transform kernel (one per layer side) timed alone at each row count."""
    import re

    import tvm

    source = Path(model.directory) / "device.cu"
    names = sorted(set(re.findall(r"\b(fq_(?:pad|take|frame|hadamard)\w*?)_kernel\b", source.read_text())))
    lib = _kernel_lib(model)
    lines, rng = [], np.random.default_rng(0)
    for name in names:
        steps = _transform_steps(name)
        if steps is None or lib is None or not lib.implements_function(name):
            continue
        for m in rows:
            args = [tvm.runtime.tensor(a, model._device) for a in _transform_args(steps, m, rng)]
            lines.append(f"{name[:44]:46}{m:>5}{_ms(lib, name, model._device, args):10.4f}")
    return lines


KERNEL_SHAPES = [(4096, 4096, 2), (11008, 4096, 2), (1536, 384, 2), (4096, 4096, 8), (1536, 384, 8)]
KERNEL_ROWS = (1, 4, 8, 16, 32, 128)
TC_VARIANTS = {  # name: "few" / "many" (the two buckets' tiles) or TensorCoreTiles fields
    "tc16": "few", "tc64": "many",
    **{f"tc16_s{n}": (1, 4, 1, 1, 4, n) for n in (1, 2, 3, 4, 6, 8, 12)},
    **{f"tc64_s{n}": (2, 2, 2, 2, 4, n) for n in (1, 2, 4, 8)}}
KERNEL_SHAPES_SWEPT = {(4096, 4096, 2), (11008, 4096, 2), (4096, 4096, 8)}  # all variants; others the buckets


def _coded_width(cols: int) -> int:
    """A layer's code count after the frame (r = 1.125 on blocks of 16, as fq2 builds it)."""
    return cols * 9 // 8


def _kernel_forms(rows: int, cols: int, bits: int, sweep: bool) -> dict:
    """name -> PrimFunc for each form of one layer's code reduction (with every tensor-core
    variant when `sweep`)."""
    from fq_tvm.schedules import gpu, kernels

    forms = {"gemv": kernels.dequant_gemv(rows, cols, bits, gpu.GEMV_THREADS),
             "tiled": kernels.dequant_matmul_tiled(rows, cols, bits, gpu.TILE_ROWS)}
    for name, spec in TC_VARIANTS.items():
        if isinstance(spec, str):
            tiles = gpu.tensor_core_tiles(rows, cols, few_rows=spec == "few")
        elif not sweep:
            continue
        else:
            tiles = gpu.TensorCoreTiles(*spec)
        forms[name] = gpu.tensor_core_kernel(rows, cols, bits, tiles)
    return forms


def prepare_kernels(out: Path, arch: str, sweep: bool = False) -> None:
    """Each code-reduction form alone (GEMV, tiled, tensor-core tile variants), built for `arch`
    into out/kernels/<rows>x<codes>_b<bits>.<form>/ (host library, device source, cubin, PTX)."""
    import tvm

    from fq_tvm.schedules import schedule_func
    from fq_tvm.targets import cuda, resolve

    preset = resolve("cuda", cuda_arch=arch)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    for rows, cols, bits in KERNEL_SHAPES:
        codes = _coded_width(cols) if bits == 2 else cols
        swept = sweep and (rows, cols, bits) in KERNEL_SHAPES_SWEPT
        for name, func in _kernel_forms(rows, codes, bits, swept).items():
            where = out / "kernels" / f"{rows}x{codes}_b{bits}.{name}"
            if (where / cuda.CUBIN).exists():
                continue
            where.mkdir(parents=True, exist_ok=True)
            cuda.export(tvm.compile(tvm.IRModule({"main": schedule_func(func, target)}), target), where, preset)
            print(f"prepared kernel {where.name}", file=sys.stderr)


TRANSFORM_SIDES = [[("hadamard", 4096, 4096, 0), ("frame", 256, 16, 18, 0)], [("hadamard", 4096, 4096, 1)]]
TRANSFORM_VARIANTS = {"t512": (512, True), "t512_int64": (512, False), "t1024": (1024, True)}  # threads, 32-bit


def prepare_transforms(out: Path, arch: str) -> None:
    """The 4096 layer's two sides alone per TRANSFORM_VARIANTS (threads per row; index arithmetic
    narrowed to 32 bits by `gpu.finish` or left int64), into out/kernels/<name>.<variant>."""
    import tvm
    import tvm.s_tir as s_tir

    from fq_tvm.schedules import chains, gpu, kernels
    from fq_tvm.targets import cuda, resolve

    preset, target = resolve("cuda", cuda_arch=arch), tvm.target.Target({"kind": "cuda", "arch": arch})
    default = gpu.TRANSFORM_THREADS
    try:
        for steps in TRANSFORM_SIDES:
            for variant, (threads, narrow) in TRANSFORM_VARIANTS.items():
                where = out / "kernels" / f"{chains.transform_name(steps)}.{variant}"
                where.mkdir(parents=True, exist_ok=True)
                gpu.TRANSFORM_THREADS = threads
                sch = s_tir.Schedule(tvm.IRModule({"main": kernels.transform(steps)}))
                gpu.transform(sch, target)
                func = gpu.finish(sch.mod["main"]) if narrow else sch.mod["main"]
                cuda.export(tvm.compile(tvm.IRModule({"main": func}), target), where, preset)
    finally:
        gpu.TRANSFORM_THREADS = default


def run_transforms(directory: Path) -> list[str]:
    """Each prepared side variant timed at 1, 16 and 128 rows; '!' where its output differs from
    the variant before it on the same input (the schedules compute the same sums)."""
    import tvm

    from fq_tvm.targets import cuda

    cuda.load_runtime()
    dev, lines, last = tvm.cuda(0), [], {}
    for where in sorted((directory / "kernels").glob("fq_*.*")):
        name = where.name.rsplit(".", 1)[0]
        steps = _transform_steps(name)
        cuda.install_precompiled(where)
        lib = tvm.runtime.load_module(str(where / cuda.LIB_NAME))
        row = f"{where.name[:50]:52}"
        for m in (1, 16, 128):
            args = [tvm.runtime.tensor(a, dev) for a in _transform_args(steps, m, np.random.default_rng(m))]
            lib["main"](*args)
            got = args[-1].numpy()
            bad = (name, m) in last and _rel(got, last[name, m]) > 1e-5
            last[name, m] = got
            row += f"{_ms(lib, 'main', dev, args):9.4f}{'!' if bad else ' '}"
        lines.append(row)
    return lines


def run_kernels(directory: Path) -> list[str]:
    """Time every prepared kernel at KERNEL_ROWS rows on random codes, each output checked against
    numpy (float64; tensor-core forms within float16 rounding, 2e-3, the others 1e-4)."""
    import re

    import tvm

    from fq_tvm.numerics.packing import unpack_codes
    from fq_tvm.targets import cuda

    cuda.load_runtime()  # TVM's CUDA loader, when no artifact was loaded before
    dev, lines, rng = tvm.cuda(0), [], np.random.default_rng(0)
    for where in sorted((directory / "kernels").glob("[0-9]*.*")):
        rows, codes, bits = (int(v) for v in re.match(r"(\d+)x(\d+)_b(\d+)", where.name).groups())
        width = -(-codes * bits // 8)
        packed = rng.integers(0, 256, (rows, width), dtype=np.uint8)
        scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
        zero = np.full((rows, 1), (2**bits - 1) / 2, np.float32)
        w = (unpack_codes(packed, bits, codes) - zero.astype(np.float64)) * scale
        try:
            cuda.install_precompiled(where)
            lib = tvm.runtime.load_module(str(where / cuda.LIB_NAME))
        except Exception as err:  # noqa: BLE001 - report it, go on with the others
            lines.append(f"{where.name:34} load failed: {str(err).splitlines()[-1][:80]}")
            continue
        row = f"{where.name:34}"
        for m in KERNEL_ROWS:
            x = rng.standard_normal((m, codes)).astype(np.float32)
            args = [tvm.runtime.tensor(a, dev) for a in (x, packed, scale, zero, np.zeros((m, rows), np.float32))]
            try:
                lib["main"](*args)
                err = _rel(args[-1].numpy(), x.astype(np.float64) @ w.T)
                ms = _ms(lib, "main", dev, args)
            except Exception as exc:  # noqa: BLE001
                row += f"  M={m} failed: {str(exc).splitlines()[-1][:60]}"
                break
            bad = err > (2e-3 if ".tc" in where.name else 1e-4)
            row += f"{ms:9.4f}{'!' if bad else ' '}"
        lines.append(row)
        print(row, file=sys.stderr, flush=True)
    return lines


def run(directory: Path) -> int:
    import fq_tvm

    index = json.loads((directory / "index.json").read_text())
    failures, lines, base, buckets, transforms = 0, [], {}, [], []
    for entry in index:
        if not (directory / entry["artifact"]).is_dir():  # left out to fit a transfer limit
            continue
        try:
            model = fq_tvm.load(directory / entry["artifact"])
        except Exception as err:  # noqa: BLE001 - report it in the table, go on with the others
            failures += 1
            lines.append(f"{entry['case']:12}{entry['scheme']:6}  load failed: {str(err).splitlines()[-1]}")
            continue
        for m in entry["rows"]:
            try:
                checked = _check(entry, m, model, directory)
            except Exception as err:  # noqa: BLE001
                failures += 1
                lines.append(f"{entry['case']:12}{entry['scheme']:6}{m:>5}  failed: {str(err).splitlines()[-1]}")
                continue
            if checked is None:
                continue
            feed, err, err_ort = checked
            ok = err < _tolerance(entry, m) and (not np.isfinite(err_ort) or err_ort < 1e-4)
            failures += not ok
            ms = _time_artifact(model, feed)
            row = f"{entry['case']:12}{entry['scheme']:6}{m:>5}{err:10.1e}{err_ort:10.1e}{ms:10.4f}"
            if entry["kind"] == "linear":
                key = (entry["in"], entry["out"], m)
                if key not in base:
                    base[key] = _baselines(*key)
                f32, f16, i8 = base[key]
                row += f"{f32:10.4f}{f16:10.4f}{i8:10.4f}{ms / f16:9.2f}"
            lines.append(row + ("" if ok else "  MISMATCH"))
            print(lines[-1], file=sys.stderr, flush=True)
        if entry["kind"] == "linear":
            try:
                buckets += _bucket_times(model, entry["rows"])
            except Exception as err:  # noqa: BLE001
                buckets.append(f"{entry['artifact']}: bucket timing failed: {str(err).splitlines()[-1]}")
            try:
                transforms += _transform_times(model, entry["rows"])
            except Exception as err:  # noqa: BLE001
                transforms.append(f"{entry['artifact']}: transform timing failed: {str(err).splitlines()[-1]}")
    print(f"\n{'case':12}{'scheme':6}{'M':>5}{'rel.err':>10}{'vs ORT':>10}{'ours ms':>10}{'cuBLAS32':>10}"
          f"{'cuBLAS16':>10}{'torch i8':>10}{'/fp16':>9}")
    print("\n".join(lines))
    if buckets:
        print(f"\n{'layer kernel alone':38}{'M':>5}{'GEMV ms':>10}{'TC16 ms':>10}{'TC64 ms':>10}")
        print("\n".join(buckets))
    if transforms:
        print(f"\n{'transform kernel alone':46}{'M':>5}{'ms':>10}")
        print("\n".join(transforms))
    wrong = 0  # kernels alone whose output is wrong or which failed (counted apart from the artifacts)
    if (directory / "kernels").is_dir():
        kernel_lines = run_kernels(directory)
        print(f"\n{'kernel alone (ms; ! = wrong output)':34}" + "".join(f"{'M=' + str(m):>10}" for m in KERNEL_ROWS))
        print("\n".join(kernel_lines))
        side_lines = run_transforms(directory)
        print(f"\n{'layer side alone (ms at M = 1, 16, 128)':52}")
        print("\n".join(side_lines))
        wrong = sum("!" in line or "failed" in line for line in kernel_lines + side_lines)
        print(f"\n{len(kernel_lines) + len(side_lines) - wrong}/{len(kernel_lines) + len(side_lines)} kernels "
              "alone right at every row count")
    print(f"\n{len(lines) - failures}/{len(lines)} outputs match the host artifact (rel. L2 error < 1e-4; "
          "2e-3 for float16 tensor-core rows)")
    return 1 if failures or wrong else 0


RUNTIME_LEFT_OUT = ("3rdparty", "src", "include", "__pycache__", "libtvm_compiler.so", "relax", "topi", "s_tir",
                    "web", "contrib", "meta_schedule", "dlight")  # not imported by `run` (TVM_USE_RUNTIME_LIB=1)
DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site {out}/whl/*.whl "
                  "&& export PYTHONPATH=$PWD/{out}/site:/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1 "
                  "&& for d in schedules passes targets; do ln -sfn ../$d fq_tvm/$d; done "
                  "&& python3 benchmarks/cuda_check.py run {out}/run > $OUT/log 2>&1; tail -c 6000 $OUT/log")


def pack(prepared: Path, out: Path, leave_out: list[str], python: str) -> None:
    """What a GPU machine with Python and numpy but no TVM needs, in `out` (a git-ignored folder
    of the checkout, carried to the device): run/ (the prepared cases without _work and without
    the artifacts in `leave_out`), site/tvm (the installed TVM without its compiler library or
    the packages `run` does not import) and whl/ (tvm-ffi's wheel for the device's Python)."""
    import shutil
    import subprocess

    import tvm
    import tvm_ffi

    shutil.rmtree(out / "run", ignore_errors=True)
    shutil.rmtree(out / "site", ignore_errors=True)
    dropped = lambda name: any(name.startswith(f"{a}.") or name == a for a in leave_out)  # noqa: E731
    shutil.copytree(prepared, out / "run", ignore=lambda _d, names: [n for n in names if n == "_work" or dropped(n)])
    index = [e for e in json.loads((prepared / "index.json").read_text()) if e["artifact"] not in leave_out]
    (out / "run" / "index.json").write_text(json.dumps(index, indent=1))
    shutil.copytree(Path(tvm.__file__).parent, out / "site" / "tvm", ignore=shutil.ignore_patterns(*RUNTIME_LEFT_OUT))
    version = tvm_ffi.__version__
    tag = python.replace(".", "")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
                    *(f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)), "--platform=manylinux2014_x86_64",
                    "-d", str(out / "whl"), f"apache-tvm-ffi=={version}"], check=True)
    parts = [out / name for name in ("run", "site", "whl")]
    size = sum(f.stat().st_size for part in parts for f in part.rglob("*") if f.is_file()) / 2**20
    where = os.path.relpath(out)
    print(f"{size:.1f} MiB to carry: {', '.join(os.path.relpath(p) for p in parts)}; then, from the checkout's "
          f"root:\n  {DEVICE_COMMAND.format(out=where)}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="compile CUDA artifacts and host references (needs full TVM + nvcc)")
    pp.add_argument("dir", type=Path)
    pp.add_argument("--arch", default="sm_90")
    pp.add_argument("--minilm", action="store_true",
                    help="instead of the synthetic cases: all-MiniLM-L6-v2 fq2 on Lee documents (needs its data)")
    pp.add_argument("--kernels", action="store_true",
                    help="also each code-reduction form alone (GEMV, tiled, the two tensor-core buckets) and "
                         "the 4096 layer sides alone")
    pp.add_argument("--sweep", action="store_true",
                    help="with --kernels: every tensor-core tile and slice variant on KERNEL_SHAPES_SWEPT")
    pk = sub.add_parser("pack", help="copy what the GPU machine needs into a folder to carry there")
    pk.add_argument("dir", type=Path, help="the prepared directory")
    pk.add_argument("out", type=Path, help="a git-ignored folder inside the checkout, e.g. .gpu")
    pk.add_argument("--leave-out", nargs="*", default=[], metavar="ARTIFACT",
                    help="artifacts not to carry (e.g. 4096x4096.int8, 17 MB) to fit a transfer limit")
    pk.add_argument("--python", default="3.12", help="the device's Python version (default 3.12)")
    pr = sub.add_parser("run", help="check and time them on this machine's GPU (TVM runtime only)")
    pr.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.dir, args.out, args.leave_out, args.python)
        return 0
    if args.cmd == "prepare":
        prepare(args.dir, args.arch, args.minilm)
        if args.kernels:
            prepare_kernels(args.dir, args.arch, args.sweep)
            prepare_transforms(args.dir, args.arch)
        return 0
    return run(args.dir)


if __name__ == "__main__":
    sys.exit(main())
