"""fq-compile + fq-run on the host CPU against ONNX Runtime on the original model."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fq_tvm import FqError, artifact, load
from fq_tvm.cli import compile_main, run_main
from conftest import max_rel_err, ort_run


def _compile(onnx_path, out, *extra):
    assert compile_main([str(onnx_path), "--target", "host", "-o", str(out), "-q", *extra]) == 0
    return out


def _fq_run(art, inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **inputs)
    assert run_main([str(art), "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")]) == 0
    with np.load(tmp_path / "out.npz") as out:
        return {k: out[k] for k in out.files}


def test_mlp_gemm_transb_with_bias(mlp_onnx, tmp_path):
    art = _compile(mlp_onnx, tmp_path / "mlp.fq")
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 32)).astype(np.float32)
        ours = _fq_run(art, {"x": x}, tmp_path)["y"]
        ref = ort_run(mlp_onnx, {"x": x})[0]
        assert ours.shape == ref.shape == (batch, 16)
        assert max_rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("shape", [(1, 5, 64), (3, 40, 64)])
def test_encoder_dynamic_batch_and_sequence(encoder_onnx, tmp_path_factory, shape):
    art = tmp_path_factory.getbasetemp() / "encoder.host"
    if not art.exists():
        _compile(encoder_onnx, art)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ours = _fq_run(art, {"x": x}, tmp_path_factory.mktemp("run"))["y"]
    ref = ort_run(encoder_onnx, {"x": x})[0]
    assert ours.shape == ref.shape
    assert max_rel_err(ours, ref) < 1e-4


def test_manifest_records_versions_signature_and_checksums(mlp_onnx, tmp_path):
    import onnx
    import tvm

    art = _compile(mlp_onnx, tmp_path / "mlp.fq")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["format"] == "fq-tvm-artifact" and manifest["format_version"] == 1
    assert manifest["versions"]["tvm"] == tvm.__version__
    assert manifest["versions"]["onnx"] == onnx.__version__
    assert manifest["target"]["name"] == "host" and manifest["scheme"]["name"] == "fp32"
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 32]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": ["batch", 16]}]
    assert manifest["weights"]["bytes"] == 4 * (32 * 64 + 64 + 64 * 16 + 16)
    assert set(manifest["files"]) == {"model.so"}
    assert manifest["files"]["model.so"] == artifact.sha256_file(art / "model.so")
    assert not list(tmp_path.glob(".*tmp*")), "staging directory left behind"


def test_tampered_library_is_refused(mlp_onnx, tmp_path):
    art = _compile(mlp_onnx, tmp_path / "mlp.fq")
    with open(art / "model.so", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(FqError, match="checksum mismatch for 'model.so'"):
        load(art)


def test_future_format_version_is_refused(mlp_onnx, tmp_path):
    art = _compile(mlp_onnx, tmp_path / "mlp.fq")
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
    with pytest.raises(FqError, match="format version 99 is not supported"):
        load(art)


def test_existing_output_needs_force(mlp_onnx, tmp_path, capsys):
    art = _compile(mlp_onnx, tmp_path / "mlp.fq")
    before = (art / "manifest.json").read_text()
    assert compile_main([str(mlp_onnx), "-o", str(art), "-q"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (art / "manifest.json").read_text() == before
    _compile(mlp_onnx, art, "--force")
    assert load(art).run({"x": np.ones((2, 32), np.float32)})["y"].shape == (2, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.fq"]


def test_python_api_mirrors_cli(mlp_onnx, tmp_path):
    import fq_tvm

    out = fq_tvm.compile(mlp_onnx, "host", tmp_path / "api.fq", quiet=True)
    x = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float32)
    assert max_rel_err(fq_tvm.load(out).run({"x": x})["y"], ort_run(mlp_onnx, {"x": x})[0]) < 1e-4


def test_run_rejects_wrong_inputs(mlp_onnx, tmp_path):
    model = load(_compile(mlp_onnx, tmp_path / "mlp.fq"))
    with pytest.raises(FqError, match=r"missing \['x'\], unexpected \['z'\]"):
        model.run({"z": np.ones((1, 32), np.float32)})
    with pytest.raises(FqError, match=r"input 'x' has shape \[1, 31\], expected \['batch', 32\]"):
        model.run({"x": np.ones((1, 31), np.float32)})


def test_console_scripts_installed(mlp_onnx, tmp_path):
    """The real entry points, as a user types them."""
    out = tmp_path / "cli.fq"
    bindir = __import__("pathlib").Path(sys.executable).parent
    done = subprocess.run([bindir / "fq-compile", mlp_onnx, "-o", out, "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    x = np.full((3, 32), 0.5, np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    done = subprocess.run([bindir / "fq-run", out, "-i", tmp_path / "in.npz"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref = ort_run(mlp_onnx, {"x": x})[0]
    assert done.stdout.startswith("y: shape [3, 16] float32 mean ")
    assert float(done.stdout.split()[6]) == pytest.approx(ref.mean(), rel=1e-4, abs=1e-6)


def test_list_targets_and_schemes(capsys):
    assert compile_main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    for name in ("host", "x86-avx512", "arm-neon", "rpi4", "rpi5", "jetson-orin", "cuda", "cuda-sm90"):
        assert f"\n{name} " in "\n" + out
    assert '"mcpu": "cortex-a76"' in out
    assert compile_main(["--list-schemes"]) == 0
    out = capsys.readouterr().out
    assert "fq2     framequant  2-bit r=1.1" in out and "int8    rtn         8-bit" in out


def test_builtin_demo_matches_onnx_runtime(capsys):
    from fq_tvm.demo import main as demo_main

    assert demo_main(["--builtin"]) == 0
    out = capsys.readouterr().out
    assert "OK: the compiled model matches ONNX Runtime" in out
    errors = [float(line.split()[-1]) for line in out.splitlines() if "max relative error vs ONNX Runtime" in line]
    assert len(errors) == 2 and max(errors) < 1e-4


def _threads_in_fresh_python(env_update: dict) -> int:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env.update(env_update)
    code = "import fq_tvm, tvm; print(tvm.runtime.num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip())


def test_tvm_runs_one_thread_per_physical_core():
    """TVM alone halves the logical CPUs on x86 (one thread on a 2-core VM without SMT)."""
    import psutil

    assert _threads_in_fresh_python({}) == psutil.cpu_count(logical=False)
    assert _threads_in_fresh_python({"TVM_NUM_THREADS": "1"}) == 1  # the user's choice wins


def test_blas_threads_do_not_spin():
    """Importing fq_tvm before numpy asks OpenBLAS's idle threads to sleep at once (they spun on the
    cores ONNX Runtime needed between calibration's products); the user's setting wins."""
    import os
    import subprocess
    import sys

    code = "import fq_tvm, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    for extra, want in (({}, "4"), ({"OPENBLAS_THREAD_TIMEOUT": "12"}, "12")):
        out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == want


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_reach_the_output_like_ort(mlp_onnx, encoder_onnx, tmp_path_factory, bad):
    """A NaN or Inf in one input row shows in the outputs of the rows ORT marks (relu keeps NaN;
    attention spreads it over the sequence) and nowhere else."""
    for onnx_path, shape in ((mlp_onnx, (3, 32)), (encoder_onnx, (2, 5, 64))):
        art = tmp_path_factory.getbasetemp() / f"{onnx_path.stem}.nan.host"
        if not art.exists():
            _compile(onnx_path, art)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        x.reshape(-1, shape[-1])[1, 3] = bad
        ours = load(art).run({"x": x})["y"]
        ref = ort_run(onnx_path, {"x": x})[0]
        assert np.array_equal(np.isfinite(ours), np.isfinite(ref)), onnx_path.stem
        assert not np.isfinite(ref).all()
        assert max_rel_err(np.where(np.isfinite(ref), ours, 0), np.where(np.isfinite(ref), ref, 0)) < 1e-4


def test_every_fp32_op_of_the_encoder_gets_a_schedule(encoder_onnx, tmp_path_factory):
    """The fallback rule fits every legalized op of an encoder block (attention batch-matmuls,
    softmax, layer norm, masks): a rule that raises leaves its op unscheduled and 10-40x slower."""
    art = tmp_path_factory.getbasetemp() / "encoder.host"
    if not art.exists():
        _compile(encoder_onnx, art)
    counts = json.loads((art / "manifest.json").read_text())["kernels"]["counts"]
    assert counts.get("unscheduled", 0) == 0 and counts["fallback"] >= 4, counts
    assert counts["softmax_rows"] == 1 and counts["layer_norm_rows"] == 1  # written by the legalization


def test_reshapes_are_views_not_kernels(encoder_onnx, tmp_path_factory):
    """The attention's head split and merge run as VM reshapes (no copy): scheduling them first had
    hidden them from TVM's RewriteDataflowReshape (SmolLM2: ~480 copies per decode step)."""
    import re

    import tvm

    art = tmp_path_factory.getbasetemp() / "encoder.host"
    if not art.exists():
        _compile(encoder_onnx, art)
    calls = re.findall(r"call\s+(\S+)", tvm.runtime.load_module(str(art / "model.so"))["as_text"]())
    assert not [c for c in calls if c.startswith("reshape")], sorted(set(calls))
    assert calls.count("vm.builtin.reshape") >= 4  # q, k, v split into heads, the heads merged


def test_a_reshaped_output_is_a_view_that_later_calls_leave_alone(tmp_path):
    """A reshape producing the function's output runs as a view too (SmolLM2's logits were copied,
    25 MB); the output still owns its memory: a second call does not overwrite the first result."""
    import re

    import tvm
    from onnx import TensorProto, helper, numpy_helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])
    shape = numpy_helper.from_array(np.array([-1, 8], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["s"]),
                               helper.make_node("Reshape", ["s", "shape"], ["y"])], "g", [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save(model, str(tmp_path / "view.onnx"))
    art = _compile(tmp_path / "view.onnx", tmp_path / "view.host")
    calls = re.findall(r"call\s+(\S+)", tvm.runtime.load_module(str(art / "model.so"))["as_text"]())
    assert "vm.builtin.reshape" in calls and not [c for c in calls if c.startswith("reshape")], calls
    model = load(art)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((2, 3, 8)).astype(np.float32) for _ in range(2))
    first = model._vm["main"](tvm.runtime.tensor(a))
    kept = first.numpy().copy()
    second = model._vm["main"](tvm.runtime.tensor(b))
    assert np.array_equal(first.numpy(), kept)
    assert max_rel_err(kept, ort_run(tmp_path / "view.onnx", {"x": a})[0]) < 1e-6
    assert max_rel_err(second.numpy(), ort_run(tmp_path / "view.onnx", {"x": b})[0]) < 1e-6


def test_ops_left_unscheduled_are_named(tmp_path, capsys):
    """ScatterElements lowers to TOPI's loop-written kernel: no schedule fits; the build says which
    function kept TVM's plain lowering, the manifest counts it, and the result still matches ORT."""
    from onnx import TensorProto, helper, numpy_helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])
    idx = numpy_helper.from_array(np.array([[1, 0, 3, 2, 5, 4, 7, 6]] * 4, np.int64), "idx")
    graph = helper.make_graph([helper.make_node("ScatterElements", ["x", "idx", "x"], ["y"], axis=1)],
                              "g", [x], [y], [idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save(model, str(tmp_path / "scatter.onnx"))
    out = tmp_path / "scatter.host"
    assert compile_main([str(tmp_path / "scatter.onnx"), "-o", str(out)]) == 0
    assert "note: kept TVM's plain lowering (no schedule fits): scatter_elements" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["kernels"]["counts"] == {"unscheduled": 1}
    feed = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    assert np.array_equal(load(out).run(feed)["y"], ort_run(tmp_path / "scatter.onnx", feed)[0])


def _passthrough_onnx(path):
    """y = x (the graph input passed through) and z = x @ W."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, w


def test_run_takes_any_array_and_returns_arrays_of_its_own(tmp_path):
    """Model.run hands aligned inputs to TVM without a copy and returns outputs without one:
    misaligned, read-only and strided inputs (and lists and float64 arrays, which are converted)
    give the same results, and no output is the caller's input (an output that passes an input
    through is copied)."""
    onnx_path, w = _passthrough_onnx(tmp_path / "pass.onnx")
    model = load(_compile(onnx_path, tmp_path / "pass.fq"))
    x = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)
    raw = np.zeros(3 * 32 + 1, np.float32)
    misaligned = raw[1:].reshape(3, 32)
    misaligned[...] = x
    readonly = x.copy()
    readonly.flags.writeable = False
    strided = np.repeat(x, 2, axis=1)[:, ::2]
    assert misaligned.ctypes.data % artifact.ALIGN != 0
    for given in (x, misaligned, readonly, strided, x.tolist(), x.astype(np.float64)):
        out = model.run({"x": given})
        np.testing.assert_array_equal(out["y"], x)
        np.testing.assert_allclose(out["z"], x @ w, rtol=1e-5, atol=1e-5)
        assert not np.may_share_memory(out["y"], given)
        assert out["y"].flags.writeable and out["z"].flags.writeable
    first = model.run({"x": x})["z"]
    second = model.run({"x": 2 * x})["z"]  # a later call does not overwrite an earlier result
    np.testing.assert_allclose(first, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(second, 2 * x @ w, rtol=1e-5, atol=1e-5)


def test_two_builds_of_one_model_give_one_artifact(encoder_onnx, tmp_path):
    """Separate processes (objects at other addresses: Relax's shape function came out in hash
    order) build byte-identical libraries, the first parsing its kernels, the second loading them
    from the kernel cache; with SOURCE_DATE_EPOCH the manifests are identical too."""
    import os
    from pathlib import Path

    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000", "FQ_CACHE_DIR": str(tmp_path / "cache")}
    for name in ("a", "b"):
        done = subprocess.run([Path(sys.executable).parent / "fq-compile", encoder_onnx, "-o", tmp_path / name, "-q"],
                              capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    for name in ("model.so", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["created"] == "2023-11-14T22:13:20+00:00"
    assert list((tmp_path / "cache" / "kernels").glob("*/*.json"))  # the second build could load


def test_a_bad_source_date_epoch_is_one_line_before_any_work(mlp_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    assert compile_main([str(mlp_onnx), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert capsys.readouterr().err.strip() == ("fq-compile: error: SOURCE_DATE_EPOCH='yesterday' is not a count "
                                               "of seconds since 1970")
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "9" * 30)  # past datetime's range
    assert compile_main([str(mlp_onnx), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "is not a count of seconds since 1970" in capsys.readouterr().err
