"""Accuracy sweep of quantization settings on the real models, by float simulation.

    python benchmarks/quality_sweep.py smollm2 --calib 16x256 fq2 fq2r1 "fq2:clip_sigma=1.75"
    python benchmarks/quality_sweep.py minilm --calib 64x128 fq2 "fq2:percdamp=0.1"

A configuration is `scheme[:field=value,...]`: a registered scheme (fq_tvm.numerics.SCHEMES) with
QuantConfig fields overridden (values are Python literals: 0.1, 16, None, True). `fp32` evaluates
the unquantized model. Calibration (`--calib NxSEQ`, several allowed; SmolLM2: N Wikipedia windows
of SEQ tokens, MiniLM: N Wikipedia passages padded to SEQ tokens) runs once per set and its
Hessian sums are cached on disk. Each configuration is quantized exactly as fq_tvm.compile does
(plan_layers, quantize_layers; SmolLM2 skips lm_head), then the simulated model
(fq_tvm.quantize.simulated_model: dense weights = the dequantized effective weights) runs in ONNX
Runtime:
- smollm2: perplexity on Pride and Prejudice, 2 windows x 512 tokens (evaluate.austen_windows);
- minilm: Lee Spearman, WordSim353, SimLex999, polarity accuracy and mean cosine of the Lee
  embeddings to fp32 (evaluate.evaluate_minilm). `--calib NxSEQ+S` adds S short samples (the
  first 1-12 words of other passages, realmodels.short_texts).
`--bits B` chooses per group of layers among redundancies and 4-bit codes within B bits per weight
(fq_tvm.quantize.quantize_allocated, what `fq-compile --bits` does). `--seq` calibrates sequentially (fq_tvm.quantize.quantize_sequential, what `fq-compile --calib-sequential`
does): each layer's Hessian from the model with the layers before it already quantized. Without it
every configuration calibrates on the fp32 model unless it says `sequential=True` (whatever the
scheme's default).
One JSON line per run, printed and appended to WORK/results.jsonl. Work files: --work
(default /tmp/quality).

    python benchmarks/quality_sweep.py synthetic rtn2 gptq2 fq2r1 fq2 "gptq2:guard=False"

`synthetic`: the three small models of issue 14 (fq_tvm.models, random init): an encoder block
of hidden 320 (5 heads, ffn 1280), a Llama-style block of hidden 576 (9 heads, ffn 1536) and the
MLP 1000-768-3072-10 (its 3072 -> 10 layer stays fp32: too small). Inputs (SYNTH_INPUTS): a
low-rank (rank hidden / 4), heavy-tailed (Student-t, 3 degrees of freedom) mixture plus 5% noise,
with hidden / 64 outlier features scaled 8x; calibration 1,000 tokens (125 x 8, the MLP 1000
rows), evaluation 320 tokens of the same distribution, another seed. Metric: relative output error
||y - y_fp32|| / ||y_fp32|| of the float simulation (which the compiled artifacts equal, see
tests/test_quantized_compile.py). `--seeds N --first-seed S` repeats over input seeds (model seed fixed).
`--weights normal` draws the blocks' dense weights from a Gaussian (trained weights' shape) instead of
torch's uniform init.
Per-layer held-out errors of the guard are summarised as `guard` (chosen options counted).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

import numpy as np

from fq_tvm import evaluate, realmodels
from fq_tvm.numerics import HessianStat, model_bits_per_weight
from fq_tvm.quantize import (calibrate_layers, plan_layers, quantize_allocated, quantize_layers, quantize_sequential,
                             scheme_config, simulated_model)

SKIP = {"smollm2": "lm_head", "minilm": None}


def sweep_config(spec: str, seq: bool):
    """The QuantConfig of `spec`; sequential only with --seq or an explicit `sequential=True`."""
    name, overrides = parse_config(spec)
    overrides.setdefault("sequential", bool(seq))
    return scheme_config(name, **overrides)


def parse_config(spec: str):
    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, _, value = item.partition("=")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return name, overrides


def load_model(model: str, work: Path):
    import onnx

    if model == "smollm2":
        path = realmodels.export_smollm2(work / "smollm2")
        return onnx.load(str(path), load_external_data=True)
    path = realmodels.export_minilm(work / "minilm")
    return onnx.load(str(path))


def calib_file(model: str, work: Path, n: int, seq: int, short: int = 0) -> Path:
    path = work / f"{model}.calib.{n}x{seq}{f'+{short}' if short else ''}.npz"
    if not path.exists():
        if model == "smollm2":
            realmodels.smollm2_calib(path, n=n, seq=seq)
        else:
            realmodels.minilm_calib(path, n=n, max_len=seq, short=short)
    return path


def hessians_cached(proto, layers, calib: Path, cache: Path, batch_note: str = "") -> dict:
    if cache.exists():
        with np.load(cache) as data:
            names = json.loads(str(data["__names__"]))
            return {name: HessianStat(data[f"x{i}"], float(data[f"c{i}"]),
                                      data[f"h{i}"] if f"h{i}" in data else None,
                                      float(data[f"hc{i}"]) if f"hc{i}" in data else 0.0)
                    for i, name in enumerate(names)}
    t = time.time()
    stats = calibrate_layers(proto, layers, calib, progress=False)
    names = list(stats)
    arrays = {"__names__": np.array(json.dumps(names))}
    for i, name in enumerate(names):
        arrays[f"x{i}"], arrays[f"c{i}"] = stats[name].xtx, np.array(stats[name].count)
        if getattr(stats[name], "held_xtx", None) is not None:  # the held-out part (numerics.guard)
            arrays[f"h{i}"], arrays[f"hc{i}"] = stats[name].held_xtx, np.array(stats[name].held_count)
    np.savez(cache, **arrays)
    print(f"# calibrated {calib.name}{batch_note} in {time.time() - t:.0f} s -> {cache.name}",
          file=sys.stderr, flush=True)
    return stats


def session_runner(proto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


class Evaluator:
    def __init__(self, model: str, work: Path, proto):
        self.model = model
        if model == "smollm2":
            self.windows = evaluate.austen_windows(realmodels.smollm2_tokenizer(), n_windows=2, window=512)
        else:
            self.tok = realmodels.minilm_tokenizer()
            ref = work / "minilm.fp32_lee.npy"
            if not ref.exists():
                res = evaluate.evaluate_minilm(session_runner(proto), tokenizer=self.tok, metrics=("lee",))
                np.save(ref, res["lee_embeddings"])
            self.reference = np.load(ref)

    def __call__(self, proto) -> dict:
        run = session_runner(proto)
        if self.model == "smollm2":
            return {"ppl": round(evaluate.perplexity(run, self.windows), 3)}
        res = evaluate.evaluate_minilm(run, reference_embeddings=self.reference, tokenizer=self.tok)
        return {k: round(res[k], 4) for k in ("lee_spearman", "wordsim353", "simlex999",
                                               "polarity_accuracy", "cos_to_reference")}


SYNTH_MODELS = {
    "encoder320": lambda path, w: _models().encoder_block(path, hidden=320, heads=5, ffn=1280, weights=w),
    "llama576": lambda path, w: _models().decoder_block(path, hidden=576, heads=9, ffn=1536, weights=w),
    "mlp1000": lambda path, w: _models().mlp_gemm(path, sizes=(1000, 768, 3072, 10)),  # Gaussian already
}


def _models():
    from fq_tvm import models

    return models


def synth_inputs(hidden: int, shape: tuple, seed: int) -> np.ndarray:
    """Low-rank heavy-tailed inputs [*shape, hidden] with a few 8x outlier features. The mixing
    matrix and the outlier features depend on `hidden` only (one distribution per model); the
    samples on `seed`."""
    mix_rng = np.random.default_rng(1000 + hidden)
    rank = max(8, hidden // 4)
    mix = mix_rng.standard_normal((rank, hidden)) / np.sqrt(rank)
    outliers = mix_rng.choice(hidden, max(2, hidden // 64), replace=False)
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    x = rng.standard_t(3, (n, rank)) @ mix + 0.05 * rng.standard_normal((n, hidden))
    x[:, outliers] *= 8.0
    return x.reshape(*shape, hidden).astype(np.float32)


def synthetic_main(args, work: Path):
    import onnx

    for model, build in SYNTH_MODELS.items():
        path = work / (f"{model}.onnx" if args.weights == "uniform" else f"{model}.{args.weights}.onnx")
        if not path.exists():
            build(path, args.weights)
        proto = onnx.load(str(path))
        hidden = proto.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
        two_d = model.startswith("mlp")
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            calib = work / f"{model}.calib.s{seed}.npz"
            cshape, eshape = ((1000,), (320,)) if two_d else ((125, 8), (40, 8))
            np.savez(calib, x=synth_inputs(hidden, cshape, 2 * seed))
            x = synth_inputs(hidden, eshape, 2 * seed + 1)
            ref = session_runner(proto)({"x": x})
            (out_name,) = ref
            plan = plan_layers(proto, None)
            for spec in args.configs:
                cfg = sweep_config(spec, args.seq)
                t, cpu = time.time(), time.process_time()
                if (args.seq or cfg.sequential) and cfg.method != "rtn":
                    records = quantize_sequential(proto, plan, cfg, calib, progress=False)
                else:
                    hess = calibrate_layers(proto, plan.all_uses(plan.chosen), calib, progress=False) \
                        if cfg.method != "rtn" else None
                    records = quantize_layers(proto, plan, cfg, hess, progress=False)
                quant_s, quant_cpu_s = time.time() - t, time.process_time() - cpu
                y = session_runner(simulated_model(proto, records))({"x": x})[out_name]
                err = float(np.linalg.norm(y - ref[out_name]) / np.linalg.norm(ref[out_name]))
                row = {"model": model, "weights": args.weights, "config": spec, "seed": seed,
                       "seq": args.seq or cfg.sequential, "tag": args.tag,
                       "rel_err": round(err, 4),
                       "quant_s": round(quant_s, 1), "quant_cpu_s": round(quant_cpu_s, 1)}
                guards = [getattr(r, "guard", None) for r in records.values()]
                if any(guards):
                    chosen = [g["chosen"] for g in guards if g]
                    row["guard"] = {c: chosen.count(c) for c in dict.fromkeys(chosen)}
                line = json.dumps(row)
                print(line, flush=True)
                with open(work / "results.jsonl", "a") as f:
                    f.write(line + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=("smollm2", "minilm", "synthetic"))
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--calib", action="append", default=None, help="NxSEQ (repeatable)")
    ap.add_argument("--bits", type=float, help="per-group option choice within B bits per weight (fq-compile --bits)")
    ap.add_argument("--seq", action="store_true", help="sequential calibration (layers before quantized)")
    ap.add_argument("--work", default="/tmp/quality")
    ap.add_argument("--tag", default="", help="free text stored with each result")
    ap.add_argument("--seeds", type=int, default=1, help="synthetic: input seeds FIRST..FIRST+N-1")
    ap.add_argument("--first-seed", type=int, default=0, help="synthetic: the first input seed")
    ap.add_argument("--weights", choices=("uniform", "normal"), default="uniform",
                    help="synthetic: the blocks' dense weights, torch's uniform init (issue 14's models) or "
                         "Gaussian (the shape of trained weights; fq_tvm.models.WEIGHTS)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "synthetic":
        return synthetic_main(args, work)
    calibs = args.calib or (["16x256"] if args.model == "smollm2" else ["64x128"])

    proto = load_model(args.model, work)
    plan = plan_layers(proto, SKIP[args.model])
    evaluator = Evaluator(args.model, work, proto)
    for cspec in calibs:
        size, _, short = cspec.lower().partition("+")  # minilm NxSEQ+S: S short samples more
        n, seq = (int(v) for v in size.split("x"))
        short = int(short or 0)
        hess = None
        for spec in args.configs:
            cfg = sweep_config(spec, args.seq)
            t, cpu = time.time(), time.process_time()
            row = {"model": args.model, "config": spec, "calib": cspec, "seq": args.seq or cfg.sequential,
                   "tag": args.tag}
            if cfg.method == "none":
                sim, row["bits"] = proto, 32.0
            else:
                sequential = (args.seq or cfg.sequential) and cfg.method != "rtn"
                if cfg.method != "rtn" and hess is None and (args.bits or not sequential):
                    calib = calib_file(args.model, work, n, seq, short)
                    hess = hessians_cached(proto, plan.chosen, calib, work / f"{args.model}.hess-split.{cspec.lower()}.npz")
                configs = None
                if args.bits:
                    configs, row["allocation"] = quantize_allocated(proto, plan, cfg, hess, args.bits, progress=False)
                if sequential:
                    records = quantize_sequential(proto, plan, cfg, calib_file(args.model, work, n, seq, short), progress=False,
                                                  configs=configs)
                else:
                    records = quantize_layers(proto, plan, cfg, hess if cfg.method != "rtn" else None, progress=False,
                                              configs=configs)
                sim = simulated_model(proto, records)
                row["bits"] = round(model_bits_per_weight(records.values()), 4)
            row["quant_s"] = round(time.time() - t, 1)
            row["quant_cpu_s"] = round(time.process_time() - cpu, 1)  # wall time counts other jobs too
            t = time.time()
            row.update(evaluator(sim))
            row["eval_s"] = round(time.time() - t, 1)
            line = json.dumps(row)
            print(line, flush=True)
            with open(work / "results.jsonl", "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
