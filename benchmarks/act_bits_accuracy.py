"""What int8 activations cost in accuracy on the real models: each scheme compiled with
`act_bits` 32 (float activations) and 8 (the int8 kernels), evaluated from the artifacts.

    python benchmarks/act_bits_accuracy.py minilm [--schemes fq2 int8] [--act-bits 32 8] [--work DIR]
    python benchmarks/act_bits_accuracy.py smollm2 [--windows 2]

MiniLM: Lee Spearman and mean cosine to the fp32 artifact on the Lee documents. SmolLM2:
perplexity of the compiled artifact on the first Pride-and-Prejudice windows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import fq_tvm
from fq_tvm import evaluate, realmodels


def minilm(work: Path, schemes, act_bits_list) -> None:
    onnx_path = realmodels.export_minilm(work)
    calib = work / "minilm_calib.npz"
    if not calib.exists():
        realmodels.minilm_calib(calib)
    fp32 = fq_tvm.compile(onnx_path, "host", work / "minilm.fp32", force=True, quiet=True)
    ref = evaluate.evaluate_minilm(evaluate.artifact_runner(fp32), metrics=("lee",))
    print(f"fp32: Lee {ref['lee_spearman']:.4f}", flush=True)
    for scheme in schemes:
        for act_bits in act_bits_list:
            out = fq_tvm.compile(onnx_path, "host", work / f"minilm.{scheme}.a{act_bits}", scheme=scheme,
                                 calib=calib, force=True, quiet=True, act_bits=act_bits)
            t0 = time.perf_counter()
            res = evaluate.evaluate_minilm(evaluate.artifact_runner(out), reference_embeddings=ref["lee_embeddings"],
                                           metrics=("lee",))
            print(f"{scheme} act_bits={act_bits}: Lee {res['lee_spearman']:.4f} cos {res['cos_to_reference']:.4f} "
                  f"({time.perf_counter() - t0:.1f} s for the Lee documents)", flush=True)


def smollm2(work: Path, schemes, windows: int, act_bits_list) -> None:
    onnx_path = realmodels.export_smollm2(work)
    calib = work / "smollm2_calib.npz"
    if not calib.exists():
        realmodels.smollm2_calib(calib)
    tokens = evaluate.austen_windows(realmodels.smollm2_tokenizer(), windows, 512)
    for scheme in schemes:
        for act_bits in act_bits_list:
            out = fq_tvm.compile(onnx_path, "host", work / f"smollm2.{scheme}.a{act_bits}", scheme=scheme,
                                 calib=calib, force=True, quiet=True, act_bits=act_bits, skip="lm_head")
            ppl = evaluate.perplexity_of(evaluate.window_nlls(evaluate.artifact_runner(out), tokens), 512)
            print(f"{scheme} act_bits={act_bits}: ppl {ppl:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["minilm", "smollm2"])
    p.add_argument("--schemes", nargs="+", default=["fq2", "int8"])
    p.add_argument("--work", default=str(Path.home() / ".cache" / "fq-tvm" / "act_bits"))
    p.add_argument("--windows", type=int, default=2, help="SmolLM2 windows of 512 tokens (default 2)")
    p.add_argument("--act-bits", type=int, nargs="+", choices=(8, 32), default=[32, 8],
                   help="activation widths to compile each scheme with (default 32 8)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "minilm":
        minilm(work, args.schemes, args.act_bits)
    else:
        smollm2(work, args.schemes, args.windows, args.act_bits)


if __name__ == "__main__":
    main()
