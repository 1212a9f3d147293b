"""--force replaces only an fq-tvm artifact: never the model, its directory, the current directory
or anything else (issue 11's data-loss cases), in the CLI and the Python API; an interrupted
compile leaves no staging directory."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

import fq_tvm
from fq_tvm.cli import compile_main
from fq_tvm.errors import FqError


@pytest.fixture
def model_home(mlp_onnx, tmp_path, monkeypatch):
    """A directory holding model.onnx and an unrelated file, as the current directory."""
    home = tmp_path / "inner"
    home.mkdir()
    (home / "model.onnx").write_bytes(mlp_onnx.read_bytes())
    (home / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(home)
    return home


def _refused(argv, capsys, expected):
    assert compile_main(argv) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def _intact(home, model_bytes):
    assert (home / "model.onnx").read_bytes() == model_bytes
    assert (home / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in home.iterdir()) == ["model.onnx", "notes.txt"]


def test_force_never_replaces_the_model(model_home, mlp_onnx, capsys):
    _refused(["model.onnx", "-o", "model.onnx", "--force"], capsys,
             "fq-compile: error: output 'model.onnx' would replace the input model.onnx")
    _intact(model_home, mlp_onnx.read_bytes())


def test_force_never_replaces_the_current_directory(model_home, mlp_onnx, capsys):
    _refused(["model.onnx", "-o", "../inner", "--force"], capsys,
             "output '../inner' is the current directory or one above it")
    _refused(["model.onnx", "-o", "..", "--force"], capsys, "output '..' is not a new directory name")
    _intact(model_home, mlp_onnx.read_bytes())


def test_force_never_replaces_a_directory_holding_the_model(model_home, mlp_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(["inner/model.onnx", "-o", "inner", "--force"], capsys,
             "output 'inner' would replace the input inner/model.onnx")
    _intact(model_home, mlp_onnx.read_bytes())


def test_force_never_replaces_a_non_artifact(model_home, mlp_onnx, capsys):
    _refused(["model.onnx", "-o", "notes.txt", "--force"], capsys,
             "notes.txt exists and is not an fq-tvm artifact; --force replaces only artifacts")
    os.mkdir("photos")
    (model_home / "photos" / "a.jpg").write_bytes(b"jpg")
    _refused(["model.onnx", "-o", "photos", "--force"], capsys, "photos exists and is not an fq-tvm artifact")
    assert (model_home / "photos" / "a.jpg").read_bytes() == b"jpg"
    os.symlink("photos", "link")
    _refused(["model.onnx", "-o", "link", "--force"], capsys, "link exists and is not an fq-tvm artifact")
    (model_home / "link").unlink()
    (model_home / "photos" / "a.jpg").unlink()
    (model_home / "photos").rmdir()
    _intact(model_home, mlp_onnx.read_bytes())


def test_empty_or_dot_output(model_home, capsys):
    _refused(["model.onnx", "-o", ""], capsys, "fq-compile: error: the output path is empty")
    _refused(["model.onnx", "-o", "."], capsys, "fq-compile: error: output '.' is not a new directory name")


def test_output_below_a_file(model_home, capsys):
    _refused(["model.onnx", "-o", "notes.txt/art"], capsys, "cannot create notes.txt/art: notes.txt is not a directory")
    assert (model_home / "notes.txt").read_text() == "mine\n"


def test_force_replaces_an_artifact(model_home, capsys):
    assert compile_main(["model.onnx", "-o", "art", "-q"]) == 0
    (model_home / "art" / "stale").write_text("old")
    assert compile_main(["model.onnx", "-o", "art", "-q", "--force"]) == 0
    assert sorted(p.name for p in (model_home / "art").iterdir()) == ["manifest.json", "model.so"]
    assert sorted(p.name for p in model_home.iterdir()) == ["art", "model.onnx", "notes.txt"]


def test_python_api_has_the_same_rules(model_home, mlp_onnx):
    with pytest.raises(FqError, match="would replace the input model.onnx"):
        fq_tvm.compile("model.onnx", "host", "model.onnx", force=True, quiet=True)
    with pytest.raises(FqError, match="is the current directory or one above it"):
        fq_tvm.compile(model_home / "model.onnx", "host", model_home, force=True, quiet=True)
    with pytest.raises(FqError, match="notes.txt exists and is not an fq-tvm artifact"):
        fq_tvm.compile("model.onnx", "host", "notes.txt", force=True, quiet=True)
    with pytest.raises(FqError, match="the output path is empty"):
        fq_tvm.compile("model.onnx", "host", "", quiet=True)
    _intact(model_home, mlp_onnx.read_bytes())


SLOW_EXPORT = textwrap.dedent("""
    import signal, sys, time
    # Ctrl-C as from a terminal: undo an ignored or blocked SIGINT inherited from pytest (a suite
    # started in the background by a non-interactive shell runs with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    from fq_tvm.targets import x86
    from fq_tvm.cli import compile_main

    def slow(executable, out_dir, preset):
        (out_dir / "model.so").write_bytes(b"half")
        print("writing", flush=True)
        for _ in range(600):  # short sleeps: Python acts on a signal between them, whichever thread
            time.sleep(0.1)   # the kernel gave it to (one sleep(60) outlived the 30 s wait twice)

    x86.export = slow
    sys.exit(compile_main([sys.argv[1], "-o", sys.argv[2], "-q"]))
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupted_compile_removes_its_staging_dir(mlp_onnx, tmp_path, sig, code):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(mlp_onnx), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n", proc.stderr.read()
        assert [p.name[:9] for p in tmp_path.iterdir()] == [".out.tmp-"]
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == code
    finally:
        proc.kill()
    assert list(tmp_path.iterdir()) == []
