"""`fq-demo`: the main job on an embedded default. With the MiniLM wheel installed: export
all-MiniLM-L6-v2, calibrate, compile fp32 / int8 / fq2 r=1.1 for this machine and print accuracy
and latency side by side. Otherwise (or with --builtin): export a small transformer encoder,
compile it, run it at two batch/sequence sizes and compare with ONNX Runtime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .cli import Parser, _cli


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


LEGEND = [
    "scheme     how the dense layers' weights are stored (fp32: unchanged; int8; fq2: FrameQuant 2-bit, r = 1.1)",
    "bits/w     stored bits per weight of the dense layers, scales included (lower is better: a smaller model)",
    "MB         artifact size on disk (lower is better; the embedding table stays fp32 in all three)",
    "Lee        Spearman correlation with human ratings of 50 document pairs (higher is better)",
    "WordSim    Spearman correlation with WordSim353 word-pair ratings (higher is better)",
    "cos fp32   mean cosine of the document embeddings to the fp32 artifact's (higher is better, 1 = same)",
    "50 docs s  seconds to embed the 50 Lee documents on this machine (lower is better)",
]


def run_minilm_demo(work: Path, target: str) -> None:
    """MiniLM fp32 / int8 / fq2 r=1.1 compiled for `target`: accuracy and latency side by side,
    then the same documents through ONNX Runtime, and a verdict in words."""
    from .evaluate import evaluate_minilm, ort_runner
    from .realmodels import export_minilm
    from .report import minilm_rows

    print("all-MiniLM-L6-v2: export, calibrate on Wikipedia, compile fp32 / int8 / fq2, evaluate")
    rows = minilm_rows(work, ["fp32", "int8", "fq2"], target, metrics=("lee", "wordsim353"))
    ort = evaluate_minilm(ort_runner(export_minilm(work)), metrics=("lee",))
    ort_row = {"lee_spearman": ort["lee_spearman"], "lee_s": ort["seconds"]["lee"]}
    print(f"\n{'scheme':8}{'bits/w':>8}{'MB':>7}{'Lee':>8}{'WordSim':>9}{'cos fp32':>10}{'50 docs s':>11}")
    for r in rows:
        print(f"{r['scheme']:8}{r['bits']:8.2f}{r['size_mb']:7.1f}{r['lee_spearman']:8.4f}{r['wordsim353']:9.4f}"
              f"{r.get('cos_to_reference', 1.0):10.4f}{r['lee_s']:11.2f}")
    print(f"{'ORT fp32':8}{'':8}{'':7}{ort_row['lee_spearman']:8.4f}{'':9}{'':10}{ort_row['lee_s']:11.2f}")
    print("\n" + "\n".join(LEGEND))
    print("\n" + verdict(rows, ort_row))


def verdict(rows: list, ort: dict | None = None) -> str:
    """fq2 against fp32 and int8 (and ONNX Runtime fp32 on the same documents) in words."""
    by = {r["scheme"]: r for r in rows}
    fp32, int8, fq2 = by["fp32"], by["int8"], by["fq2"]
    lines = [f"fq2 stores dense weights in {fq2['bits']:.2f} bits instead of 32: the artifact is "
             f"{fq2['size_mb']:.1f} MB against {fp32['size_mb']:.1f} MB for fp32 and {int8['size_mb']:.1f} MB "
             f"for int8.",
             f"Accuracy: Lee {fq2['lee_spearman']:.4f} against {fp32['lee_spearman']:.4f} (fp32) and "
             f"{int8['lee_spearman']:.4f} (int8), {_change(fq2['lee_spearman'], fp32['lee_spearman'])} fp32; "
             f"embeddings keep a cosine of {fq2.get('cos_to_reference', 1.0):.3f} to fp32's.",
             f"Speed: {fq2['lee_s']:.2f} s for the 50 documents, {_times(fq2['lee_s'], fp32['lee_s'])} fp32 "
             f"and {_times(fq2['lee_s'], int8['lee_s'])} int8"
             + (f", {_times(fq2['lee_s'], ort['lee_s'])} ONNX Runtime fp32 (Lee {ort['lee_spearman']:.4f})."
                if ort else ".")]
    return "\n".join(lines)


def _change(value: float, reference: float) -> str:
    if reference == 0:
        return "compared with"
    delta = 100 * (value - reference) / abs(reference)
    return f"{abs(delta):.1f}% {'below' if delta < 0 else 'above'}"


def _times(seconds: float, reference: float) -> str:
    """'1.8x faster than' / '1.3x slower than' / 'as fast as'."""
    if seconds <= 0 or reference <= 0 or abs(seconds / reference - 1) < 0.05:
        return "as fast as"
    if seconds < reference:
        return f"{reference / seconds:.1f}x faster than"
    return f"{seconds / reference:.1f}x slower than"


def next_steps(work: Path | None) -> str:
    where = (f"The ONNX file and the artifacts are kept in {work}." if work else
             "The ONNX file and the artifacts were in a temporary directory, now deleted; "
             "fq-demo --keep DIR keeps them in DIR.")
    return (f"{where}\nNext, your own model: fq-compile model.onnx --scheme fq2 --calib calib.npz -o model.fq2 "
            f"&& fq-run model.fq2 --input inputs.npz (calib.npz: sample inputs keyed by input name)")


@_cli("fq-demo")
def main(argv=None):
    p = Parser(prog="fq-demo", description=__doc__)
    p.add_argument("--target", default="host", help="target preset (default: host)")
    p.add_argument("--keep", metavar="DIR", help="keep the ONNX file and the artifacts in DIR (default: a temporary "
                                                 "directory, deleted at the end)")
    p.add_argument("--builtin", action="store_true", help="the small built-in encoder, even if MiniLM is installed")
    args = p.parse_args(argv)
    if not args.builtin and minilm_installed():
        with tempfile.TemporaryDirectory() as tmp:
            run_minilm_demo(Path(args.keep or tmp), args.target)
        print(next_steps(args.keep))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        worst = run_demo(work, args.target)
    ok = worst < 1e-4
    print("(max relative error: largest |ours - ORT| over the largest |ORT| output; lower is better)")
    print(f"{'OK' if ok else 'MISMATCH'}: the compiled model {'matches' if ok else 'does not match'} "
          f"ONNX Runtime (worst max relative error {worst:.2e}, bound 1e-4)")
    print(next_steps(args.keep))
    return 0 if ok else 1
