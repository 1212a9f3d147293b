"""The loader trusts nothing in an artifact directory: it opens only regular files inside it that
the manifest lists with a verified sha256, and a malformed manifest is a one-line FqError, never
an internal error, a hang or a large read (issue 11, "Artifacts you can trust")."""

import json
import os
import shutil

import numpy as np
import pytest

from fq_tvm import artifact
from fq_tvm.artifact import load
from fq_tvm.cli import compile_main, run_main
from fq_tvm.errors import FqError


@pytest.fixture(scope="module")
def built(mlp_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust") / "mlp.fq"
    assert compile_main([str(mlp_onnx), "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture
def art(built, tmp_path):
    """A private copy of the artifact to damage."""
    return shutil.copytree(built, tmp_path / "art")


def _manifest(art):
    return json.loads((art / "manifest.json").read_text())


def _write(art, manifest):
    (art / "manifest.json").write_text(json.dumps(manifest))


def _edit(art, **changes):
    manifest = _manifest(art)
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    _write(art, manifest)


def _refused(art, pattern):
    with pytest.raises(FqError, match=pattern):
        load(art)


def test_library_outside_the_directory_is_refused(art, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(art / "model.so", other / "model.so")
    files = _manifest(art)["files"]
    _edit(art, library="../other/model.so")
    _refused(art, "invalid manifest: 'library' must name a file listed in 'files'")
    for name in ("../other/model.so", str(other / "model.so")):
        _edit(art, library=name, files=dict(files, **{name: files["model.so"]}))
        _refused(art, f"file name '{name}' is not a plain file name inside the artifact")


def test_library_symlinked_out_is_refused(art, tmp_path):
    shutil.move(art / "model.so", tmp_path / "elsewhere.so")
    os.symlink(tmp_path / "elsewhere.so", art / "model.so")  # same bytes, so the checksum matches
    _refused(art, "model.so: is a symbolic link; an artifact holds regular files only")


def test_checksums_cannot_be_switched_off(art):
    (art / "model.so").write_bytes((art / "model.so").read_bytes() + b"tampered")
    _edit(art, files=None)
    _refused(art, r"invalid manifest: 'files' \(the sha256 of every file\) is missing or empty")
    _edit(art, files={})
    _refused(art, "'files' .* is missing or empty")
    _edit(art, files={"model.so": "0" * 63})
    _refused(art, "checksum of 'model.so' is not a sha256 hex digest")
    _write(art, {})
    _refused(art, "manifest.json: not an fq-tvm manifest")


@pytest.mark.parametrize("text", ["null", "[]", '"manifest"', "42", '{"format": "fq-tvm-artifact"}'])
def test_non_object_manifests(art, text):
    (art / "manifest.json").write_text(text)
    _refused(art, "not an fq-tvm manifest" if "format\"" not in text else "format version None is not supported")


@pytest.mark.parametrize("key, value, pattern", [
    ("inputs", None, "'inputs' must be a non-empty list"),
    ("outputs", [], "'outputs' must be a non-empty list"),
    ("outputs", {"y": 1}, "'outputs' must be a non-empty list"),
    ("inputs", [{"name": "x", "dtype": "object", "shape": [1]}],
     "each of 'inputs' needs a string 'name' and a numeric 'dtype'"),
    ("inputs", [{"name": "x", "dtype": "float32", "shape": "batch"}], "'inputs' entry 'x' needs a 'shape' list"),
    ("inputs", [{"name": "x", "dtype": "float32", "shape": [-1, 32]}], "'inputs' entry 'x' needs a 'shape' list"),
    ("inputs", ["x"], "each of 'inputs' needs a string 'name'"),
    ("library", None, "'library' must name a file listed in 'files'"),
    ("library", 7, "'library' must name a file listed in 'files'"),
    ("target", None, "'target' must be an object with string 'name', 'arch' and 'device'"),
    ("target", "host", "'target' must be an object"),
])
def test_missing_or_wrong_typed_keys(art, key, value, pattern):
    _edit(art, **{key: value})
    _refused(art, "invalid manifest: " + pattern)


@pytest.mark.parametrize("field, value, pattern", [
    ("arch", None, "'target' must be an object with string 'name', 'arch' and 'device'"),
    ("device", "tpu", "unknown target device 'tpu' \\(expected cpu or cuda\\)"),
    ("device", "cuda", "a CUDA artifact must list device.cu, device.cubin, device.ptx"),
    ("tvm", "llvm", "'target.tvm' must be an object"),
])
def test_bad_target(art, field, value, pattern):
    target = _manifest(art)["target"]
    if value is None:
        del target[field]
    else:
        target[field] = value
    _edit(art, target=target)
    _refused(art, pattern)


def test_deep_nesting_and_nan(art):
    (art / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(art, r"corrupt manifest \(nested too deeply\)")
    (art / "manifest.json").write_text('{"format": NaN}')
    _refused(art, r"corrupt manifest \(NaN is not valid JSON\)")


def test_huge_manifest_is_not_read(art):
    with open(art / "manifest.json", "r+b") as handle:
        handle.truncate(artifact.MAX_MANIFEST_BYTES + 1)
    _refused(art, f"manifest.json: larger than {artifact.MAX_MANIFEST_BYTES} bytes")


def test_fifo_and_dev_zero_do_not_hang(art):
    (art / "manifest.json").unlink()
    os.mkfifo(art / "manifest.json")
    _refused(art, "manifest.json: not a regular file")
    (art / "manifest.json").unlink()
    os.symlink("/dev/zero", art / "manifest.json")
    _refused(art, "manifest.json: is a symbolic link")


def test_listed_file_that_is_a_fifo(art):
    (art / "model.so").unlink()
    os.mkfifo(art / "model.so")
    _refused(art, "model.so: not a regular file")


def test_library_that_is_not_a_library(art):
    (art / "model.so").write_bytes(b"not an ELF file")
    _edit(art, files={"model.so": artifact.sha256_file(art / "model.so")})
    _refused(art, "cannot load 'model.so'")


def test_fq_run_reports_one_line(art, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 32), np.float32))
    _edit(art, outputs=[])
    assert run_main([str(art), "-i", str(tmp_path / "in.npz")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fq-run: error: ") and "'outputs' must be a non-empty list" in err
    assert err.count("\n") == 1 and "internal error" not in err


def test_good_artifact_still_loads(art):
    assert load(art).run({"x": np.ones((2, 32), np.float32)})["y"].shape == (2, 16)


def test_inputs_may_be_symbolic_links(mlp_onnx, tmp_path):
    """A model and calibration file that are links (the Hugging Face cache keeps every file as one)
    compile; the manifest hashes the file linked to. Only artifact files must be regular files."""
    import hashlib

    import fq_tvm

    store = tmp_path / "blobs"
    store.mkdir()
    (store / "model").write_bytes(mlp_onnx.read_bytes())
    np.savez(store / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    (tmp_path / "model.onnx").symlink_to(store / "model")
    (tmp_path / "calib.npz").symlink_to(store / "calib.npz")
    out = fq_tvm.compile(tmp_path / "model.onnx", "host", tmp_path / "art", scheme="gptq2",
                         calib=tmp_path / "calib.npz", calib_sequential=False, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(mlp_onnx.read_bytes()).hexdigest()
    assert [entry["name"] for entry in manifest["layers"]] == ["fc0"]
