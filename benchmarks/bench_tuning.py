"""MiniLM with and without an fq-tune database, side by side in one run (interleaved blocks).

    fq-tune minilm.onnx --scheme fq2 --calib C.npz --input-shape batch=1 --input-shape seq=128 -o DB
    python benchmarks/bench_tuning.py --db DB --model minilm.onnx --calib C.npz --shape 1x128

Both builds use the same pins (MetaSchedule's records cover static shapes only; the kernels' knobs
need none) and are compiled in this process, so the calibration is computed once. Inputs: Lee
documents truncated or padded to the sequence length. Prints the database's int8 kernels as a table (hand -> tuned ms per row bucket,
as fq-tune measured them), the tuned/default split of the manifest, and median / p10 / p90 ms per
call of both builds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import fq_tvm
from fq_tvm import evaluate, kernel_tuning, realmodels, timing


def kernel_table(meta: dict) -> list[str]:
    """The database's int8 kernels as a markdown table: per row bucket, hand -> tuned ms as fq-tune
    measured them ("same code" where the tuned knobs do not change that bucket's path)."""
    rows = sorted({m for e in meta.get("kernels", {}).values() for m in e.get("hand_s") or {}}, key=int)
    lines = ["| kernel plan | calls | " + " | ".join(f"{m} rows, ms" for m in rows) + " | used |",
             "| --- | --- | " + " | ".join("---" for _ in rows) + " | --- |"]
    for key, e in meta.get("kernels", {}).items():
        hand, best, acts = e.get("hand_s") or {}, e.get("best_s") or {}, e.get("acts", [])
        cells = [f"{hand[m] * 1e3:.4f} -> {best[m] * 1e3:.4f}" if best and m in acts else
                 f"{hand[m] * 1e3:.4f}" + (" (same code)" if best else "") if m in hand else "-" for m in map(str, rows)]
        moved = " ".join(f"`{k}={v}`" for k, v in kernel_tuning.moved(e).items())
        used = ("tuned: " + moved) if kernel_tuning.wins(e) else "hand" if "checked" in e else "search not finished"
        lines.append(f"| {key} | {e.get('calls', 0)} | " + " | ".join(cells) + f" | {used} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--calib")
    p.add_argument("--scheme", default="fq2")
    p.add_argument("--shape", default="1x128")
    p.add_argument("--work", default="bench_tuning")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    batch, seq = map(int, args.shape.split("x"))
    pins = [f"batch={batch}", f"seq={seq}"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    arts = {}
    for label, db in (("default", None), ("tuned", args.db)):
        t0 = time.perf_counter()
        arts[label] = fq_tvm.compile(args.model, "host", work / label, scheme=args.scheme, calib=args.calib,
                                     input_shapes=pins, tuning_db=db, force=True, quiet=True)
        print(f"compiled {label} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    for line in kernel_table(json.loads((Path(args.db) / "fq_tuning.json").read_text())):
        print(line)
    tuning = json.loads((arts["tuned"] / "manifest.json").read_text())["kernels"]["tuning"]
    print(f"tuned {tuning['tuned']} of {tuning['tuned'] + tuning['default']} fallback functions")
    for name, state in sorted(tuning["functions"].items()):
        print(f"  {name}: {state}")
    docs, _ = realmodels.lee_corpus()
    feed = realmodels.tokenize_minilm(realmodels.minilm_tokenizer(), docs[:batch], max_len=seq, pad_to=seq)
    runs = {label: evaluate.artifact_runner(path) for label, path in arts.items()}
    outs = {label: run(feed) for label, run in runs.items()}
    name = next(iter(outs["default"]))
    diff = float(np.abs(outs["tuned"][name] - outs["default"][name]).max() / np.abs(outs["default"][name]).max())
    print(f"tuned vs default output: max relative difference {diff:.2e}")
    blocks = {label: timing.local_block(lambda run=run: run(feed)) for label, run in runs.items()}
    result = timing.interleaved(blocks, seconds=args.seconds, rounds=args.rounds)
    for label, stats in result.items():
        print(f"{label:8} median {stats['median_ms']:.2f} ms  p10 {stats['p10_ms']:.2f}  p90 {stats['p90_ms']:.2f}"
              f"  ({stats['calls']} calls)")
    print(f"speedup (median): {result['default']['median_ms'] / result['tuned']['median_ms']:.3f}x")


if __name__ == "__main__":
    main()
