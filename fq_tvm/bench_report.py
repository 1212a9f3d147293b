"""fq-bench's report files: report.json (the whole result), report.md (a table) and report.png
(latency and size bars, accuracy against bits; only when matplotlib is installed)."""

from __future__ import annotations

import json
from pathlib import Path

MB = 1e6


def write_report(directory: Path, result: dict) -> list[str]:
    """Write the report files into `directory`; return their names."""
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / "report.md").write_text(markdown(result))
    names = ["report.md", "report.json"]
    if plot(result, directory / "report.png"):
        names.append("report.png")
    return names


def markdown(result: dict) -> str:
    where = result["board"] or result["host"]["description"]
    lines = [f"# fq-bench: {Path(result['model']).name}", "",
             f"- machine: {where}",
             f"- threads: {result['threads']}",
             f"- eval inputs: {result['eval_inputs']['source']} "
             f"({', '.join(f'{k} {v}' for k, v in result['eval_inputs']['shapes'].items())})",
             f"- date: {result['date']}; fq-tvm {result['versions']['fq_tvm']}, TVM {result['versions']['tvm']}, "
             f"ONNX Runtime {result['versions']['onnxruntime']}", "",
             "Latency: median ms per call over interleaved blocks (p10 / p90); accuracy against ONNX Runtime "
             "fp32 on the eval inputs (max relative error = max |a - b| / max |b|; cosine of the flattened "
             "outputs, worst output). Peak MB: resident memory the build added while it loaded and ran "
             "once (peak above the process before; all builds share one process, so read it as a "
             "comparison).", "",
             "| build | median ms | p10 ms | p90 ms | vs ORT fp32 | size MB | peak MB | bits/weight (dense) "
             "| max rel err | cosine | cos to fq-tvm fp32 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [_line(row) for row in result["rows"]]
    lines += [""] + [f"Note: {note}" for note in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def _line(row: dict) -> str:
    lat = row["latency"]
    ratio = f"{row['vs_ort_fp32_latency']:.2f}x" if row["vs_ort_fp32_latency"] is not None else ""
    bits = f"{row['bits_per_weight']:.2f}"
    if row["dense_bits_per_weight"] is not None:
        bits += f" ({row['dense_bits_per_weight']:.2f})"
    acc = row["vs_ort_fp32"]
    fp32 = f"{row['vs_fp32_build']['cosine']:.6f}" if row["vs_fp32_build"] else ""
    peak = f"{row['peak_bytes'] / MB:.1f}" if row.get("peak_bytes") is not None else ""
    return (f"| {row['label']} | {lat['median_ms']:.3f} | {lat['p10_ms']:.3f} | {lat['p90_ms']:.3f} | {ratio} "
            f"| {row['size_bytes'] / MB:.3f} | {peak} | {bits} | {acc['max_rel_err']:.2e} | {acc['cosine']:.6f} "
            f"| {fp32} |")


def plot(result: dict, path: Path) -> bool:
    """Latency bars (p10-p90 whiskers), size bars, cosine against bits; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    med = [r["latency"]["median_ms"] for r in rows]
    err = [[m - r["latency"]["p10_ms"] for m, r in zip(med, rows)],
           [r["latency"]["p90_ms"] - m for m, r in zip(med, rows)]]
    axes[0].barh(labels, med, xerr=err, color="tab:blue")
    axes[0].set_xlabel("median ms per call (p10-p90)")
    axes[1].barh(labels, [r["size_bytes"] / MB for r in rows], color="tab:gray")
    axes[1].set_xlabel("size on disk, MB")
    for r in rows:
        axes[2].scatter(r["bits_per_weight"], r["vs_ort_fp32"]["cosine"], label=r["label"])
    axes[2].set_xlabel("bits per weight (all weights)")
    axes[2].set_ylabel("cosine to ONNX Runtime fp32")
    axes[2].legend(fontsize=7)
    for ax in axes[:2]:
        ax.invert_yaxis()
    fig.suptitle(f"{Path(result['model']).name}: {result['board'] or result['host']['description']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
