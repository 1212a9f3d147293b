"""fq-tvm: FrameQuant 2-bit transformer compiler on Apache TVM.

Import-light on purpose: `fq_tvm.load` must work in a bare Python that has only tvm and numpy
(an aarch64 board, or qemu). Heavy modules are imported inside the functions that need them.
"""

__version__ = "0.1.0"

import os
import platform

from .errors import FqError  # noqa: E402


def _physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # a bare board Python
        return os.cpu_count() or 1


def _one_thread_per_core() -> None:
    """TVM's CPU thread pool takes half the logical CPUs on x86, assuming two hyper-threads per
    core: on a VM with 2 cores and no SMT that is one thread, and every artifact ran single-threaded
    beside ONNX Runtime's two. Ask for one thread per physical core instead, before the pool starts,
    unless TVM_NUM_THREADS or OMP_NUM_THREADS is set."""
    if platform.machine() in ("x86_64", "AMD64") and not ({"TVM_NUM_THREADS", "OMP_NUM_THREADS"} & set(os.environ)):
        os.environ["TVM_NUM_THREADS"] = str(_physical_cores())


def _quiet_blas_threads() -> None:
    """OpenBLAS's idle threads spin for about 0.1 s after each BLAS call, on the cores ONNX Runtime
    and TVM run on next: calibration alternates the two (MiniLM fq2 at 1024 passages: 147 -> 124 s
    wall, 260 -> 184 s CPU). Let them sleep at once. Read when OpenBLAS loads, so it only takes
    where numpy is imported after fq_tvm (the command-line tools); OPENBLAS_THREAD_TIMEOUT wins."""
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


_one_thread_per_core()
_quiet_blas_threads()


def cache_dir():
    """fq-tvm's cache directory: $FQ_CACHE_DIR, else ~/.cache/fq-tvm (a pathlib.Path)."""
    from pathlib import Path

    env = os.environ.get("FQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fq-tvm"


def compile(model, target="host", out_dir=None, **options):  # noqa: A001 - mirrors `fq-compile`
    """Compile an ONNX model (path or ModelProto) for `target`; see `fq_tvm.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(model, target, out_dir, **options)


def tune(model, target="host", out_dir="tuning", **options):
    """Tune the CPU graph ops of the model's build into a MetaSchedule database directory for
    `compile(..., tuning_db=out_dir)`; see `fq_tvm.tuning.tune` (`fq-tune`)."""
    from .tuning import tune as _tune

    return _tune(model, target, out_dir, **options)


def load(path, **options):
    """Load an artifact directory for running here; see `fq_tvm.artifact.load`."""
    from .artifact import load as _load

    return _load(path, **options)


def bench(model, calib=None, schemes=("fp32", "int8", "fq2"), **options):
    """Latency, size and accuracy of the model's builds beside ONNX Runtime; see `fq_tvm.benchmark.bench`."""
    from .benchmark import bench as _bench

    return _bench(model, calib, schemes, **options)


def bundle(artifact, out, **options):
    """Pack an artifact, TVM's runtime libraries and a C++ runner into a tarball that runs without
    Python; see `fq_tvm.bundler.bundle`."""
    from .bundler import bundle as _bundle

    return _bundle(artifact, out, **options)


__all__ = ["FqError", "__version__", "bench", "bundle", "compile", "load", "tune"]
