"""The CPU layer norm over the last axis, a row at a time: the mean, then the sum of squared
deviations, then (x - mean) * rstd * gamma + beta, three vector passes while the row is in L1.
Rows in parallel tasks. Through the fallback (TOPI's sums of x and x^2 as reductions, then the
normalisation) it took 15 of 278 ms of MiniLM fq2 at 16 x 128 on one Zen 4 core.

The variance is the mean of squared deviations from the mean (two passes, as ONNX Runtime), not
E[x^2] - E[x]^2.

`rms_norm` is the same row kernel for x * (1 / sqrt(mean(x^2) + eps)) * w (Llama's norm, gathered
into one op by passes/rms_norm.py): one pass for the sum of squares, one for the output. Through
the fallback (a power kernel, then a fused mean and normalisation) SmolLM2's 61 norms took 4.3 of
125 ms of its 1 x 128 forward at two threads (AMD EPYC, Zen 4).
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .common import STACK, in_tasks, parsed_once, row_kernel
from .kernels import OPAQUE

KIND = "layer_norm_rows"
RMS_KIND = "rms_norm_rows"


def _lane_sum(L: int):
    """A macro vsum(acc, s): s[0] = the L lanes of acc added."""

    @T.macro
    def vsum(acc, s):
        s[0] = T.float32(0)
        for v in range(L):
            s[0] = s[0] + acc[v]

    return vsum


@parsed_once
def layer_norm(n: int, epsilon: float, lanes: int) -> tvm.tirx.PrimFunc:
    """x [rows, n], gamma [n], beta [n] -> y [rows, n], float32; rows symbolic, n static."""
    L = min(lanes, n)
    full = n // L * L
    eps = T.float32(epsilon)
    vsum = _lane_sum(L)

    @T.macro
    def row(i, x, gamma, beta, y, acc, s):
        acc[T.ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
        for jo in range(n // L):
            acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + x[i, T.ramp(jo * L, 1, L)]
        vsum(acc, s)
        for j in range(full, n):
            s[0] = s[0] + x[i, j]
        mean: T.let = s[0] / T.float32(n)
        acc[T.ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
        for jo in range(n // L):
            acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + (x[i, T.ramp(jo * L, 1, L)] - T.Broadcast(mean, L)) * (
                x[i, T.ramp(jo * L, 1, L)] - T.Broadcast(mean, L))
        vsum(acc, s)
        for j in range(full, n):
            s[0] = s[0] + (x[i, j] - mean) * (x[i, j] - mean)
        rstd: T.let = T.float32(1) / T.sqrt(s[0] / T.float32(n) + eps)
        for jo in range(n // L):
            y[i, T.ramp(jo * L, 1, L)] = (x[i, T.ramp(jo * L, 1, L)] - T.Broadcast(mean, L)) * T.Broadcast(
                rstd, L) * gamma[T.ramp(jo * L, 1, L)] + beta[T.ramp(jo * L, 1, L)]
        for j in range(full, n):
            y[i, j] = (x[i, j] - mean) * rstd * gamma[j] + beta[j]

    @T.macro
    def rows(lo, count, x, gamma, beta, y):
        acc = T.alloc_buffer((L,), "float32", annotations=STACK)
        s = T.alloc_buffer((1,), "float32", annotations=STACK)
        for r in range(count):
            row(lo + r, x, gamma, beta, y, acc, s)

    run = in_tasks(rows)

    @T.prim_func(private=True)
    def func(x_h: T.handle, gamma: T.Buffer((n,), "float32"), beta: T.Buffer((n,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, n), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        run(m, x, gamma, beta, y)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


@parsed_once
def rms_norm(n: int, epsilon: float, lanes: int) -> tvm.tirx.PrimFunc:
    """x [rows, n], w [n] -> y [rows, n] = x * (1 / sqrt(mean(x^2) + eps)) * w, float32; rows
    symbolic, n static."""
    row, L = rms_row(n, epsilon, lanes)

    @T.macro
    def rows(lo, count, x, w, y):
        acc = T.alloc_buffer((L,), "float32", annotations=STACK)
        s = T.alloc_buffer((1,), "float32", annotations=STACK)
        for r in range(count):
            row(lo + r, x, w, lo + r, y, acc, s)

    func = row_kernel(n, n, (n,), rows)
    return func.with_attrs({"fq_kernel": RMS_KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})


def rms_row(n: int, epsilon: float, lanes: int):
    """(row, L): the macro row(i, x, w, yi, y, acc, s) writing row yi of y as row i of x, RMS
    normalised and scaled by w, with scratch acc [L] and s [1]; `cpu_transform` runs it before an
    input side."""
    L = min(lanes, n)
    full = n // L * L
    eps = T.float32(epsilon)
    vsum = _lane_sum(L)

    @T.macro
    def row(i, x, w, yi, y, acc, s):
        acc[T.ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
        for jo in range(n // L):
            acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + x[i, T.ramp(jo * L, 1, L)] * x[i, T.ramp(jo * L, 1, L)]
        vsum(acc, s)
        for j in range(full, n):
            s[0] = s[0] + x[i, j] * x[i, j]
        rstd: T.let = T.float32(1) / T.sqrt(s[0] / T.float32(n) + eps)
        for jo in range(n // L):
            y[yi, T.ramp(jo * L, 1, L)] = x[i, T.ramp(jo * L, 1, L)] * T.Broadcast(rstd, L) * w[T.ramp(jo * L, 1, L)]
        for j in range(full, n):
            y[yi, j] = x[i, j] * rstd * w[j]

    return row, L
