"""`fq-report`: compile a real model under several schemes, evaluate every compiled artifact, and
write a markdown table (+ a PNG plot of each metric against bits per weight).

    fq-report minilm --work ~/.cache/fq-tvm/report -o report.md --plot report.png
    fq-report smollm2 --work ~/.cache/fq-tvm/report -o smollm2.md --plot smollm2.png

MiniLM: every figure comes from a compiled artifact run by fq-tvm. SmolLM2: the compiled artifact is
run on a bounded set of windows (2 x 512 tokens by default, minutes on 2 cores), a float simulation
of the same codes (ONNX Runtime on the effective weights) on the same windows must agree with it,
and the simulation then covers more windows (16 x 512 by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import _cli
from .errors import FqError

SCHEMES = ["fp32", "int8", "fq4", "rtn2", "gptq2", "had2", "fq2r1", "fq2"]
LABELS = {"had2": "Hadamard-only 2-bit", "fq2r1": "fq2 r=1.0", "fq2": "fq2 r=1.1"}
MINILM_METRICS = [("lee_spearman", "Lee Spearman"), ("wordsim353", "WordSim353"),
                  ("simlex999", "SimLex999"), ("polarity_accuracy", "polarity acc."),
                  ("cos_to_reference", "cos to fp32")]


def _artifact_facts(path: Path) -> dict:
    import json

    manifest = json.loads((path / "manifest.json").read_text())
    weights = manifest["weights"]
    return {"bits": weights.get("quantized_dense_bits_per_weight", 32.0),
            "size_mb": sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6}


def _keep(rows: list, row: dict, schemes, quiet: bool) -> None:
    """Print the row's figures (unless quiet) and keep it if its scheme was asked for (fp32 always
    runs first as the reference)."""
    if not quiet:
        print(f"{row['scheme']:6} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
              file=sys.stderr, flush=True)
    if row["scheme"] in schemes:
        rows.append(row)


def minilm_rows(work: Path, schemes=SCHEMES, target: str = "host", metrics=None, quiet: bool = False) -> list:
    """One dict per scheme: scheme, bits, size_mb, compile_s, the MiniLM metrics, eval_s."""
    from . import compile as compile_model
    from .compiler import uses_calibration
    from .evaluate import artifact_runner, evaluate_minilm
    from .realmodels import export_minilm, minilm_calib

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = export_minilm(work)
    calib = work / "minilm_calib.npz"
    if not calib.exists():
        minilm_calib(calib)
    metrics = metrics or ("lee", "wordsim353", "simlex999", "polarity")
    rows, reference = [], None
    for scheme in (["fp32"] + [s for s in schemes if s != "fp32"]):
        t0 = time.perf_counter()
        out = compile_model(onnx_path, target, work / f"minilm.{scheme}", scheme=scheme, force=True, quiet=True,
                            calib=calib if uses_calibration(scheme) else None)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate_minilm(artifact_runner(out), reference_embeddings=reference, metrics=metrics)
        if scheme == "fp32":
            reference = result["lee_embeddings"]
            result["cos_to_reference"] = 1.0
        row = {"scheme": scheme, **_artifact_facts(out), "compile_s": compile_s,
               "eval_s": time.perf_counter() - t0, "lee_s": result["seconds"].get("lee", float("nan")),
               **{k: v for k, v in result.items() if k not in ("lee_embeddings", "seconds")}}
        _keep(rows, row, schemes, quiet)
    return rows


SMOLLM2_METRICS = [("ppl_compiled", "ppl compiled"), ("ppl_sim_same", "ppl simulated (same windows)"),
                   ("ppl_sim", "ppl simulated"), ("ppl_ratio", "ppl / fp32"),
                   ("sim_agreement", "compiled vs simulated")]
NOT_PLOTTED = {"sim_agreement", "ppl_sim_same", "ppl_ratio"}
SIM_TOLERANCE = 0.01  # relative perplexity difference allowed between artifact and simulation


def smollm2_rows(work: Path, schemes=SCHEMES, target: str = "host", compiled_windows: int = 2,
                 sim_windows: int = 16, window: int = 512, quiet: bool = False) -> list:
    """One dict per scheme: scheme, bits, size_mb, compile_s, ppl_compiled (the artifact on the
    first `compiled_windows` windows), ppl_sim_same (simulation, same windows), ppl_sim (simulation,
    `sim_windows` windows), ppl_ratio (ppl_sim / fp32's), sim_agreement (|compiled / sim - 1|)."""
    import onnx

    from . import compile as compile_model
    from . import onnx_io
    from .compiler import uses_calibration
    from .evaluate import artifact_runner, austen_windows, ort_runner, perplexity_of, window_nlls
    from .frontend import prepare
    from .quantize import simulated_model
    from .realmodels import export_smollm2, smollm2_calib, smollm2_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    onnx_path = export_smollm2(work)
    calib = work / "smollm2_calib.npz"
    if not calib.exists():
        smollm2_calib(calib)
    windows = austen_windows(smollm2_tokenizer(), max(compiled_windows, sim_windows), window)
    proto = prepare(onnx_io.load_model(onnx_path))  # what compile quantizes (the records' names)
    rows, fp32_ppl = [], None
    for scheme in (["fp32"] + [s for s in schemes if s != "fp32"]):
        t0 = time.perf_counter()
        records = {}
        # float activations: the check against the float simulation is then exact (<< 1%); what int8
        # activations cost is measured by benchmarks/act_bits_accuracy.py
        out = compile_model(onnx_path, target, work / f"smollm2.{scheme}", scheme=scheme, skip="lm_head", force=True,
                            quiet=True, records=records, act_bits=32,
                            calib=calib if uses_calibration(scheme) else None)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        compiled = window_nlls(artifact_runner(out), windows[:compiled_windows])
        sim_path = work / "smollm2.sim.onnx"
        onnx.save(simulated_model(proto, records), str(sim_path))
        sim = window_nlls(ort_runner(sim_path), windows[:sim_windows])
        row = {"scheme": scheme, **_artifact_facts(out), "compile_s": compile_s,
               "ppl_compiled": perplexity_of(compiled, window),
               "ppl_sim_same": perplexity_of(sim[:compiled_windows], window),
               "ppl_sim": perplexity_of(sim, window), "eval_s": time.perf_counter() - t0,
               "windows": f"{compiled_windows}x{window} compiled, {sim_windows}x{window} simulated"}
        row["sim_agreement"] = abs(row["ppl_compiled"] / row["ppl_sim_same"] - 1)
        if row["sim_agreement"] > SIM_TOLERANCE:
            raise FqError(f"{scheme}: the float simulation (ppl {row['ppl_sim_same']:.4g}) disagrees with the "
                          f"compiled artifact (ppl {row['ppl_compiled']:.4g}) on the same windows; not "
                          f"extending it to more windows")
        fp32_ppl = fp32_ppl or row["ppl_sim"]
        row["ppl_ratio"] = row["ppl_sim"] / fp32_ppl
        _keep(rows, row, schemes, quiet)
    return rows


def markdown(rows: list, metrics=MINILM_METRICS) -> str:
    present = [(key, name) for key, name in metrics if any(key in r for r in rows)]
    head = ["scheme", "bits/weight (dense)", "artifact MB"] + [name for _, name in present]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [LABELS.get(r["scheme"], r["scheme"]), f"{r['bits']:.2f}", f"{r['size_mb']:.1f}"]
        cells += [_number(r[key], key) if key in r else "-" for key, _ in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float, key: str = "") -> str:
    if key == "sim_agreement":
        return f"{value:.1e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"


def plot(rows: list, path: Path, metrics=MINILM_METRICS) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FqError("the plot needs matplotlib: pip install matplotlib") from None
    present = [(key, name) for key, name in metrics if key not in NOT_PLOTTED and any(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
    for ax, (key, name) in zip(axes[0], present):
        for r in rows:
            if key in r:
                ax.scatter(r["bits"], r[key])
                ax.annotate(LABELS.get(r["scheme"], r["scheme"]), (r["bits"], r[key]), fontsize=7)
        ax.set_xscale("log", base=2)
        if key.startswith("ppl"):
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (dense layers)")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_cli("fq-report")
def main(argv=None):
    p = argparse.ArgumentParser(prog="fq-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["minilm", "smollm2"],
                   help="minilm: sentence embeddings (Lee, WordSim353, SimLex999, polarity, cosine to fp32); "
                        "smollm2: perplexity on Pride and Prejudice (needs bash scripts/fetch_data.sh --smollm2)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "fq-tvm" / "report"),
                   help="directory for the ONNX export, calibration data and artifacts")
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--metrics", nargs="+", choices=["lee", "wordsim353", "simlex999", "polarity"],
                   help="MiniLM metrics to compute (default: all)")
    p.add_argument("--windows", type=int, nargs=2, default=[2, 16], metavar=("COMPILED", "SIMULATED"),
                   help="SmolLM2: 512-token windows run by the compiled artifact and by the float "
                        "simulation (default 2 16)")
    p.add_argument("--target", default="host")
    p.add_argument("-o", "--output", help="markdown file to write (default: print)")
    p.add_argument("--plot", help="PNG file for the metric-vs-bits plot")
    args = p.parse_args(argv)
    if args.model == "minilm":
        rows, metrics = minilm_rows(Path(args.work), args.schemes, args.target, args.metrics), MINILM_METRICS
    else:
        rows = smollm2_rows(Path(args.work), args.schemes, args.target, *args.windows)
        metrics = SMOLLM2_METRICS
    table = markdown(rows, metrics)
    if args.output:
        Path(args.output).write_text(table)
    print(table)
    if args.plot:
        plot(rows, Path(args.plot), metrics)
    return 0
