"""`fq-demo`: the main job on an embedded default. With the MiniLM wheel installed: export
all-MiniLM-L6-v2, calibrate, compile fp32 / int8 / fq2 r=1.1 for this machine and print accuracy
and latency side by side. Otherwise (or with --builtin): export a small transformer encoder,
compile it, run it at two batch/sequence sizes and compare with ONNX Runtime."""

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


def minilm_installed() -> bool:
    from .errors import FqError
    from .realmodels import gensim_data_dir, minilm_dir

    try:
        minilm_dir()
        gensim_data_dir()
    except FqError as err:
        print(f"fq-demo: {err}; see scripts/fetch_data.sh. Running the built-in encoder demo instead.")
        return False
    return True


def run_minilm_demo(work: Path, target: str) -> None:
    """MiniLM fp32 / int8 / fq2 r=1.1 compiled for `target`: accuracy and latency side by side."""
    from .report import minilm_rows

    print("all-MiniLM-L6-v2: export, calibrate on Wikipedia, compile fp32 / int8 / fq2, evaluate")
    rows = minilm_rows(work, ["fp32", "int8", "fq2"], target, metrics=("lee", "wordsim353"))
    print(f"\n{'scheme':8}{'bits/w':>8}{'MB':>7}{'Lee':>8}{'WordSim':>9}{'cos fp32':>10}{'50 docs s':>11}")
    for r in rows:
        print(f"{r['scheme']:8}{r['bits']:8.2f}{r['size_mb']:7.1f}{r['lee_spearman']:8.4f}{r['wordsim353']:9.4f}"
              f"{r.get('cos_to_reference', 1.0):10.4f}{r['lee_s']:11.2f}")


@_cli("fq-demo")
def main(argv=None):
    p = argparse.ArgumentParser(prog="fq-demo", description=__doc__)
    p.add_argument("--target", default="host", help="target preset (default: host)")
    p.add_argument("--keep", help="directory to keep the ONNX file and artifact in")
    p.add_argument("--builtin", action="store_true", help="the small built-in encoder, even if MiniLM is installed")
    args = p.parse_args(argv)
    if not args.builtin and minilm_installed():
        with tempfile.TemporaryDirectory() as tmp:
            run_minilm_demo(Path(args.keep or tmp), args.target)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        worst = run_demo(work, args.target)
    ok = worst < 1e-4
    print(f"{'OK' if ok else 'MISMATCH'}: the compiled model {'matches' if ok else 'does not match'} "
          f"ONNX Runtime (worst max relative error {worst:.2e}, bound 1e-4)")
    return 0 if ok else 1
