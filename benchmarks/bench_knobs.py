"""The int8 dequant-matmul's schedule knobs, swept one at a time around the hand values on this
machine: is the hand schedule the best point near it, per layer shape and row count?

    python benchmarks/bench_knobs.py [--shapes 3072x648 576x1728 ...] [--rows 1 16 128] [--bits 2]

Shapes are N x K as our fq2 kernels see them (K: the frame's width; defaults: SmolLM2's and
MiniLM's fq2 layers at r = 1.1). For each shape and row count every variant (one knob moved from
its hand value to another value of its space) is built for the host and checked against the hand
build's output; then all of them are timed in interleaved blocks (`fq_tvm.timing.interleaved`) on
the same inputs.
The knobs and their values are fq-tune's search space (`cpu_int8.Knobs`, `FEW_ROW_SPACE`,
`MANY_ROW_SPACE`): few-row knobs act below `many_rows` activation rows, many-row knobs from it;
`many_rows=16` runs the many-row path at 16 rows. Prints per case the hand schedule's median, the
best variant's and hand / best, then hand / best again from a second, longer interleaved run of
those two alone (the best of many noisy draws is biased low: trust the second ratio).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ["3072x648", "576x1728", "960x648", "576x648", "1536x432", "384x1728", "1152x432"]


def variants(rows: int, plan) -> list[tuple[str, object]]:
    """(label, knobs) for the hand schedule and each knob moved to another value of its space
    (`cpu_int8.FEW_ROW_SPACE`, `MANY_ROW_SPACE`) that acts at `rows`."""
    from dataclasses import replace

    from fq_tvm.schedules import cpu_int8

    hand = plan.knobs
    space = cpu_int8.FEW_ROW_SPACE if rows < plan.many_rows else cpu_int8.MANY_ROW_SPACE
    out = [("hand", hand)]
    for name, values in space.items():  # (a lower many_rows acts only where it reaches `rows`)
        out += [(f"{name}={v}", replace(hand, **{name: v})) for v in values
                if v != getattr(hand, name) and (name != "many_rows" or v <= rows)]
    return out


def build(plan, knobs, target):
    import tvm
    from dataclasses import replace

    from fq_tvm.schedules import cpu_int8

    func = cpu_int8.dequant_matmul(replace(plan, knobs=knobs))
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).mod["main"]


def case(n: int, k: int, rows: int, bits: int, target, seconds: float, rounds: int) -> dict:
    import tvm

    from fq_tvm import timing
    from fq_tvm.numerics.packing import pack_codes
    from fq_tvm.schedules import cpu_int8

    plan = cpu_int8.plan(n, k, bits, k, target)
    if plan is None:
        raise SystemExit(f"no int8 kernel for {n}x{k} on this target")
    rng = np.random.default_rng(n + k)
    args = [tvm.runtime.tensor(a) for a in (
        rng.standard_normal((rows, k)).astype(np.float32), pack_codes(rng.integers(0, 2**bits, (n, k)), bits),
        rng.uniform(0.01, 0.1, (n, 1)).astype(np.float32), rng.uniform(0, 2**bits - 1, (n, 1)).astype(np.float32))]
    blocks, ref = {}, None
    for label, knobs in variants(rows, plan):
        fn, y = build(plan, knobs, target), tvm.runtime.tensor(np.zeros((rows, n), np.float32))
        fn(*args, y)
        out = y.numpy()
        ref = out if ref is None else ref
        err = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
        if err > 1e-5:
            raise SystemExit(f"{n}x{k} rows {rows} {label}: output differs from the hand build ({err:.2e})")
        blocks[label] = timing.local_block(lambda fn=fn, y=y: fn(*args, y))
    res = timing.interleaved(blocks, seconds=seconds, rounds=rounds)
    best = min(res, key=lambda label: res[label]["median_ms"])
    if best != "hand":  # the winner of many noisy draws: timed again against the hand schedule alone
        again = timing.interleaved({b: blocks[b] for b in ("hand", best)}, seconds=3 * seconds, rounds=2 * rounds)
        res.update({f"{b} again": r for b, r in again.items()})
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="N x K (default: SmolLM2's and MiniLM's fq2 layers)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--bits", type=int, default=2, choices=(2, 4, 8))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.5, help="time per variant and case (default 1.5)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts
    from fq_tvm.cpuinfo import board_info, describe
    from fq_tvm.targets import resolve

    preset = resolve("host")
    target = preset.tvm_target()
    print(f"# {describe(board_info())}, {args.threads} threads, target {preset.target}")
    print("| layer (N x K) | rows | hand ms | best ms | best variant | hand / best | timed again: hand / best |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.lower().split("x"))
        for rows in args.rows:
            res = case(n, k, rows, args.bits, target, args.seconds, args.rounds)
            timed = [label for label in res if not label.endswith(" again")]
            best = min(timed, key=lambda label: res[label]["median_ms"])
            hand, low = res["hand"]["median_ms"], res[best]["median_ms"]
            again = res["hand again"]["median_ms"] / res[f"{best} again"]["median_ms"] if best != "hand" else 1.0
            print(f"| {n} x {k} | {rows} | {hand:.4f} | {low:.4f} | {best} | {hand / low:.3f} | {again:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
