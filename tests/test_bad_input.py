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


def test_run_bad_npz(mlp_onnx, tmp_path, capsys):
    art = tmp_path / "mlp.fq"
    assert compile_main([str(mlp_onnx), "-o", str(art), "-q"]) == 0
    (tmp_path / "in.npz").write_text("garbage")
    assert run_main([str(art), "-i", str(tmp_path / "in.npz")]) == 1
    assert "not a readable .npz file" in capsys.readouterr().err


def test_scheme_needing_calibration(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "scheme 'fq2' needs calibration data: pass --calib", "--scheme", "fq2")


def test_missing_calibration_file(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "no-such.npz: no such calibration file", "--scheme", "gptq2",
           "--calib", str(tmp_path / "no-such.npz"))


def test_calibration_file_lacking_inputs(mlp_onnx, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", wrong=np.ones((4, 32), np.float32))
    _check(mlp_onnx, tmp_path / "out", capsys, "calibration failed: samples lack model inputs: x", "--scheme", "gptq2",
           "--calib", str(tmp_path / "calib.npz"))


def test_bad_redundancy(mlp_onnx, tmp_path, capsys):
    _check(mlp_onnx, tmp_path / "out", capsys, "redundancy must be >= 1.0", "--scheme", "fq2", "--redundancy", "0.5",
           "--calib", "unused.npz")


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
