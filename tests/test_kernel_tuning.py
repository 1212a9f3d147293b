"""fq-tune's search over the int8 dequant-matmul's knobs (fq_tvm/kernel_tuning.py): every point of
the search space computes the same numbers (numpy on the definitions), the search's rules on a
made-up cost, its resumption, and a tuned build that writes its kernels with the recorded knobs."""

import json
import math
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest
import tvm

import fq_tvm
from fq_tvm import kernel_tuning, tuning
from fq_tvm.numerics import quantize_activations
from fq_tvm.schedules import cpu_int8
from conftest import max_rel_err, pack_reference

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
SPACE = [(k, v) for space in (cpu_int8.FEW_ROW_SPACE, cpu_int8.MANY_ROW_SPACE) for k, vs in space.items() for v in vs
         if v != getattr(cpu_int8.Knobs(), k)]


@pytest.mark.parametrize("knob, value", SPACE)
def test_every_point_of_the_space_equals_numpy(knob, value):
    """Both paths (1-23 rows few-row, 70 many-row; 16 and more where many_rows is 16), a K of
    several cache blocks at the smaller sizes and not a multiple of a block, rows over two tasks."""
    rows, cols, bits = 192, 2200, 2
    plan = cpu_int8.plan(rows, cols, bits, 0, HOST)
    plan = replace(plan, knobs=replace(plan.knobs, **{knob: value}))
    lib = tvm.compile(tvm.IRModule({"main": cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")}), HOST)
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
    zero = rng.uniform(0, 3, (rows, 1)).astype(np.float32)
    w = (codes - zero.astype(np.float64)) * scale
    for m in (1, 3, 16, 23, 70):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((m, rows), np.float32))
        lib.mod["main"](*(tvm.runtime.tensor(a) for a in (x, pack_reference(codes, bits), scale, zero)), y)
        ref = quantize_activations(x, None).astype(np.float64) @ w.T
        assert max_rel_err(y.numpy(), ref) < 2e-6, (knob, value, m)


def _fake(cost_of):
    """A measure whose seconds are cost_of(knobs, rows), counting its calls per knobs."""
    calls = []

    def measure(plan, rows):
        calls.append((plan.knobs, tuple(rows)))
        return {str(m): cost_of(plan.knobs, m) for m in rows}

    measure.calls = calls
    return measure


def _task():
    plan = cpu_int8.plan(192, 2200, 2, 0, HOST)
    return kernel_tuning.KernelTask(["k"], 1, plan, kernel_tuning.plan_key(plan), {"trials": 0})


def _cost(knobs, m):
    """Many-row: gemm_task_rows 128 is 10% faster, gemm_tile_block 4 1% (under the step);
    few-row: chunk_rows 32 is 20% faster at 16 rows only."""
    if m >= 128:
        return 1.0 * (0.9 if knobs.gemm_task_rows == 128 else 1) * (0.99 if knobs.gemm_tile_block == 4 else 1)
    return 1.0 * (0.8 if knobs.chunk_rows == 32 and m == 16 else 1)


def test_search_moves_a_knob_only_for_a_real_gain():
    task = _task()
    measure = _fake(_cost)
    assert kernel_tuning.search(task, measure, trials=100, deadline=None)
    won = cpu_int8.Knobs(**task.meta["knobs"])
    assert won == replace(task.plan.knobs, gemm_task_rows=128, chunk_rows=32)  # not gemm_tile_block: 1% < STEP
    # knobs that write the same kernel share a measurement (2200 columns: chunk_cols 4096 and 8192 alike)
    assert replace(task.plan.knobs, chunk_cols=8192) not in {k for k, _ in measure.calls}
    assert task.meta["trials"] == len(measure.calls) == len(set(measure.calls))  # (the hand knobs: 2 row sets)


def test_a_spent_budget_stops_before_the_confirming_timings():
    """A search finished from earlier measurements is not confirmed past the deadline: the task
    stays unfinished (no "checked"), and a later run confirms it without searching again."""
    task, measure = _task(), _fake(_cost)
    kernel_tuning.search(task, measure, trials=100, deadline=None)
    task.meta.pop("knobs")
    said, again = [], _fake(_cost)
    kernel_tuning.tune_kernels([task], again, 100, 0.0, said.append, lambda t: True)
    assert "checked" not in task.meta and not again.calls and "not finished" in said[0]
    kernel_tuning.tune_kernels([task], again, 100, None, said.append, lambda t: True)
    assert task.meta["checked"] is True and kernel_tuning.wins(task.meta)
    assert all(rows == (1, 16, 128) for _, rows in again.calls)  # confirming timings only


def test_search_stops_at_the_trials_and_a_second_run_continues():
    task, measure = _task(), _fake(_cost)
    assert not kernel_tuning.search(task, measure, trials=4, deadline=None)
    assert task.meta["trials"] == 4 and "knobs" not in task.meta
    again = _fake(_cost)
    assert kernel_tuning.search(task, again, trials=100, deadline=None)
    assert not set(again.calls) & set(measure.calls)  # measured ones are not measured again
    whole = _task()
    kernel_tuning.search(whole, _fake(_cost), trials=100, deadline=None)
    assert task.meta["knobs"] == whole.meta["knobs"] and task.meta["trials"] == whole.meta["trials"]


@pytest.mark.parametrize("best, checked, used", [
    ({"1": 0.9, "16": 0.9, "128": 0.9}, True, True),
    ({"1": 0.99, "16": 0.99, "128": 0.99}, True, False),  # 1%: under MARGIN
    ({"1": 0.8, "16": 0.8, "128": 1.05}, True, False),  # one bucket 5% slower
    ({"1": 0.9, "16": 0.9, "128": 0.9}, False, False),  # outputs differed
    ({"1": 0.9, "16": 0.9, "128": math.inf}, True, False),  # a bucket failed to run
])
def test_a_winner_is_used_only_where_it_wins_everywhere(best, checked, used):
    entry = {"hand_s": {"1": 1.0, "16": 1.0, "128": 1.0}, "best_s": best, "checked": checked, "knobs": {}}
    assert kernel_tuning.wins(entry) is used


def test_buckets_running_the_same_code_do_not_count():
    """A few-row knob leaves 128 rows (the many-row path) alone, a many-row knob 1 and 16 rows;
    many_rows = 16 moves 16 rows to the many-row path. Their timings there are noise."""
    plan = _task().plan
    assert kernel_tuning.acts(plan, replace(plan.knobs, chunk_rows=32)) == ["1", "16"]
    assert kernel_tuning.acts(plan, replace(plan.knobs, gemm_task_rows=32)) == ["128"]
    assert kernel_tuning.acts(plan, replace(plan.knobs, many_rows=16)) == ["16"]
    entry = {"hand_s": {"1": 1.0, "16": 1.0, "128": 1.0}, "best_s": {"1": 1.2, "16": 1.2, "128": 0.9},
             "checked": True, "acts": ["128"]}
    assert kernel_tuning.wins(entry) and not kernel_tuning.wins(dict(entry, acts=["1", "16", "128"]))


@pytest.fixture(scope="module")
def fq2_encoder(encoder_onnx, encoder_calib):
    return encoder_onnx, encoder_calib


def test_tune_measures_kernels_and_continues(fq2_encoder, tmp_path):
    """Two real trials (MetaSchedule's builder and runner), then a second run goes on to three."""
    onnx, calib = fq2_encoder
    out = tmp_path / "db"
    fq_tvm.tune(onnx, "host", out, scheme="fq2", calib=calib, trials=2, quick=True, quiet=True)
    kernels = json.loads((out / tuning.META).read_text())["kernels"]
    assert len(kernels) == 1
    (key, entry), = kernels.items()
    assert key.startswith(cpu_int8.select_isa(HOST).name) and entry["trials"] == 2 and "checked" not in entry
    seconds = [s for e in entry["tried"].values() for m, s in e.items() if m != "kernel"]
    assert len(seconds) >= 2 and all(0 < s < 0.1 for s in seconds)
    fq_tvm.tune(onnx, "host", out, scheme="fq2", calib=calib, trials=3, quick=True, quiet=True)
    assert json.loads((out / tuning.META).read_text())["kernels"][key]["trials"] == 3


@pytest.mark.parametrize("scheme", ["fq2", "int8"])  # int8: 8-bit codes pre-laid as words
def test_a_tuned_build_writes_the_kernel_with_the_recorded_knobs(fq2_encoder, tmp_path, scheme):
    onnx, calib = fq2_encoder
    calib = calib if scheme == "fq2" else None  # (int8 does not calibrate)
    out = tmp_path / "db"
    fq_tvm.tune(onnx, "host", out, scheme=scheme, calib=calib, trials=1, quick=True, quiet=True)
    meta = json.loads((out / tuning.META).read_text())
    moved = {"gemm_task_rows": 32, "gemm_tile_block": 4} if scheme == "int8" else {"gemm_task_rows": 32, "chunk_rows": 32}
    hand = {"1": 1e-5, "16": 2e-5, "128": 4e-5}
    for entry in meta["kernels"].values():
        knobs = dict(asdict(cpu_int8.Knobs()), **moved)
        entry.update(knobs=knobs, hand_s=hand, best_s={m: s * 0.8 for m, s in hand.items()}, checked=True)
    (out / tuning.META).write_text(json.dumps(meta))
    slower = tmp_path / "slower"
    shutil.copytree(out, slower)
    for entry in meta["kernels"].values():
        entry.update(best_s={m: s * 1.2 for m, s in hand.items()})
    (slower / tuning.META).write_text(json.dumps(meta))

    x = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)
    builds = [fq_tvm.compile(onnx, "host", tmp_path / label, scheme=scheme, calib=calib, tuning_db=db, quiet=True)
              for label, db in (("plain", None), ("tuned", out), ("same", slower))]
    report = json.loads((builds[1] / "manifest.json").read_text())["kernels"]["tuning"]
    assert len(report["knobs"]) == len(meta["kernels"]) >= 1
    for name, knobs_used in report["knobs"].items():
        assert report["functions"][name] == "tuned" and knobs_used == moved
    other = json.loads((builds[2] / "manifest.json").read_text())["kernels"]["tuning"]
    assert all(other["functions"][name] == "default: hand knobs as fast" for name in report["knobs"])
    assert "knobs" not in other
    ys = [fq_tvm.load(a).run({"x": x})["y"] for a in builds]
    if scheme == "fq2":  # knobs this version does not have (a database from another fq-tvm): hand knobs
        entry = next(iter(meta["kernels"].values()))
        entry.update(best_s={m: s * 0.8 for m, s in hand.items()}, knobs={"bogus": 1})
        (slower / tuning.META).write_text(json.dumps(meta))
        other = fq_tvm.compile(onnx, "host", tmp_path / "other", scheme=scheme, calib=calib, tuning_db=slower,
                               quiet=True)
        unknown = json.loads((other / "manifest.json").read_text())["kernels"]["tuning"]
        assert [unknown["functions"][name] for name in report["knobs"]] == ["default: knobs unknown to this fq-tvm version"]
    assert max_rel_err(ys[1], ys[0].astype(np.float64)) < 1e-5 and np.array_equal(ys[2], ys[0])
    assert (builds[1] / "model.so").read_bytes() != (builds[0] / "model.so").read_bytes()


def test_bench_tuning_tabulates_the_kernels():
    """benchmarks/bench_tuning.py's table: tuned buckets as hand -> tuned, the others marked."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_tuning

    hand = {"1": 1e-5, "16": 2e-5, "128": 4e-5}
    meta = {"kernels": {
        "avx2:64x256:b2:g0:a256": {"calls": 6, "hand_s": hand, "best_s": {m: s * 0.8 for m, s in hand.items()},
                                   "acts": ["128"], "checked": True,
                                   "knobs": dict(asdict(cpu_int8.Knobs()), gemm_task_rows=32)},
        "avx2:64x512:b2:g0:a512": {"calls": 6, "hand_s": hand, "checked": None, "knobs": asdict(cpu_int8.Knobs())},
        "avx2:64x768:b2:g0:a768": {"calls": 6, "trials": 3}}}
    lines = bench_tuning.kernel_table(meta)
    assert lines[0] == "| kernel plan | calls | 1 rows, ms | 16 rows, ms | 128 rows, ms | used |"
    assert lines[2] == ("| avx2:64x256:b2:g0:a256 | 6 | 0.0100 (same code) | 0.0200 (same code) | 0.0400 -> 0.0320 "
                        "| tuned: `gemm_task_rows=32` |")
    assert lines[3] == "| avx2:64x512:b2:g0:a512 | 6 | 0.0100 | 0.0200 | 0.0400 | hand |"
    assert lines[4] == "| avx2:64x768:b2:g0:a768 | 6 | - | - | - | search not finished |"
