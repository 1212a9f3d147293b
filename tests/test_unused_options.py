"""Options a scheme does not use are not ignored without a word: calibration data (--calib,
--calib-text, --calib-samples) given to a scheme that does not calibrate, --pad-small given to fp32.
fq-compile prints one `fq-compile: warning:` line (nothing with -q); fq_tvm.compile issues an
FqWarning."""

import json

import pytest

import fq_tvm
from fq_tvm.cli import compile_main
from fq_tvm.compiler import calibrates, ignored_options, uses_calibration
from fq_tvm.errors import FqWarning
from fq_tvm.numerics import SCHEMES
from fq_tvm.quantize import scheme_config


def test_which_schemes_calibrate():
    assert [name for name, cfg in SCHEMES.items() if not calibrates(cfg)] == ["fp32", "int8", "int7", "rtn2", "rtn4"]
    assert uses_calibration("fq2") and uses_calibration("gptq4") and not uses_calibration("int8")
    assert uses_calibration("no-such-scheme")  # compile names the bad scheme, not bench/report


@pytest.mark.parametrize("scheme,given,lines", [
    ("int8", {"--calib": "c.npz"}, ["--calib is ignored: scheme int8 does not calibrate"]),
    ("rtn2", {"--calib": "c.npz", "--calib-samples": 8},
     ["--calib and --calib-samples are ignored: scheme rtn2 does not calibrate"]),
    ("fp32", {"--calib-text": "t.txt", "--pad-small": True},
     ["--calib-text is ignored: scheme fp32 does not calibrate", "--pad-small is ignored: scheme fp32 does not quantize"]),
    ("rtn4", {"calib=": "c.npz", "calib_samples=": None, "pad_small=": True},
     ["calib= is ignored: scheme rtn4 does not calibrate"]),  # rtn4 pads nothing, but pad_small is its option
    ("int8", {"--calib-samples": 0}, ["--calib-samples is ignored: scheme int8 does not calibrate"]),
    ("fq2", {"--calib": "c.npz", "--calib-samples": 8, "--pad-small": True}, []),
    ("gptq2", {"--calib": "c.npz", "--pad-small": False}, []),
    ("rtn2", {"--calib-sequential": True}, ["--calib-sequential is ignored: scheme rtn2 does not calibrate"]),
    ("fq2", {"--calib": "c.npz", "--calib-sequential": True}, []),
    ("int8", {"--calib-sequential": True, "--denoise": True},
     ["--calib-sequential and --denoise are ignored: scheme int8 does not calibrate"]),
])
def test_ignored_options_lines(scheme, given, lines):
    assert ignored_options(scheme_config(scheme), given) == lines


def test_cli_warns_once_and_does_not_read_the_file(mlp_onnx, tmp_path, capsys):
    """The calibration file is not even opened (it does not exist), and the artifact is the plain
    int8 build."""
    out = tmp_path / "int8"
    argv = [str(mlp_onnx), "--scheme", "int8", "-o", str(out), "--calib", str(tmp_path / "none.npz"),
            "--calib-samples", "3", "--json"]
    assert compile_main(argv) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert warned == ["fq-compile: warning: --calib and --calib-samples are ignored: scheme int8 does not calibrate"]
    assert captured.err.splitlines()[0] == warned[0]  # said before the compile starts
    assert json.loads(captured.out)["layers_quantized"] == 1


def test_cli_text_calibration_and_pad_small_ignored_by_fp32(mlp_onnx, tmp_path, capsys):
    """--calib-text is not tokenized (neither file exists): one line for it, one for --pad-small."""
    argv = [str(mlp_onnx), "-o", str(tmp_path / "fp32"), "--calib-text", str(tmp_path / "none.txt"),
            "--tokenizer", str(tmp_path / "no-tokenizer"), "--pad-small"]
    assert compile_main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warned == ["fq-compile: warning: --calib-text is ignored: scheme fp32 does not calibrate",
                      "fq-compile: warning: --pad-small is ignored: scheme fp32 does not quantize"]


def test_cli_quiet_silences_the_warning(mlp_onnx, tmp_path, capfd):
    argv = [str(mlp_onnx), "--scheme", "rtn2", "-o", str(tmp_path / "q"), "--calib", "c.npz", "-q"]
    assert compile_main(argv) == 0
    assert capfd.readouterr() == ("", "")


def test_cli_text_calibration_still_needs_its_tokenizer(mlp_onnx, tmp_path, capsys):
    """A usage error stays an error, scheme or not."""
    assert compile_main([str(mlp_onnx), "--scheme", "int8", "-o", str(tmp_path / "x"), "--calib-text", "t.txt"]) == 1
    assert capsys.readouterr().err == "fq-compile: error: --calib-text and --tokenizer go together\n"
    assert not (tmp_path / "x").exists()


def test_api_warns(mlp_onnx, tmp_path):
    with pytest.warns(FqWarning) as record:
        out = fq_tvm.compile(mlp_onnx, "host", tmp_path / "rtn2", scheme="rtn2", calib=tmp_path / "none.npz",
                             calib_samples=4, quiet=True)
    assert [str(w.message) for w in record] == ["calib= and calib_samples= are ignored: scheme rtn2 does not calibrate"]
    assert record[0].filename == __file__  # attributed to the caller's line, not to fq_tvm
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in manifest["layers"]] == ["fc0"]

