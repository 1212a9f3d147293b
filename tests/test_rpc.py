"""TVM RPC on loopback: a tracker and two fq-rpc-server processes form a board pool; fq-bench
--tracker runs artifacts on it (two requests at once), and the boards' outputs match the host's.
Slow: the same with two qemu-aarch64 servers running aarch64 builds."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fq_tvm
from fq_tvm import bench_cli, rpc
from fq_tvm.benchmark import compare
from fq_tvm.errors import FqError
from conftest import max_rel_err, ort_run

REPO = Path(fq_tvm.__file__).resolve().parent.parent
KEY = "fq-loop-x86"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def repo_env(**extra) -> dict:
    """The environment of a server process: this checkout first on its path, plus `extra`."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def stand_alone(port: int, env: dict, *args) -> subprocess.Popen:
    """fq-rpc-server on 127.0.0.1:port without a tracker (stderr piped, text)."""
    return subprocess.Popen([sys.executable, "-m", "fq_tvm.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def start_server(cmd_prefix, tracker_port: int, key: str, env: dict) -> subprocess.Popen:
    port = free_port()
    cmd = [*cmd_prefix, "-m", "fq_tvm.rpc_server", "--host", "127.0.0.1", "--port", str(port),
           "--port-end", str(port + 50), "--tracker", f"127.0.0.1:{tracker_port}", "--key", key, "-q"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_free(tracker_port: int, key: str, count: int, procs, timeout: float = 90.0) -> None:
    """Until the tracker lists `count` free boards of kind `key`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in procs:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        queue = rpc.tracker_summary(("127.0.0.1", tracker_port))["queue_info"].get(key, {})
        if queue.get("free", 0) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{count} boards of kind {key} did not register within {timeout} s")


def stop(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def tracker():
    from tvm.rpc.tracker import Tracker

    tr = Tracker("127.0.0.1", port=9190, port_end=9390, silent=True)
    yield tr.port
    tr.terminate()


@pytest.fixture(scope="module")
def pool(tracker):
    """Two x86 fq-rpc-server processes registered as KEY."""
    env = repo_env(TVM_NUM_THREADS="1")
    procs = [start_server([sys.executable], tracker, KEY, env) for _ in range(2)]
    try:
        wait_free(tracker, KEY, 2, procs)
        yield {"tracker": tracker, "procs": procs, "addr": f"127.0.0.1:{tracker}"}
    finally:
        stop(procs)


@pytest.fixture(scope="module")
def builds(mlp_onnx, tmp_path_factory):
    work = tmp_path_factory.mktemp("rpc")
    calib = work / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    out = {s: fq_tvm.compile(mlp_onnx, "host", work / f"mlp.{s}", scheme=s, calib=calib, quiet=True)
           for s in ("fp32", "fq2")}
    return {"calib": calib, **out}


def eval_feeds(calib) -> dict:
    with np.load(calib) as data:
        return {"x": data["x"][:8]}


def bench_at_once(model, calib, artifacts: dict, tracker: str, key: str, tmp_path, timeout: float) -> dict:
    """fq-bench of each artifact, all at once through the tracker: {scheme: report}."""
    results, errors = {}, []

    def run(scheme):
        try:
            results[scheme] = fq_tvm.bench(model, calib, artifacts=[artifacts[scheme]], tracker=tracker, key=key,
                                           seconds=0.3, out_dir=tmp_path / f"{scheme}.bench", quiet=True,
                                           timeout=timeout)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(s,)) for s in artifacts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_two_benches_at_once_through_the_tracker(pool, builds, mlp_onnx, tmp_path):
    """fp32 and fq2 at the same time: each gets its own board; accuracy as computed here."""
    results = bench_at_once(mlp_onnx, builds["calib"], {s: builds[s] for s in ("fp32", "fq2")}, pool["addr"], KEY,
                            tmp_path, timeout=60)
    feeds = eval_feeds(builds["calib"])
    ref = {"y": ort_run(mlp_onnx, feeds)[0]}
    boards = set()
    for scheme, result in results.items():
        (row,) = result["rows"]
        assert row["label"] == f"fq-tvm {scheme}" and row["where"] != "local" and row["peak_bytes"] is None
        boards.add(row["where"])
        expected = compare(fq_tvm.load(builds[scheme]).run(feeds), ref)
        assert row["vs_ort_fp32"]["max_rel_err"] == pytest.approx(expected["max_rel_err"], rel=1e-6, abs=1e-9)
        assert row["vs_ort_fp32"]["cosine"] == pytest.approx(expected["cosine"], abs=1e-9)
        lat = row["latency"]
        assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"] and lat["calls"] >= 5
        assert "over RPC at 127.0.0.1:" in result["board"] and (tmp_path / f"{scheme}.bench" / "report.md").exists()
    assert len(boards) == 2  # two boards of the pool, one per request
    wait_free(pool["tracker"], KEY, 2, pool["procs"])


def check_on_board(board, path, rows_list=(1, 7), tol=1e-6) -> None:
    """The artifact on the board against the same artifact here (a function: the RPC session
    ends when the last remote object is released)."""
    manifest = json.loads((path / "manifest.json").read_text())
    on_board = board.load(path, manifest)
    for rows in rows_list:
        x = np.random.default_rng(rows).standard_normal((rows, 32)).astype(np.float32)
        assert max_rel_err(on_board.run({"x": x})["y"], fq_tvm.load(path).run({"x": x})["y"]) < tol
    times = on_board.time_block({"x": x}, 0.05)
    assert len(times) >= 1 and all(t > 0 for t in times)


def test_board_outputs_match_the_host_artifact(pool, builds):
    remote = rpc.Remote.parse(None, pool["addr"], KEY)
    with rpc.open_board(remote, timeout=60) as board:
        assert board.info["arch"] == "x86_64"
        for scheme in ("fp32", "fq2"):
            check_on_board(board, builds[scheme])
    wait_free(pool["tracker"], KEY, 2, pool["procs"])


def test_no_free_board_before_the_timeout(pool):
    remote = rpc.Remote.parse(None, pool["addr"], KEY)
    with rpc.open_board(remote, timeout=30), rpc.open_board(remote, timeout=30):
        start = time.monotonic()
        with pytest.raises(FqError, match=f"no free board of kind '{KEY}' within 1.5 s .*all busy"):
            rpc.request_board(("127.0.0.1", pool["tracker"]), KEY, timeout=1.5)
        assert time.monotonic() - start < 10
    with pytest.raises(FqError, match="none is registered"):
        rpc.request_board(("127.0.0.1", pool["tracker"]), "no-such-board", timeout=0.5)
    wait_free(pool["tracker"], KEY, 2, pool["procs"])


def one_line_error(capsys, argv) -> str:
    rc = bench_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err and err[-1].startswith("fq-bench: error: "), err
    return err[-1]


def test_unreachable_or_wrong_tracker(capsys, pool, builds, mlp_onnx, tmp_path):
    common = [str(mlp_onnx), "--calib", str(builds["calib"]), "--artifacts", str(builds["fp32"]), "-o",
              str(tmp_path / "r")]
    line = one_line_error(capsys, [*common, "--tracker", f"127.0.0.1:{free_port()}", "--key", KEY])
    assert "cannot reach the RPC tracker at 127.0.0.1:" in line and "refused" in line
    with socket.socket() as listener:  # answers, but not as a tracker
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        closer = threading.Thread(target=lambda: listener.accept()[0].close())
        closer.start()
        line = one_line_error(capsys, [*common, "--tracker", f"127.0.0.1:{listener.getsockname()[1]}", "--key", KEY])
        closer.join()
    assert "is not a TVM RPC tracker" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_board_of_another_architecture(capsys, pool, builds, mlp_onnx, tmp_path):
    arm = tmp_path / "mlp.rpi5"
    arm.mkdir()
    for f in builds["fp32"].iterdir():
        (arm / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((arm / "manifest.json").read_text())
    manifest["target"].update(name="rpi5", arch="aarch64")
    (arm / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, [str(mlp_onnx), "--calib", str(builds["calib"]), "--artifacts", str(arm),
                                   "--tracker", pool["addr"], "--key", KEY, "-o", str(tmp_path / "r")])
    assert "built for target 'rpi5' (aarch64), but the board at 127.0.0.1:" in line and "is x86_64" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.rpi5"]
    wait_free(pool["tracker"], KEY, 2, pool["procs"])


def test_stand_alone_server_with_rpc_option(capsys, builds, mlp_onnx, tmp_path):
    """fq-rpc-server without a tracker, fq-bench --rpc HOST:PORT (the command line end to end)."""
    port = free_port()
    proc = stand_alone(port, repo_env())
    try:
        line = ""
        for _ in range(10):  # TVM's log lines, then ours once it listens
            line = proc.stderr.readline()
            if line.startswith("fq-rpc-server:"):
                break
        assert line.startswith(f"fq-rpc-server: serving on 127.0.0.1:{port} (no tracker)"), line
        out = tmp_path / "r"
        rc = bench_cli.main([str(mlp_onnx), "--calib", str(builds["calib"]), "--artifacts", str(builds["fq2"]),
                             "--rpc", f"127.0.0.1:{port}", "--seconds", "0.2", "-o", str(out), "-q"])
        assert rc == 0 and capsys.readouterr().out.strip() == str(out)
        report = json.loads((out / "report.json").read_text())
        assert report["board"].endswith(f"over RPC at 127.0.0.1:{port}")
        assert [r["label"] for r in report["rows"]] == ["fq-tvm fq2"]
        assert report["notes"][-1].startswith("fq-tvm builds ran on the remote board")
    finally:
        stop([proc])


def test_stopped_server_removes_its_open_sessions_files(tmp_path):
    """SIGTERM (kill, systemd) while a client holds a session: the session's process and its work
    directory, with what the client uploaded, go too (TVM ends them only with the session)."""
    import tvm.rpc

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    proc = stand_alone(port, repo_env(TMPDIR=str(scratch)), "-q")
    try:
        assert proc.stderr.readline().startswith("fq-rpc-server: serving on")
        session = tvm.rpc.connect("127.0.0.1", port)
        (tmp_path / "lib.bin").write_bytes(b"x" * 1000)
        session.upload(str(tmp_path / "lib.bin"), "lib.bin")
        assert [p.name for p in scratch.glob("*/lib.bin")] == ["lib.bin"]
        proc.terminate()
        _, err = proc.communicate(timeout=20)  # EOF: no session process outlives the server either
        assert proc.returncode == 130 and "fq-rpc-server: stopped" in err
        assert not list(scratch.iterdir())
    finally:
        stop([proc])


def test_board_without_dotprod():
    """An rpi5 build (Cortex-A76: sdot kernels) offered to a Cortex-A72 board (no dotprod)."""
    board = object.__new__(rpc.Board)
    board.where, board.info = "pi4:9090", {"arch": "aarch64", "cpu": "Raspberry Pi 4", "flags": ["fp", "asimd"]}
    manifest = {"target": {"name": "rpi5", "arch": "aarch64", "device": "cpu",
                           "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}}}
    with pytest.raises(FqError, match="kernels use dotprod; the board at pi4:9090 .* lacks it"):
        board.check(Path("mlp.rpi5"), manifest)
    board.info["flags"].append("asimddp")
    board.check(Path("mlp.rpi5"), manifest)


def test_rpc_server_refuses_an_unreachable_tracker():
    done = subprocess.run([sys.executable, "-m", "fq_tvm.rpc_server", "--tracker", f"127.0.0.1:{free_port()}",
                           "--key", "x"], env=repo_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "cannot reach the RPC tracker" in done.stderr


def remote_outputs(board, path, x):
    return board.load(path, json.loads((path / "manifest.json").read_text())).run({"x": x})["y"]


# ---- slow: aarch64 boards emulated by qemu-user -------------------------------------------------------

@pytest.mark.slow
def test_qemu_aarch64_pool_runs_rpi5_builds(tracker, mlp_onnx, encoder_onnx, tmp_path):
    """Two qemu-aarch64 fq-rpc-servers; fp32 and fq2 rpi5 builds benched at once through the
    tracker; the boards' outputs match the x86 builds (float activations on both sides); fq-tune
    for rpi5 measures on them (plumbing: one trial per task, timings under emulation mean nothing)."""
    from fq_tvm.targets import qemu

    try:
        qemu.check_qemu()
        root = qemu.ensure_sysroot(with_cross_compiler=True)
    except RuntimeError as err:
        pytest.skip(f"qemu-aarch64 or the arm64 sysroot cannot be set up here: {err}")
    key = "fq-loop-qemu-rpi5"
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "PYTHONNOUSERSITE": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{root / 'site-packages'}"}
    prefix = [qemu.QEMU, "-L", str(root), str(root / "usr" / "bin" / qemu.PYTHON)]
    procs = [start_server(prefix, tracker, key, env) for _ in range(2)]
    try:
        calib = tmp_path / "calib.npz"
        np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
        arm, host = {}, {}
        for s in ("fp32", "fq2"):
            arm[s] = fq_tvm.compile(mlp_onnx, "rpi5", tmp_path / f"mlp.rpi5.{s}", scheme=s, calib=calib, quiet=True,
                                    act_bits=32)
            host[s] = fq_tvm.compile(mlp_onnx, "host", tmp_path / f"mlp.host.{s}", scheme=s, calib=calib,
                                     quiet=True, act_bits=32)
        wait_free(tracker, key, 2, procs, timeout=240)
        results = bench_at_once(mlp_onnx, calib, arm, f"127.0.0.1:{tracker}", key, tmp_path, timeout=120)
        feeds = eval_feeds(calib)
        ref = {"y": ort_run(mlp_onnx, feeds)[0]}
        assert len({r["rows"][0]["where"] for r in results.values()}) == 2
        for scheme, result in results.items():
            assert "emulated by qemu-user" in result["board"]  # not reported as ARM speed
            expected = compare(fq_tvm.load(host[scheme]).run(feeds), ref)
            got = result["rows"][0]["vs_ort_fp32"]
            assert got["max_rel_err"] == pytest.approx(expected["max_rel_err"], rel=1e-3, abs=1e-5)
        wait_free(tracker, key, 1, procs, timeout=60)
        with rpc.open_board(rpc.Remote.parse(None, f"127.0.0.1:{tracker}", key), timeout=60) as board:
            assert board.info["arch"] == "aarch64" and "asimddp" in board.info["flags"]
            x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
            for s in ("fp32", "fq2"):
                ours = remote_outputs(board, arm[s], x)
                assert max_rel_err(ours, fq_tvm.load(host[s]).run({"x": x})["y"]) < 1e-5
        from fq_tvm import tuning

        db = fq_tvm.tune(encoder_onnx, "rpi5", tmp_path / "rpi5.tuning", trials=1, input_shapes=["batch=1", "seq=8"],
                         quick=True, quiet=True, tracker=f"127.0.0.1:{tracker}", key=key)
        meta = json.loads((db / tuning.META).read_text())
        assert meta["target"]["preset"] == "rpi5" and meta["tasks"]
        assert all(e["trials"] == 1 and e["hand_s"] > 0 for e in meta["tasks"].values())
    finally:
        stop(procs)


def test_tune_measures_on_a_board_through_the_tracker(pool, encoder_onnx, tmp_path, capsys):
    """fq-tune --rpc-tracker --rpc-key: MetaSchedule's RPC runner measures the candidates and the
    hand schedules on a board of the pool (here an x86 fq-rpc-server), the candidates linked here
    (a board has no compiler), and the best records are checked against the hand schedule on the
    board too; the database then builds an artifact that matches ORT."""
    from fq_tvm import tuning
    from fq_tvm.tune_cli import main as tune_main

    out = tmp_path / "db"
    assert tune_main([str(encoder_onnx), "-o", str(out), "--trials", "1", "--input-shape", "batch=1",
                      "--input-shape", "seq=16", "--rpc-tracker", pool["addr"], "--rpc-key", KEY]) == 0
    err = capsys.readouterr().err
    assert f"measuring on a board from tracker {pool['addr']}, key '{KEY}'" in err
    meta = json.loads((out / tuning.META).read_text())
    assert meta["tasks"] and all(e["trials"] == 1 and e["hand_s"] > 0 for e in meta["tasks"].values())
    assert all(e["checked"] is not None for e in meta["tasks"].values() if e.get("best_s"))
    art = fq_tvm.compile(encoder_onnx, "host", tmp_path / "enc.host", tuning_db=out,
                         input_shapes=["batch=1", "seq=16"], quiet=True)
    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    assert max_rel_err(fq_tvm.load(art).run({"x": x})["y"], ort_run(encoder_onnx, {"x": x})[0]) < 1e-4
    wait_free(pool["tracker"], KEY, 2, pool["procs"])


def test_tune_measures_kernel_knobs_on_a_board(pool, encoder_onnx, encoder_calib, tmp_path):
    """The int8 kernels' knob search measures through the same RPC runner: a trial's seconds come
    from the board."""
    from fq_tvm import tuning

    out = fq_tvm.tune(encoder_onnx, "host", tmp_path / "db", scheme="fq2", calib=encoder_calib, trials=1,
                      quick=True, quiet=True, tracker=pool["addr"], key=KEY)
    (entry,) = json.loads((out / tuning.META).read_text())["kernels"].values()
    seconds = [s for e in entry["tried"].values() for m, s in e.items() if m != "kernel"]
    assert entry["trials"] == 1 and seconds and all(0 < s < 0.1 for s in seconds)
    wait_free(pool["tracker"], KEY, 2, pool["procs"])
