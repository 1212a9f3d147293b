"""Helpers shared by the per-target schedule files."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import linecache
import os
import sys
import threading
from pathlib import Path

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro


def parsed_once(factory):
    """`factory` (arguments -> PrimFunc) run once per distinct arguments in a process, and its
    result kept on disk for the next process (`_cached`). Writing a kernel parses TVMScript, 0.1-0.9
    s each (4-5 s of a MiniLM compile); fq-report, fq-bench and the tests compile the same kernels
    again and again. The key is the arguments by value, defaults applied: lists and dicts as
    tuples, frozen dataclasses by their fields. PrimFuncs are immutable, so every caller may share
    one."""
    signature = inspect.signature(factory)
    made: dict = {}

    @functools.wraps(factory)
    def once(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = _by_value(tuple(bound.arguments.items()))
        if key not in made:
            made[key] = _cached(factory, key, lambda: factory(*args, **kwargs))
        return made[key]

    return once


def _cached(factory, key, parse):
    """parse(), or the PrimFunc a process running the same schedule sources (and TVM) saved for
    `key` under fq_tvm.cache_dir()/kernels (TVM's JSON: loading takes a tenth of parsing). Keys
    that are not plain values, an unreadable cache or FQ_KERNEL_CACHE=0: parse() alone."""
    path = _cache_path(factory, key)
    if path is not None:
        try:
            func = tvm.ir.load_json(path.read_text())
            if isinstance(func, tvm.tirx.PrimFunc):
                return func
        except Exception:  # noqa: BLE001 - missing, unreadable or damaged: parsed (and written) again
            pass
    func = parse()
    if path is not None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if not path.parent.is_dir():
                _drop_stale(path.parent)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(tvm.ir.save_json(func))
            os.replace(tmp, path)
        except OSError:  # a read-only or full cache: no entry
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return func


def _cache_path(factory, key):
    if os.environ.get("FQ_KERNEL_CACHE", "1") == "0":
        return None
    text = _plain(key)
    if text is None:
        return None
    from fq_tvm import cache_dir

    try:
        folder = cache_dir() / "kernels" / _sources_digest()
    except (RuntimeError, OSError):  # no home directory, unreadable sources: no cache
        return None
    name = hashlib.sha256(f"{factory.__module__}.{factory.__qualname__}{text}".encode()).hexdigest()[:32]
    return folder / f"{factory.__name__}-{name}.json"


def _drop_stale(folder) -> None:
    """Remove the kernel caches of other sources beside `folder` (an older fq-tvm's)."""
    import shutil

    if folder.parent.is_dir():
        for other in folder.parent.iterdir():
            if other != folder and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)


@functools.cache
def _sources_digest() -> str:
    """A digest of this package's sources and TVM's (and its FFI's) version: a kernel cached by
    other code is not found (the directory of an older digest is removed when a new one is made)."""
    import tvm_ffi

    digest = hashlib.sha256(f"{tvm.__version__} {getattr(tvm_ffi, '__version__', '')}".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def _plain(value):
    """repr of a key made of numbers, strings, None, tuples, and classes and module-level functions
    of this package (their code is in `_sources_digest`); None for anything else."""
    if isinstance(value, tuple):
        parts = [_plain(v) for v in value]
        return None if None in parts else "(" + ",".join(parts) + ")"
    if isinstance(value, type) or inspect.isfunction(value):
        ours = value.__module__.rpartition(".")[0] == __name__.rpartition(".")[0]
        return f"<{value.__module__}.{value.__qualname__}>" if ours and "<locals>" not in value.__qualname__ else None
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    return None


def _by_value(value):
    if isinstance(value, (list, tuple)):
        return ("seq",) + tuple(_by_value(v) for v in value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted((k, _by_value(v)) for k, v in value.items()))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value),) + tuple(_by_value(getattr(value, f.name)) for f in dataclasses.fields(value))
    return value


def blocks(sch: s_tir.Schedule) -> list:
    """The compute blocks of the function (not the root)."""
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(var.iter_type == 2 for var in sch.get(block).iter_vars)  # 2: CommReduce


def mutate_relax_functions(mod, mutator, prune: bool = True):
    """The module with `mutator` (a relax.PyExprMutator built on `mod`) run over every Relax
    function, and bindings left unused by the rewrite removed."""
    from tvm import relax

    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            new = mutator.visit_expr(func)
            mutator.builder_.update_func(gvar, relax.analysis.remove_all_unused(new) if prune else new)
    return mutator.builder_.get()


def dispatch_pass(name: str, kind: str, make_mutator, counts: dict | None = None):
    """A module pass running `make_mutator(mod)` over every Relax function (mutate_relax_functions);
    `counts[kind]` receives the mutator's `count` of rewritten calls."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        mutator = make_mutator(mod)
        mod = mutate_relax_functions(mod, mutator)
        if counts is not None and mutator.count:
            counts[kind] = counts.get(kind, 0) + mutator.count
        return mod

    return _pass


def _find_parser_def(self):
    """The parser of the TVMScript function being parsed: the nearest caller frame whose globals
    hold it. TVM 0.27 walks `inspect.getouterframes`, which also reads every frame's source: about
    0.1 s per `T.macro` call under pytest, 3.5 s of a 13 s build of a 2-layer BERT. Same answer."""
    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


class _QuickStack:
    """`inspect` for TVM's `T.prim_func`, whose `inspect.stack()` (read to tell a function in an
    `@I.ir_module` class, and for names in string annotations) builds every outer frame's info:
    its source file found by scanning sys.modules, its line read. 20-25% of a kernel's parse, more
    under pytest's deep stacks and torch's thousands of modules. The same frames, line numbers and
    names; code lines only for the three innermost frames (the class check reads the third)."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code, lineno = frame.f_code, frame.f_lineno
            lines = [linecache.getline(code.co_filename, lineno)] if len(frames) < 3 and context else None
            frames.append(inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines,
                                            0 if lines else None))
            frame = frame.f_back
        return frames


def quick_macros() -> None:
    """Use `_find_parser_def` for every `T.macro` call (our kernels call several per kernel), and
    `_QuickStack` for `T.prim_func`'s stack."""
    if hasattr(ScriptMacro, "_find_parser_def") and hasattr(ScriptMacro, "parser_object_name"):
        ScriptMacro._find_parser_def = _find_parser_def
    from tvm.tirx.script.parser import entry

    if getattr(entry, "inspect", None) is inspect:
        entry.inspect = _QuickStack()


SERIAL_ROWS = 2  # under this many rows a row loop runs without a parallel launch
SERIAL_WORK = 8192  # nor under this many elements (row kernels given row_work; cpu.fallback's functions):
# a decode step's softmax over 9 heads saved ~3 us of wake-ups

# Annotations for a kernel's scratch buffer (T.alloc_buffer(..., annotations=STACK)): a stack array
# at the function's entry. TVM 0.27 lowers every other CPU buffer that is not "global" and under
# 1 KB to a TVMBackendAllocWorkspace / FreeWorkspace pair where it is declared, so a buffer
# declared in a row or tile loop cost two runtime calls per iteration (a 384-wide Hadamard row
# spent most of its time there).
STACK = {"disable_lower_builtin": True}

LINE = 64  # cache line bytes
AHEAD = 2048  # bytes a streaming loop prefetches ahead where the hardware prefetcher falls behind


def prefetch(load):
    """Read prefetch into every cache level of the address of `load` (a buffer element)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(load), T.int32(0), T.int32(3),
                                         T.int32(1)))


def same_row(row):
    """A macro row(i, x, p, y) from a macro row(xi, x, p, yi, y) that reads and writes row i."""

    @T.macro
    def macro(i, x, p, y):
        row(i, x, p, i, y)

    return macro


def each_row(row):
    """A macro rows(lo, n, x, p, y) running the macro row(i, x, p, y) on rows lo .. lo + n - 1."""

    @T.macro
    def rows(lo, n, x, p, y):
        for r in range(n):
            row(lo + r, x, p, y)

    return rows


TASKS = 64  # parallel tasks of a row kernel: scratch buffers are allocated once per task


def in_tasks(rows, row_work=None):
    """A macro run(m, a, b, c, d) running the macro rows(lo, n, a, b, c, d) over m rows: in up to
    TASKS parallel tasks of consecutive rows, or, under SERIAL_ROWS rows (a decode step), without a
    parallel launch, which costs more than the row at two threads. With row_work(a, b, c, d) (the
    elements of a row), also without one under SERIAL_WORK elements in all."""

    def serial(m, a, b, c, d):
        return m < SERIAL_ROWS if row_work is None else (m < SERIAL_ROWS) | (m * row_work(a, b, c, d) < SERIAL_WORK)

    @T.macro
    def run(m, a, b, c, d):
        if serial(m, a, b, c, d):
            rows(0, m, a, b, c, d)
        else:
            tasks: T.let = T.min(m, TASKS)
            for t in T.parallel(tasks):
                lo: T.let = t * m // tasks
                rows(lo, (t + 1) * m // tasks - lo, a, b, c, d)

    return run


def row_kernel(din, dout, param_shape: tuple, rows):
    """A PrimFunc (x [m, din], p [param_shape] -> y [m, dout], float32) that runs the macro
    rows(lo, n, x, p, y) (`each_row`, or a macro that allocates its scratch once) over the rows
    (`in_tasks`)."""
    run = in_tasks(_three(rows))

    @T.prim_func(private=True)
    def func(x_h: T.handle, p: T.Buffer(param_shape, "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, din), "float32")
        y = T.match_buffer(y_h, (m, dout), "float32")
        run(m, x, p, y, None)

    return func


def _three(rows):
    @T.macro
    def macro(lo, n, x, p, y, unused):
        rows(lo, n, x, p, y)

    return macro


def wide(value, n: int):
    """`value` on n lanes (itself for one)."""
    return T.Broadcast(value, n) if n > 1 else value


def transposed(vecs: list) -> list:
    """The L vectors of L lanes of an L x L block, transposed (vector c holds lane c of each), by
    log2(L) rounds of interleaving vector i with vector i + L/2: L log2(L) shuffles, where a
    lane-by-lane copy takes L * L loads and stores."""
    n = len(vecs)
    half = n // 2
    lo = _indices(v for j in range(half) for v in (j, n + j))
    hi = _indices(v for j in range(half, n) for v in (j, n + j))
    for _ in range(n.bit_length() - 1):
        vecs = [tvm.tirx.Shuffle([vecs[i // 2], vecs[i // 2 + half]], lo if i % 2 == 0 else hi) for i in range(n)]
    return vecs


def _indices(values):
    return [tvm.tirx.IntImm("int32", v) for v in values]


def lane_sums(vecs, L: int):
    """The lane sums of n float32xL vectors (n a power of two, at most L) as one float32xn vector,
    by a tree of shuffles and adds: about 4 instructions per sum where LLVM's ordered
    `vector.reduce.fadd` chains L dependent adds. (Summation order differs: float rounding only.)"""
    width = L  # lanes per vector that still belong to one sum
    while len(vecs) > 1:  # pairs of vectors -> one vector holding both sets of half-width partial sums
        segs = L // width
        lo = [j * width + k for j in range(segs) for k in range(width // 2)]
        lo = lo + [L + v for v in lo]
        vecs = [tvm.tirx.Shuffle(pair, _indices(lo)) + tvm.tirx.Shuffle(pair, _indices(v + width // 2 for v in lo))
                for pair in zip(vecs[0::2], vecs[1::2])]
        width //= 2
    vec, total = vecs[0], L
    while width > 1:  # halve every sum's lanes inside the one vector
        lo = [j * width + k for j in range(total // width) for k in range(width // 2)]
        vec = tvm.tirx.Shuffle([vec], _indices(lo)) + tvm.tirx.Shuffle([vec], _indices(v + width // 2 for v in lo))
        total //= 2
        width //= 2
    return vec
