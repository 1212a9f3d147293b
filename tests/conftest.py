"""Shared fixtures: small seeded ONNX models, built once per test session.

The suite runs under pytest-xdist (`-n auto --dist loadfile`, pyproject.toml): each worker gets
its share of the physical cores for TVM, BLAS and OpenMP, set here before numpy or TVM load, so
that workers do not oversubscribe the machine (a TVM or ORT thread pool spinning at a barrier
while its partner thread waits for a core is many times slower). The longest files are handed out first.
"""

import os


def _share_cores() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers <= 1:
        return
    import psutil

    share = max(1, (psutil.cpu_count(logical=False) or 1) // workers)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(share))
    _share_ort(share)


def _share_ort(threads: int) -> None:
    """ONNX Runtime reads no environment variable for its pool: sessions that leave the thread
    count at its default (0: one per core) get the worker's share."""
    import onnxruntime as ort

    class Session(ort.InferenceSession):
        def __init__(self, model, sess_options=None, *args, **kwargs):
            opts = sess_options or ort.SessionOptions()
            if opts.intra_op_num_threads == 0:
                opts.intra_op_num_threads = threads
            super().__init__(model, opts, *args, **kwargs)

    ort.InferenceSession = Session


_share_cores()

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402

from fq_tvm import models  # noqa: E402


# The files with the most work (worker seconds of setup + calls, full suite 2026-11-27 04:36, nothing
# else running), longest first: with `--no-loadscope-reorder` (pyproject.toml) xdist hands files out
# in this order.
LONGEST = tuple(f"test_{name}.py" for name in (
    "real_smollm2",  # 359
    "quantized_compile",  # 187
    "real_quantized",  # 158
    "import_real",  # 150
    "tuning",  # 127
    "compile_cpu",  # 88
    "import_fixes",  # 82
    "rpc",  # 79
    "aarch64_qemu",  # 69
    "attention", "real_models", "kernels", "generate", "int8_activations", "cross_targets",  # 52-67
    "import_rnn"))  # 47


# Files whose tests build whole models with TVM (5-20 s each): marked `build`, so that the quick loop
# (`-m "not slow and not build"`: numerics, passes, manifests, CLI checks) runs in about a minute.
BUILDS = {f"test_{name}.py" for name in (
    "quantized_compile", "compile_cpu", "cross_targets", "import_fixes", "attention", "import_real",
    "tuning", "kernels", "rpc", "int8_activations", "bench", "force", "cuda_codegen", "quantize_head",
    "tied_weights", "bundle", "dense", "generate")}


def pytest_collection_modifyitems(config, items):
    """Marks the BUILDS files' tests `build`. Orders the longest files first, then the other slow
    ones (stable otherwise): xdist hands files out in this order, and a long one started last
    leaves one worker running alone at the end (xdist's own order, most tests first, started the
    SmolLM2 file 770 s into a 1060 s run on 2026-11-27)."""
    for item in items:
        if item.path.name in BUILDS:
            item.add_marker(pytest.mark.build)

    def key(item):
        name = item.path.name
        return (LONGEST.index(name) if name in LONGEST else len(LONGEST), item.get_closest_marker("slow") is None)

    items.sort(key=key)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_onnx(model_dir):
    return models.mlp_gemm(model_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def encoder_onnx(model_dir):
    return models.encoder_block(model_dir / "encoder.onnx")


@pytest.fixture(scope="session")
def encoder_calib(model_dir):
    """Calibration samples for `encoder_onnx`: 8 sequences of 16 tokens."""
    path = model_dir / "encoder_calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 16, 64)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory):
    """SmolLM2-135M exported once per session (about 2 minutes; without the exporter's optimizer,
    which alone took another minute and a half on one core): (work dir, onnx path)."""
    from fq_tvm import FqError, realmodels

    try:
        realmodels.smollm2_gguf()
    except FqError as err:
        pytest.fail(f"{err} (or run bash scripts/fetch_data.sh --smollm2)", pytrace=False)
    work = tmp_path_factory.mktemp("smollm2")
    return work, realmodels.export_smollm2(work, optimize=False)


def ort_run(onnx_path, inputs: dict) -> list:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def max_rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def int8_rows_match(ours, ref, tol=1e-4, flips=0.05) -> bool:
    """An int8-activation artifact against numpy's int8 inference math: rows agree to `tol`
    relative, except that an activation rounded to the other side of a .5 boundary (float
    differences upstream, in the Hadamard and frame) may move up to `flips` of the rows by about
    one quantization step, ~1e-3 relative."""
    ours = np.asarray(ours, np.float64).reshape(-1, np.shape(ref)[-1])
    ref = np.asarray(ref, np.float64).reshape(ours.shape)
    row_err = np.abs(ours - ref).max(-1) / np.abs(ref).max()
    return bool(row_err.max() < 3e-3 and (row_err > tol).mean() <= flips)


def gram_error(op, d, chunk=1024, columns: int | None = None) -> float:
    """max |T^T T - I| for an operator with apply/adjoint on the last axis, in column chunks;
    `columns`: only that many columns of the Gram matrix, drawn at random (seeded)."""
    cols = np.arange(d)
    if columns is not None and columns < d:
        cols = np.sort(np.random.default_rng(d).choice(d, columns, replace=False))
    err = 0.0
    for a in range(0, len(cols), chunk):
        part = cols[a : a + chunk]
        e = np.zeros((len(part), d))
        e[np.arange(len(part)), part] = 1.0
        err = max(err, float(np.abs(op.adjoint(op.apply(e)) - e).max()))
    return err


def pack_reference(codes, bits: int) -> np.ndarray:
    """uint8 [rows, ceil(cols * bits / 8)]: code j of a row at bit offset bits * (j % per) of byte
    j // per (DESIGN.md, "Packed codes"), written independently of numerics.pack_codes."""
    per = 8 // bits
    rows, cols = codes.shape
    padded = np.zeros((rows, -(-cols // per) * per), np.uint64)
    padded[:, :cols] = codes
    return (padded.reshape(rows, -1, per) << (bits * np.arange(per, dtype=np.uint64))).sum(-1).astype(np.uint8)
