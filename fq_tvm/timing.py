"""Latency measurement: warm-up, then adaptive repeats, several runners interleaved block by block.

ONNX Runtime's and TVM's thread pools spin for a while after a call, so alternating call by call
would make each steal the other's cores; each runner instead gets a block of calls (about
`seconds / rounds`) before the next one, and the rounds cycle through all runners so that a slow
minute on a shared machine hits them all. Stdlib + numpy only.
"""

from __future__ import annotations

import time

import numpy as np


def call_times(fn, seconds: float, min_calls: int = 1, max_calls: int = 100_000) -> list[float]:
    """Seconds per call of `fn()`, calling it for about `seconds` (at least min_calls times)."""
    times, start = [], time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict:
    """Median, p10 and p90 in milliseconds, and the number of calls."""
    ms = 1e3 * np.asarray(times, np.float64)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "calls": int(len(ms))}


def repeat(fn, n: int, warmup: int = 3) -> dict:
    """`fn()` warmed up, then timed n times: summarize() of the n calls."""
    for _ in range(warmup):
        fn()
    return summarize(call_times(fn, 0.0, min_calls=n, max_calls=n))


def interleaved(blocks: dict, seconds: float = 2.0, rounds: int = 5, min_calls: int = 5,
                warmup_seconds: float = 0.2, progress=None) -> dict:
    """Time several runners, block by block. `blocks`: {label: time_block(seconds) -> [seconds per
    call]}, each a runner that warms itself up on its first unrecorded call of a block. Each runner
    gets about `seconds` in all, `rounds` blocks of seconds / rounds, and more rounds until it has
    min_calls calls. Returns {label: summarize(...)}."""
    for label, block in blocks.items():
        block(warmup_seconds)  # warm-up: caches, allocators, thread pools
    times = {label: [] for label in blocks}
    per_block = seconds / rounds
    for i in range(rounds * 20):
        pending = [label for label in blocks if i < rounds or len(times[label]) < min_calls]
        if not pending:
            break
        for label in pending:
            times[label] += blocks[label](per_block)
        if progress is not None:
            progress(i + 1, rounds)
    return {label: summarize(t) for label, t in times.items()}


def local_block(fn):
    """A time_block for a local callable: one unrecorded call, then calls for `seconds`."""
    def block(seconds: float) -> list[float]:
        fn()
        return call_times(fn, seconds)

    return block
