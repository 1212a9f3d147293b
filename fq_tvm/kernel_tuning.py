"""fq-tune's search over the knobs of our own kernels (the int8 dequant-matmul, `schedules/cpu_int8`),
and a tuned build's kernels written with the winners.

Our kernels are TVMScript written already scheduled, with a symbolic row count: their schedule
choices (`cpu_int8.Knobs`: cache blocks, task rows, unrolling, the row count from which the
many-row path runs) shape the TVMScript itself, so there is no MetaSchedule trace to replay. fq-tune
searches them here instead, over the spaces the kernel module declares (`FEW_ROW_SPACE`,
`MANY_ROW_SPACE`; the hand schedule is one point of each), and measures every candidate with the
same builder and runner as MetaSchedule's trials (here, or on a board through the tracker).

Row buckets: the kernel picks its path by the row count at run time, inside one function. The
many-row path's knobs are measured at 128 rows, then the few-row path's (and `many_rows`, the
boundary) at 1 and 16 rows (their geometric mean); a kernel whose codes are pre-laid words runs
the many-row path at every count, measured at 1, 16 and 128. The search moves one knob at a time
to the best of its values (coordinate search, in a fixed order: no randomness), and a move must
gain STEP. Measured candidates are kept in `fq_tuning.json` under "kernels", so a second run
continues where the first stopped. After the search the winner and the hand knobs are timed again,
alternately; a build uses the winner only if it was at least MARGIN faster over the buckets where
it runs other code than the hand knobs (`cpu_int8.same_code_at`), no such bucket was more than
MARGIN slower, and its outputs matched the hand kernel's.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

STEP = 0.02  # a knob moves from its current value only for a gain of 2% at least
MARGIN = 0.03  # a build uses the winner only if it is 3% faster than the hand knobs over the buckets
CONFIRM_ROUNDS = 4  # alternate timings of hand and winner after the search (2 threads on a VM: +-20%)
MANY_ROWS, FEW_ROWS = (128,), (1, 16)


@dataclass
class KernelTask:
    """One distinct kernel plan (hand knobs) and the functions of the build that run it."""

    names: list
    calls: int
    plan: object  # cpu_int8.Plan with the hand knobs
    key: str
    meta: dict = field(default_factory=dict)  # its entry in fq_tuning.json's "kernels"


def plan_key(p) -> str:
    """The plan's identity without its knobs: the ISA, N x K, bits, groups, pre-laid words, 7-bit
    codes."""
    return (f"{p.isa.name}:{p.rows}x{p.cols}:b{p.bits}:g{p.group_cols}:a{p.act_width}"
            + (":words" if p.prelaid else "") + (f":c{p.code_bits}" if p.code_bits else ""))


def kernels(mod, target) -> list[tuple[str, object, object]]:
    """(name, function, hand plan) of the int8 dequant-matmuls in `mod`."""
    import tvm

    from .schedules import cpu_int8

    out = []
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None \
                and str(func.attrs.get("fq_kernel", "")) == cpu_int8.KIND:
            plan = cpu_int8.plan_of(func.attrs, target)
            if plan is not None:
                out.append((gvar.name_hint, func, plan))
    return out


def find_kernel_tasks(mod, target, calls: dict) -> list[KernelTask]:
    """Distinct kernel plans of `mod`; calls: {function name: call sites} (`tuning.call_counts`)."""
    tasks = {}
    for name, _, plan in kernels(mod, target):
        key = plan_key(plan)
        task = tasks.setdefault(key, KernelTask([], 0, plan, key))
        task.names.append(name)
        task.calls += calls.get(name, 0)
    return list(tasks.values())


def buckets(p) -> list[tuple[dict, tuple]]:
    """(space, row counts) per knob group, in search order: the many-row path first (the few-row
    group's `many_rows` may hand 16 rows to it)."""
    from .schedules import cpu_int8

    if p.prelaid:
        return [(cpu_int8.MANY_ROW_SPACE, FEW_ROWS + MANY_ROWS)]
    few = dict(cpu_int8.FEW_ROW_SPACE)
    if not p.gemm:
        few.pop("many_rows")
        return [(few, FEW_ROWS)]
    return [(cpu_int8.MANY_ROW_SPACE, MANY_ROWS), (few, FEW_ROWS)]


def all_rows(p) -> tuple:
    return tuple(sorted({r for _, rows in buckets(p) for r in rows}))


def _name(knobs) -> str:
    return json.dumps(asdict(knobs), sort_keys=True)


def _geomean(values) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


class Measure:
    """Seconds per call of a plan's kernel at given row counts, with MetaSchedule's builder and
    runner (as its trials are measured: the fastest repeat)."""

    def __init__(self, target, builder, runner):
        self.target, self.builder, self.runner = target, builder, runner

    def __call__(self, plan, rows) -> dict | None:
        import tvm
        from tvm.s_tir import meta_schedule as ms

        from .schedules import cpu_int8
        from .tuning import _min

        mod = tvm.IRModule({"main": cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")})
        built = self.builder.build([ms.builder.BuilderInput(mod, self.target)])[0]
        if built.error_msg:
            return None
        try:
            inputs = [ms.runner.RunnerInput(built.artifact_path, "cpu",
                                            [ms.arg_info.TensorInfo(d, list(s)) for d, s in cpu_int8.arg_shapes(plan, m)])
                      for m in rows]
            results = [future.result() for future in self.runner.run(inputs)]
        finally:
            shutil.rmtree(Path(built.artifact_path).parent, ignore_errors=True)
        if any(r.error_msg or not r.run_secs for r in results):
            return None
        return {str(m): _min(r.run_secs) for m, r in zip(rows, results)}


def search(task: KernelTask, measure, trials: int, deadline: float | None) -> bool:
    """Coordinate search of the task's knobs (see the module doc), measured candidates kept in
    task.meta["tried"] by knobs, with their kernel's structural hash: knobs that write the same
    kernel (a cache block past the row) share one measurement. False where trials or the deadline
    ran out first (a later run continues)."""
    from .schedules import cpu_int8

    from .tuning import workload_key

    tried = task.meta.setdefault("tried", {})
    by_kernel = {e["kernel"]: e for e in tried.values() if "kernel" in e}

    def cost(knobs, rows):  # seconds (geometric mean over rows)
        plan = replace(task.plan, knobs=knobs)
        entry = tried.get(_name(knobs))
        if entry is None:
            kernel = workload_key(cpu_int8.dequant_matmul(plan))
            entry = by_kernel.setdefault(kernel, {"kernel": kernel})
        missing = [m for m in rows if str(m) not in entry]
        if missing:
            if task.meta["trials"] >= trials or (deadline is not None and time.monotonic() > deadline):
                raise _Spent
            got = measure(plan, missing)
            task.meta["trials"] += 1
            entry.update(got or {str(m): math.inf for m in missing})
        tried[_name(knobs)] = entry
        return _geomean([entry[str(m)] for m in rows]) if all(math.isfinite(entry[str(m)]) for m in rows) else math.inf

    current = task.plan.knobs
    try:
        for space, rows in buckets(task.plan):
            for knob, values in space.items():
                best, low = current, cost(current, rows)
                for value in values:
                    candidate = replace(current, **{knob: value})
                    seconds = cost(candidate, rows)
                    if seconds < low * (1 - STEP):
                        best, low = candidate, seconds
                current = best
    except _Spent:
        return False
    task.meta["knobs"] = asdict(current)
    return True


class _Spent(Exception):
    """Trials or time ran out in the middle of a search."""


def candidates(task: KernelTask) -> list:
    """The search's winner and, where both knob groups moved, each group's moves alone on the hand
    knobs (a group's gain must not pay for the other's loss in another bucket)."""
    from .schedules import cpu_int8

    hand, winner = task.plan.knobs, cpu_int8.Knobs(**task.meta["knobs"])
    out = [winner] if winner != hand else []
    groups = [space for space, _ in buckets(task.plan)]
    if len(groups) > 1:
        for space in groups:
            alone = replace(hand, **{k: getattr(winner, k) for k in space})
            if alone not in out and alone != hand:
                out.append(alone)
    return out


def confirm(task: KernelTask, measure) -> None:
    """Time the hand knobs and each candidate again, alternately, keeping each one's fastest per
    row count; the candidate that wins by most (`wins`) becomes the entry's knobs and `best_s`, else
    the hand knobs stay (no `best_s`)."""
    rows = all_rows(task.plan)
    found = candidates(task)
    times = [{} for _ in range(len(found) + 1)]
    for _ in range(CONFIRM_ROUNDS if found else 1):
        for knobs, out in zip([task.plan.knobs] + found, times):
            got = measure(replace(task.plan, knobs=knobs), rows) or {str(m): math.inf for m in rows}
            for m, s in got.items():
                out[m] = min(out.get(m, math.inf), s)
    task.meta["hand_s"], task.meta["candidates"] = times[0], len(found)
    for key in ("best_s", "acts"):
        task.meta.pop(key, None)
    task.meta["knobs"] = asdict(task.plan.knobs)
    ranked = []
    for i, (knobs, t) in enumerate(zip(found, times[1:])):
        entry = {"hand_s": times[0], "best_s": t, "checked": True, "acts": acts(task.plan, knobs)}
        if wins(entry):
            ranked.append((_geomean([t[m] / times[0][m] for m in entry["acts"]]), i, entry))
    if ranked:
        _, best, entry = min(ranked)
        task.meta.update(knobs=asdict(found[best]), best_s=entry["best_s"], acts=entry["acts"])


def acts(plan, knobs) -> list[str]:
    """The row counts (as keys of the times) at which `knobs` run other code than the plan's: the
    others measure the same code twice, so their difference is noise and does not count."""
    from .schedules import cpu_int8

    return [str(m) for m in all_rows(plan) if not cpu_int8.same_code_at(plan, knobs, m)]


def wins(entry: dict) -> bool:
    """The entry's winner beats the hand knobs by MARGIN over the buckets where it runs other code
    (`acts`; all where not given), loses in none of them by more, and its outputs matched the hand
    kernel's."""
    hand, best = entry.get("hand_s"), entry.get("best_s")
    if not hand or not best or entry.get("checked") is not True or set(hand) != set(best):
        return False
    ratios = [best[m] / hand[m] for m in entry.get("acts", hand)]
    if not ratios:
        return False
    if not all(math.isfinite(r) and r > 0 for r in ratios):
        return False
    return _geomean(ratios) <= 1 - MARGIN and max(ratios) <= 1 + MARGIN


def same_results(task: KernelTask, target, preset=None, remote=None) -> bool:
    """The winner's outputs equal the hand kernel's on random inputs (float sums in another order:
    within 1e-5 of the largest output), built and run here or on a board from `remote`."""
    import numpy as np
    import tvm

    from .schedules import cpu_int8
    from .tuning import outputs_of

    rng = np.random.default_rng(0)
    rows = max(all_rows(task.plan)) + 3  # (a row tail as well)
    inputs = []
    for dtype, shape in cpu_int8.arg_shapes(task.plan, rows):
        if dtype == "float32":
            inputs.append(rng.uniform(0.01, 1.0, shape).astype(dtype) * np.sign(rng.standard_normal(shape)).astype(dtype))
        else:
            inputs.append(rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True))
    libs = [tvm.tirx.build(tvm.IRModule({"main": cpu_int8.dequant_matmul(replace(task.plan, knobs=knobs))
                                         .with_attr("global_symbol", "main")}), target=target)
            for knobs in (task.plan.knobs, cpu_int8.Knobs(**task.meta["knobs"]))]
    a, b = (out[-1] for out in outputs_of(libs, inputs, preset, remote))
    return bool(np.all(np.isfinite(b)) and np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-30))


def tune_kernels(tasks: list[KernelTask], measure, trials: int, deadline: float | None, say, check) -> None:
    """Search, confirm and check each task in turn (the most called first); `check(task) -> bool`."""
    for index, task in enumerate(sorted(tasks, key=lambda t: -t.calls)):
        if "checked" in task.meta:  # searched, confirmed and checked by an earlier run
            continue
        task.meta.setdefault("trials", 0)
        if not search(task, measure, trials, deadline) or (deadline is not None and time.monotonic() > deadline):
            say(f"kernel {index + 1}/{len(tasks)} {task.names[0]}: {task.meta['trials']}/{trials} trials, "
                f"not finished (run again with the same -o to continue)")
            return
        confirm(task, measure)
        task.meta["checked"] = check(task) if task.meta.get("best_s") else None
        say(f"kernel {index + 1}/{len(tasks)} {task.names[0]} ({task.calls} calls): {task.meta['trials']} "
            f"trials, {describe(task.meta, task.plan)}")


def describe(entry: dict, plan=None) -> str:
    """One line: per row count, hand and tuned ms, and what a build uses."""
    hand, best = entry.get("hand_s") or {}, entry.get("best_s") or {}
    if not best:
        times = ", ".join(f"{m} rows {_ms(hand[m])}" for m in hand)
        if entry.get("candidates"):
            return f"hand knobs kept: {entry['candidates']} candidates not faster when timed again ({times})"
        return f"hand knobs best ({times})"
    times = ", ".join(f"{m} rows {_ms(hand[m])} -> {_ms(best.get(m))}" if m in entry.get("acts", hand)
                      else f"{m} rows {_ms(hand[m])} (same code)" for m in hand)
    verdict = "used" if wins(entry) else "not used" + (" (outputs differ)" if entry.get("checked") is False else "")
    return f"{' '.join(f'{k}={v}' for k, v in moved(entry, plan).items())}: {times}; {verdict}"


def moved(entry: dict, plan=None) -> dict:
    """The entry's knobs that differ from the hand knobs (the plan's, or the defaults)."""
    from .schedules import cpu_int8

    hand = plan.knobs if plan is not None else cpu_int8.Knobs()
    return {k: v for k, v in entry.get("knobs", {}).items() if getattr(hand, k) != v}


def _ms(seconds) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.4f} ms"


def tuned_kernel(func, plan, entry: dict | None):
    """(`func`, the kernel of `plan`, written with the entry's knobs, None) where the entry wins,
    else (None, why)."""
    from .schedules import cpu_int8

    if entry is None:
        return None, "not in the database"
    if "checked" not in entry:
        return None, "search not finished"
    if not wins(entry):
        return None, "hand knobs as fast" if entry.get("checked") is not False else "tuned results differed"
    if set(entry.get("knobs", {})) != set(asdict(plan.knobs)):  # a database from an fq-tvm with other knobs
        return None, "knobs unknown to this fq-tvm version"
    new = cpu_int8.dequant_matmul(replace(plan, knobs=cpu_int8.Knobs(**entry["knobs"])))
    extra = {k: v for k, v in func.attrs.items() if k not in new.attrs}  # global_symbol, tirx.is_scheduled
    return new.with_attrs(extra), None
