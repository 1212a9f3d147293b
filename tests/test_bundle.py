"""fq-bundle: an artifact, TVM's runtime libraries and the C++ runner in one tarball.

The host bundle's runner (compiled with g++) runs a small fq2 MLP and matches fq_tvm's Python
result; the runner refuses tampered files and bad inputs; run.sh's glibc check runs against a stub
getconf / ldd; the ELF version reader agrees with objdump. Slow: an rpi5 bundle's runner runs under
qemu-aarch64 and matches the host build. The runner binary is cached (~/.cache/fq-tvm/runner), so
only the first run of the suite compiles it (about 15 s per architecture)."""

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import fq_tvm
from fq_tvm import bundle_cli, bundler
from fq_tvm.errors import FqError

from conftest import max_rel_err

LATENCY = re.compile(r"^fq-runner: latency median ([0-9.]+) ms, min ([0-9.]+) ms, max ([0-9.]+) ms over (\d+) runs",
                     re.M)


def calib_file(directory: Path) -> Path:
    path = directory / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("bundle")


@pytest.fixture(scope="module")
def host_artifact(mlp_onnx, work):
    """The MLP as fq2 with int8 activations (the default) for this machine."""
    return fq_tvm.compile(mlp_onnx, "host", work / "mlp.host", scheme="fq2", calib=calib_file(work), quiet=True)


@pytest.fixture(scope="module")
def host_bundle(host_artifact, work):
    """(summary, extracted bundle directory)."""
    summary = fq_tvm.bundle(host_artifact, work / "mlp-host.tar.gz", quiet=True)
    with tarfile.open(summary["path"]) as tar:
        tar.extractall(work / "x", filter="data")
    return summary, work / "x" / "mlp-host"


def run(cmd, env=None, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def host_env(**extra) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
            "TVM_NUM_THREADS": "2", **extra}


# ---- the host bundle runs and matches Python -----------------------------------------------------

def test_host_bundle_matches_python(host_artifact, host_bundle, tmp_path):
    summary, root = host_bundle
    model = fq_tvm.load(host_artifact)
    assert summary["arch"] == "x86_64" and summary["bytes"] == Path(summary["path"]).stat().st_size
    top = "mlp-host/"
    assert sorted(summary["files"]) == sorted(
        ["mlp-host"] + [top + n for n in ("bin", "lib", "model", "bin/fq-runner", "lib/libtvm_runtime.so",
                                          "lib/libtvm_ffi.so", "model/model.so", "model/manifest.json",
                                          "bundle.json", "SHA256SUMS", "run.sh", "README.txt")])
    assert os.access(root / "run.sh", os.X_OK) and os.access(root / "bin" / "fq-runner", os.X_OK)
    for rows in (1, 7):
        x = np.random.default_rng(rows).standard_normal((rows, 32)).astype(np.float32)
        np.savez(tmp_path / "in.npz", x=x)
        done = run([root / "run.sh", "-i", tmp_path / "in.npz", "-o", tmp_path / f"out{rows}", "--repeat", "5",
                    "--warmup", "1"], env=host_env())
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == [str(tmp_path / f"out{rows}" / "y.npy")]
        median, low, high, count = LATENCY.search(done.stderr).groups()
        assert int(count) == 5 and 0 < float(low) <= float(median) <= float(high)
        ours = np.load(tmp_path / f"out{rows}" / "y.npy")
        ref = model.run({"x": x})["y"]
        assert ours.dtype == np.float32 and ours.shape == (rows, 16)
        assert max_rel_err(ours, ref) < 1e-6


def test_runner_input_forms(host_artifact, host_bundle, tmp_path):
    """One .npy, NAME=FILE.npy, a directory of NAME.npy; a zip64 .npz as numpy writes it."""
    _, root = host_bundle
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    ref = fq_tvm.load(host_artifact).run({"x": x})["y"]
    (tmp_path / "dir").mkdir()
    np.save(tmp_path / "dir" / "x.npy", x)
    for args in (["-i", tmp_path / "dir" / "x.npy"], [f"x={tmp_path / 'dir' / 'x.npy'}"], ["-i", tmp_path / "dir"]):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        done = run([root / "run.sh", *args, "-o", out, "--repeat", "1"], env=host_env())
        assert done.returncode == 0, done.stderr
        assert max_rel_err(np.load(out / "y.npy"), ref) < 1e-6


def test_bundle_records_what_the_binaries_need(host_bundle):
    summary, root = host_bundle
    info = json.loads((root / "bundle.json").read_text())
    assert info["format"] == "fq-tvm-bundle" and info["arch"] == "x86_64" and info["inputs"][0]["name"] == "x"
    req = info["requires"]
    assert req == summary["requires"]
    assert set(req["binaries"]) == {"bin/fq-runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "model/model.so"}
    # the recorded maximum is the maximum of what each file needs, recomputed here from the files
    needs = {name: bundler.elf_requirements(root / name) for name in req["binaries"]}
    assert bundler.max_version(needs, "GLIBC") == (req["glibc"], req["glibc_from"])
    assert bundler.version_at_least(req["glibc"], "2.17")
    assert f"NEED_GLIBC={req['glibc']}\n" in (root / "run.sh").read_text()
    sums = dict(reversed(line.split("  ")) for line in (root / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"bin/fq-runner", "lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "bundle.json"}
    assert all(bundler._sha256(root / n) == d for n, d in sums.items())


@pytest.fixture(scope="module")
def ids_artifact(work):
    """Token ids (int64, a table of 50 rows) -> two outputs: an fp32 build."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="proj"),
             helper.make_node("Relu", ["h"], ["z"], name="relu")]
    graph = helper.make_graph(
        nodes, "ids", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 48]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "seq", 32])],
        [numpy_helper.from_array(rng.standard_normal((50, 32)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((32, 48)).astype(np.float32), "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), work / "ids.onnx")
    return fq_tvm.compile(work / "ids.onnx", "host", work / "ids.host", scheme="fp32", quiet=True)


def test_int_input_and_two_outputs(ids_artifact, tmp_path):
    summary = fq_tvm.bundle(ids_artifact, tmp_path / "ids.tar.gz", quiet=True)
    with tarfile.open(summary["path"]) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "ids"
    ids = np.random.default_rng(1).integers(0, 50, (2, 5))
    np.savez(tmp_path / "in.npz", ids=ids)
    done = run([root / "run.sh", "-i", tmp_path / "in.npz", "-o", tmp_path / "out", "--repeat", "2"], env=host_env())
    assert done.returncode == 0, done.stderr
    ref = fq_tvm.load(ids_artifact).run({"ids": ids})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y.npy", "z.npy"]
    for name in ("y", "z"):
        ours = np.load(tmp_path / "out" / f"{name}.npy")
        assert ours.shape == ref[name].shape and np.array_equal(ours, ref[name])
    np.savez(tmp_path / "bad.npz", ids=np.array([[1, 2, 50]]))  # read unchecked by the library: refused
    assert one_line_error(run([root / "run.sh", "-i", tmp_path / "bad.npz"], env=host_env())) == (
        "fq-runner: input 'ids' has values from 1 to 50; it indexes a table of 50 rows, so each must be in [0, 50)")
    np.savez(tmp_path / "i32.npz", ids=ids.astype(np.int32))
    assert "input 'ids' has dtype int32, expected int64" in one_line_error(
        run([root / "run.sh", "-i", tmp_path / "i32.npz"], env=host_env()))


# ---- the runner refuses -------------------------------------------------------------------------

def copy_bundle(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(root, copy, symlinks=True)
    return copy


def test_runner_refuses_a_tampered_model(host_bundle, tmp_path):
    _, root = host_bundle
    copy = copy_bundle(root, tmp_path)
    np.savez(tmp_path / "in.npz", x=np.ones((2, 32), np.float32))
    lib = copy / "model" / "model.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    line = one_line_error(run([copy / "run.sh", "-i", tmp_path / "in.npz"], env=host_env()))
    assert line == f"fq-runner: {copy / 'model'}: checksum mismatch for 'model.so' (file changed or corrupt)"
    lib.unlink()
    lib.symlink_to(root / "model" / "model.so")  # same bytes, but a link: refused like artifact.py does
    assert "is a symbolic link" in one_line_error(run([copy / "run.sh", "--check"], env=host_env()))
    lib.unlink()
    assert "'model.so' listed in the manifest is missing" in one_line_error(run([copy / "run.sh"], env=host_env()))
    (copy / "model" / "manifest.json").write_text("{not json")
    assert "corrupt manifest" in one_line_error(run([copy / "run.sh"], env=host_env()))


def test_runner_sha256_and_unloadable_library(host_bundle, tmp_path):
    """The runner's own sha256 against hashlib on block-boundary sizes; a library that passes its
    checksum but is no shared library fails in one line."""
    _, root = host_bundle
    copy = copy_bundle(root, tmp_path)
    model = copy / "model"
    manifest = json.loads((model / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    for size in (0, 1, 55, 56, 63, 64, 65, 119, 120, 65536, 65537, 1_000_003):
        (model / f"f{size}").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        manifest["files"][f"f{size}"] = bundler._sha256(model / f"f{size}")
    (model / "manifest.json").write_text(json.dumps(manifest))
    done = run([copy / "bin" / "fq-runner", model, "--check"])
    assert done.returncode == 0 and done.stdout == f"fq-runner: {model} verified (x86_64)\n", done.stderr
    (model / "f56").write_bytes(b"x" * 56)
    assert one_line_error(run([copy / "bin" / "fq-runner", model, "--check"])).endswith(
        "checksum mismatch for 'f56' (file changed or corrupt)")
    (model / "f56").unlink()
    del manifest["files"]["f56"]
    (model / "model.so").write_bytes(b"\x7fELF" + bytes(200))
    manifest["files"]["model.so"] = bundler._sha256(model / "model.so")
    (model / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "x.npy", np.ones((1, 32), np.float32))
    line = one_line_error(run([copy / "bin" / "fq-runner", model, "-i", tmp_path / "x.npy"]))
    assert line.startswith(f"fq-runner: {model}: cannot load 'model.so': ")


def test_run_sh_refuses_a_changed_library(host_bundle, tmp_path):
    _, root = host_bundle
    copy = copy_bundle(root, tmp_path)
    with open(copy / "lib" / "libtvm_ffi.so", "ab") as handle:
        handle.write(b"\0")
    line = one_line_error(run([copy / "run.sh", "--check"], env=host_env()))
    assert line == "fq-bundle: bundle file changed or corrupt: lib/libtvm_ffi.so: FAILED"


def test_runner_refuses_bad_inputs(host_bundle, tmp_path):
    _, root = host_bundle
    cases = {
        "f64": (lambda p: np.save(p, np.ones((2, 32))), "input 'x' has dtype float64, expected float32"),
        "shape": (lambda p: np.save(p, np.ones((2, 31), np.float32)),
                  "input 'x' has shape [2, 31], expected [batch, 32]"),
        "fortran": (lambda p: np.save(p, np.asfortranarray(np.ones((2, 32), np.float32))), "Fortran-ordered"),
    }
    for name, (write, expected) in cases.items():
        write(tmp_path / f"{name}.npy")
        assert expected in one_line_error(run([root / "run.sh", "-i", tmp_path / f"{name}.npy"], env=host_env()))
    np.savez_compressed(tmp_path / "z.npz", x=np.ones((2, 32), np.float32))
    assert "is compressed; write the inputs with np.savez" in one_line_error(
        run([root / "run.sh", "-i", tmp_path / "z.npz"], env=host_env()))
    np.savez(tmp_path / "w.npz", y=np.ones((2, 32), np.float32))
    assert one_line_error(run([root / "run.sh", "-i", tmp_path / "w.npz"], env=host_env())) == (
        "fq-runner: inputs do not match the model: missing [x], unexpected [y]; the model takes [x]")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    assert "not a .npy file" in one_line_error(run([root / "run.sh", "-i", tmp_path / "junk.npy"], env=host_env()))
    assert "--repeat needs an integer >= 1" in one_line_error(run([root / "run.sh", "--repeat", "0"], env=host_env()))


# ---- run.sh: the glibc check ----------------------------------------------------------------------

def stub(directory: Path, name: str, script: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text("#!/bin/sh\n" + script + "\n")
    (directory / name).chmod(0o755)


def test_run_sh_glibc_check(host_bundle, tmp_path):
    _, root = host_bundle
    need = json.loads((root / "bundle.json").read_text())["requires"]["glibc"]
    stubs = tmp_path / "stubs"
    env = host_env(PATH=f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    stub(stubs, "getconf", 'echo "glibc 2.17"')
    line = one_line_error(run([root / "run.sh", "--check"], env=env))
    assert line == (f"fq-bundle: this machine has glibc 2.17, older than the {need} the bundled runner and TVM "
                    f"libraries need; use a newer OS")
    stub(stubs, "getconf", "exit 1")  # no getconf answer: ldd --version's first line
    stub(stubs, "ldd", 'echo "ldd (GNU libc) 2.4"')  # 2.4 < 2.17: numbers, not strings
    assert "this machine has glibc 2.4, older than" in one_line_error(run([root / "run.sh", "--check"], env=env))
    stub(stubs, "ldd", "exit 1")
    assert "cannot tell this machine's glibc version" in one_line_error(run([root / "run.sh", "--check"], env=env))
    major, minor = map(int, need.split("."))
    stub(stubs, "getconf", f'echo "glibc {major}.{minor + 10}"')  # 2.44 > 2.34 although "2.4" < "2.34"
    done = run([root / "run.sh", "--check"], env=env)
    assert done.returncode == 0 and "verified (x86_64)" in done.stdout, done.stderr
    stub(stubs, "uname", 'echo "aarch64"')
    assert one_line_error(run([root / "run.sh", "--check"], env=env)).startswith(
        "fq-bundle: this bundle is for x86_64, this machine is aarch64;")


def test_run_sh_libstdcxx_check(host_bundle, tmp_path):
    """run.sh looks for the newest GLIBCXX_ version the binaries need in the system's libstdc++."""
    _, root = host_bundle
    need = json.loads((root / "bundle.json").read_text())["requires"]["glibcxx"]
    assert f"NEED_GLIBCXX={need}\n" in (root / "run.sh").read_text()
    copy = copy_bundle(root, tmp_path)
    script = (copy / "run.sh").read_text().replace(f"NEED_GLIBCXX={need}\n", "NEED_GLIBCXX=3.4.999\n")
    (copy / "run.sh").write_text(script)
    line = one_line_error(run([copy / "run.sh", "--check"], env=host_env()))
    assert re.fullmatch(r"fq-bundle: this machine's libstdc\+\+ \(/\S+/libstdc\+\+\.so\.6\) lacks GLIBCXX_3\.4\.999, "
                        r"which the bundled runner and TVM libraries need; use a newer OS", line), line


def test_version_logic():
    assert bundler.version_at_least("2.36", "2.34") and bundler.version_at_least("2.34", "2.34")
    assert not bundler.version_at_least("2.4", "2.17") and bundler.version_at_least("2.17", "2.4")
    assert bundler.version_at_least("3.4.30", "3.4.29") and not bundler.version_at_least("3.4", "3.4.1")
    reqs = {"a": {"versions": {"libc.so.6": ["GLIBC_2.2.5", "GLIBC_2.17", "GLIBC_PRIVATE"],
                               "libstdc++.so.6": ["GLIBCXX_3.4.9", "GLIBCXX_3.4.21", "CXXABI_1.3.13"]}},
            "b": {"versions": {"libc.so.6": ["GLIBC_2.4", "GLIBC_2.17"], "libm.so.6": ["GLIBC_2.29"]}},
            "c": {"versions": {"libm.so.6": ["GLIBC_2.29"]}}}
    assert bundler.max_version(reqs, "GLIBC") == ("2.29", ["b", "c"])
    assert bundler.max_version(reqs, "GLIBCXX") == ("3.4.21", ["a"])
    assert bundler.max_version({"d": {"versions": {}}}, "GLIBC") == (None, [])


def objdump_versions(path) -> set:
    """Versions of the undefined dynamic symbols, as objdump -T prints them."""
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    return {m.group(1) for line in out.splitlines() if "*UND*" in line
            for m in [re.search(r"\s\(?([A-Z]+_[0-9.]+)\)?\s", line)] if m}


def test_elf_reader_agrees_with_objdump(host_bundle):
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    _, root = host_bundle
    for name in ("lib/libtvm_runtime.so", "lib/libtvm_ffi.so", "bin/fq-runner"):
        req = bundler.elf_requirements(root / name)
        ours = {v for names in req["versions"].values() for v in names}
        assert req["machine"] == "x86_64" and "libc.so.6" in req["versions"]
        assert ours == objdump_versions(root / name), name
    assert bundler.elf_requirements(root / "bin/fq-runner")["needed"][:2] == ["libtvm_runtime.so", "libtvm_ffi.so"]
    with pytest.raises(FqError, match="not an ELF file"):
        bundler.elf_requirements(root / "bundle.json")


# ---- fq-bundle refuses -----------------------------------------------------------------------------

def cli_error(capsys, argv) -> str:
    assert bundle_cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def fake_artifact(src: Path, dst: Path, **target) -> Path:
    """A copy of `src` whose manifest says another target (the manifest carries no checksum of itself)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["target"].update(target)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_fq_bundle_refuses_bad_input(capsys, host_artifact, tmp_path, monkeypatch):
    out = tmp_path / "out.tar.gz"
    (tmp_path / "plain").mkdir()
    assert cli_error(capsys, [tmp_path / "plain", "-o", out]) == (
        f"fq-bundle: error: {tmp_path / 'plain'}: not an fq-tvm artifact (no manifest.json)")
    assert "no such artifact directory" in cli_error(capsys, [tmp_path / "nothing", "-o", out])
    tampered = tmp_path / "tampered"
    shutil.copytree(host_artifact, tampered)
    with open(tampered / "model.so", "ab") as handle:
        handle.write(b"\0")
    assert "checksum mismatch for 'model.so'" in cli_error(capsys, [tampered, "-o", out])
    assert "must be a file name ending in .tar.gz or .tgz" in cli_error(capsys,
                                                                       [host_artifact, "-o", tmp_path / "o.zip"])
    (tmp_path / "d.tar.gz").mkdir()
    assert "is a directory" in cli_error(capsys, [host_artifact, "-o", tmp_path / "d.tar.gz", "--force"])
    assert "is inside the artifact" in cli_error(capsys, [host_artifact, "-o", host_artifact / "b.tar.gz"])
    riscv = fake_artifact(host_artifact, tmp_path / "riscv", arch="riscv64", name="riscv")
    assert "fq-bundle packs x86_64 and aarch64 artifacts" in cli_error(capsys, [riscv, "-o", out])
    cuda = fake_artifact(host_artifact, tmp_path / "cuda", device="cuda", name="cuda")
    manifest = json.loads((cuda / "manifest.json").read_text())
    for name in ("device.cu", "device.cubin", "device.ptx"):
        (cuda / name).write_text("x")
        manifest["files"][name] = bundler._sha256(cuda / name)
    (cuda / "manifest.json").write_text(json.dumps(manifest))
    assert "fq-bundle packs CPU artifacts (x86_64, aarch64) only" in cli_error(capsys, [cuda, "-o", out])
    arm = fake_artifact(host_artifact, tmp_path / "arm", arch="aarch64", name="rpi5")
    if shutil.which("aarch64-linux-gnu-g++"):
        monkeypatch.setenv("FQ_ARM64_SYSROOT", str(tmp_path / "no-sysroot"))
        line = cli_error(capsys, [arm, "-o", out])
        assert line.startswith(f"fq-bundle: error: the aarch64 TVM runtime libraries are not in the arm64 sysroot "
                               f"{tmp_path / 'no-sysroot'} (") and line.endswith("; run bash scripts/setup_arm64.sh")
        monkeypatch.delenv("FQ_ARM64_SYSROOT")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no aarch64-linux-gnu-g++
    assert cli_error(capsys, [arm, "-o", out]) == ("fq-bundle: error: aarch64-linux-gnu-g++ (the aarch64 "
                                                   "cross-compiler) not found: run bash scripts/setup_arm64.sh")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_fq_bundle_output_rules(capsys, host_artifact, host_bundle, tmp_path, monkeypatch):
    out = tmp_path / "m.tgz"
    out.write_bytes(b"keep me")
    assert cli_error(capsys, [host_artifact, "-o", out]) == (
        f"fq-bundle: error: {out} already exists; pass --force (force=True) to replace it")
    assert out.read_bytes() == b"keep me"

    calls = []

    def fail_midway(*args, **kwargs):  # the second file fails: nothing half-written is left
        calls.append(args[1])
        if len(calls) == 2:
            raise FqError("disk full (simulated)")
        return real(*args, **kwargs)

    real = bundler._add_file
    monkeypatch.setattr(bundler, "_add_file", fail_midway)
    assert cli_error(capsys, [host_artifact, "-o", out, "--force"]) == "fq-bundle: error: disk full (simulated)"
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.tgz"]
    monkeypatch.setattr(bundler, "_add_file", real)
    assert bundle_cli.main([str(host_artifact), "-o", str(out), "--force", "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with tarfile.open(out) as tar:
        assert tar.getmember("m/model/model.so").size == (host_artifact / "model.so").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tgz"]


def test_source_date_epoch_gives_one_bundle(capsys, host_artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    assert cli_error(capsys, [host_artifact, "-o", tmp_path / "bad.tar.gz"]) == (
        "fq-bundle: error: SOURCE_DATE_EPOCH='soon' is not a count of seconds since 1970")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = fq_tvm.bundle(host_artifact, tmp_path / "a.tar.gz", quiet=True)["path"]
    second = fq_tvm.bundle(host_artifact, tmp_path / "b" / "a.tar.gz", quiet=True)["path"]
    assert Path(first).read_bytes() == Path(second).read_bytes()
    with tarfile.open(first) as tar:
        assert {member.mtime for member in tar.getmembers()} == {1700000000}
        info = json.load(tar.extractfile("a/bundle.json"))
    assert info["created"] == "2023-11-14T22:13:20+00:00"


def test_api_is_a_function_after_the_module_is_imported(host_artifact, tmp_path):
    import fq_tvm.bundler  # noqa: F401  (a module named bundle.py would replace fq_tvm.bundle here)

    assert callable(fq_tvm.bundle) and "bundle" in fq_tvm.__all__
    summary = fq_tvm.bundle(host_artifact, tmp_path / "api.tar.gz", quiet=True)
    assert summary["target"] == "host" and summary["requires"]["glibc"]


# ---- slow: an rpi5 bundle under qemu-aarch64 ------------------------------------------------------

@pytest.mark.slow
def test_rpi5_bundle_runs_under_qemu(mlp_onnx, tmp_path):
    """The aarch64 runner (cross-compiled) runs the rpi5 fq2 build under qemu-user and matches the
    host build (float activations on both sides). Its latency is emulated and not checked."""
    from fq_tvm.targets import qemu

    try:
        qemu.check_qemu()
        root = qemu.ensure_sysroot(with_cross_compiler=True)
    except RuntimeError as err:
        pytest.skip(f"qemu-aarch64 or the arm64 sysroot cannot be set up here: {err}")
    calib = calib_file(tmp_path)
    arm = fq_tvm.compile(mlp_onnx, "rpi5", tmp_path / "mlp.rpi5", scheme="fq2", calib=calib, quiet=True, act_bits=32)
    host = fq_tvm.compile(mlp_onnx, "host", tmp_path / "mlp.host", scheme="fq2", calib=calib, quiet=True, act_bits=32)
    summary = fq_tvm.bundle(arm, tmp_path / "mlp-rpi5.tar.gz", quiet=True)
    assert summary["arch"] == "aarch64" and bundler.version_at_least("2.36", summary["requires"]["glibc"])
    with tarfile.open(summary["path"]) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    board = tmp_path / "x" / "mlp-rpi5"
    assert bundler.elf_requirements(board / "bin" / "fq-runner")["machine"] == "aarch64"
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    done = run([qemu.QEMU, "-L", root, board / "bin" / "fq-runner", board / "model", "-i", tmp_path / "in.npz",
                "-o", tmp_path / "out", "--repeat", "2"], env=host_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert LATENCY.search(done.stderr)
    ours = np.load(tmp_path / "out" / "y.npy")
    assert ours.shape == (5, 16) and max_rel_err(ours, fq_tvm.load(host).run({"x": x})["y"]) < 1e-5
    # run.sh on this x86 machine refuses the aarch64 bundle in one line
    assert one_line_error(run([board / "run.sh", "-i", tmp_path / "in.npz"], env=host_env())).startswith(
        "fq-bundle: this bundle is for aarch64, this machine is x86_64;")
