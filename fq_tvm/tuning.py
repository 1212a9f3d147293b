"""Tuning a model's CPU build (`fq-tune`), and applying the tuned database when building
(`fq-compile --tuning-db DIR`).

What is tuned (CPU only): the PrimFuncs `schedules.cpu.fallback` would schedule, i.e. every
legalized, fused op we did not write (attention batch-matmuls, softmax, layer norm, elementwise,
transposes, gathers), with MetaSchedule's default rules for the target; and the knobs of our int8
dequant-matmul kernels (`kernel_tuning`: they take a symbolic row count, which MetaSchedule's CPU
postprocessing refuses, and their knobs shape the TVMScript itself). Our other kernels
(`cpu_dense`, `cpu_hadamard`, `cpu_frame`, attention) keep their hand schedules. Fallback
functions with symbolic shapes (a dynamic batch or sequence length) are not tuned: pin the shapes
with `--input-shape` (the same pins for fq-tune and fq-compile) to tune them.

The output directory holds MetaSchedule's JSON database (`database_workload.json`,
`database_tuning_record.json`; one directory per target: database queries ignore the target) and
`fq_tuning.json`: the target and versions it was tuned for, and per task the measured latency of
our hand (fallback) schedule and the trials run. At build time a function uses its best tuned
record only when that record beat the hand schedule on the tuning machine; anything else (no
record, symbolic shapes, hand schedule faster) keeps `cpu.fallback`, and the manifest says which.

Workloads are keyed by structure with our attributes stripped (`workload`): `op_pattern` and the
like are not part of the key, so a database is found again by the same function in any build.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, kernel_tuning
from .errors import FqError

META = "fq_tuning.json"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
KEEP_ATTRS = ("s_tir", "tirx.noalias")  # what a workload keeps of a function's attributes
DEFAULT_TRIALS, CHUNK = 32, 8
REMOTE_TIMEOUT = 120  # seconds per measurement session on a board (qemu boards are slow)


@dataclass
class Task:
    """One distinct workload: the functions of the build (`names`) that share it."""

    names: list
    calls: int  # call sites in the model, all names together
    func: object  # the first function, as the build has it
    mod: object  # its workload: IRModule({"main": func without our attributes})
    key: str
    meta: dict = field(default_factory=dict)  # its entry in fq_tuning.json


def parse_budget(text) -> float | None:
    """'20m', '90s', '1h', '1h30m' or a number of seconds -> seconds; None or '' -> no budget."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", str(text))
        if not parts or not any(parts.groups()):
            raise FqError(f"--budget: '{text}' is not a duration (e.g. 20m, 90s, 1h30m)")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not (math.isfinite(seconds) and seconds > 0):
        raise FqError(f"--budget must be positive, not {text}")
    return seconds


def workload(func):
    """The function as a MetaSchedule workload: our attributes stripped (they are part of the
    database key), named `main`."""
    import tvm

    attrs = {k: func.attrs[k] for k in KEEP_ATTRS if func.attrs is not None and k in func.attrs}
    attrs["global_symbol"] = "main"
    clean = tvm.tirx.PrimFunc(func.params, func.body, func.ret_type).with_attrs(attrs)
    return tvm.IRModule({"main": clean})


def workload_key(mod) -> str:
    from tvm_ffi import structural_hash

    return f"{structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def is_static(func) -> bool:
    """Every buffer of the signature has constant dims and there are no scalar parameters."""
    import tvm

    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
            return False
    return True


def call_counts(mod) -> dict:
    """{function name: how many times the Relax functions call it} (reshapes become views later:
    not counted)."""
    import tvm
    from tvm import relax

    calls = {}

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            for arg in call.args:
                if isinstance(arg, tvm.ir.GlobalVar):
                    calls[arg.name_hint] = calls.get(arg.name_hint, 0) + 1

    for _, func in relax.transform.RewriteDataflowReshape()(mod).functions_items():
        if isinstance(func, relax.Function):
            _Calls().visit_expr(func)
    return calls


def fallback_funcs(mod) -> list:
    """(name, func, calls) of the PrimFuncs the CPU fallback would schedule and the model really
    runs, with how many times the Relax functions call each."""
    import tvm

    from .schedules import _scheduled

    calls = call_counts(mod)
    return [(gvar.name_hint, func, calls[gvar.name_hint]) for gvar, func in mod.functions_items()
            if isinstance(func, tvm.tirx.PrimFunc) and not _scheduled(func) and gvar.name_hint in calls]


def reads_indirect(func) -> bool:
    """A block reads a buffer at an index loaded from another (a gather: `take`). MetaSchedule's
    runner feeds random data, so such a candidate would read out of bounds (and crash or time out
    its runner): gathers are not tuned."""
    import tvm

    try:
        sch = tvm.s_tir.Schedule(workload(func))
        found = [sch.get(b) for b in _blocks(sch)]
    except Exception:  # noqa: BLE001 - no block structure: nothing MetaSchedule could tune either
        return True
    return any(str(region).count("[") > 1 for block in found for region in block.reads)


def _blocks(sch):
    from .schedules.common import blocks

    return blocks(sch)


def find_tasks(mod, skipped: dict | None = None) -> tuple[list[Task], list[str]]:
    """Distinct static workloads among the fallback functions, and the names of the dynamic ones;
    `skipped` receives {name: why} of static ones not tuned (gathers)."""
    tasks, dynamic, by_key = [], [], {}
    for name, func, calls in fallback_funcs(mod):
        if not is_static(func):
            dynamic.append(name)
            continue
        if reads_indirect(func):
            if skipped is not None:
                skipped[name] = "data-dependent indexing (a gather): random inputs would read out of bounds"
            continue
        wl = workload(func)
        key = workload_key(wl)
        if key in by_key:
            by_key[key].names.append(name)
            by_key[key].calls += calls
            continue
        by_key[key] = Task([name], calls, func, wl, key)
        tasks.append(by_key[key])
    return tasks, dynamic


def lowered_module(model, preset, *, scheme="fp32", calib=None, skip=None, act_bits=8, input_shapes=None,
                   calib_samples=None, redundancy=None, l_den=None, quiet=False, quantize_head=False,
                   head_scheme=None):
    """The Relax module fq-compile builds, legalized and fused with our kernels scheduled: the
    point where the CPU fallback would schedule the rest (the same steps as `compiler.compile`)."""
    from . import compiler, onnx_io
    from .quantize import scheme_config
    from .schedules import apply as schedule_kernels
    from .schedules import relax_pipeline

    compiler.check_frame_options(scheme, redundancy, l_den)
    cfg = scheme_config(scheme, redundancy=redundancy, l_den=l_den)
    if compiler.calibrates(cfg) and calib is None:
        raise FqError(f"scheme '{scheme}' needs calibration data: pass --calib FILE.npz")
    proto = onnx_io.load_model(Path(model))
    imported, proto = compiler._import_first(proto, input_shapes)
    layers, report = {}, {}
    quantize_head = quantize_head or head_scheme is not None
    if cfg.method != "none":
        head_cfg = compiler._head_config(cfg, head_scheme) if quantize_head else None
        layers, report, _ = compiler._quantize(proto, cfg, calib, skip, quiet, calib_samples, head_cfg=head_cfg)
    mod = compiler._import(proto, layers, report, True, imported)
    target = preset.tvm_target()
    captured = {}

    class _Stop(Exception):
        pass

    def capture(lowered):
        captured["mod"] = lowered
        raise _Stop  # the rest of the build is not needed

    with compiler.without_log_lines(compiler.log_filter(compiler.fast_take_bounds(mod["main"])[1], True)):
        mod = schedule_kernels(mod, target, act_bits, {})
        try:
            relax_pipeline(target, {}, before_fallback=capture)(mod)
        except Exception:  # noqa: BLE001 - _Stop comes back through TVM's FFI as another type
            if "mod" not in captured:
                raise
    return captured["mod"]


def _target_id(preset) -> dict:
    import tvm

    return {"preset": preset.name, "tvm_target": preset.target, "tvm": tvm.__version__, "fq_tvm": __version__}


def read_meta(out_dir: Path) -> dict | None:
    path = Path(out_dir) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise FqError(f"{path}: not a readable fq-tune file ({err})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("target"), dict) and isinstance(meta.get("tasks"), dict)):
        raise FqError(f"{path}: not an fq-tune file")
    return meta


def _write_meta(out_dir: Path, meta: dict) -> None:
    tmp = Path(out_dir) / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(Path(out_dir) / META)


def mismatch(meta: dict, preset) -> str | None:
    """Why a database tuned for `meta['target']` must not be used for `preset`, or None."""
    here, there = _target_id(preset), meta["target"]
    if there.get("tvm_target") != here["tvm_target"]:
        return f"tuned for {there.get('preset')} {json.dumps(there.get('tvm_target'))}, building for {preset.name} " \
               f"{json.dumps(here['tvm_target'])}"
    if there.get("tvm") != here["tvm"]:
        return f"tuned with TVM {there.get('tvm')}, building with TVM {here['tvm']}"
    return None


def light_tensor_intrin(target) -> None:
    """Register only the target family's tensor intrinsics. `tvm.s_tir.tensor_intrin`, which
    every TuneContext and MetaSchedule's LocalBuilder workers import, parses every family's
    (CUDA 27 s, ROCm 4 s, Arm 4 s: 41 s of CPU here) though a CPU task needs its own at most."""
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        pkg = types.ModuleType(name)
        pkg.__spec__, pkg.__path__, pkg.__file__ = spec, list(spec.submodule_search_locations), spec.origin
        sys.modules[name] = pkg
    arm = "aarch64" in str(target.attrs.get("mtriple", "")) or "arm" in str(target.attrs.get("mtriple", ""))
    importlib.import_module(f"{name}.{'arm_cpu' if arm else 'x86'}")  # (once per family: a later target's too)


def _builder(preset=None):
    """MetaSchedule's LocalBuilder starts a new process pool for every batch, and each worker
    imports every tensor intrinsic (41 s): build in this process instead (CPU candidates of one
    fused op take well under a second). With `preset` (tuning on a board), each candidate is
    linked here into a shared library the way the preset's artifacts are (`targets` export: the
    cross-compiler for a board), since a board has no compiler to link MetaSchedule's .tar."""
    from tvm.s_tir import meta_schedule as ms

    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            from tvm.tirx import build as tvm_build
            from tvm.s_tir.meta_schedule.builder.local_builder import default_export
            from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    lib = tvm_build(mod, target=item.target)
                    path = default_export(lib) if preset is None else _linked(lib, preset)
                    results.append(ms.builder.BuilderResult(path, None))
                except Exception as err:  # noqa: BLE001 - a candidate that does not build is a failed trial
                    results.append(ms.builder.BuilderResult(None, f"build failed: {err}"))
            return results

    return InProcessBuilder()


def _linked(lib, preset) -> str:
    """`lib` exported as the preset's artifacts are, in a fresh temporary directory (the runner's
    RemoveBuildArtifact callback deletes it); returns the library's path."""
    import tempfile

    from .targets import family

    out = Path(tempfile.mkdtemp(prefix="fq-tune-"))
    return str(out / family(preset).export(lib, out, preset)[0])


def _measure_tools(target, quick: bool, preset=None, remote=None):
    """(builder, runner): here, or on a board that `remote` (an `rpc.Remote` with a tracker)
    lends, through MetaSchedule's RPC runner."""
    from tvm.s_tir import meta_schedule as ms

    config = ms.runner.EvaluatorConfig(number=3, repeat=3 if not quick else 1, min_repeat_ms=40 if not quick else 10,
                                       enable_cpu_cache_flush=False)
    if remote is None:
        return _builder(), ms.runner.LocalRunner(evaluator_config=config)
    rpc_config = ms.runner.RPCConfig(tracker_host=remote.tracker[0], tracker_port=remote.tracker[1],
                                     tracker_key=remote.key, session_timeout_sec=REMOTE_TIMEOUT)
    return _builder(preset), ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=config, max_workers=1)


def measure_hand(task: Task, target, builder, runner) -> float | None:
    """Seconds per call of our hand (fallback) schedule of the task, measured as MetaSchedule
    measures its candidates (same builder and runner); None if it did not build or run."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .schedules import cpu

    func, _ = cpu.fallback(task.mod["main"], target)
    mod = tvm.IRModule({"main": func.with_attr("tirx.is_scheduled", True)})
    built = builder.build([ms.builder.BuilderInput(mod, target)])[0]
    if built.error_msg:
        return None
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu", args)])[0].result()
    shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
    if result.error_msg or not result.run_secs:
        return None
    return _min(result.run_secs)


def _remeasure_hand(task: Task, target, builder, runner) -> None:
    """The hand schedule is measured again after each batch of trials and keeps its best time, as
    the tuned records keep their best: both sides see the same machine over the same period."""
    seconds = measure_hand(task, target, builder, runner)
    old = task.meta.get("hand_s")
    task.meta["hand_s"] = seconds if old is None else old if seconds is None else min(old, seconds)


def best_seconds(db, mod) -> float | None:
    """The best repeat of the workload's best record in `db` (None: no successful record)."""
    if not db.has_workload(mod):
        return None
    top = db.get_top_k(db.commit_workload(mod), 1)
    if not top or not top[0].run_secs:
        return None
    return _min(top[0].run_secs)


def _min(run_secs) -> float:
    """The fastest repeat: on a shared machine the others measure the neighbours (a parallel
    kernel waits for its slowest thread)."""
    return min(float(getattr(s, "value", s)) for s in run_secs)


def tune(model, target="host", out_dir="tuning", *, scheme: str = "fp32", calib=None, trials: int = DEFAULT_TRIALS,
         budget=None, seed: int = 0, skip=None, act_bits: int = 8, input_shapes=None, calib_samples=None,
         redundancy=None, l_den=None, cuda_arch=None, quiet: bool = False, quick: bool = False,
         tracker: str | None = None, key: str | None = None, kernels: bool = True, quantize_head: bool = False,
         head_scheme: str | None = None) -> Path:
    """Tune the fallback ops of the model's build for `target` into `out_dir` (see the module doc).

    trials: MetaSchedule candidates measured per task (in total over runs: a second run with the
    same directory continues, a task already at `trials` is skipped). budget: seconds or '20m';
    tuning stops starting new batches once it is spent. seed: fixed, so a run can be repeated.
    tracker, key: measure on a board of kind `key` from the TVM tracker at HOST:PORT (fq-rpc-server
    on the board; candidates are linked here as the target's artifacts are), else on this machine.
    quantize_head, head_scheme: as for `compile` (a tied head's kernel is tuned too).
    kernels: also search the knobs of our int8 dequant-matmul kernels (`kernel_tuning`; they have
    symbolic row counts and need no pins). quick: shorter measurements (tests)."""
    from tvm.s_tir import meta_schedule as ms

    from .rpc import Remote, check_reachable, parse_addr
    from .targets import family, resolve

    if trials < 1:
        raise FqError(f"--trials must be at least 1, not {trials}")
    limit = parse_budget(budget)
    start = time.monotonic()
    preset = resolve(target, cuda_arch)
    if preset.device != "cpu":
        raise FqError(f"fq-tune: '{preset.name}' is a {preset.device} target; this version tunes CPU targets only")
    family(preset).check_tools(preset)
    remote = None
    if tracker or key:
        if not (tracker and key):
            raise FqError("--rpc-tracker HOST:PORT and --rpc-key KEY go together (the board kind to measure on)")
        remote = Remote(tracker=parse_addr(tracker, "--rpc-tracker"), key=key)
        check_reachable(remote)
    elif not preset.runs_here:
        raise FqError(f"'{preset.name}' builds run on {preset.arch}, not on this machine: measure on a board with "
                      f"--rpc-tracker HOST:PORT --rpc-key KEY (fq-rpc-server on the board)")
    if isinstance(calib, (str, Path)) and not Path(calib).is_file():
        raise FqError(f"{calib}: no such calibration file")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FqError(f"{out}: exists and is not a directory")
    meta = read_meta(out) if out.is_dir() else None
    if meta is not None and (why := mismatch(meta, preset)):
        raise FqError(f"{out} holds a database {why}; use one directory per target")
    if meta is None and out.is_dir() and any(out.iterdir()):
        raise FqError(f"{out}: exists, is not empty and is not an fq-tune directory")

    def say(text):
        if not quiet:
            print(f"[fq-tune {time.monotonic() - start:6.1f}s] {text}", file=sys.stderr, flush=True)

    say(f"building the Relax module of {model} for {preset.name} ({scheme})")
    mod = lowered_module(model, preset, scheme=scheme, calib=calib, skip=skip, act_bits=act_bits,
                         input_shapes=input_shapes, calib_samples=calib_samples, redundancy=redundancy,
                         l_den=l_den, quiet=quiet, quantize_head=quantize_head, head_scheme=head_scheme)
    skipped = {}
    tasks, dynamic = find_tasks(mod, skipped)
    n_static = sum(len(t.names) for t in tasks)
    say(f"{n_static + len(dynamic) + len(skipped)} functions left to the CPU fallback: {n_static} with static "
        f"shapes ({len(tasks)} distinct tasks), {len(skipped)} gathers (not tuned), {len(dynamic)} with symbolic "
        f"shapes (not tuned" + (": pin them with --input-shape, e.g. batch=1 --input-shape seq=128)" if dynamic else ")"))
    tvm_target = preset.tvm_target()
    ktasks = kernel_tuning.find_kernel_tasks(mod, tvm_target, call_counts(mod)) if kernels else []
    if kernels:
        say(f"{sum(len(t.names) for t in ktasks)} int8 dequant-matmul kernels ({len(ktasks)} distinct plans): "
            f"their knobs are searched at 1, 16 and 128 rows")
    out.mkdir(parents=True, exist_ok=True)
    meta = meta or {"format": 1, "target": _target_id(preset), "tasks": {}}
    meta.setdefault("kernels", {})
    meta["model"] = Path(model).name
    meta["dynamic_functions"] = sorted(dynamic)
    meta["skipped_functions"] = skipped
    _write_meta(out, meta)
    if not tasks and not ktasks:
        say("nothing to tune")
        return out
    if "num-cores" not in preset.target:
        raise FqError(f"target '{preset.name}' has no num-cores (MetaSchedule needs it)")
    light_tensor_intrin(tvm_target)
    db = ms.database.JSONDatabase(work_dir=str(out), module_equality="structural")
    builder, runner = _measure_tools(tvm_target, quick, preset, remote)
    if remote is not None:
        say(f"measuring on a board from {remote.describe()}")
    for ktask in ktasks:
        ktask.meta = meta["kernels"].setdefault(ktask.key, {"trials": 0})
        ktask.meta.update(names=ktask.names, calls=ktask.calls)
    measure = kernel_tuning.Measure(tvm_target, builder, runner)
    try:
        kernel_tuning.tune_kernels(ktasks, measure, trials, None if limit is None else start + limit, say,
                                   lambda t: kernel_tuning.same_results(t, tvm_target, preset, remote))
    finally:
        _write_meta(out, meta)
    for task in tasks:
        task.meta = meta["tasks"].setdefault(task.key, {"trials": 0})
        task.meta.update(names=task.names, calls=task.calls, shape=[list(map(int, p.shape)) for p in task.func.params])
        db.commit_workload(task.mod)
        if "hand_s" not in task.meta:
            _remeasure_hand(task, tvm_target, builder, runner)
            _write_meta(out, meta)
    tasks.sort(key=lambda t: -(t.meta["hand_s"] or 0) * t.calls)  # where the time goes first
    logger = _quiet_logger()
    while True:
        todo = [t for t in tasks if t.meta["trials"] < trials]
        if not todo:
            break
        for index, task in enumerate(tasks):
            if task.meta["trials"] >= trials:
                continue
            if limit is not None and time.monotonic() - start > limit:
                say(f"budget of {limit:.0f} s spent; stopping (run again with the same -o to continue)")
                return _finish(out, meta, tasks, db, say, tvm_target, preset, remote)
            n = min(CHUNK, trials - task.meta["trials"])
            rand = (seed * 1_000_003 + int(task.key[:8], 16) + task.meta["trials"]) % (2**31 - 1)
            ctx = ms.TuneContext(mod=task.mod, target=tvm_target, space_generator="post-order-apply",
                                 search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.names[0],
                                 rand_state=rand, num_threads=1, logger=logger).clone()
            ms.tune.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(out), max_trials_global=n,
                               max_trials_per_task=n, num_trials_per_iter=n, builder=builder, runner=runner,
                               database=db, cost_model=ms.cost_model.RandomModel(seed=rand % (2**30)),
                               measure_callbacks=[ms.measure_callback.AddToDatabase(),
                                                  ms.measure_callback.RemoveBuildArtifact()],
                               task_scheduler="round-robin")
            task.meta["trials"] += n
            _remeasure_hand(task, tvm_target, builder, runner)
            _write_meta(out, meta)
            best, hand = best_seconds(db, task.mod), task.meta["hand_s"]
            say(f"task {index + 1}/{len(tasks)} {task.names[0]} ({task.calls} calls): "
                f"{task.meta['trials']}/{trials} trials, best {_ms(best)}, hand schedule {_ms(hand)}"
                + (f" ({hand / best:.2f}x)" if best and hand else ""))
    return _finish(out, meta, tasks, db, say, tvm_target, preset, remote)


def _finish(out, meta, tasks, db, say, target, preset=None, remote=None) -> Path:
    for task in tasks:
        task.meta["best_s"] = best_seconds(db, task.mod)
        task.meta["checked"] = _same_results(task, db, target, preset, remote) if task.meta["best_s"] else None
        if task.meta["checked"] is False:
            say(f"{task.names[0]}: the best record's results differ from the hand schedule's: not used")
    _write_meta(out, meta)
    wins = [t for t in tasks if _wins(t.meta)]
    say(f"done: {len(db)} records; {len(wins)} of {len(tasks)} tasks beat the hand schedule -> {out}")
    for line in summary_lines(meta):
        say(line)
    return out


def _same_results(task: Task, db, target, preset=None, remote=None) -> bool:
    """The best record and the hand schedule give the same results on random inputs (MetaSchedule
    measures candidates, it does not check them): built and run here, or on a board from `remote`."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .schedules import cpu

    sch = db.query_schedule(task.mod, target, "main")
    if sch is None:
        return False
    hand, _ = cpu.fallback(task.mod["main"], target)
    rng = np.random.default_rng(0)
    inputs = []
    for info in ms.arg_info.ArgInfo.from_prim_func(task.mod["main"]):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        inputs.append((rng.standard_normal(shape) if "float" in dtype else rng.integers(0, 2, shape)).astype(dtype))
    libs = [tvm.tirx.build(mod, target=target)
            for mod in (tvm.IRModule({"main": hand.with_attr("tirx.is_scheduled", True)}), sch.mod)]
    for a, b in zip(*outputs_of(libs, inputs, preset, remote)):
        scale = max(float(np.abs(a).max()), 1e-30)
        if not np.all(np.isfinite(a) == np.isfinite(b)) or float(np.nanmax(np.abs(a - b), initial=0)) > 1e-4 * scale:
            return False
    return True


def outputs_of(libs, inputs, preset=None, remote=None) -> list:
    """Per library, its `main`'s arguments after a call on copies of `inputs` (`_outputs`), run here
    or on one board from `remote`."""
    import tvm

    if remote is None:
        return [_outputs(lib["main"], inputs, tvm.cpu()) for lib in libs]
    return _remote_outputs(libs, inputs, preset, remote)


def _outputs(main, inputs, device) -> list:
    """`main` run on copies of `inputs` on `device`: the arguments after the call, as float64."""
    import numpy as np
    import tvm

    args = [tvm.runtime.tensor(x.copy(), device) for x in inputs]
    main(*args)
    return [a.numpy().astype(np.float64) for a in args]


def _remote_outputs(libs, inputs, preset, remote) -> list:
    """`_outputs` of each library's `main`, run on one board from `remote`."""
    from .rpc import open_board

    outs = []
    with open_board(remote) as board:
        for n, lib in enumerate(libs):
            path = _linked(lib, preset)
            name = f"fq-tune-check{n}.so"
            board.session.upload(path, name)
            shutil.rmtree(Path(path).parent, ignore_errors=True)
            outs.append(_outputs(board.session.load_module(name)["main"], inputs, board.session.cpu()))
    return outs


def _wins(entry: dict) -> bool:
    return bool(entry.get("best_s") and entry.get("hand_s") and entry["best_s"] < entry["hand_s"]
                and entry.get("checked") is not False)


def summary_lines(meta: dict) -> list[str]:
    """Per task: calls, hand and tuned ms per call, and what a build will use."""
    rows = sorted(meta["tasks"].values(), key=lambda e: -(e.get("hand_s") or 0) * e.get("calls", 1))
    lines = [f"{'task':48} {'calls':>5} {'hand ms':>9} {'tuned ms':>9}  used"]
    for e in rows:
        lines.append(f"{e['names'][0][:48]:48} {e.get('calls', 1):5d} {_num(e.get('hand_s')):>9} "
                     f"{_num(e.get('best_s')):>9}  {'tuned' if _wins(e) else 'hand'}")
    for key, e in meta.get("kernels", {}).items():
        if "checked" in e:
            lines.append(f"kernel {e['names'][0]} ({key}, {e.get('calls', 0)} calls): {kernel_tuning.describe(e)}")
    return lines


def _num(seconds) -> str:
    return "-" if not seconds else f"{seconds * 1e3:.4f}"


def _ms(seconds) -> str:
    return "-" if not seconds else f"{seconds * 1e3:.4f} ms"


def _quiet_logger():
    import logging

    logger = logging.getLogger("fq_tvm.tuning.ms")
    logger.setLevel(logging.WARNING)
    return logger


class Applier:
    """The `before_fallback` hook of `schedules.relax_pipeline` for a tuned database: functions
    whose best record beat the hand schedule take the tuned schedule; `report` (the manifest's
    `kernels["tuning"]`) receives, per fallback function, "tuned" or "default: why"."""

    def __init__(self, db_dir, preset, report: dict, quiet: bool = False):
        from tvm.s_tir import meta_schedule as ms

        self.dir, self.preset, self.report, self.quiet = Path(db_dir), preset, report, quiet
        report.update(database=str(self.dir), functions={}, tuned=0, default=0)
        meta = read_meta(self.dir) if self.dir.is_dir() else None
        if meta is None or not all((self.dir / f).is_file() for f in DB_FILES):
            raise FqError(f"--tuning-db {db_dir}: not a directory written by fq-tune")
        self.meta, self.db = meta, None
        why = mismatch(meta, preset) if preset.device == "cpu" else f"{preset.device} target (fq-tune tunes CPUs)"
        if why:
            report["ignored"] = why
            self._log(f"tuning database {db_dir} ignored: {why}")
            return
        self.db = ms.database.JSONDatabase(work_dir=str(self.dir), allow_missing=False, module_equality="structural")

    def _log(self, text):
        if not self.quiet:
            print(f"    {text}", file=sys.stderr, flush=True)

    def __call__(self, mod):
        target = self.preset.tvm_target()
        for name, func, plan in kernel_tuning.kernels(mod, target):
            entry = self.meta.get("kernels", {}).get(kernel_tuning.plan_key(plan))
            if self._swap(mod, name, lambda: kernel_tuning.tuned_kernel(func, plan, entry), "hand knobs"):
                self.report.setdefault("knobs", {})[name] = kernel_tuning.moved(entry, plan)
        for name, func, _ in fallback_funcs(mod):
            self._swap(mod, name, lambda: self._tuned(func), "hand schedule")
        functions = self.report["functions"]
        self.report["tuned"] = sum(1 for v in functions.values() if v == "tuned")
        self.report["default"] = len(functions) - self.report["tuned"]
        return mod

    def _swap(self, mod, name, tuned, hand: str) -> bool:
        """mod[name] replaced by `tuned()`'s function, or kept with the reason reported."""
        functions = self.report["functions"]
        if self.db is None:
            functions[name] = "default: database ignored"
            return False
        func, why = tuned()
        if func is None:
            functions[name] = f"default: {why}"
            self._log(f"{name}: {hand} ({why})")
            return False
        mod[name] = func
        functions[name] = "tuned"
        return True

    def _tuned(self, func):
        import tvm

        if not is_static(func):
            return None, "symbolic shape"
        if reads_indirect(func):
            return None, "a gather (not tuned)"
        wl = workload(func)
        entry = self.meta["tasks"].get(workload_key(wl))
        if entry is None or not self.db.has_workload(wl):
            return None, "not in the database"
        best, hand = best_seconds(self.db, wl), entry.get("hand_s")
        if best is None:
            return None, "no successful record"
        if entry.get("checked") is False:
            return None, "the tuned results differed from the hand schedule's"
        if hand is not None and best >= hand:
            return None, f"hand schedule faster ({_ms(hand)} against {_ms(best)})"
        sch = self.db.query_schedule(wl, self.preset.tvm_target(), "main")
        if sch is None:
            return None, "no successful record"
        new = sch.mod["main"]
        attrs = dict(func.attrs) if func.attrs is not None else {}
        attrs["tirx.is_scheduled"] = True
        return tvm.tirx.PrimFunc(new.params, new.body, new.ret_type).with_attrs(attrs), None
