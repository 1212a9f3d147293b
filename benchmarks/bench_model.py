"""Whole-model latency, side by side in one run: fq-tvm fp32 / int8 / fq2 artifacts against ONNX
Runtime fp32 and dynamic int8 on the same ONNX file and the same inputs.

    python benchmarks/bench_model.py [--model minilm|smollm2] [--shapes 1x128 16x128] [--schemes fp32 int8 fq2]
                                     [--reuse] [--before DIR] [--rounds N] [--threads N]

minilm: all-MiniLM-L6-v2 (exported and calibrated as fq-report does); inputs are Lee documents
truncated or padded to the sequence length. smollm2: SmolLM2-135M, one forward pass (logits for
every position, no KV cache) over Pride and Prejudice tokens; calibration 16 x 256 Wikipedia
tokens, the tied lm_head kept fp32 (as in fq-report). Runners take turns in blocks of calls
(`fq_tvm.timing.interleaved`, 2 s per runner and shape per round) so that thread pools do not
steal each other's cores.
--reuse times the artifacts already in --work instead of compiling; --before DIR also times the
artifacts of another work dir (an earlier build) in the same run, as "fq-tvm SCHEME (before)";
--rounds N repeats the sequence of blocks N times and reports each runner's median call over
them (on a shared machine a neighbour's burst then spoils one block, not one runner's figure); --threads N
runs both runtimes on N threads (default: TVM one per physical core, ORT its default). A scheme
written SCHEME+head (fq2+head) compiles with --quantize-head (SmolLM2's tied head quantized too),
SCHEME+head:HEAD (fq2+head:int8) with --head-scheme HEAD; a suffix @aBITS (fq2@a32) with --act-bits BITS.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_layer import cpu_name, scheme_spec  # noqa: E402

import fq_tvm  # noqa: E402
from fq_tvm import evaluate, realmodels, timing  # noqa: E402


def _model(name: str, work: Path):
    """(onnx path, calibration path, compile options) of a benchmark model."""
    if name == "smollm2":
        onnx_path = realmodels.export_smollm2(work)
        calib = work / "smollm2_calib.npz"
        if not calib.exists():
            realmodels.smollm2_calib(calib, n=16, seq=256)
        return onnx_path, calib, {"skip": "lm_head"}
    onnx_path = realmodels.export_minilm(work)
    calib = work / "minilm_calib.npz"
    if not calib.exists():
        realmodels.minilm_calib(calib)
    return onnx_path, calib, {}


def runners(work: Path, schemes, model: str = "minilm", reuse: bool = False, before: Path | None = None,
            threads: int = 0) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fq_tvm.compiler import uses_calibration

    onnx_path, calib, options = _model(model, work)
    out = {}
    for scheme in schemes:
        path = work / f"bench.{model}.{scheme}"
        build, act_bits = scheme_spec(scheme)  # fq2@a32: --act-bits 32
        name, head, head_scheme = build.partition("+head")  # fq2+head: --quantize-head; fq2+head:int8
        head_scheme = head_scheme.removeprefix(":") or None
        if not reuse:
            t0 = time.perf_counter()
            fq_tvm.compile(onnx_path, "host", path, scheme=name, calib=calib if uses_calibration(name) else None,
                           force=True, quiet=True, quantize_head=bool(head), head_scheme=head_scheme,
                           act_bits=act_bits, **options)
            print(f"compiled {scheme} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        if before is not None:
            out[f"fq-tvm {scheme} (before)"] = evaluate.artifact_runner(before / f"bench.{model}.{scheme}")
        out[f"fq-tvm {scheme}"] = evaluate.artifact_runner(path)
    int8_path = work / f"{model}.ort_int8.onnx"
    if not (reuse and int8_path.exists()):
        quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=True)
    out["ORT fp32"] = evaluate.ort_runner(onnx_path, threads)
    out["ORT int8 (dynamic)"] = evaluate.ort_runner(int8_path, threads)
    return out


def feeds(model: str, shapes) -> list:
    if model == "smollm2":
        ids = evaluate.austen_windows(realmodels.smollm2_tokenizer(), max(b for b, _ in shapes),
                                      max(s for _, s in shapes))
        return [{"input_ids": ids[:batch, :seq]} for batch, seq in shapes]
    docs, _ = realmodels.lee_corpus()
    tokenizer = realmodels.minilm_tokenizer()
    return [realmodels.tokenize_minilm(tokenizer, docs[:batch], max_len=seq, pad_to=seq) for batch, seq in shapes]


def main(argv=None) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--shapes", nargs="+", default=None, help="batch x tokens (minilm: 1x128 16x128; smollm2: 1x128)")
    p.add_argument("--schemes", nargs="+", default=["fp32", "int8", "fq2"])
    p.add_argument("--work", default=str(Path.home() / ".cache" / "fq-tvm" / "bench_model"))
    p.add_argument("--reuse", action="store_true", help="time the artifacts already in --work (no compile)")
    p.add_argument("--before", default=None, help="a work dir of an earlier build, timed in the same run")
    p.add_argument("--rounds", type=int, default=1, help="blocks per runner and shape, interleaved; the median is shown")
    p.add_argument("--threads", type=int, default=0, help="threads of both runtimes (0: their defaults)")
    args = p.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts (first run)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = runners(work, args.schemes, args.model, args.reuse, Path(args.before) if args.before else None, args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x"))
              for s in (args.shapes or (["1x128"] if args.model == "smollm2" else ["1x128", "16x128"]))]
    inputs = feeds(args.model, shapes)
    name = "SmolLM2-135M forward" if args.model == "smollm2" else "all-MiniLM-L6-v2"
    threads = f", {args.threads} thread(s)" if args.threads else ""
    print(f"\n{name}, median ms per call ({cpu_name()}{threads})")
    print(f"{'':28}" + "".join(f"{f'{b}x{s}':>18}" for b, s in shapes))
    rounds = max(1, args.rounds)
    blocks = {(label, j): timing.local_block(lambda run=run, feed=feed: run(feed))
              for label, run in table.items() for j, feed in enumerate(inputs)}
    medians = timing.interleaved(blocks, seconds=2.0 * rounds, rounds=rounds)
    results = {label: [medians[label, j]["median_ms"] for j in range(len(inputs))] for label in table}
    base = results["ORT fp32"]
    for label, row in results.items():
        print(f"{label:28}" + "".join(f"{t:9.2f} ({t / b:5.2f}x)" for t, b in zip(row, base)), flush=True)


if __name__ == "__main__":
    main()
