"""fq-tvm: FrameQuant 2-bit transformer compiler on Apache TVM.

Import-light on purpose: `fq_tvm.load` must work in a bare Python that has only tvm and numpy
(an aarch64 board, or qemu). Heavy modules are imported inside the functions that need them.
"""

__version__ = "0.1.0"

from .errors import FqError  # noqa: E402


def compile(model, target="host", out_dir=None, **options):  # noqa: A001 - mirrors `fq-compile`
    """Compile an ONNX model (path or ModelProto) for `target`; see `fq_tvm.compiler.compile`."""
    from .compiler import compile as _compile

    return _compile(model, target, out_dir, **options)


def load(path, **options):
    """Load an artifact directory for running here; see `fq_tvm.artifact.load`."""
    from .artifact import load as _load

    return _load(path, **options)


__all__ = ["FqError", "__version__", "compile", "load"]
