"""Gathers and TVM's build log.

TVM's ONNX importer gathers with `take(mode="fast")`, which reads its indices unchecked, and TVM
warns "Fast mode segfaults when there are out-of-bounds indices" at every build. Here: which
model inputs are such indices (the manifest records their range and the loader refuses values
outside it), and the filter that drops the warning from the build log where every fast take is
so bounded (and every TVM warning under -q).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

FAST_TAKE_WARNING = "Fast mode segfaults when there are out-of-bounds indices"
TVM_WARNING = re.compile(r"^\[[\d:]+\] \S+:\d+: Warning: ")


def fast_take_bounds(func) -> tuple[dict, bool]:
    """TVM's ONNX importer gathers with `take(mode="fast")`: no bounds check, and TVM warns at
    every build. Return {input name: [0, rows)} for the model inputs used as such indices, so
    that the loader can refuse values out of range (which makes those takes safe), and whether
    there are fast takes and every one reads a constant in range or such an input."""
    from tvm import relax

    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    count = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
    inputs = {param.name for param in func.params[:count]}
    ranges, found, unbounded = {}, False, False
    for value in bound.values():
        if not (_is_call(value, "relax.take") and value.attrs.mode == "fast"):
            continue
        found = True
        rows = _static_rows(value.args[0], value.attrs.axis)
        source = _index_source(value.args[1], bound, rows) if rows else None
        if isinstance(source, relax.Var) and source.name in inputs:
            ranges[source.name] = [0, min(rows, ranges.get(source.name, [0, rows])[1])]
        elif source is not True:
            unbounded = True
    return ranges, found and not unbounded


def _is_call(value, op: str) -> bool:
    from tvm import relax

    return isinstance(value, relax.Call) and getattr(value.op, "name", None) == op


def _static_rows(table, axis) -> int | None:
    try:
        return int(table.ty.shape[int(axis or 0)])
    except (TypeError, ValueError, AttributeError, IndexError):
        return None


SAME_VALUES = ("relax.astype", "relax.strided_slice", "relax.reshape", "relax.expand_dims", "relax.squeeze",
               "relax.permute_dims", "relax.broadcast_to")  # ops whose output values are some of their input's


def _index_source(index, bound: dict, rows: int):
    """Where the values of `index` come from, through SAME_VALUES ops and ONNX's negative-index
    fix `where(x < 0, x + rows, x)` (the loader refuses negative inputs, so it keeps x): True for a
    constant with every value in [0, rows), the model input (a parameter of main), None otherwise."""
    import tvm

    while index in bound:
        value = bound[index]
        if any(_is_call(value, op) for op in SAME_VALUES):
            index = value.args[0]
        elif _is_call(value, "relax.where") and _is_negative_test(bound.get(value.args[0]), value.args[2]):
            index = value.args[2]
        else:
            return None
    if isinstance(index, tvm.ir.expr.Constant):
        values = index.value.numpy()
        return bool(values.size == 0 or (values.min() >= 0 and values.max() < rows)) or None
    return index


def _is_negative_test(cond, x) -> bool:
    import tvm

    return (_is_call(cond, "relax.less") and cond.args[0].same_as(x)
            and isinstance(cond.args[1], tvm.ir.expr.Constant) and float(cond.args[1].value.numpy()) == 0)


def add_ranges(inputs: list, bounds: dict) -> None:
    for spec in inputs:
        if spec["name"] in bounds and spec["dtype"].startswith(("int", "uint")):
            spec["range"] = bounds[spec["name"]]


def log_filter(fast_takes_safe: bool, quiet: bool):
    """Which lines of TVM's C++ log to drop during the build: the fast-take warning where the
    loader bounds the indices, and every TVM warning under -q."""
    if not (fast_takes_safe or quiet):
        return None
    return lambda line: (fast_takes_safe and FAST_TAKE_WARNING in line) or (quiet and bool(TVM_WARNING.match(line)))


@contextlib.contextmanager
def without_log_lines(drop):
    """Capture the process's stderr (fd 2, where TVM's C++ logs go) and write back the lines
    `drop` does not match."""
    if drop is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not drop(line))
            if kept:
                os.write(2, kept.encode())
