"""fq-bench and fq-run --repeat: the report's numbers against an independent computation, the
files it writes, and one-line errors that leave nothing behind."""

import json
import mmap
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import tvm

import fq_tvm
from fq_tvm import bench_cli, benchmark, cpuinfo, timing
from fq_tvm.cli import run_main
from conftest import max_rel_err


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ort_outputs(path, feeds, threads=1) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name or p.name.endswith(".bench"))


@pytest.fixture(scope="module")
def bench_run(encoder_onnx, tmp_path_factory):
    """fq-bench on the small encoder: fp32 and fq2 builds, ORT rows, 0.3 s of timing each."""
    work = tmp_path_factory.mktemp("bench")
    calib = work / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((12, 10, 64)).astype(np.float32))
    out = work / "enc.bench"
    rc = bench_cli.main([str(encoder_onnx), "--calib", str(calib), "--schemes", "fp32,fq2", "--seconds", "0.3",
                         "-o", str(out), "-q"])
    assert rc == 0
    return {"dir": out, "calib": calib, "report": json.loads((out / "report.json").read_text())}


def test_report_files_and_table(bench_run):
    out, report = bench_run["dir"], bench_run["report"]
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "ort", "report.json", "report.md", "report.png"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["fq-tvm fp32", "fq-tvm fq2", "ORT fp32", "ORT int8 (dynamic)", "ORT MatMulNBits 4-bit",
                      "ORT MatMulNBits 2-bit"]
    md = (out / "report.md").read_text()
    assert cpuinfo.read_cpuinfo()["model"] in md  # the CPU model named in the heading
    for row in report["rows"]:
        assert f"| {row['label']} | {row['latency']['median_ms']:.3f} |" in md
    assert report["threads"] >= 1 and report["eval_inputs"]["shapes"] == {"x": [8, 10, 64]}
    assert leftovers(out.parent) == ["enc.bench"]  # no staging directory left


def test_accuracy_matches_an_independent_computation(bench_run, encoder_onnx):
    """Every row's error and cosine, recomputed here from the files in the report directory."""
    out, report = bench_run["dir"], bench_run["report"]
    with np.load(bench_run["calib"]) as data:
        feeds = {"x": data["x"][:8]}
    threads = report["threads"]
    ref = ort_outputs(encoder_onnx, feeds, threads)["y"]
    fp32_build = fq_tvm.load(out / "artifacts" / "fp32").run(feeds)["y"]
    assert report["rows"][2]["path"] == str(encoder_onnx)
    for row in report["rows"]:
        path = out / row["path"]  # relative inside the report, or the model itself
        if row["runtime"] == "fq-tvm":
            ours = fq_tvm.load(path).run(feeds)["y"]
        else:
            ours = ort_outputs(path, feeds, threads)["y"]
        got = row["vs_ort_fp32"]
        assert got["max_rel_err"] == pytest.approx(max_rel_err(ours, ref), rel=1e-3, abs=1e-6), row["label"]
        assert got["cosine"] == pytest.approx(cosine(ours, ref), abs=1e-6), row["label"]
        assert row["vs_fp32_build"]["cosine"] == pytest.approx(cosine(ours, fp32_build), abs=1e-6), row["label"]
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["fq-tvm fp32"]["vs_ort_fp32"]["max_rel_err"] < 1e-5
    assert 0.9 < rows["fq-tvm fq2"]["vs_ort_fp32"]["cosine"] < 0.99999  # quantized: close, not equal
    notes = report["notes"]  # without VNNI, one note: ORT int8's sums saturate (below)
    assert len(notes) == benchmark.ort_int8_saturates(cpuinfo.board_info()) and all("saturate" in n for n in notes)


@pytest.mark.parametrize("arch, flags, saturates", [
    ("x86_64", ["avx2", "fma"], True),  # Zen 3, Haswell .. Skylake client
    ("x86_64", ["avx2", "avx512bw", "avx512_vnni"], False),  # Ice Lake server, Zen 4
    ("x86_64", ["avx2", "avx_vnni"], False),  # Alder Lake
    ("aarch64", ["asimd"], False)])
def test_ort_int8_note_only_where_its_sums_saturate(arch, flags, saturates):
    rows = [{"label": benchmark.ORT_INT8, "scheme": "int8", "vs_ort_fp32": {"max_rel_err": 0.1}}]
    notes = benchmark._notes(rows, None, {"arch": arch, "flags": flags})
    assert len(notes) == saturates and all("saturate" in n and "int8_exactness" in n for n in notes)
    assert benchmark._notes(rows[:0], None, {"arch": arch, "flags": flags}) == []  # no ORT int8 row


def test_sizes_bits_and_latency_are_consistent(bench_run):
    out, report = bench_run["dir"], bench_run["report"]
    rows = {r["label"]: r for r in report["rows"]}
    for scheme in ("fp32", "fq2"):
        row, art = rows[f"fq-tvm {scheme}"], out / "artifacts" / scheme
        manifest = json.loads((art / "manifest.json").read_text())
        assert row["size_bytes"] == sum(f.stat().st_size for f in art.iterdir())
        weights = manifest["weights"]
        fp32_bytes = weights.get("fp32_bytes", weights["bytes"])  # an fp32 build lists bytes only
        assert row["bits_per_weight"] == pytest.approx(32 * weights["bytes"] / fp32_bytes, abs=1e-3)
        assert row["dense_bits_per_weight"] == weights.get("quantized_dense_bits_per_weight", 32.0)
    assert rows["fq-tvm fp32"]["bits_per_weight"] == 32.0
    assert rows["fq-tvm fq2"]["dense_bits_per_weight"] < 4
    assert rows["ORT int8 (dynamic)"]["size_bytes"] == (out / "ort" / "model.int8.onnx").stat().st_size
    assert 8 < rows["ORT int8 (dynamic)"]["bits_per_weight"] < 12  # int8 weights, fp32 biases and norms
    assert all(r["peak_bytes"] is not None and r["peak_bytes"] >= 0 for r in report["rows"])
    base = rows["ORT fp32"]["latency"]["median_ms"]
    for row in report["rows"]:
        lat = row["latency"]
        assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
        assert lat["calls"] >= 5
        assert row["vs_ort_fp32_latency"] == pytest.approx(lat["median_ms"] / base)


def test_python_api_reuses_artifacts(bench_run, encoder_onnx, tmp_path):
    """fq_tvm.bench with artifacts= and inputs=: no compile, the same accuracy on the same inputs."""
    out = bench_run["dir"]
    with np.load(bench_run["calib"]) as data:
        np.savez(tmp_path / "eval.npz", x=data["x"][:8])
    arts = [out / "artifacts" / "fq2", out / "artifacts" / "fp32"]  # fp32 second: still the fp32 reference
    result = fq_tvm.bench(encoder_onnx, artifacts=arts, inputs=tmp_path / "eval.npz", ort=False, seconds=0.2,
                          out_dir=tmp_path / "again", quiet=True, threads=1)
    assert [r["label"] for r in result["rows"]] == ["fq-tvm fq2", "fq-tvm fp32", "ORT fp32"]
    assert result["threads"] == 1 and tvm.runtime.num_threads() == 1
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["report.json", "report.md", "report.png"]
    first = next(r for r in bench_run["report"]["rows"] if r["label"] == "fq-tvm fq2")
    for key in ("vs_ort_fp32", "vs_fp32_build"):
        assert result["rows"][0][key] == pytest.approx(first[key], rel=1e-6)
    assert json.loads((tmp_path / "again" / "report.json").read_text())["rows"] == result["rows"]


# ---- bad input: one line, exit 1, nothing written ---------------------------------------------------

def one_line_error(capsys, argv) -> str:
    rc = bench_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err, err
    assert err[-1].startswith("fq-bench: error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def fake_target(src: Path, dst: Path, **target) -> Path:
    """A copy of an artifact whose manifest names another target (the manifest is not checksummed)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["target"].update(target)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_missing_model(capsys, tmp_path):
    line = one_line_error(capsys, [str(tmp_path / "nope.onnx"), "--calib", "c.npz", "-o", str(tmp_path / "r")])
    assert "no such file" in line and leftovers(tmp_path) == []


@pytest.mark.parametrize("arrays, words", [
    ({"input": np.zeros((2, 4, 64), np.float32)}, "unexpected ['input']"),
    ({"x": np.zeros((2, 4, 63), np.float32)}, "'x' has shape [2, 4, 63]"),
    ({"x": np.zeros((2, 64), np.float32)}, "'x' has shape [2, 64]"),
    ({"x": np.zeros((2, 4, 64), np.complex64)}, "'x' is complex64"),
])
def test_eval_inputs_that_do_not_fit(capsys, tmp_path, encoder_onnx, arrays, words):
    np.savez(tmp_path / "eval.npz", **arrays)
    line = one_line_error(capsys, [str(encoder_onnx), "--inputs", str(tmp_path / "eval.npz"),
                                   "-o", str(tmp_path / "r")])
    assert "do not fit the model" in line and words in line
    assert leftovers(tmp_path) == []


def test_artifact_for_another_target(capsys, tmp_path, bench_run, encoder_onnx):
    host = bench_run["dir"] / "artifacts" / "fp32"
    arm = fake_target(host, tmp_path / "enc.rpi5", name="rpi5", arch="aarch64")
    calib, out = str(bench_run["calib"]), str(tmp_path / "r")
    line = one_line_error(capsys, [str(encoder_onnx), "--calib", calib, "--artifacts", str(arm), "-o", out])
    assert "built for target 'rpi5' (aarch64)" in line and "cannot run it" in line
    line = one_line_error(capsys, [str(encoder_onnx), "--calib", calib, "--artifacts", str(host), "--target",
                                   "x86-avx512", "-o", out])
    assert "built for target 'host', not 'x86-avx512'" in line
    line = one_line_error(capsys, [str(encoder_onnx), "--calib", calib, "--artifacts", str(host), str(arm), "--rpc",
                                   "127.0.0.1:1", "-o", out])
    assert "cannot reach the RPC server at 127.0.0.1:1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.rpi5"]


def test_artifact_needing_a_missing_cpu_feature(capsys, tmp_path, bench_run, encoder_onnx):
    here = set(cpuinfo.read_cpuinfo()["flags"])
    if "avx512bw" in here:
        pytest.skip("this CPU has AVX-512: an x86-64-v4 build runs here")
    host = bench_run["dir"] / "artifacts" / "fp32"
    v4 = fake_target(host, tmp_path / "enc.v4", name="x86-avx512", tvm={"kind": "llvm", "mcpu": "x86-64-v4"})
    line = one_line_error(capsys, [str(encoder_onnx), "--calib", str(bench_run["calib"]), "--artifacts", str(v4),
                                   "-o", str(tmp_path / "r")])
    assert "avx512bw" in line and "lacks it" in line


def test_failed_build_leaves_nothing(capsys, tmp_path, mlp_onnx):
    """fp32 builds, then an unknown scheme fails: the half-made report directory is removed."""
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 32), np.float32))
    line = one_line_error(capsys, [str(mlp_onnx), "--calib", str(tmp_path / "calib.npz"), "--schemes", "fp32,nonsense",
                                   "-o", str(tmp_path / "r")])
    assert "nonsense" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


def test_existing_report_needs_force(capsys, tmp_path, mlp_onnx):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    line = one_line_error(capsys, [str(mlp_onnx), "--inputs", "x.npz", "-o", str(tmp_path / "r")])
    assert "already exists" in line
    line = one_line_error(capsys, [str(mlp_onnx), "--inputs", "x.npz", "-o", str(tmp_path / "r"), "--force"])
    assert "not an fq-bench report" in line
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, words", [
    (["--rpc", "nohost"], "--rpc takes HOST:PORT"),
    (["--tracker", "127.0.0.1:9190"], "--tracker needs --key"),
    (["--key", "rpi5"], "give --tracker HOST:PORT too"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--target", "rpi5"], "target 'rpi5' builds for aarch64, which this machine cannot run: add --rpc"),
    (["--target", "nosuch"], "unknown target 'nosuch'"),
])
def test_bad_options(capsys, tmp_path, mlp_onnx, argv, words):
    line = one_line_error(capsys, [str(mlp_onnx), "--inputs", "x.npz", "--target", "host", "-o",
                                   str(tmp_path / "r"), *argv])
    assert words in line and leftovers(tmp_path) == []


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "fq-bench model.onnx --calib calib.npz" in text and "--tracker" in text


# ---- fq-run --repeat and the timing helpers ---------------------------------------------------------

def test_fq_run_repeat(capsys, bench_run, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 5, 64), np.float32))
    assert run_main([str(bench_run["dir"] / "artifacts" / "fq2"), "-i", str(tmp_path / "in.npz"), "--repeat", "7"]) == 0
    err = capsys.readouterr().err
    match = re.search(r"latency over 7 calls: median ([\d.]+) ms, p10 ([\d.]+) ms, p90 ([\d.]+) ms", err)
    assert match, err
    median, p10, p90 = map(float, match.groups())
    assert 0 < p10 <= median <= p90
    assert run_main([str(bench_run["dir"] / "artifacts" / "fq2"), "-i", str(tmp_path / "in.npz"), "--repeat", "0"]) == 1
    assert "--repeat must be at least 1" in capsys.readouterr().err


def test_peak_rss_sees_a_temporary_allocation():
    """A fresh anonymous mapping, not numpy's malloc: once fq_tvm.generate has raised glibc's mmap
    and trim thresholds (process-wide) in this worker, a 64 MiB malloc can reuse heap pages that
    are already resident and add less than 64 MiB (read 50 MB here under xdist)."""
    def fn():
        block = mmap.mmap(-1, 64 << 20)  # 64 MiB, every page written, unmapped on return
        for page in range(0, len(block), mmap.PAGESIZE):
            block[page] = 1
        value = block[-mmap.PAGESIZE]
        block.close()
        return value

    value, peak = benchmark.peak_rss(fn)
    assert value == 1 and 60e6 < peak < 200e6


def test_summarize():
    t = timing.summarize([0.001 * v for v in range(1, 11)])  # 1..10 ms
    assert t == {"median_ms": pytest.approx(5.5), "p10_ms": pytest.approx(1.9), "p90_ms": pytest.approx(9.1),
                 "calls": 10}


def test_interleaved_runs_blocks_in_turn():
    """Each runner gets whole blocks, in turn, warm-up first, until all have min_calls calls."""
    order = []

    def runner(name, per_call):
        def block(seconds):
            order.append(name)
            return [per_call] * max(1, int(seconds / per_call))
        return block

    out = timing.interleaved({"a": runner("a", 0.125), "b": runner("b", 0.5)}, seconds=1.25, rounds=5, min_calls=8,
                             warmup_seconds=0.0)
    assert order[:6] == ["a", "b", "a", "b", "a", "b"]  # warm-ups, then rounds
    assert order[12:] == ["b"] * 3  # after 5 rounds only b, short of 8 calls, goes on
    assert out["a"]["calls"] == 5 * 2 and out["b"]["calls"] == 8
    assert out["a"]["median_ms"] == pytest.approx(125.0) and out["b"]["median_ms"] == pytest.approx(500.0)


# ---- what a CPU can run ---------------------------------------------------------------------------

PI5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""
RPI5 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": "cortex-a76"}


def test_cpuinfo_of_a_pi5_and_features_its_builds_need():
    info = cpuinfo.read_cpuinfo(PI5_CPUINFO)
    assert info["model"] == "Raspberry Pi 5 Model B Rev 1.0" and "asimddp" in info["flags"]
    assert cpuinfo.needed_features(RPI5) == ["dotprod"]
    assert cpuinfo.missing_features(RPI5, info) == []
    pi4 = {"flags": ["fp", "asimd", "crc32"]}  # Cortex-A72: no dot product
    assert cpuinfo.missing_features(RPI5, pi4) == ["dotprod"]
    assert cpuinfo.missing_features({**RPI5, "mcpu": "cortex-a72"}, pi4) == []


def test_auxv_flags():
    words = np.array([6, 4096, 16, (1 << 1) | (1 << 20), 26, 1 << 13, 0, 0], np.uint64)  # AT_PAGESZ, HWCAP, HWCAP2
    assert cpuinfo.auxv_flags(words.tobytes()) == ["asimd", "asimddp", "i8mm"]
    assert os.path.exists("/proc/self/auxv")
