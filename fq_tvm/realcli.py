"""`fq-export` and `fq-eval`: the real-model commands (MiniLM, SmolLM2), thin wrappers over
fq_tvm.realmodels and fq_tvm.evaluate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli import _cli
from .errors import FqError
from .realmodels import MINILM_INPUTS

MODELS = ("minilm", "smollm2")


@_cli("fq-export")
def export_main(argv=None):
    p = argparse.ArgumentParser(
        prog="fq-export", description="Export a packaged pretrained model to ONNX, offline, plus a "
        "calibration .npz made from Wikipedia text (never the evaluation text).")
    p.add_argument("model", nargs="?", choices=MODELS)
    p.add_argument("--hf", metavar="MODEL_DIR", help="a Llama-architecture Hugging Face model directory instead of a "
                                                     "packaged model (needs --kv-cache)")
    p.add_argument("--kv-cache", action="store_true", help="causal LMs: export with past/present keys and values "
                   "for fq-generate (MODEL_kv.onnx, tokenizer.json, MODEL_kv_calib.npz)")
    p.add_argument("-o", "--out", default=".", help="directory for MODEL.onnx and MODEL_calib.npz")
    p.add_argument("--force", action="store_true", help="export again even if the file exists")
    p.add_argument("--calib-samples", type=int, metavar="N",
                   help="calibration samples: minilm passages of up to 128 tokens (default 256; 1024 "
                        "raise fq2's cosine to the fp32 embeddings .915 -> .931 at about 2.5x the compile time), "
                        "smollm2 (and --hf) windows of 512 tokens (default 64)")
    args = p.parse_args(argv)
    from . import realmodels

    out = Path(args.out)
    if args.calib_samples is not None and args.calib_samples < 1:
        raise FqError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    if args.kv_cache or args.hf:
        return _export_kv(args, out)
    if not args.model:
        raise FqError(f"no model given: one of {', '.join(MODELS)}, or --hf MODEL_DIR --kv-cache")
    export = realmodels.export_minilm if args.model == "minilm" else realmodels.export_smollm2
    calib = realmodels.minilm_calib if args.model == "minilm" else realmodels.smollm2_calib
    print(export(out, force=args.force))
    print(calib(out / f"{args.model}_calib.npz", **_calib_samples(args)))
    return 0


def _export_kv(args, out: Path) -> int:
    from . import realmodels

    if args.hf and args.model:
        raise FqError("give a packaged model or --hf MODEL_DIR, not both")
    if not args.kv_cache:
        raise FqError("--hf exports causal LMs with a KV cache only: add --kv-cache")
    if args.model == "minilm":
        raise FqError("--kv-cache applies to causal LMs (smollm2, --hf DIR), not minilm")
    if args.hf:
        path = realmodels.export_hf_kv(args.hf, out, force=args.force)
        calib = out / f"{path.stem}_calib.npz"
        print(path)
        print(_hf_calib(path, calib, **_calib_samples(args)))
        return 0
    if not args.model:
        raise FqError("no model given: smollm2, or --hf MODEL_DIR")
    path = realmodels.export_smollm2_kv(out, force=args.force)
    print(path)
    print(realmodels.smollm2_kv_calib(out / "smollm2_kv_calib.npz", path, **_calib_samples(args)))
    return 0


def _calib_samples(args) -> dict:
    """{"n": --calib-samples} for the realmodels calibration writers, or {} for their default."""
    return {} if args.calib_samples is None else {"n": args.calib_samples}


def _hf_calib(path: Path, calib: Path, **n):
    """Wikipedia windows tokenized with the model's tokenizer; skipped (with a note) without gensim."""
    import importlib.util
    import sys

    import onnx

    from . import realmodels
    from .kvcache import read_generation

    if importlib.util.find_spec("gensim") is None:
        print("fq-export: note: no calibration file (the Wikipedia sample needs `pip install gensim`)",
              file=sys.stderr)
        return "(no calibration file)"
    info = read_generation(onnx.load(str(path), load_external_data=False))
    seq = min(512, info["context"])  # positions past the context have no rotary row
    return realmodels.kv_calib(calib, realmodels.text_calib_ids(path.parent / "tokenizer.json", seq=seq, **n), info)


@_cli("fq-eval")
def eval_main(argv=None):
    p = argparse.ArgumentParser(
        prog="fq-eval", description="Evaluate a compiled artifact (or an .onnx file, with ONNX Runtime) on "
        "the real model's task: MiniLM similarity/polarity metrics, SmolLM2 perplexity on Pride and Prejudice.")
    p.add_argument("model", choices=MODELS)
    p.add_argument("artifact", help="artifact directory from fq-compile, or an .onnx file")
    p.add_argument("--windows", type=int, default=4, help="SmolLM2: number of token windows (default 4)")
    p.add_argument("--window", type=int, default=512, help="SmolLM2: tokens per window (default 512)")
    p.add_argument("--reference", metavar="MODEL",
                   help="an .onnx file or artifact to compare with, usually the fp32 export (fq-export's "
                        "MODEL.onnx): MiniLM adds cos_to_reference, the mean cosine of the Lee embeddings "
                        "to the reference's (the README's 'cosine to fp32'); SmolLM2 adds "
                        "reference_perplexity and perplexity_ratio on the same windows")
    args = p.parse_args(argv)
    from .evaluate import evaluate_minilm, evaluate_smollm2

    if args.windows < 1 or args.window < 2:
        raise FqError(f"--windows must be at least 1 and --window at least 2 (got {args.windows} and {args.window})")
    run = _runner(args.artifact, args.model)
    reference = _runner(args.reference, args.model) if args.reference else None
    if args.model == "minilm":
        ref = None if reference is None else evaluate_minilm(reference, metrics=("lee",))["lee_embeddings"]
        result = evaluate_minilm(run, reference_embeddings=ref)
        result.pop("lee_embeddings", None)
    else:
        result = evaluate_smollm2(run, args.windows, args.window, reference=reference)
    print(json.dumps(result, indent=2))
    return 0


# what fq-eval feeds each model and reads back
EVAL_IO = {"minilm": (set(MINILM_INPUTS), "embedding"), "smollm2": ({"input_ids"}, "logits")}


def _runner(path, model: str):
    """A runner of an .onnx file (ONNX Runtime) or an artifact directory (loaded and verified once);
    FqError unless it takes exactly the inputs fq-eval feeds `model` and has the output it reads."""
    from . import load
    from .evaluate import ort_runner, ort_session

    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FqError(f"{path}: no such .onnx file")
        try:
            session = ort_session(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same one line
            raise FqError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
        inputs, outputs = ({v.name for v in vs} for vs in (session.get_inputs(), session.get_outputs()))
        run = ort_runner(path, session=session)
    else:
        loaded = load(path)
        inputs, outputs = ({v["name"] for v in loaded.manifest[k]} for k in ("inputs", "outputs"))
        run = loaded.run
    feeds, output = EVAL_IO[model]
    if inputs != feeds or output not in outputs:
        raise FqError(f"{path}: takes {sorted(inputs)} and gives {sorted(outputs)}; fq-eval {model} feeds "
                      f"{sorted(feeds)} and reads '{output}' (is it the {model} export?)")
    return run
