"""`fq-export` and `fq-eval`: the real-model commands (MiniLM, SmolLM2), thin wrappers over
fq_tvm.realmodels and fq_tvm.evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import _cli

MODELS = ("minilm", "smollm2")


@_cli("fq-export")
def export_main(argv=None):
    p = argparse.ArgumentParser(
        prog="fq-export", description="Export a packaged pretrained model to ONNX, offline, plus a "
        "calibration .npz made from Wikipedia text (never the evaluation text).")
    p.add_argument("model", choices=MODELS)
    p.add_argument("-o", "--out", default=".", help="directory for MODEL.onnx and MODEL_calib.npz")
    p.add_argument("--force", action="store_true", help="export again even if the file exists")
    args = p.parse_args(argv)
    from . import realmodels

    out = Path(args.out)
    export = realmodels.export_minilm if args.model == "minilm" else realmodels.export_smollm2
    calib = realmodels.minilm_calib if args.model == "minilm" else realmodels.smollm2_calib
    print(export(out, force=args.force))
    print(calib(out / f"{args.model}_calib.npz"))
    return 0


@_cli("fq-eval")
def eval_main(argv=None):
    p = argparse.ArgumentParser(
        prog="fq-eval", description="Evaluate a compiled artifact (or an .onnx file, with ONNX Runtime) on "
        "the real model's task: MiniLM similarity/polarity metrics, SmolLM2 perplexity on Pride and Prejudice.")
    p.add_argument("model", choices=MODELS)
    p.add_argument("artifact", help="artifact directory from fq-compile, or an .onnx file")
    p.add_argument("--windows", type=int, default=4, help="SmolLM2: number of token windows (default 4)")
    p.add_argument("--window", type=int, default=512, help="SmolLM2: tokens per window (default 512)")
    args = p.parse_args(argv)
    from .evaluate import artifact_runner, evaluate_minilm, evaluate_smollm2, ort_runner

    path = Path(args.artifact)
    run = ort_runner(path) if path.suffix == ".onnx" else artifact_runner(path)
    if args.model == "minilm":
        result = evaluate_minilm(run)
        result.pop("lee_embeddings", None)
    else:
        result = evaluate_smollm2(run, args.windows, args.window)
    print(json.dumps(result, indent=2))
    return 0
