"""CUDA code generation without a GPU: the fused row transforms against numpy, the GEMV / tiled
choice by row count run on the host, and what a CUDA build holds (both buckets, one kernel per
layer side)."""

import re

import numpy as np
import pytest
import tvm

import fq_tvm
from fq_tvm import models
from fq_tvm.numerics.frames import frame_block
from fq_tvm.numerics.hadamard import fwht
from fq_tvm.schedules import chains, gpu, kernels
from fq_tvm.targets.cuda import nvcc_path

HOST = tvm.target.Target("llvm")


def _run(func, *arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), HOST)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib.mod["main"](*args, out)
    return out.numpy().astype(np.float64)


def _frame(x, F, nblk, tail):
    two_k, two_l = F.shape
    body = x[:, :nblk * two_l].reshape(len(x), nblk, two_l) @ F.T.astype(np.float64)
    return np.concatenate([body.reshape(len(x), -1), x[:, nblk * two_l:nblk * two_l + tail]], axis=1)


def test_input_side_matches_numpy():
    """pad 200 -> 256, Hadamard (block 128) with signs, frame 16 x (16 -> 18) with no tail, pad to
    the coded width 296: one kernel, the numpy fwht and frame block as reference."""
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], 256).astype(np.float32)
    F = frame_block(9, 8).astype(np.float32)
    steps = [("pad", 200, 256), ("hadamard", 256, 128, 0), ("frame", 16, 16, 18, 0), ("pad", 288, 296)]
    func = kernels.transform(steps)
    for m in (1, 7):
        x = rng.standard_normal((m, 200)).astype(np.float32)
        ours = _run(func, x, signs, F, out_shape=(m, 296))
        h = fwht(np.pad(x.astype(np.float64), ((0, 0), (0, 56))) * signs, 128)
        ref = np.pad(_frame(h, F, 16, 0), ((0, 0), (0, 8)))
        assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()


def test_output_side_matches_numpy():
    """Inverse Hadamard (block 64, signs after) then take 300 of 320: one kernel."""
    rng = np.random.default_rng(1)
    signs = rng.choice([-1.0, 1.0], 320).astype(np.float32)
    func = kernels.transform([("hadamard", 320, 64, 1), ("take", 320, 300)])
    x = rng.standard_normal((5, 320)).astype(np.float32)
    ours = _run(func, x, signs, out_shape=(5, 300))
    ref = (fwht(x.astype(np.float64), 64) * signs)[:, :300]
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()


def test_transform_tail_and_unknown_step():
    rng = np.random.default_rng(2)
    F = frame_block(9, 8).astype(np.float32)
    x = rng.standard_normal((3, 4 * 16 + 5)).astype(np.float32)
    ours = _run(kernels.transform([("frame", 4, 16, 18, 5), ("take", 77, 70)]), x, F, out_shape=(3, 70))
    assert np.abs(ours - _frame(x.astype(np.float64), F, 4, 5)[:, :70]).max() < 1e-5
    with pytest.raises(ValueError, match="unknown transform step 'scale'"):
        kernels.transform([("scale", 4, 4)])


@pytest.mark.parametrize("rows, cols, bits", [(40, 1001, 2), (96, 576, 4), (33, 130, 8)])
def test_gemv_and_tiled_forms_match_numpy(rows, cols, bits):
    """Both buckets' kernels built for the host: (q - zero) * scale decoded in the reduction."""
    from conftest import pack_reference

    rng = np.random.default_rng(rows + bits)
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
    zero = rng.uniform(0, 2**bits - 1, (rows, 1)).astype(np.float32)
    w = (codes - zero.astype(np.float64)) * scale
    forms = (kernels.dequant_gemv(rows, cols, bits), kernels.dequant_gemv(rows, cols, bits, gpu.GEMV_THREADS),
             kernels.dequant_matmul_tiled(rows, cols, bits, 32))
    for func in forms:
        for m in (1, 37):
            x = rng.standard_normal((m, cols)).astype(np.float32)
            ours = _run(func, x, pack_reference(codes, bits), scale, zero, out_shape=(m, rows))
            ref = x.astype(np.float64) @ w.T
            assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("rows, cols, bits, splits", [(40, 1001, 2, 3), (96, 576, 4, 1), (33, 130, 8, 2)])
def test_tensor_core_form_matches_numpy_in_float16(rows, cols, bits, splits):
    """The tensor-core kernel (unscheduled, built for the host) computes in float16 products with
    float32 sums: exactly numpy's product of the float16-rounded x and w, to float32 rounding, and
    within float16 rounding of the float64 product."""
    from conftest import pack_reference

    rng = np.random.default_rng(rows * bits)
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
    zero = rng.uniform(0, 2**bits - 1, (rows, 1)).astype(np.float32)
    w = ((codes - zero) * scale).astype(np.float32)
    func = kernels.dequant_matmul_tc(rows, cols, bits, (32, 64, 64), splits)
    for m in (1, 37):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        ours = _run(func, x, pack_reference(codes, bits), scale, zero, out_shape=(m, rows))
        half = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
        assert np.abs(ours - half).max() < 1e-5 * np.abs(half).max()
        exact = x.astype(np.float64) @ w.T
        assert np.linalg.norm(ours - exact) < 2e-3 * np.linalg.norm(exact)


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    """A 200 -> 300 fq2 layer: the input side pads and the output side takes."""
    work = tmp_path_factory.mktemp("cuda_layer")
    onnx = models.linear(work / "lin.onnx", 200, 300, bias=False)
    np.savez(work / "calib.npz", x=np.random.default_rng(0).standard_normal((16, 4, 200)).astype(np.float32))
    return work, onnx


def test_row_dispatch_runs_on_the_host(layer, monkeypatch):
    """The GPU Relax rewrite (fused sides, GEMV up to GEMV_ROWS rows, two tensor-core buckets above) built
    for the host: the plain host build's outputs, to float32 rounding for the GEMV and to float16
    rounding (products of float16 activations and weights) above the threshold."""
    from fq_tvm.schedules import cpu

    work, onnx = layer
    opts = dict(scheme="fq2", calib=work / "calib.npz", quiet=True, force=True, act_bits=32)
    plain = fq_tvm.load(fq_tvm.compile(onnx, "host", work / "plain", **opts))
    monkeypatch.setattr(cpu, "rewrite", gpu.rewrite, raising=False)
    fused = fq_tvm.load(fq_tvm.compile(onnx, "host", work / "fused", **opts))
    rng = np.random.default_rng(3)
    gemv_rows = gpu.GEMV_ROWS[2]
    for rows in (1, gemv_rows, gemv_rows + 1, gpu.SMALL_ROWS, gpu.SMALL_ROWS + 1, 70):
        x = rng.standard_normal((1, rows, 200)).astype(np.float32)
        want, got = plain.run({"x": x})["y"], fused.run({"x": x})["y"]
        tolerance = 1e-5 if rows <= gemv_rows else 2e-3
        assert np.linalg.norm(got - want) < tolerance * np.linalg.norm(want), rows


def _kernels(source: str) -> list[str]:
    return sorted(set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\(", source)))


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed: CUDA device code cannot be built")
def test_cuda_build_holds_every_bucket_and_one_kernel_per_side(layer):
    """The GEMV bucket is one kernel, each tensor-core bucket its kernel plus the sum of its code
    slices (a second kernel only when it has slices), each layer side one kernel; tensor-core
    instructions in the PTX."""
    work, onnx = layer
    out = fq_tvm.compile(onnx, "cuda-sm90", work / "cuda", scheme="fq2", calib=work / "calib.npz",
                         quiet=True, force=True)
    names = _kernels((out / "device.cu").read_text())
    for bucket in ("gemv", "tc16", "tc64"):
        assert any(n.endswith(f"_{bucket}_kernel") for n in names), (bucket, names)
    assert not [n for n in names if re.search(r"_gemv_kernel_\d|_tc\d+_kernel_[2-9]", n)], names
    sides = [n for n in names if n.startswith("fq_pad") or n.startswith("fq_hadamard")]
    assert len(sides) == 2, names  # input side and output side, no per-stage kernels
    assert any("frame" in n for n in sides) and any("take" in n for n in sides)
    assert not [n for n in names if re.search(r"fq_(pad|hadamard|frame|take)\w*_kernel_\d", n)], names
    ptx = (out / "device.ptx").read_text()
    assert ".target sm_90" in ptx
    assert re.search(r"wmma\.mma\.sync\.aligned\.row\.col\.m16n16k16\.f32\.f32", ptx)


def test_cuda_check_rebuilds_transform_arguments():
    """cuda_check times each fused side alone from its kernel name: the steps read back from the
    name, and arguments of the shapes the kernel checks (host build, output against numpy)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cuda_check

    steps = [("hadamard", 320, 64, 1), ("take", 320, 300)]
    assert cuda_check._transform_steps(chains.transform_name(steps)) == steps
    assert cuda_check._transform_steps("fq_hadamard_inv_11008_256") == [("hadamard", 11008, 256, 1)]
    assert cuda_check._transform_steps("fq_dequant_matmul_40_1004_b2_g1004") is None
    x, signs, out = cuda_check._transform_args(steps, 3, np.random.default_rng(4))
    assert out.shape == (3, 300)
    ours = _run(kernels.transform(steps), x, signs, out_shape=out.shape)
    ref = (fwht(x.astype(np.float64), 64) * signs)[:, :300]
    assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()


def test_gemv_schedule_wants_padded_bytes():
    """Without byte_tile (432 codes: 108 bytes, not a multiple of 128) the GPU schedule refuses."""
    import tvm.s_tir as s_tir

    sch = s_tir.Schedule(tvm.IRModule({"main": kernels.dequant_gemv(64, 432, 2)}))
    with pytest.raises(ValueError, match="multiple of 128"):
        gpu.dequant_gemv(sch, None)
    padded = s_tir.Schedule(tvm.IRModule({"main": kernels.dequant_gemv(64, 432, 2, gpu.GEMV_THREADS)}))
    gpu.dequant_gemv(padded, None)
    assert "threadIdx.x" in padded.mod.script()


@pytest.mark.parametrize("rows, cols", [(4096, 4608), (11008, 4608), (1536, 432), (300, 240), (64, 50)])
def test_tensor_core_slices_cover_the_codes_in_whole_steps(rows, cols):
    """Each bucket's slices are whole 64-code steps, none empty, together covering the codes; the
    H100-chosen counts for the 4096 and 11008 layers (8 / 4 and 8 / 1)."""
    for few in (True, False):
        tiles = gpu.tensor_core_tiles(rows, cols, few_rows=few)
        steps = -(-cols // tiles.tile[2])
        per_slice = -(-steps // tiles.splits)
        assert (tiles.splits - 1) * per_slice < steps <= tiles.splits * per_slice
        assert tiles.splits <= (gpu.FEW_ROWS_SLICES if few else steps)
    chosen = {(4096, 4608): (8, 4), (11008, 4608): (8, 1)}
    if (rows, cols) in chosen:
        assert (gpu.tensor_core_tiles(rows, cols, True).splits, gpu.tensor_core_tiles(rows, cols, False).splits) \
            == chosen[rows, cols]


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed: CUDA device code cannot be built")
def test_gated_middle_is_one_cuda_kernel():
    """A gated MLP's middle (inverse Hadamard, swiglu, the down projection's input side; the run
    passes/swiglu.py makes) as the GPU's one transform kernel: it builds for sm_90, one kernel."""
    from fq_tvm.schedules import schedule_func

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    steps = [("hadamard", 768, 128, 1), ("swiglu", 768), ("hadamard", 384, 128, 0), ("frame", 24, 16, 18, 0)]
    func = schedule_func(kernels.transform(steps), target, act_bits=32).with_attr("global_symbol", "gated")
    lib = tvm.compile(tvm.IRModule({"gated": func}), target)
    source = lib.mod.imports[0].inspect_source()
    assert _kernels(source) == ["gated_kernel"], _kernels(source)
