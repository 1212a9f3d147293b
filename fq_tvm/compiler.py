"""The build driver behind `fq-compile`: ONNX -> Relax -> (rewrite) -> TVM build -> artifact."""

from __future__ import annotations

import sys
from pathlib import Path

from . import __version__
from .artifact import staging_dir, write_manifest
from .errors import FqError


class Steps:
    """One line per compile step on stderr (the long steps draw their own tqdm bars)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.done, self.quiet = total, 0, quiet

    def __call__(self, text: str) -> None:
        self.done += 1
        if not self.quiet:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)


def default_out_dir(model_path: Path, target_name: str, scheme: str) -> Path:
    return model_path.with_name(f"{model_path.stem}.{target_name}.{scheme}")


def compile(model, target="host", out_dir=None, *, scheme: str = "fp32", cuda_arch: str | None = None,
            force: bool = False, quiet: bool = False) -> Path:
    """Compile an ONNX model for `target` into an artifact directory; return its path.

    model: path to an .onnx file. target: a preset name (`fq-compile --list-targets`) or a TVM
    target JSON dict string. A failed compile leaves nothing at `out_dir`.
    """
    from . import onnx_io
    from .targets import family, resolve

    preset = resolve(target, cuda_arch)
    hooks = family(preset)
    hooks.check_tools(preset)
    if scheme != "fp32":
        raise FqError(f"unknown scheme '{scheme}'; available: fp32")
    model_path = Path(model)
    out_dir = Path(out_dir) if out_dir else default_out_dir(model_path, preset.name, scheme)
    if out_dir.exists() and not force:
        raise FqError(f"{out_dir} already exists; pass --force (force=True) to replace it")
    step = Steps(4, quiet)
    step(f"loading {model_path}")
    proto = onnx_io.load_model(model_path)
    step("importing into Relax")
    mod = _import(proto)
    step(f"building for {preset.name} {preset.target}")
    executable = _build(mod, preset)
    with staging_dir(out_dir, force) as tmp:
        step(f"writing {out_dir}")
        files = hooks.export(executable, tmp, preset)
        write_manifest(tmp, _manifest(proto, model_path, preset, scheme, files), files)
    return out_dir


def _import(proto):
    from .importer import bind_weights, to_relax

    mod, weights = to_relax(proto)
    return bind_weights(mod, weights)


def _build(mod, preset):
    import tvm

    try:
        return tvm.compile(mod, preset.tvm_target())
    except FqError:
        raise
    except Exception as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise FqError(f"TVM build for '{preset.name}' failed: {lines[-1] if lines else type(err).__name__}") from None


def _manifest(proto, model_path: Path, preset, scheme: str, files: list[str]) -> dict:
    import datetime

    import onnx
    import tvm

    from .artifact import sha256_file
    from .onnx_io import signature, weight_bytes

    sig = signature(proto)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"fq_tvm": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__},
        "source": {"model": model_path.name, "sha256": sha256_file(model_path)},
        "target": {"name": preset.name, "tvm": preset.target, "arch": preset.arch, "device": preset.device},
        "scheme": {"name": scheme, "bits_per_weight": 32.0},
        "weights": {"bytes": weight_bytes(proto)},
        "library": files[0],
        "inputs": sig["inputs"],
        "outputs": sig["outputs"],
    }
