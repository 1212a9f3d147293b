"""One dense layer, side by side in one run: our compiled fq2 / int8 / fp32 artifacts against
ONNX Runtime fp32, dynamic int8 and MatMulNBits 2/4-bit (accuracy_level 4).

    python benchmarks/bench_layer.py [--shapes 4096x4096 11008x4096 1536x384] [--rows 1 16 128]

Shapes are N x K (outputs x inputs). Prints median latency per call (ms) and the ratio to ORT
fp32. Runners take turns in blocks of calls (`fq_tvm.timing.interleaved`: --rounds blocks of
--seconds / --rounds each, after a warm-up block): ORT's and TVM's thread pools spin after a call,
so alternating call by call would make each steal the other's cores, and one block per runner
(as before 2026-11-27; at most 200 calls, 20 ms at M = 1) caught whatever the machine was doing
then. Timings on a shared 2-core machine are noisy: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import logging

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).parent))
import ort_baselines  # noqa: E402

import fq_tvm  # noqa: E402
from fq_tvm import models, timing  # noqa: E402
from fq_tvm.numerics import find_dense_layers, weight_matrix  # noqa: E402


def ort_runner(path: Path, threads: int = 0):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def scheme_spec(spec: str) -> tuple[str, int]:
    """SCHEME or SCHEME@aBITS (fq2@a32: --act-bits 32) -> (scheme, act_bits)."""
    name, _, bits = spec.partition("@a")
    return name, int(bits) if bits else 8


def build(work: Path, n: int, k: int, target: str, schemes, threads: int = 0) -> dict:
    """{label: callable(x [M, K]) -> y} for ours and ORT's."""
    from fq_tvm.compiler import uses_calibration

    onnx_path = models.linear(work / "linear.onnx", k, n, bias=False)
    w = weight_matrix(str(onnx_path), find_dense_layers(str(onnx_path))[0])
    rng = np.random.default_rng(0)
    np.savez(work / "calib.npz", x=rng.standard_normal((64, 1, k)).astype(np.float32))
    runners = {}
    for scheme in schemes:
        t0 = time.perf_counter()
        name, act_bits = scheme_spec(scheme)
        out = fq_tvm.compile(onnx_path, target, work / f"ours.{scheme}", scheme=name, act_bits=act_bits,
                             calib=work / "calib.npz" if uses_calibration(name) else None, quiet=True)
        print(f"compiled {scheme} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        model = fq_tvm.load(out)
        runners[f"fq-tvm {scheme}"] = lambda x, m=model: m.run({"x": x[None]})["y"]
    fp32 = ort_baselines.fp32_matmul(work / "ort_fp32.onnx", w)
    runners["ORT fp32"] = ort_runner(fp32, threads)
    runners["ORT int8 (dynamic)"] = ort_runner(ort_baselines.dynamic_int8(work / "ort_int8.onnx", fp32), threads)
    for bits in (2, 4):
        path = ort_baselines.matmul_nbits(work / f"ort_nbits{bits}.onnx", w, bits)
        runners[f"ORT MatMulNBits {bits}-bit"] = ort_runner(path, threads)
    return runners


def main(argv=None) -> None:
    logging.getLogger().setLevel(logging.ERROR)  # ORT quantizer chatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["4096x4096"], help="N x K of each layer (default 4096x4096)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128], help="M values (default 1 16 128)")
    p.add_argument("--target", default="host")
    p.add_argument("--schemes", nargs="+", default=["fq2", "int8", "fp32"],
                   help="our builds; SCHEME@aBITS compiles with --act-bits BITS (fq2@a32)")
    p.add_argument("--threads", type=int, default=0, help="threads of both runtimes (0: their defaults)")
    p.add_argument("--seconds", type=float, default=4.0, help="time per runner and row count (default 4)")
    p.add_argument("--rounds", type=int, default=4, help="blocks per runner and row count (default 4)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts (first run)
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            runners = build(Path(tmp), n, k, args.target, args.schemes, args.threads)
            rng = np.random.default_rng(1)
            print(f"\n{n}x{k} layer (N x K), median ms per call ({args.target}, {cpu_name()})")
            print(f"{'':24}" + "".join(f"{'M=' + str(m):>18}" for m in args.rows))
            xs = [rng.standard_normal((m, k)).astype(np.float32) for m in args.rows]
            blocks = {(label, j): timing.local_block(lambda fn=fn, x=x: fn(x))
                      for label, fn in runners.items() for j, x in enumerate(xs)}
            medians = timing.interleaved(blocks, seconds=args.seconds, rounds=args.rounds)
            table = {label: [medians[label, j]["median_ms"] for j in range(len(xs))] for label in runners}
            base = table["ORT fp32"]
            for label, row in table.items():
                cells = "".join(f"{t:9.3f} ({t / b:5.2f}x)" for t, b in zip(row, base))
                print(f"{label:24}{cells}", flush=True)


def cpu_name() -> str:
    """The CPU model and its int8 dot-product flags, for the table's heading."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    keep = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}; {' '.join(keep)}"


if __name__ == "__main__":
    main()
