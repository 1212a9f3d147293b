"""fq-tune (MetaSchedule tuning of the CPU fallback's graph ops) and fq-compile --tuning-db, on the
small encoder block pinned to batch 1 x 16 tokens, a few trials per task."""

import json
import shutil

import numpy as np
import pytest

import fq_tvm
from fq_tvm import FqError, models, tuning
from fq_tvm.cli import compile_main
from fq_tvm.tune_cli import main as tune_main
from conftest import max_rel_err, ort_run

PINS = ["batch=1", "seq=16"]


def _records(out) -> list:
    """(workload index, trace) of every record of a database directory, run times left out."""
    lines = (out / "database_tuning_record.json").read_text().splitlines()
    return [(json.loads(line)[0], json.dumps(json.loads(line)[1][0])) for line in lines if line.strip()]


def _meta(out) -> dict:
    return json.loads((out / tuning.META).read_text())


@pytest.fixture(scope="module")
def tuned(encoder_onnx, tmp_path_factory):
    """The encoder tuned with 2 trials per task (about 15 s on 2 cores)."""
    out = tmp_path_factory.mktemp("tune") / "db"
    fq_tvm.tune(encoder_onnx, "host", out, trials=2, input_shapes=PINS, quick=True, quiet=True)
    return out


def _with_hand_times(db, dest, seconds: float):
    """A copy of the database whose recorded hand-schedule latencies are all `seconds`."""
    shutil.copytree(db, dest)
    meta = _meta(dest)
    for entry in meta["tasks"].values():
        entry["hand_s"] = seconds
    (dest / tuning.META).write_text(json.dumps(meta))
    return dest


def _run(art, x):
    return fq_tvm.load(art).run({"x": x})["y"]


@pytest.mark.slow  # two more tuning runs
def test_tune_writes_a_seeded_database_and_a_second_run_continues_it(tuned, encoder_onnx, tmp_path, capsys):
    meta = _meta(tuned)
    assert meta["target"]["preset"] == "host" and meta["dynamic_functions"] == []
    tasks = meta["tasks"]
    # the encoder's fallback ops: gelu, bias adds, the scale, reshapes fused with them (static shapes);
    # attention runs cpu_attention, cpu_softmax, cpu_attention_values, the norms cpu_layer_norm
    assert len(tasks) == 6
    assert all(entry["trials"] == 2 and entry["hand_s"] > 0 and entry["best_s"] > 0 for entry in tasks.values())
    assert all(entry["checked"] is True for entry in tasks.values())  # best records agree with the hand schedule
    names = {name for entry in tasks.values() for name in entry["names"]}
    assert not {"layer_norm", "softmax"} & names
    first = _records(tuned)
    assert len(first) == 12 and len({index for index, _ in first}) == 6
    workloads = (tuned / "database_workload.json").read_text().splitlines()
    assert len(workloads) == 6

    again = tmp_path / "again"  # a copy goes on from 2 to 3 trials per task (CI time: seeded reruns
    shutil.copytree(tuned, again)  # measuring the same candidates is not re-checked here)
    fq_tvm.tune(encoder_onnx, "host", again, trials=3, budget=0.001, input_shapes=PINS, quick=True)
    assert "budget of 0 s spent" in capsys.readouterr().err  # stops between batches, the database kept
    assert _records(again) == first and all(e["trials"] == 2 for e in _meta(again)["tasks"].values())
    fq_tvm.tune(encoder_onnx, "host", again, trials=3, input_shapes=PINS, quick=True, quiet=True)
    resumed = _records(again)
    assert len(resumed) == 18 and sorted(t for _, t in resumed[:12]) == sorted(t for _, t in first)
    assert (again / "database_workload.json").read_text().splitlines() == workloads  # same 6 workloads
    assert all(entry["trials"] == 3 for entry in _meta(again)["tasks"].values())
    fq_tvm.tune(encoder_onnx, "host", again, trials=3, input_shapes=PINS, quick=True, quiet=True)
    assert len(_records(again)) == 18  # nothing left to do


def test_tuned_build_matches_ort_and_the_untuned_build(tuned, encoder_onnx, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    ref = ort_run(encoder_onnx, {"x": x})[0]
    plain = fq_tvm.compile(encoder_onnx, "host", tmp_path / "plain", input_shapes=PINS, quiet=True)
    all_tuned = _with_hand_times(tuned, tmp_path / "slow_hand", 1.0)  # every record beats 1 s
    art = fq_tvm.compile(encoder_onnx, "host", tmp_path / "tuned", input_shapes=PINS, quiet=True,
                         tuning_db=all_tuned)
    report = json.loads((art / "manifest.json").read_text())["kernels"]
    assert "tuning" not in json.loads((plain / "manifest.json").read_text())["kernels"]
    functions = report["tuning"]["functions"]
    assert len(functions) == 6 and set(functions.values()) == {"tuned"}
    assert report["tuning"]["tuned"] == 6 and report["tuning"]["default"] == 0
    ours, untuned = _run(art, x), _run(plain, x)
    assert max_rel_err(ours, ref) < 1e-5 and max_rel_err(ours, untuned) < 1e-5
    again = fq_tvm.compile(encoder_onnx, "host", tmp_path / "again", input_shapes=PINS, quiet=True,
                           tuning_db=all_tuned)  # the same database and model: the same library, byte for byte
    assert (again / "model.so").read_bytes() == (art / "model.so").read_bytes()


def test_records_slower_than_the_hand_schedule_are_not_used(tuned, encoder_onnx, tmp_path):
    fast_hand = _with_hand_times(tuned, tmp_path / "fast_hand", 1e-12)
    art = fq_tvm.compile(encoder_onnx, "host", tmp_path / "art", input_shapes=PINS, quiet=True, tuning_db=fast_hand)
    report = json.loads((art / "manifest.json").read_text())["kernels"]["tuning"]
    assert report["tuned"] == 0 and report["default"] == 6
    assert all(v.startswith("default: hand schedule faster") for v in report["functions"].values())
    # the real database: a function is tuned exactly when its best record beat the hand schedule
    art = fq_tvm.compile(encoder_onnx, "host", tmp_path / "real", input_shapes=PINS, quiet=True, tuning_db=tuned)
    functions = json.loads((art / "manifest.json").read_text())["kernels"]["tuning"]["functions"]
    wins = {name for entry in _meta(tuned)["tasks"].values() for name in entry["names"]
            if entry["best_s"] < entry["hand_s"]}
    assert {name for name, v in functions.items() if v == "tuned"} == wins


def test_a_database_for_another_target_is_ignored_and_not_extended(tuned, encoder_onnx, tmp_path, capsys):
    other = '{"kind": "llvm", "mcpu": "x86-64-v2", "num-cores": 2}'
    art = fq_tvm.compile(encoder_onnx, other, tmp_path / "art", input_shapes=PINS, tuning_db=tuned)
    assert "tuning database" in capsys.readouterr().err
    report = json.loads((art / "manifest.json").read_text())["kernels"]["tuning"]
    assert "tuned for host" in report["ignored"]
    assert set(report["functions"].values()) == {"default: database ignored"} and report["tuned"] == 0
    with pytest.raises(FqError, match="one directory per target"):
        fq_tvm.tune(encoder_onnx, other, tuned, trials=1, input_shapes=PINS, quiet=True)


def test_dynamic_shapes_are_reported_not_tuned(encoder_onnx, tmp_path, capsys):
    assert tune_main([str(encoder_onnx), "-o", str(tmp_path / "db"), "--trials", "1"]) == 0
    err = capsys.readouterr().err
    assert "0 with static shapes" in err and "--input-shape" in err
    meta = _meta(tmp_path / "db")
    assert len(meta["dynamic_functions"]) == 4 and meta["tasks"] == {}  # attention, softmax, norms: ours
    assert "fused_add2_gelu" in meta["dynamic_functions"]


def test_gathers_are_not_tuned(tmp_path):
    """An embedding lookup reads at indices loaded from the input: random measurement inputs would
    read out of bounds, so it keeps the hand schedule; the rest of the model is tuned. A vocabulary
    of 500 is not whole dense panels, so the table is not packed and its gather stays TVM's take
    (a packed tied table's gather is our kernel, `cpu_dense.gather_columns`)."""
    onnx_path = models.tied_lm(tmp_path / "lm.onnx", vocab=500, hidden=32)
    fq_tvm.tune(onnx_path, "host", tmp_path / "db", trials=1, input_shapes=["batch=1", "seq=8"], quick=True, quiet=True)
    meta = _meta(tmp_path / "db")
    skipped = meta["skipped_functions"]
    assert len(skipped) == 1 and all(name.startswith("take") and "gather" in why for name, why in skipped.items())
    tuned_names = {name for entry in meta["tasks"].values() for name in entry["names"]}
    assert tuned_names and not tuned_names & set(skipped)
    art = fq_tvm.compile(onnx_path, "host", tmp_path / "art", input_shapes=["batch=1", "seq=8"], quiet=True,
                         tuning_db=_with_hand_times(tmp_path / "db", tmp_path / "db2", 1.0))
    functions = json.loads((art / "manifest.json").read_text())["kernels"]["tuning"]["functions"]
    assert all(functions[name] == "default: a gather (not tuned)" for name in skipped)
    assert {name for name, v in functions.items() if v == "tuned"} == tuned_names
    ids = np.random.default_rng(0).integers(0, 500, (1, 8)).astype(np.int64)
    ref = ort_run(onnx_path, {"x": ids})[0]
    assert max_rel_err(fq_tvm.load(art).run({"x": ids})["y"], ref) < 1e-5


def test_bad_arguments_are_one_line_errors(encoder_onnx, tmp_path, capsys):
    assert tune_main([str(encoder_onnx), "-o", str(tmp_path / "db"), "--budget", "soon"]) == 1
    assert "--budget" in capsys.readouterr().err
    assert tune_main([str(encoder_onnx), "-o", str(tmp_path / "db"), "--trials", "0"]) == 1
    assert compile_main([str(encoder_onnx), "-o", str(tmp_path / "art"), "-q", "--tuning-db", str(tmp_path)]) == 1
    assert "not a directory written by fq-tune" in capsys.readouterr().err
    assert tuning.parse_budget("20m") == 1200 and tuning.parse_budget("1h30m") == 5400
    assert tuning.parse_budget("90s") == 90 and tuning.parse_budget(45) == 45 and tuning.parse_budget(None) is None
    db = str(tmp_path / "db2")
    assert tune_main([str(encoder_onnx), "-o", db, "--target", "rpi5"]) == 1  # aarch64: needs a board
    assert "measure on a board with --rpc-tracker HOST:PORT --rpc-key KEY" in capsys.readouterr().err
    assert tune_main([str(encoder_onnx), "-o", db, "--rpc-tracker", "127.0.0.1:9"]) == 1
    assert "--rpc-tracker HOST:PORT and --rpc-key KEY go together" in capsys.readouterr().err
    assert tune_main([str(encoder_onnx), "-o", db, "--rpc-tracker", "nowhere", "--rpc-key", "rpi5"]) == 1
    assert "--rpc-tracker takes HOST:PORT" in capsys.readouterr().err
    assert tune_main([str(encoder_onnx), "-o", db, "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "rpi5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "127.0.0.1:9" in err  # no tracker there: one line, before any build
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((2, 16, 64), np.float32))
    assert tune_main([str(encoder_onnx), "-o", db, "--scheme", "fq2", "--calib", str(calib), "--head-scheme", "fp32"]) == 1
    assert "--head-scheme fp32: that scheme does not quantize" in capsys.readouterr().err
