"""`fq-demo`: the main job on a built-in model: export a small transformer encoder to ONNX,
compile it for this machine, run it at two batch/sequence sizes and compare with ONNX Runtime."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from .cli import _cli


def run_demo(work_dir: Path, target: str = "host", quiet: bool = False) -> float:
    """Return the worst max-relative error against ONNX Runtime over the test shapes."""
    import onnxruntime as ort

    from . import compile, load
    from .models import encoder_block

    onnx_path = encoder_block(work_dir / "encoder.onnx")
    print(f"exported a transformer encoder block to {onnx_path}")
    artifact = compile(onnx_path, target, work_dir / "encoder.fq", force=True, quiet=quiet)
    model = load(artifact)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in ((1, 16, 64), (4, 33, 64)):
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        ours = model.run({"x": x})["y"]
        ref = session.run(None, {"x": x})[0]
        err = float(np.abs(ours - ref).max() / np.abs(ref).max())
        worst = max(worst, err)
        print(f"batch {shape[0]}, seq {shape[1]}: max relative error vs ONNX Runtime {err:.2e}")
    return worst


@_cli("fq-demo")
def main(argv=None):
    p = argparse.ArgumentParser(prog="fq-demo", description=__doc__)
    p.add_argument("--target", default="host", help="target preset (default: host)")
    p.add_argument("--keep", help="directory to keep the ONNX file and artifact in")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        worst = run_demo(work, args.target)
    ok = worst < 1e-4
    print(f"{'OK' if ok else 'MISMATCH'}: the compiled model {'matches' if ok else 'does not match'} "
          f"ONNX Runtime (worst max relative error {worst:.2e}, bound 1e-4)")
    return 0 if ok else 1
