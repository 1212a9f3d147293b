"""`fq-report`: compile a real model under several schemes, evaluate every compiled artifact, and
write a markdown table (+ a PNG plot of each metric against bits per weight).

    fq-report minilm --work ~/.cache/fq-tvm/report -o report.md --plot report.png

Every figure comes from a compiled artifact run by fq-tvm, not from a float simulation.
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


def minilm_rows(work: Path, schemes=SCHEMES, target: str = "host", metrics=None, quiet: bool = False) -> list:
    """One dict per scheme: scheme, bits, size_mb, compile_s, the MiniLM metrics, eval_s."""
    from . import compile as compile_model
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
        out = compile_model(onnx_path, target, work / f"minilm.{scheme}", scheme=scheme, calib=calib,
                            force=True, quiet=True)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = evaluate_minilm(artifact_runner(out), reference_embeddings=reference, metrics=metrics)
        if scheme == "fp32":
            reference = result["lee_embeddings"]
            result["cos_to_reference"] = 1.0
        row = {"scheme": scheme, **_artifact_facts(out), "compile_s": compile_s,
               "eval_s": time.perf_counter() - t0, "lee_s": result["seconds"].get("lee", float("nan")),
               **{k: v for k, v in result.items() if k not in ("lee_embeddings", "seconds")}}
        if not quiet:
            print(f"{scheme:6} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)),
                  file=sys.stderr, flush=True)
        if scheme in schemes:
            rows.append(row)
    return rows


def markdown(rows: list, metrics=MINILM_METRICS) -> str:
    present = [(key, name) for key, name in metrics if any(key in r for r in rows)]
    head = ["scheme", "bits/weight (dense)", "artifact MB"] + [name for _, name in present]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [LABELS.get(r["scheme"], r["scheme"]), f"{r['bits']:.2f}", f"{r['size_mb']:.1f}"]
        cells += [f"{r[key]:.4f}" if key in r else "-" for key, _ in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path, metrics=MINILM_METRICS) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FqError("the plot needs matplotlib: pip install matplotlib") from None
    present = [(key, name) for key, name in metrics if any(key in r for r in rows)]
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.5), squeeze=False)
    for ax, (key, name) in zip(axes[0], present):
        for r in rows:
            if key in r:
                ax.scatter(r["bits"], r[key])
                ax.annotate(LABELS.get(r["scheme"], r["scheme"]), (r["bits"], r[key]), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight (dense layers)")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_cli("fq-report")
def main(argv=None):
    p = argparse.ArgumentParser(prog="fq-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["minilm"], help="which real model (SmolLM2: see docs/real_models.md)")
    p.add_argument("--work", default=str(Path.home() / ".cache" / "fq-tvm" / "report"),
                   help="directory for the ONNX export, calibration data and artifacts")
    p.add_argument("--schemes", nargs="+", default=SCHEMES)
    p.add_argument("--metrics", nargs="+", choices=["lee", "wordsim353", "simlex999", "polarity"])
    p.add_argument("--target", default="host")
    p.add_argument("-o", "--output", help="markdown file to write (default: print)")
    p.add_argument("--plot", help="PNG file for the metric-vs-bits plot")
    args = p.parse_args(argv)
    rows = minilm_rows(Path(args.work), args.schemes, args.target, args.metrics)
    table = markdown(rows)
    if args.output:
        Path(args.output).write_text(table)
    print(table)
    if args.plot:
        plot(rows, Path(args.plot))
    return 0
