"""CUDA artifacts checked and timed on a real GPU, built on a machine without one.

    python benchmarks/cuda_check.py prepare DIR [--arch sm_90]   # here: compile + references
    python benchmarks/cuda_check.py run DIR                        # on the GPU machine

`prepare` compiles small models for CUDA and for the host, runs the host artifact (and ONNX Runtime
for fp32) on fixed inputs and stores inputs and expected outputs beside the CUDA artifacts. `run`
needs only TVM's runtime, numpy and (for the cuBLAS baselines) torch: it loads every CUDA artifact,
compares its outputs with the stored ones (relative L2 error) and times it with TVM's evaluator,
next to torch fp32 / fp16 matmuls of the same layer shape measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

CASES = [  # name, model builder kwargs, schemes, input row counts
    ("linear4096", {"kind": "linear", "size": 4096}, ("fq2", "int8"), (1, 16, 128)),
    ("linear1024", {"kind": "linear", "size": 1024}, ("fp32", "fq2"), (1, 16)),
    ("encoder384", {"kind": "encoder", "hidden": 384, "heads": 6, "ffn": 1536}, ("fp32", "fq2"), (8, 64)),
    ("decoder576", {"kind": "decoder", "hidden": 576, "heads": 9, "ffn": 1536}, ("fp32", "fq2"), (8, 64)),
]
# all-MiniLM-L6-v2 (real weights): rows = number of Lee documents per batch
MINILM = ("minilm", {"kind": "minilm"}, ("fq2",), (1, 16))


def _build_onnx(work: Path, name: str, spec: dict) -> Path:
    from fq_tvm import models

    if spec["kind"] == "minilm":
        from fq_tvm import realmodels

        return realmodels.export_minilm(work)
    path = work / f"{name}.onnx"
    if spec["kind"] == "linear":
        return models.linear(path, spec["size"], spec["size"], bias=False)
    if spec["kind"] == "encoder":
        return models.encoder_block(path, spec["hidden"], spec["heads"], spec["ffn"])
    return models.decoder_block(path, spec["hidden"], spec["heads"], spec["ffn"])


def _width(spec: dict) -> int:
    """Feature width of a synthetic case (0 for MiniLM, whose inputs are token ids)."""
    return spec.get("size") or spec.get("hidden", 0)


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

    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    index = []
    for name, spec, schemes, rows in ([MINILM] if minilm else CASES):
        onnx_path = _build_onnx(work, name, spec)
        calib = _calib(work, spec)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        for scheme in schemes:
            opts = dict(scheme=scheme, calib=calib, quiet=True, force=True)
            gpu = fq_tvm.compile(onnx_path, "cuda", out / f"{name}.{scheme}", cuda_arch=arch, **opts)
            host = fq_tvm.load(fq_tvm.compile(onnx_path, "host", work / f"{name}.{scheme}.host", **opts))
            for m in rows:
                feed = _inputs(spec, m, seed=m)
                expected = next(iter(host.run(feed).values()))
                extra = {"ort": session.run(None, feed)[0]} if scheme == "fp32" else {}
                inputs = {f"in_{k}": v for k, v in feed.items()}
                np.savez(out / f"{name}.{scheme}.m{m}.npz", **inputs, expected=expected, **extra)
            index.append({"case": name, "scheme": scheme, "artifact": gpu.name, "rows": list(rows),
                          "width": _width(spec), "kind": spec["kind"]})
            print(f"prepared {name} {scheme}", file=sys.stderr)
    (out / "index.json").write_text(json.dumps(index, indent=1))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _time_artifact(model, feed: dict) -> float:
    import tvm

    dev = model._device
    args = [tvm.runtime.tensor(np.ascontiguousarray(feed[s["name"]]), dev) for s in model.inputs]
    timer = model._vm.time_evaluator("main", dev, number=20, repeat=7, min_repeat_ms=50)
    return 1e3 * float(np.median(timer(*args).results))


def _torch_ms(width: int, rows: int, dtype) -> float:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(rows, width, device="cuda", dtype=dtype)
    w = torch.randn(width, width, device="cuda", dtype=dtype)
    for _ in range(5):
        a @ w
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        for _ in range(50):
            a @ w
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 50)
    return float(np.median(times))


def run(directory: Path) -> int:
    import fq_tvm

    index = json.loads((directory / "index.json").read_text())
    failures, lines = 0, []
    for entry in index:
        if not (directory / entry["artifact"]).is_dir():  # left out to fit a transfer limit
            continue
        model = fq_tvm.load(directory / entry["artifact"])
        for m in entry["rows"]:
            path = directory / f"{entry['case']}.{entry['scheme']}.m{m}.npz"
            if not path.exists():  # left out to fit a transfer limit
                continue
            data = dict(np.load(path))
            feed = {k[3:]: v for k, v in data.items() if k.startswith("in_")}
            got = next(iter(model.run(feed).values()))
            err = _rel(got, data["expected"])
            err_ort = _rel(got, data["ort"]) if "ort" in data else float("nan")
            ok = np.isfinite(got).all() and err < 1e-4 and (not np.isfinite(err_ort) or err_ort < 1e-4)
            failures += not ok
            ms = _time_artifact(model, feed)
            row = f"{entry['case']:12}{entry['scheme']:6}M={m:<5}{err:10.2e}{err_ort:10.2e}{ms:10.4f}"
            if entry["kind"] == "linear":
                import torch

                row += f"{_torch_ms(entry['width'], m, torch.float32):10.4f}{_torch_ms(entry['width'], m, torch.float16):10.4f}"
            lines.append(row + ("" if ok else "  MISMATCH"))
    print(f"\n{'case':12}{'scheme':6}{'rows':7}{'rel.err':>10}{'vs ORT':>10}{'ours ms':>10}{'cuBLAS32':>10}{'cuBLAS16':>10}")
    print("\n".join(lines))
    print(f"\n{len(lines) - failures}/{len(lines)} outputs match (rel. L2 error < 1e-4)")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="compile CUDA artifacts and host references (needs full TVM + nvcc)")
    pp.add_argument("dir", type=Path)
    pp.add_argument("--arch", default="sm_90")
    pp.add_argument("--minilm", action="store_true",
                    help="instead of the synthetic cases: all-MiniLM-L6-v2 fq2 on Lee documents (needs its data)")
    pr = sub.add_parser("run", help="check and time them on this machine's GPU (TVM runtime only)")
    pr.add_argument("dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.dir, args.arch, args.minilm)
        return 0
    return run(args.dir)


if __name__ == "__main__":
    sys.exit(main())
