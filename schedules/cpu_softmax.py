"""The CPU softmax over the last axis, a row at a time: a vector max, then exp (Cephes' polynomial,
`cpu_ops.exp_f32`) written out with a vector sum, then one scaling pass while the row is in L1.
Rows in parallel tasks. The TE form (max, exp, sum, divide as four scheduled stages) read and
wrote the scores four times: 27 of 322 ms of MiniLM fq2 at 16 x 128 on one Zen 4 core.

NaN stays NaN and an all -inf row gives NaN, as with the TE form and ONNX Runtime: x - max is NaN
there, `exp_f32` keeps it, and the sum carries it to the whole row.

The exps go G vectors at a time (independent chains). G vectors whose every x - max is below
UNDER are written as zeros without their exps (the same zeros `exp_f32` gives there): the masked
half of a causal row, the padded keys of an encoder's row.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .common import STACK, in_tasks, parsed_once
from .cpu_ops import exp_f32
from .kernels import OPAQUE

KIND = "softmax_rows"
UNDER = -88.0  # exp_f32 of anything below is 0.0 exactly (2^-127 and less flush to zero)
G = 4  # vectors whose exps are computed together (one at a time, each exp's chain of dependent
# multiply-adds left the cores idle: ~39 cycles a vector on a Zen 3); a group is skipped only where
# every vector of it is hidden, and the exp of a hidden vector is zeros anyway, so the bits do not change


def row_macro(lanes: int):
    """The macro row(i, x, y, n, acc, top): y[i, :n] = softmax(x[i, :n]) (x and y may be one
    buffer); acc holds `lanes` floats, top 2 (also `cpu_attention_fused`'s)."""
    L = lanes

    def hidden(d):  # every lane of x - max below UNDER (NaN is not): exp_f32 gives exactly 0 there
        return T.call_llvm_pure_intrin("bool", "llvm.vector.reduce.and", d < T.Broadcast(T.float32(UNDER), L))

    def exps(g):
        """The macro block(i, x, y, v, acc, top): the exps of the g vectors from vector v written to y
        and added to acc in order (g independent chains), or zeros where all g are hidden."""

        def vec(buf, i, v):
            return buf[i, T.ramp(v * L, 1, L)]

        def all_hidden(x, i, v, top):
            return tvm.tirx.all(*[hidden(vec(x, i, v + u) - T.Broadcast(top, L)) for u in range(g)])

        @T.macro
        def block(i, x, y, v, acc, top):
            if all_hidden(x, i, v, top[0]):
                for u in T.unroll(g):
                    y[i, T.ramp((v + u) * L, 1, L)] = T.Broadcast(T.float32(0), L)
            else:
                for u in T.unroll(g):
                    y[i, T.ramp((v + u) * L, 1, L)] = exp_f32(vec(x, i, v + u) - T.Broadcast(top[0], L))
                for u in T.unroll(g):
                    acc[T.ramp(0, 1, L)] = acc[T.ramp(0, 1, L)] + vec(y, i, v + u)

        return block

    group, single = exps(G), exps(1)

    @T.macro
    def row(i, x, y, n, acc, top):
        acc[T.ramp(0, 1, L)] = T.Broadcast(T.float32(-3.4028234663852886e38), L)
        for jo in range(n // L):
            acc[T.ramp(0, 1, L)] = T.max(acc[T.ramp(0, 1, L)], x[i, T.ramp(jo * L, 1, L)])
        for j in range(n // L * L, n):
            acc[0] = T.max(acc[0], x[i, j])
        top[0] = acc[0]
        for v in range(1, L):
            top[0] = T.max(top[0], acc[v])
        acc[T.ramp(0, 1, L)] = T.Broadcast(T.float32(0), L)
        for jg in range(n // (G * L)):
            group(i, x, y, jg * G, acc, top)
        for jo in range(n // (G * L) * G, n // L):
            single(i, x, y, jo, acc, top)
        for j in range(n // L * L, n):
            y[i, j] = exp_f32(x[i, j] - top[0])
            acc[0] = acc[0] + y[i, j]
        top[1] = T.float32(0)
        for v in range(L):
            top[1] = top[1] + acc[v]
        scale: T.let = T.float32(1) / top[1]
        for jo in range(n // L):
            y[i, T.ramp(jo * L, 1, L)] = y[i, T.ramp(jo * L, 1, L)] * T.Broadcast(scale, L)
        for j in range(n // L * L, n):
            y[i, j] = y[i, j] * scale

    return row


@parsed_once
def softmax(lanes: int) -> tvm.tirx.PrimFunc:
    """x [rows, n] -> y [rows, n], both symbolic, float32; vectors of `lanes` floats."""
    L = lanes
    row = row_macro(lanes)

    @T.macro
    def rows(lo, count, x, y, n, unused):
        acc = T.alloc_buffer((L,), "float32", annotations=STACK)
        top = T.alloc_buffer((2,), "float32", annotations=STACK)  # the row's max, then its sum
        for r in range(count):
            row(lo + r, x, y, n, acc, top)

    run = in_tasks(rows, lambda x, y, n, unused: n)

    @T.prim_func(private=True, check_well_formed=False)  # the root block (below) with plain loops
    def func(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        n = T.int64()
        x = T.match_buffer(x_h, (m, n), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        with T.sblock("root"):  # RewriteDataflowReshape asserts a root block in one-input kernels
            run(m, x, y, n, None)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
