"""The CPU row transforms of one side of a layer as one kernel: [pad] -> Hadamard -> [frame] on the
input side, inverse Hadamard -> [take] on the output side. Each row goes through every step in
local buffers (no intermediate tensor, one launch instead of one per step), with the row macros
of `cpu_hadamard` and `cpu_frame`. The buffers of `kernels.transform` (x, signs, [F] -> y) but the
frame block transposed, F^T [2l, 2k]: `cpu.rewrite` passes it so."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from . import cpu_frame, cpu_hadamard
from .common import in_tasks, row_kernel
from .kernels import OPAQUE

KIND = "transform_rows"


def parts(steps) -> tuple | None:
    """(pad, hadamard, frame, end) of a run this kernel covers, or None. One Hadamard, optionally
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


def transform(steps, lanes: int = 16) -> tvm.tirx.PrimFunc:
    pad, (_, dim, block, inverse), frame, end = parts(steps)
    hrow = cpu_hadamard.row_macro(dim, block, bool(inverse), lanes)
    frow = cpu_frame.analysis_row(*frame[1:]) if frame is not None else None
    din = pad[1] if pad is not None else dim
    width = frame[1] * frame[3] + frame[4] if frame is not None else dim  # before the last resize
    dout = end[2] if end is not None else width
    rows = _rows(din, dim, width, dout, hrow, frow, pad is not None, end is not None)
    if frame is None:
        func = row_kernel(din, dout, (dim,), _without_frame(rows))
    else:
        func = _with_frame(din, dim, dout, (frame[2], frame[3]), rows)
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


def _rows(din: int, dim: int, width: int, dout: int, hrow, frow, padded: bool, resized: bool):
    """rows(lo, n, x, signs, F, y): rows lo .. lo + n - 1 of x [zero-padded to dim] -> Hadamard ->
    [frame] -> [pad or take to dout] -> the same rows of y; intermediates in buffers allocated
    once per task, the last step writing y."""
    framed = frow is not None
    h_local = framed or resized

    @T.macro
    def rows(lo, n, x, signs, F, y):
        xp = T.alloc_buffer((1, dim), "float32")
        h = T.alloc_buffer((1, dim), "float32")
        f = T.alloc_buffer((1, width), "float32")
        for r in range(n):
            i: T.let = lo + r
            if padded:  # a copy and a fill (one loop with a select per element did not vectorise)
                for j in range(din):
                    xp[0, j] = x[i, j]
                for j in range(din, dim):
                    xp[0, j] = T.float32(0)
            hrow(0 if padded else i, xp if padded else x, signs, 0 if h_local else i, h if h_local else y)
            if framed:
                frow(0, h, F, 0 if resized else i, f if resized else y)
            if resized:
                for j in range(min(dout, width)):
                    y[i, j] = (f if framed else h)[0, j]
                for j in range(width, dout):
                    y[i, j] = T.float32(0)

    return rows


def _without_frame(rows):
    @T.macro
    def macro(lo, n, x, signs, y):
        rows(lo, n, x, signs, None, y)

    return macro


def _with_frame(din: int, dim: int, dout: int, f_shape: tuple, rows):
    """row_kernel with two parameters (signs [dim], F^T [2l, 2k])."""
    run = in_tasks(rows)

    @T.prim_func(private=True)
    def func(x_h: T.handle, signs: T.Buffer((dim,), "float32"), F: T.Buffer(f_shape, "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, din), "float32")
        y = T.match_buffer(y_h, (m, dout), "float32")
        run(m, x, signs, F, y)

    return func
