"""Are the int8 products exact on this CPU? ONNX Runtime's dynamic int8 against our int8 build.

    python benchmarks/int8_exactness.py [--work DIR]

Two dense layers y = x @ W^T: weights +-1 (every int8 code +-127: the worst case) and normal
weights (a few codes near +-127: the common case), each with inputs that fill the 8-bit range.
ORT's dynamic int8 (`quantize_dynamic`, QInt8 weights) quantizes x to uint8 and, on x86 without
VNNI, multiplies with `vpmaddubsw`, whose int16 sum of two uint8 x int8 products saturates at
32767 (two products of 255 x 127 make 64770). Our int8 kernel sums pairs of at most 128 x 127
there (`schedules/cpu_int8.py`, `_dot_avx2_signed`), so its integer sums are exact. Prints each
engine's error against float64 numpy, and that of ORT's quantization simulated without
saturation, with the CPU named: on such a CPU a speed comparison of the two int8 engines compares
exact integer sums with saturating ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fq_tvm  # noqa: E402
from fq_tvm.benchmark import compare  # noqa: E402
from fq_tvm.cpuinfo import board_info, describe  # noqa: E402
from ort_baselines import dynamic_int8, fp32_matmul  # noqa: E402


def _layers(n: int = 64, k: int = 256, seed: int = 0) -> dict:
    normal = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    signs = np.sign(normal)
    signs[0] = 1.0  # row 0: every product positive, so every pair saturates in ORT's kernel
    return {"weights +-1": signs, "weights normal": normal}


def _inputs(k: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"ones (uint8 255)": np.ones((1, k), np.float32),
            "uniform [0, 1)": rng.random((4, k), dtype=np.float32),
            "normal": rng.standard_normal((4, k)).astype(np.float32)}


def _ort_unsaturated(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ORT's dynamic int8 numerics in float64 numpy, without saturation: x to uint8 over its range
    (with 0) per tensor, W to int8 per output channel, symmetric."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = (hi - lo) / 255 or 1.0
    zx = np.clip(np.round(-lo / sx), 0, 255)
    xq = np.clip(np.round(x / sx) + zx, 0, 255) - zx
    sw = np.abs(w).max(axis=1) / 127
    wq = np.round(w / sw[:, None])
    return sx * (xq.astype(np.float64) @ wq.T.astype(np.float64)) * sw


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    """fq-bench's measure: max |got - ref| / max |ref|."""
    return compare({"y": got}, {"y": ref})["max_rel_err"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="directory for the ONNX files and our build (default: a temporary one)")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    work = args.work or Path(tempfile.mkdtemp(prefix="fq_int8_exact_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{describe(board_info())}; max |error| / max |y| against float64 numpy")
    print(f"{'layer':<16} {'input':<16} {'ORT int8':>9} {'its numerics, unsaturated':>26} {'fq-tvm int8':>12}")
    for i, (label, w) in enumerate(_layers().items()):
        fp32 = fp32_matmul(work / f"layer{i}.onnx", w)
        ort_int8 = ort.InferenceSession(str(dynamic_int8(work / f"layer{i}.ort_int8.onnx", fp32)),
                                        providers=["CPUExecutionProvider"])
        ours = fq_tvm.load(fq_tvm.compile(fp32, "host", work / f"layer{i}.int8", scheme="int8", quiet=True,
                                          force=True))
        for name, x in _inputs(w.shape[1]).items():
            ref = x.astype(np.float64) @ w.T.astype(np.float64)
            print(f"{label:<16} {name:<16} {_rel(ort_int8.run(None, {'x': x})[0], ref):>9.4f} "
                  f"{_rel(_ort_unsaturated(x, w), ref):>26.4f} {_rel(ours.run({'x': x})['y'], ref):>12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
