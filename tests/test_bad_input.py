"""Every bad input gives a one-line error, exit status 1, no traceback and no output directory."""

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fq_tvm.cli import compile_main, run_main


def _fails(argv, capsys, expected: str):
    code = compile_main(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def _check(model_path, out, capsys, expected, *extra):
    _fails([str(model_path), "-o", str(out), "-q", *extra], capsys, expected)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _tiny(nodes, inits=(), name="bad"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_missing_file(tmp_path, capsys):
    _check(tmp_path / "nope.onnx", tmp_path / "out", capsys, "nope.onnx: no such file")


def test_not_an_onnx_file(tmp_path, capsys):
    path = tmp_path / "text.onnx"
    path.write_text("this is plain text, not a protobuf\n" * 20)
    _check(path, tmp_path / "out", capsys, "text.onnx: not a")


def test_truncated_file(mlp_onnx, tmp_path, capsys):
    data = mlp_onnx.read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _check(path, tmp_path / "out", capsys, "cut.onnx: not a")


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _check(path, tmp_path / "out", capsys, "empty.onnx: empty file")


def test_model_failing_the_checker(tmp_path, capsys):
    model = _tiny([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])])
    path = tmp_path / "dup.onnx"
    onnx.save(model, str(path))
    _check(path, tmp_path / "out", capsys, "dup.onnx: fails the ONNX checker")


def test_nan_weights(tmp_path, capsys):
    w = np.eye(4, dtype=np.float32)
    w[1, 2] = np.nan
    model = _tiny([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")])
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    _check(path, tmp_path / "out", capsys, "weight 'w' contains NaN values")


def test_unsupported_op_names_op_and_node(tmp_path, capsys):
    model = _tiny([helper.make_node("Celu", ["x"], ["y"], name="act_7")])
    path = tmp_path / "celu.onnx"
    onnx.save(model, str(path))
    _check(path, tmp_path / "out", capsys, "unsupported ONNX op 'Celu' at node 'act_7'")


def test_unknown_target(mlp_onnx, tmp_path, capsys):
    err = _fails([str(mlp_onnx), "--target", "pdp11", "-o", str(tmp_path / "out")], capsys,
                 "unknown target 'pdp11'; known targets:")
    assert "rpi5" in err and "x86-avx512" in err
    assert not (tmp_path / "out").exists()


def test_malformed_target_json(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "malformed target JSON", "--target", '{"kind": "llvm",')


def test_target_json_of_unknown_kind(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "invalid TVM target", "--target", '{"kind": "vax"}')


def test_bad_cuda_arch(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "bad --cuda-arch 'ampere'", "--target", "cuda",
           "--cuda-arch", "ampere")


def test_missing_cross_compiler(mlp_onnx, tmp_path, capsys, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if "aarch64" in name else real_which(name))
    _check(mlp_onnx, tmp_path / "out", capsys, "apt-get install g++-aarch64-linux-gnu", "--target", "rpi4")


def test_missing_cuda_compiler(mlp_onnx, tmp_path, capsys, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "nvcc" else real_which(name))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    _check(mlp_onnx, tmp_path / "out", capsys, "no CUDA compiler: nvcc not found", "--target", "cuda")


def test_unknown_scheme(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "unknown scheme 'fq7'", "--scheme", "fq7")


def test_no_model_argument(capsys):
    _fails([], capsys, "no model given")


def test_run_missing_artifact(tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 4), np.float32))
    assert run_main([str(tmp_path / "nothing"), "-i", str(tmp_path / "in.npz")]) == 1
    assert "no such artifact directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mlp_art(mlp_onnx, tmp_path_factory):
    art = tmp_path_factory.mktemp("run") / "mlp.fq"
    assert compile_main([str(mlp_onnx), "-o", str(art), "-q"]) == 0
    return art


def _run_fails(argv, capsys, expected: str):
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fq-run: error: ") and expected in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


def test_run_garbage_npz(mlp_art, tmp_path, capsys):
    (tmp_path / "in.npz").write_text("garbage")
    _run_fails([str(mlp_art), "-i", str(tmp_path / "in.npz")], capsys,
               "in.npz: not an .npz file (an .npz is the zip archive numpy.savez writes)")


def test_run_given_npy(mlp_art, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((1, 32), np.float32))
    _run_fails([str(mlp_art), "-i", str(tmp_path / "x.npy")], capsys,
               "x.npy: a single .npy array, not an .npz archive; save inputs with numpy.savez(FILE, INPUT_NAME=array)")


def test_run_npz_with_objects(mlp_art, tmp_path, capsys):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    _run_fails([str(mlp_art), "-i", str(tmp_path / "obj.npz")], capsys,
               "obj.npz: holds Python objects, not numeric arrays")


def test_run_output_prints_the_path_written(mlp_art, tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "in.npz", x=np.ones((2, 32), np.float32))
    monkeypatch.chdir(tmp_path)
    assert run_main([str(mlp_art), "-i", "in.npz", "--output", "result"]) == 0
    assert capsys.readouterr().out == "result.npz\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz", "result.npz"]
    with np.load(tmp_path / "result.npz") as data:
        assert data["y"].shape == (2, 16)
    assert run_main([str(mlp_art), "-i", "in.npz", "-o", "again.npz"]) == 0
    assert capsys.readouterr().out == "again.npz\n"


def test_run_input_fifo_does_not_hang(mlp_art, tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "in.npz")
    _run_fails([str(mlp_art), "-i", str(tmp_path / "in.npz")], capsys, "in.npz: not a regular file")


def test_run_output_in_missing_directory(mlp_art, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((2, 32), np.float32))
    _run_fails([str(mlp_art), "-i", str(tmp_path / "in.npz"), "-o", str(tmp_path / "no" / "out")], capsys,
               "out.npz: cannot write (No such file or directory)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npz"]


@pytest.mark.parametrize("argv, expected", [
    (["m.onnx", "--bogus"], "fq-compile: error: unrecognized arguments: --bogus (see fq-compile --help)"),
    (["m.onnx", "--redundancy", "lots"], "argument --redundancy: invalid float value: 'lots'"),
    (["m.onnx", "--act-bits", "4"], "argument --act-bits: invalid choice: 4"),
    (["m.onnx", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
])
def test_argparse_errors_are_one_line_exit_1(argv, expected, capsys):
    _fails(argv, capsys, expected)


def test_run_argparse_error_and_help_documents_exit_status(capsys):
    assert run_main(["art"]) == 1
    err = capsys.readouterr().err
    assert err == "fq-run: error: the following arguments are required: -i/--input (see fq-run --help)\n"
    with pytest.raises(SystemExit) as done:
        compile_main(["--help"])
    assert done.value.code == 0
    assert "exit status: 0 success; 1 any error, bad arguments included" in capsys.readouterr().out


def test_scheme_needing_calibration(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "scheme 'fq2' needs calibration data: pass --calib", "--scheme", "fq2")


def test_missing_calibration_file(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "no-such.npz: no such calibration file", "--scheme", "gptq2",
           "--calib", str(tmp_path / "no-such.npz"))


@pytest.mark.parametrize("kind", ["text", "npy"])
def test_calibration_file_not_an_npz(mlp_onnx, tmp_path, capsys, kind):
    """fq-run's checks (npz.read_npz): a text file is named as not an .npz (numpy's own
    message spoke of pickles), an .npy as a single array."""
    path = tmp_path / "calib.npz"
    if kind == "text":
        path.write_text("input,1,2\n")
        expected = "calib.npz: not an .npz file (an .npz is the zip archive numpy.savez writes)"
    else:
        with open(path, "wb") as handle:
            np.save(handle, np.ones((4, 32), np.float32))
        expected = "calib.npz: a single .npy array, not an .npz archive"
    _check(mlp_onnx, tmp_path / "out", capsys, expected, "--scheme", "gptq2", "--calib", str(path))


def test_calibration_file_lacking_inputs(mlp_onnx, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", wrong=np.ones((4, 32), np.float32))
    _check(mlp_onnx, tmp_path / "out", capsys, "calibration failed: samples lack model inputs: x", "--scheme", "gptq2",
           "--calib", str(tmp_path / "calib.npz"))


@pytest.mark.parametrize("value", ["0.5", "3", "nan", "inf"])
def test_bad_redundancy(mlp_onnx, tmp_path, capsys, value):
    _check(mlp_onnx, tmp_path / "out", capsys, f"--redundancy must be between 1.0 and 2.0 (1.0 = no frame), not "
           f"{float(value)}", "--scheme", "fq2", "--redundancy", value, "--calib", "unused.npz")


@pytest.mark.parametrize("value", ["-1", str(2**63)])
def test_bad_seed(mlp_onnx, tmp_path, capsys, value):
    _check(mlp_onnx, tmp_path / "out", capsys, f"--seed must be a whole number from 0 to 2^63 - 1, not {value}",
           "--scheme", "fq2", "--seed", value, "--calib", "unused.npz")


@pytest.mark.parametrize("scheme, flag, value", [("fp32", "--redundancy", "1.1"), ("fp32", "--l-den", "0"),
                                                 ("int8", "--l-den", "8"), ("rtn2", "--redundancy", "0.5"),
                                                 ("gptq2", "--seed", "1")])
def test_frame_options_of_schemes_without_a_frame(mlp_onnx, tmp_path, capsys, scheme, flag, value):
    _check(mlp_onnx, tmp_path / "out", capsys, f"{flag} applies to FrameQuant schemes (fq2, fq4, had2, ...), "
           f"not '{scheme}'", "--scheme", scheme, flag, value)


def test_unknown_llvm_cpu(mlp_onnx, tmp_path, capfd):
    """capfd: the one line must also be all that LLVM and TVM print on the process's stderr."""
    _check(mlp_onnx, tmp_path / "out", capfd, "unknown CPU 'notacpu' for this host: LLVM knows", "--target",
           '{"kind": "llvm", "mcpu": "notacpu"}')
    _check(mlp_onnx, tmp_path / "out", capfd, "unknown CPU 'cortex-a77x' for aarch64-linux-gnu: LLVM knows",
           "--target", '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a77x"}')


def test_bad_skip_regex(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "bad --skip regular expression '(fc'", "--scheme", "rtn2",
           "--skip", "(fc")


def test_failed_export_leaves_nothing(mlp_onnx, tmp_path, capsys, monkeypatch):
    from fq_tvm.targets import x86

    def broken(executable, out_dir, preset):
        (out_dir / "model.so").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(x86, "export", broken)
    assert compile_main([str(mlp_onnx), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "internal error: OSError: disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
