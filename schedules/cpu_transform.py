"""The CPU row transforms of one side of a layer as one kernel: [pad] -> Hadamard -> [frame] on the
input side, inverse Hadamard -> [take] on the output side; and a gated MLP's middle, the gate / up
output side -> swiglu -> the down projection's input side. Each row goes through every step in
local buffers (no intermediate tensor, one launch instead of one per step), with the row macros
of `cpu_hadamard` and `cpu_frame`. The buffers of `kernels.transform` (x, signs, [F] -> y) but the
frame block transposed, F^T [2l, 2k]: `cpu.rewrite` passes it so."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from . import cpu_frame, cpu_hadamard
from .common import STACK, in_tasks, parsed_once
from .cpu_ops import GELU_SCALE, erf_clamp, exp_f32, gelu_of
from .kernels import OPAQUE

KIND = "transform_rows"


def parts(steps) -> tuple | None:
    """(pad, hadamard, frame, end) of a run of one side, or None. One Hadamard, optionally
    a pad before it, a frame after it, and a last resize (pad or take) after those; pad, frame and
    end may be None."""
    resize = ("pad", "take")
    pad = steps[0] if steps[0][0] == "pad" else None
    rest = steps[pad is not None:]
    end = rest[-1] if len(rest) > 1 and rest[-1][0] in resize else None
    core = rest[:len(rest) - (end is not None)]
    if not core or core[0][0] != "hadamard" or len(core) > 2 or (len(core) == 2 and core[1][0] != "frame"):
        return None
    return pad, core[0], core[1] if len(core) == 2 else None, end


def sides(steps) -> tuple | None:
    """(before, gate, after) of a run this kernel covers, or None: `parts` of the steps before
    and after its one swiglu step (gate; None, and after None, where it has none); a side without
    steps is None."""
    kinds = [s[0] for s in steps]
    if "swiglu" not in kinds:
        found = parts(steps)
        return None if found is None else (found, None, None)
    at = kinds.index("swiglu")
    before, after = steps[:at], steps[at + 1:]
    found = [parts(side) if side else None for side in (before, after)]
    if "swiglu" in kinds[at + 1:] or any(side and f is None for side, f in zip((before, after), found)):
        return None
    return found[0], steps[at], found[1]


@parsed_once
def transform(steps, lanes: int = 16, residual: bool = False, norm: float | None = None,
              bias: bool = False, gelu: bool = False) -> tvm.tirx.PrimFunc:
    """The kernel of a run (`sides`). With `residual` (one side, one parameter: an output side), a
    second input r [m, dout] is added to each row written: y = side(x) + r, the residual add that
    follows a layer's output (one pass over a row in L1 instead of a kernel over the tensor); with
    `bias` too, a parameter b [dout] before r: y = (side(x) + b) + r (BERT's output dense). With
    `norm` (an epsilon; one side), a last parameter w [din] and each row is RMS normalised (x /
    sqrt(mean(x^2) + norm) * w, as `cpu_layer_norm.rms_norm`) before the side: the norm before a
    layer's input side. With `gelu` (one side, one parameter: an output side), each row written
    is GELU(side(x) [+ b]), b [dout] a last parameter with `bias`: BERT's intermediate dense and its
    activation in the same pass over the row."""
    before, gate, after = sides(steps)
    before, after = (None if p is None else _Side(p, lanes) for p in (before, after))
    if gelu:
        assert gate is None and len(before.params) == 1, "a GELU follows one side with one parameter"
        shapes = before.params + ([(before.dout,)] if bias else [])
        rows = _activated(before, lanes, bias)
        return _kernel(before.din, before.dout, shapes, rows).with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})
    if residual:
        assert gate is None and len(before.params) == 1, "a residual follows one side with one parameter"
        return _residual_kernel(before, lanes, bias).with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})
    if norm is not None:
        assert gate is None, "a norm comes before one side"
        shapes = before.params + [(before.din,)]
        rows = _normed(before, norm, lanes)
        return _kernel(before.din, before.dout, shapes, rows).with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})
    if gate is None:
        rows, din, dout = _one_side(before), before.din, before.dout
    else:
        rows = _gated(before, gate[1], after, lanes)
        din = before.din if before is not None else gate[1]
        dout = after.dout if after is not None else gate[1] // 2
    shapes = [shape for side in (before, after) if side is not None for shape in side.params]
    return _kernel(din, dout, shapes, rows).with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


class _Side:
    """One side of a run: its row macro `row` (see `_row`), its widths (din in, dim of the
    Hadamard, width after the frame, dout out) and its parameters' shapes (signs [, F^T])."""

    def __init__(self, p, lanes: int):
        pad, (_, dim, block, inverse), frame, end = p
        hrow = cpu_hadamard.row_macro(dim, block, bool(inverse), lanes)
        self.frow = cpu_frame.analysis_row(*frame[1:]) if frame is not None else None
        self.din = pad[1] if pad is not None else dim
        self.dim = dim
        self.width = frame[1] * frame[3] + frame[4] if frame is not None else dim  # before the last resize
        self.dout = end[2] if end is not None else self.width
        self.params = [(dim,)] + ([(frame[2], frame[3])] if frame is not None else [])
        self.row = _row(self.din, dim, self.width, self.dout, hrow, self.frow, pad is not None, end is not None)


def _row(din: int, dim: int, width: int, dout: int, hrow, frow, padded: bool, resized: bool):
    """row(xi, x, signs, F, yi, y, xp, h, f): row xi of x [zero-padded to dim] -> Hadamard ->
    [frame] -> [pad or take to dout] -> row yi of y; xp [1, dim], h [1, dim], f [1, width] scratch."""
    framed = frow is not None
    h_local = framed or resized

    @T.macro
    def row(xi, x, signs, F, yi, y, xp, h, f):
        if padded:  # a copy and a fill (one loop with a select per element did not vectorise)
            for j in range(din):
                xp[0, j] = x[xi, j]
            for j in range(din, dim):
                xp[0, j] = T.float32(0)
        hrow(0 if padded else xi, xp if padded else x, signs, 0 if h_local else yi, h if h_local else y)
        if framed:
            frow(0, h, F, 0 if resized else yi, f if resized else y)
        if resized:
            for j in range(min(dout, width)):
                y[yi, j] = (f if framed else h)[0, j]
            for j in range(width, dout):
                y[yi, j] = T.float32(0)

    return row


def _one_side(side: _Side, then=None):
    """rows(lo, n, x, P, y): rows lo .. lo + n - 1 through one side, scratch allocated once per task;
    the macro then(i, P, y), if given, runs on each row i written."""
    row, framed, after = side.row, side.frow is not None, then is not None

    @T.macro
    def rows(lo, n, x, P, y, _unused):
        xp = T.alloc_buffer((1, side.dim), "float32")
        h = T.alloc_buffer((1, side.dim), "float32")
        f = T.alloc_buffer((1, side.width), "float32")
        for r in range(n):
            row(lo + r, x, P[0], P[1] if framed else None, lo + r, y, xp, h, f)
            if after:
                then(lo + r, P, y)

    return rows


def _activated(side: _Side, lanes: int, bias: bool):
    """rows(lo, n, x, P, y): each row through the side, then GELU(y [+ P[1]]) on it while it is in L1."""
    dout = side.dout
    L = next(v for v in (lanes, 8, 4, 2, 1) if dout % v == 0)

    def at(j):
        return T.ramp(j * L, 1, L) if L > 1 else j

    @T.macro
    def gelu(i, P, y):  # cpu_ops.gelu_f32 of u = y [+ b], its terms bound once
        for j in range(dout // L):
            u: T.let = y[i, at(j)] + P[1][at(j)] if bias else y[i, at(j)]
            x: T.let = erf_clamp(u * T.float32(GELU_SCALE))
            x2: T.let = x * x
            y[i, at(j)] = gelu_of(u, x, x2)

    return _one_side(side, gelu)


def _normed(side: _Side, epsilon: float, lanes: int):
    """rows(lo, n, x, P, y): each row RMS normalised by P[-1] into a local row, then through the side."""
    from .cpu_layer_norm import rms_row

    norm, L = rms_row(side.din, epsilon, lanes)
    row, framed, last = side.row, side.frow is not None, len(side.params)

    @T.macro
    def rows(lo, n, x, P, y, _unused):
        acc = T.alloc_buffer((L,), "float32", annotations=STACK)
        s = T.alloc_buffer((1,), "float32", annotations=STACK)
        a = T.alloc_buffer((1, side.din), "float32")
        xp = T.alloc_buffer((1, side.dim), "float32")
        h = T.alloc_buffer((1, side.dim), "float32")
        f = T.alloc_buffer((1, side.width), "float32")
        for r in range(n):
            norm(lo + r, x, P[last], 0, a, acc, s)
            row(0, a, P[0], P[1] if framed else None, lo + r, y, xp, h, f)

    return rows


def _residual_kernel(side: _Side, lanes: int, bias: bool):
    """x [m, din], signs, [b [dout],] r [m, dout] -> y [m, dout]: each row through the side, then
    [b and] r's row added."""
    rows, dout = _one_side(side), side.dout
    L = next(v for v in (lanes, 8, 4, 2, 1) if dout % v == 0)

    def at(j):
        return T.ramp(j * L, 1, L) if L > 1 else j

    @T.macro
    def with_residual(lo, n, x, P, y, r):
        rows(lo, n, x, P, y, None)
        for i in range(n):
            for j in range(dout // L):
                if bias:
                    y[lo + i, at(j)] = y[lo + i, at(j)] + P[1][at(j)] + r[lo + i, at(j)]
                else:
                    y[lo + i, at(j)] = y[lo + i, at(j)] + r[lo + i, at(j)]

    run = in_tasks(with_residual)
    if bias:
        @T.prim_func(private=True)
        def func_b(x_h: T.handle, p0: T.Buffer(side.params[0], "float32"), b: T.Buffer((dout,), "float32"),
                   r_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, side.din), "float32")
            r = T.match_buffer(r_h, (m, dout), "float32")
            y = T.match_buffer(y_h, (m, dout), "float32")
            run(m, x, (p0, b), y, r)

        return func_b

    @T.prim_func(private=True)
    def func(x_h: T.handle, p0: T.Buffer(side.params[0], "float32"), r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, side.din), "float32")
        r = T.match_buffer(r_h, (m, dout), "float32")
        y = T.match_buffer(y_h, (m, dout), "float32")
        run(m, x, (p0,), y, r)

    return func


def _gated(before, width: int, after, lanes: int):
    """rows(lo, n, x, P, y): each row through the side before (if any), then silu(a[:half]) *
    a[half:], then the side after (if any), every intermediate a row in local buffers."""
    half = width // 2
    L = next(v for v in (lanes, 8, 4, 2, 1) if half % v == 0)
    one = T.Broadcast(T.float32(1), L) if L > 1 else T.float32(1)
    nb = 0 if before is None else len(before.params)
    first, last = before is not None, after is not None  # (Python bools: TVMScript tests only those)
    framed0 = first and before.frow is not None
    framed = last and after.frow is not None
    dim0, width0 = (before.dim, before.width) if before is not None else (1, 1)  # (scratch sizes)
    dim1, width1 = (after.dim, after.width) if after is not None else (1, 1)

    def at(j):
        return T.ramp(j, 1, L) if L > 1 else j

    def vec(buf, i, j):
        return buf[i, at(j)]

    @T.macro
    def gate(ai, a, gi, g):  # g = a * sigmoid(a) * up, as the graph wrote it
        for j in range(half // L):
            g[gi, at(j * L)] = vec(a, ai, j * L) * (one / (one + exp_f32(-vec(a, ai, j * L)))) * vec(
                a, ai, half + j * L)

    @T.macro
    def rows(lo, n, x, P, y, _unused):
        xp0 = T.alloc_buffer((1, dim0), "float32")
        h0 = T.alloc_buffer((1, dim0), "float32")
        f0 = T.alloc_buffer((1, width0), "float32")
        a = T.alloc_buffer((1, width), "float32")
        g = T.alloc_buffer((1, half), "float32")
        xp1 = T.alloc_buffer((1, dim1), "float32")
        h1 = T.alloc_buffer((1, dim1), "float32")
        f1 = T.alloc_buffer((1, width1), "float32")
        for r in range(n):  # gate reads a (the side before's row) or x, writes g (for the side after) or y
            if first:
                before.row(lo + r, x, P[0], P[1] if framed0 else None, 0, a, xp0, h0, f0)
            gate(0 if first else lo + r, a if first else x, 0 if last else lo + r, g if last else y)
            if last:
                after.row(0, g, P[nb], P[nb + 1] if framed else None, lo + r, y, xp1, h1, f1)

    return rows


def _kernel(din: int, dout: int, shapes: list, rows):
    """A PrimFunc (x [m, din], params of `shapes` (float32) -> y [m, dout]) running rows(lo, n, x,
    P, y) over the rows in tasks, P the tuple of params."""
    run = in_tasks(rows)
    if len(shapes) == 0:  # (a root block: RewriteDataflowReshape asserts one in one-input kernels)
        @T.prim_func(private=True, check_well_formed=False)
        def func0(x_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, din), "float32")
            y = T.match_buffer(y_h, (m, dout), "float32")
            with T.sblock("root"):
                run(m, x, (), y, None)

        return func0
    if len(shapes) == 1:
        @T.prim_func(private=True)
        def func1(x_h: T.handle, p0: T.Buffer(shapes[0], "float32"), y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, din), "float32")
            y = T.match_buffer(y_h, (m, dout), "float32")
            run(m, x, (p0,), y, None)

        return func1
    if len(shapes) == 2:
        @T.prim_func(private=True)
        def func2(x_h: T.handle, p0: T.Buffer(shapes[0], "float32"), p1: T.Buffer(shapes[1], "float32"), y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, din), "float32")
            y = T.match_buffer(y_h, (m, dout), "float32")
            run(m, x, (p0, p1), y, None)

        return func2

    @T.prim_func(private=True)
    def func3(x_h: T.handle, p0: T.Buffer(shapes[0], "float32"), p1: T.Buffer(shapes[1], "float32"),
              p2: T.Buffer(shapes[2], "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, din), "float32")
        y = T.match_buffer(y_h, (m, dout), "float32")
        run(m, x, (p0, p1, p2), y, None)

    return func3
