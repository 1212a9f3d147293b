"""fq-compile explains itself: timed progress lines that reach the last step, a final summary
(--json: as JSON), -q prints errors only; fq-demo's legend, verdict and next command."""

import json
import re

import pytest

from fq_tvm.cli import compile_main
from fq_tvm.demo import LEGEND, main as demo_main, verdict

FP32_BYTES = 4 * (32 * 64 + 64 + 64 * 16 + 16)  # the conftest MLP: 32 -> 64 -> 16, Gemm + bias
RTN2_FC0_BYTES = 64 * (32 * 2 + 64) // 8  # 64 rows of 32 2-bit codes + fp32 scale and zero


def test_progress_reaches_the_last_step_with_times(mlp_onnx, tmp_path, capsys):
    out = tmp_path / "rtn2"
    assert compile_main([str(mlp_onnx), "--scheme", "rtn2", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.replace("\r", "\n")  # quantize.py's tqdm bar ends with a carriage return
    steps = re.findall(r"^\[(\d)/(\d) +(\d+\.\d)s\] (.*)$", lines, re.M)
    assert [(n, total) for n, total, _, _ in steps] == [("1", "5"), ("2", "5"), ("3", "5"), ("4", "5"), ("5", "5"),
                                                       ("5", "5")]
    assert steps[-1][3] == f"done: {out}"
    seconds = [float(s) for _, _, s, _ in steps]
    assert seconds == sorted(seconds)
    summary = captured.err.strip().splitlines()[-1]
    assert re.fullmatch(r"compiled in \d+\.\d s: 1 layer quantized \(rtn2, 4\.00 bits per weight\), 1 kept fp32; "
                        r"weights 13\.81 bits each on average, 0\.005 MB against 0\.013 MB in fp32 \(2\.3x smaller\); "
                        r"artifact 0\.\d{3} MB on disk", summary), summary
    assert captured.out == f"{out}\n"


def test_json_summary(mlp_onnx, tmp_path, capsys):
    out = tmp_path / "rtn2"
    assert compile_main([str(mlp_onnx), "--scheme", "rtn2", "-o", str(out), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    info = json.loads(captured.out)
    weight_bytes = FP32_BYTES - 4 * 64 * 32 + RTN2_FC0_BYTES
    assert info["artifact"] == str(out) and info["scheme"] == "rtn2" and info["target"] == "host"
    assert info["layers_quantized"] == 1 and info["layers_kept_fp32"] == 1
    assert info["dense_bits_per_weight"] == 4.0
    assert info["weight_bytes"] == weight_bytes and info["fp32_weight_bytes"] == FP32_BYTES
    assert info["bits_per_weight"] == round(32 * weight_bytes / FP32_BYTES, 4)
    assert info["artifact_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert 0 < info["compile_seconds"] < 120


def test_fp32_summary(mlp_onnx, tmp_path, capsys):
    assert compile_main([str(mlp_onnx), "-o", str(tmp_path / "fp32"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers_quantized"] == 0 and info["layers_kept_fp32"] is None
    assert info["weight_bytes"] == info["fp32_weight_bytes"] == FP32_BYTES and info["bits_per_weight"] == 32.0


def test_quiet_prints_nothing(mlp_onnx, tmp_path, capfd):
    assert compile_main([str(mlp_onnx), "--scheme", "rtn2", "-o", str(tmp_path / "q"), "-q"]) == 0
    assert capfd.readouterr() == ("", "")


ROWS = [{"scheme": "fp32", "bits": 32.0, "size_mb": 90.6, "lee_spearman": 0.5083, "lee_s": 2.0},
        {"scheme": "int8", "bits": 8.1, "size_mb": 45.0, "lee_spearman": 0.5080, "lee_s": 1.0},
        {"scheme": "fq2", "bits": 2.4, "size_mb": 30.0, "lee_spearman": 0.4575, "lee_s": 0.8,
         "cos_to_reference": 0.95}]


def test_verdict_in_words():
    text = verdict(ROWS, {"lee_spearman": 0.5083, "lee_s": 1.2})
    assert text.splitlines() == [
        "fq2 stores dense weights in 2.40 bits instead of 32: the artifact is 30.0 MB against 90.6 MB for fp32 "
        "and 45.0 MB for int8.",
        "Accuracy: Lee 0.4575 against 0.5083 (fp32) and 0.5080 (int8), 10.0% below fp32; embeddings keep a cosine "
        "of 0.950 to fp32's.",
        "Speed: 0.80 s for the 50 documents, 2.5x faster than fp32 and 1.2x faster than int8, 1.5x faster than "
        "ONNX Runtime fp32 (Lee 0.5083)."]


def test_minilm_demo_prints_table_legend_and_verdict(tmp_path, capsys, monkeypatch):
    """The MiniLM demo's printing, with the slow parts (export, compile, evaluation) stubbed."""
    from fq_tvm import demo, evaluate, realmodels, report

    rows = [dict(r, wordsim353=0.7, cos_to_reference=r.get("cos_to_reference", 1.0)) for r in ROWS]
    monkeypatch.setattr(report, "minilm_rows", lambda work, schemes, target, metrics: rows)
    monkeypatch.setattr(realmodels, "export_minilm", lambda work: work / "minilm.onnx")
    monkeypatch.setattr(evaluate, "ort_runner", lambda path: None)
    monkeypatch.setattr(evaluate, "evaluate_minilm", lambda run, metrics: {"lee_spearman": 0.5083,
                                                                            "seconds": {"lee": 1.2}})
    demo.run_minilm_demo(tmp_path, "host")
    out = capsys.readouterr().out
    assert "\nfq2         2.40   30.0  0.4575   0.7000    0.9500       0.80\n" in out
    assert "\nORT fp32                 0.5083                          1.20\n" in out
    assert "\n".join(LEGEND) in out and verdict(ROWS, {"lee_spearman": 0.5083, "lee_s": 1.2}) in out


def test_legend_has_a_line_per_column_and_a_direction():
    assert [line.split()[0] for line in LEGEND] == ["scheme", "bits/w", "MB", "Lee", "WordSim", "cos", "50"]
    assert all("(higher is better" in line or "(lower is better" in line for line in LEGEND[1:])


def _fake_demo(work, target):
    (work / "encoder.fq").mkdir()
    return 2e-7


def test_builtin_demo_keeps_artifacts_and_says_what_next(tmp_path, capsys, monkeypatch):
    """The compile itself: test_compile_cpu.test_builtin_demo_matches_onnx_runtime."""
    from fq_tvm import demo

    monkeypatch.setattr(demo, "run_demo", _fake_demo)
    keep = tmp_path / "kept"
    assert demo_main(["--builtin", "--keep", str(keep)]) == 0
    out = capsys.readouterr().out
    assert "max relative error: largest |ours - ORT| over the largest |ORT| output; lower is better" in out
    assert "OK: the compiled model matches ONNX Runtime (worst max relative error 2.00e-07, bound 1e-4)" in out
    assert f"The ONNX file and the artifacts are kept in {keep}." in out
    assert "Next, your own model: fq-compile model.onnx --scheme fq2 --calib calib.npz -o model.fq2" in out
    assert (keep / "encoder.fq").is_dir()


def test_builtin_demo_without_keep_says_how_to_keep(capsys, monkeypatch):
    from fq_tvm import demo

    monkeypatch.setattr(demo, "run_demo", _fake_demo)
    assert demo_main(["--builtin"]) == 0
    assert ("in a temporary directory, now deleted; fq-demo --keep DIR keeps them in DIR."
            in capsys.readouterr().out)


def test_demo_usage_error_is_one_line(capsys):
    assert demo_main(["--bogus"]) == 1
    assert capsys.readouterr().err == "fq-demo: error: unrecognized arguments: --bogus (see fq-demo --help)\n"


@pytest.mark.parametrize("seconds, reference, words", [(1.0, 1.02, "as fast as"), (2.0, 1.0, "2.0x slower than")])
def test_speed_words(seconds, reference, words):
    from fq_tvm.demo import _times

    assert _times(seconds, reference) == words
