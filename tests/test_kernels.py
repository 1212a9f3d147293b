"""TIR kernels against numpy float64 references, and what the compiler emits for each target."""

import re
import subprocess

import numpy as np
import pytest
import tvm

from fq_tvm.schedules import kernels, schedule_func
from fq_tvm.targets.cuda import nvcc_path
from conftest import pack_reference

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
AARCH64 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
CUDA = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})


def _build(func, target=HOST):
    """The float kernels (act_bits 32); tests/test_int8_kernel.py covers the int8 variant."""
    return tvm.compile(tvm.IRModule({"main": schedule_func(func, target, act_bits=32)}), target)


def _run(lib, *arrays, out_shape):
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib.mod["main"](*args, out)
    return out.numpy()


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


SHAPES = [(576, 576, None), (1536, 576, None), (384, 1000, None), (40, 1001, None),  # per row
          (576, 576, 128), (1536, 576, 128), (384, 1000, 128)]  # groups of 128 (last one partial)


@pytest.mark.parametrize("rows, cols", [(576, 576), (384, 1000), (40, 1001)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_tiled_dequant_matmul_matches_numpy(rows, cols, bits):
    """The GPU form (rows padded to a tile, separate decode stage), built for the CPU: same math."""
    rng = np.random.default_rng(rows + cols + bits)
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, 1)).astype(np.float32)
    zero = rng.uniform(0, 2**bits - 1, (rows, 1)).astype(np.float32)
    w = (codes - zero.astype(np.float64)) * scale
    lib = _build(kernels.dequant_matmul_tiled(rows, cols, bits, 32))
    for m in (1, 37, 64):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        ours = _run(lib, x, pack_reference(codes, bits), scale, zero, out_shape=(m, rows))
        assert _rel(ours, x.astype(np.float64) @ w.T) < 1e-4


def test_cuda_uses_the_tiled_form_for_per_row_layers():
    func = kernels.dequant_matmul(576, 648, 2, 648).with_attr("global_symbol", "f")
    src = _build(func, CUDA).mod.imports[0].inspect_source("")
    assert "w_shared" in src and "xpad_shared" in src  # decoded-code and activation tiles
    grouped = kernels.dequant_matmul(576, 648, 2, 128).with_attr("global_symbol", "g")
    assert "w_shared" not in _build(grouped, CUDA).mod.imports[0].inspect_source("")


@pytest.mark.parametrize("rows, cols, group", SHAPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequant_matmul_matches_numpy(rows, cols, group, bits):
    group = group or cols
    rng = np.random.default_rng(rows + cols + bits)
    ngroups = -(-cols // group)
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, ngroups)).astype(np.float32)
    zero = rng.uniform(0, 2**bits - 1, (rows, ngroups)).astype(np.float32)
    g = np.arange(cols) // group
    w = (codes - zero[:, g].astype(np.float64)) * scale[:, g]
    lib = _build(kernels.dequant_matmul(rows, cols, bits, group))
    for m in (1, 37):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        ours = _run(lib, x, pack_reference(codes, bits), scale, zero, out_shape=(m, rows))
        assert _rel(ours, x.astype(np.float64) @ w.T) < 1e-4


def _sylvester(n):
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


@pytest.mark.parametrize("dim, block", [(12, 4), (8, 8), (64, 64), (576, 64), (256, 32), (384, 128), (1024, 1024),
                                        (1536, 512)])  # radix-4 pairs with and without a last radix-2 stage; 4096: more
@pytest.mark.parametrize("inverse", [False, True])
def test_hadamard_matches_explicit_matrix(dim, block, inverse):
    rng = np.random.default_rng(dim)
    signs = rng.choice([-1.0, 1.0], dim).astype(np.float32)
    big = np.kron(np.eye(dim // block), _sylvester(block))
    matrix = big * signs[None, :] if not inverse else signs[:, None] * big  # H D, or D H
    func = kernels.hadamard(dim, block, inverse)
    assert str(schedule_func(func, HOST).attrs["fq_kernel"]) == "hadamard_rows"  # the CPU variant
    lib = _build(func)
    for m in (1, 37):
        x = rng.standard_normal((m, dim)).astype(np.float32)
        ours = _run(lib, x, signs, out_shape=(m, dim))
        assert _rel(ours, x.astype(np.float64) @ matrix.T) < 1e-5


@pytest.mark.parametrize("nblk, two_l, two_k, tail", [(36, 16, 18, 0), (4, 16, 18, 5), (72, 16, 16, 0), (9, 16, 18, 0),
                                                    (13, 16, 20, 3)])  # 8 or 4 blocks summed by lane trees, and the rest
def test_frame_analysis_matches_block_diagonal(nblk, two_l, two_k, tail):
    rng = np.random.default_rng(nblk)
    F = np.linalg.qr(rng.standard_normal((two_k, two_l)))[0].astype(np.float32)
    dense = np.zeros((nblk * two_k + tail, nblk * two_l + tail))
    for b in range(nblk):
        dense[b * two_k:(b + 1) * two_k, b * two_l:(b + 1) * two_l] = F
    dense[nblk * two_k:, nblk * two_l:] = np.eye(tail)
    func = kernels.frame_analysis(nblk, two_l, two_k, tail)
    assert str(schedule_func(func, HOST).attrs["fq_kernel"]) == "frame_rows"  # the CPU variant
    lib = _build(func)
    for m in (1, 37):
        x = rng.standard_normal((m, dense.shape[1])).astype(np.float32)
        assert _rel(_run(lib, x, F, out_shape=(m, dense.shape[0])), x.astype(np.float64) @ dense.T) < 1e-5


def test_pad_and_take():
    x = np.arange(2 * 60, dtype=np.float32).reshape(2, 60)
    padded = _run(_build(kernels.pad_last(60, 64)), x, out_shape=(2, 64))
    assert np.array_equal(padded[:, :60], x) and not padded[:, 60:].any()
    assert np.array_equal(_run(_build(kernels.take_last(64, 60)), padded, out_shape=(2, 60)), x)


def _matrix_of(steps, params):
    """The dense matrix of a run of row transforms (float64), step by step."""
    width = steps[0][1]
    total, used = np.eye(width), iter(params)
    for step in steps:
        kind = step[0]
        if kind in ("pad", "take"):
            move = np.eye(step[2], width)
        elif kind == "hadamard":
            dim, block, inverse = step[1:]
            big, signs = np.kron(np.eye(dim // block), _sylvester(block)), next(used).astype(np.float64)
            move = signs[:, None] * big if inverse else big * signs[None, :]
        else:
            nblk, two_l, two_k, tail = step[1:]
            F = next(used).astype(np.float64)
            move = np.zeros((nblk * two_k + tail, nblk * two_l + tail))
            for b in range(nblk):
                move[b * two_k:(b + 1) * two_k, b * two_l:(b + 1) * two_l] = F
            move[nblk * two_k:, nblk * two_l:] = np.eye(tail)
        total, width = move @ total, move.shape[0]
    return total


@pytest.mark.parametrize("steps", [
    [("pad", 200, 256), ("hadamard", 256, 128, 0), ("frame", 16, 16, 18, 0), ("pad", 288, 296)],
    [("hadamard", 576, 64, 0), ("frame", 36, 16, 18, 0)],  # SmolLM2's input side
    [("pad", 300, 320), ("hadamard", 320, 64, 0)],
    [("hadamard", 320, 64, 1), ("take", 320, 300)],  # an output side
    [("hadamard", 12, 4, 0), ("frame", 0, 16, 18, 12)]])  # radix-2 Hadamard, frame all tail
def test_fused_row_transforms_match_their_matrix(steps):
    """One CPU kernel for one side of a layer (`cpu_transform`, what `cpu.rewrite` fuses a run
    into), against the product of the steps' matrices."""
    from fq_tvm.schedules import cpu, cpu_transform

    rng = np.random.default_rng(len(steps))
    params = [rng.choice([-1.0, 1.0], s[1]).astype(np.float32) if s[0] == "hadamard"
              else np.linalg.qr(rng.standard_normal((s[3], s[2])))[0].astype(np.float32)
              for s in steps if s[0] in ("hadamard", "frame")]
    matrix = _matrix_of(steps, params)
    func = cpu_transform.transform(steps)
    assert str(func.attrs["fq_kernel"]) in cpu.WRITTEN_SCHEDULED
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)
    given = [p if p.ndim == 1 else p.T for p in params]  # the kernel reads the frame block transposed
    for m in (0, 1, 7):
        x = rng.standard_normal((m, matrix.shape[1])).astype(np.float32)
        ours = _run(lib, x, *given, out_shape=(m, matrix.shape[0]))
        assert ours.shape == (m, matrix.shape[0])
        if m:
            assert _rel(ours, x.astype(np.float64) @ matrix.T) < 1e-5


def _reference(steps, params, x):
    """The steps on x in float64: the linear runs by their matrices, swiglu elementwise."""
    at = next((n for n, s in enumerate(steps) if s[0] == "swiglu"), len(steps))
    linear = sum(s[0] in ("hadamard", "frame") for s in steps[:at])
    y = x.astype(np.float64)
    if at:
        y = y @ _matrix_of(steps[:at], params[:linear]).T
    if at < len(steps):
        half = steps[at][1] // 2
        y = y[:, :half] / (1 + np.exp(-y[:, :half])) * y[:, half:]
        if at + 1 < len(steps):
            y = y @ _matrix_of(steps[at + 1:], params[linear:]).T
    return y


@pytest.mark.parametrize("steps", [
    [("hadamard", 768, 128, 1), ("swiglu", 768), ("hadamard", 384, 128, 0), ("frame", 24, 16, 18, 0)],
    [("hadamard", 320, 64, 1), ("take", 320, 300), ("swiglu", 300)],  # 150 columns: 2 lanes
    [("swiglu", 600), ("pad", 300, 320), ("hadamard", 320, 64, 0)],
    [("swiglu", 36)]])
def test_gated_row_transforms_match_numpy(steps):
    """A gated MLP's middle (gate / up output side, silu(gate) * up, the down projection's input
    side) as one CPU kernel (`cpu_transform`) and as the generic kernel (`kernels.transform`, what
    the GPU runs), against numpy."""
    from fq_tvm.schedules import cpu_transform

    rng = np.random.default_rng(len(steps))
    params = [rng.choice([-1.0, 1.0], s[1]).astype(np.float32) if s[0] == "hadamard"
              else np.linalg.qr(rng.standard_normal((s[3], s[2])))[0].astype(np.float32)
              for s in steps if s[0] in ("hadamard", "frame")]
    x = rng.standard_normal((7, steps[0][1])).astype(np.float32)
    ref = _reference(steps, params, x)
    for func, frame_t in ((cpu_transform.transform(steps), True), (kernels.transform(steps), False)):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)
        given = [p if p.ndim == 1 or not frame_t else p.T for p in params]
        for m in (0, 1, 7):
            ours = _run(lib, x[:m], *given, out_shape=(m, ref.shape[1]))
            assert ours.shape == (m, ref.shape[1])
            if m:
                assert _rel(ours, ref[:m]) < 1e-5, (str(func.attrs["fq_kernel"]), m)


def test_fused_row_transforms_cover_one_side_only():
    from fq_tvm.schedules.cpu_transform import parts, sides

    assert parts([("hadamard", 64, 64, 1), ("hadamard", 64, 64, 0)]) is None
    assert parts([("frame", 4, 16, 18, 0), ("take", 72, 70)]) is None
    assert parts([("pad", 60, 64), ("hadamard", 64, 64, 0), ("take", 64, 60)]) is not None
    assert sides([("hadamard", 64, 64, 1), ("swiglu", 64), ("swiglu", 32)]) is None
    assert sides([("hadamard", 64, 64, 1), ("swiglu", 64), ("frame", 2, 16, 18, 0)]) is None
    assert sides([("hadamard", 64, 64, 1), ("swiglu", 64), ("hadamard", 32, 32, 0)]) is not None


def _asm(target):
    lib = tvm.compile(tvm.IRModule({"main": schedule_func(kernels.dequant_matmul(256, 512, 2, 512), target, act_bits=32)}), target)
    return lib.mod.inspect_source("asm") if not lib.mod.imports else lib.mod.imports[0].inspect_source("asm")


def test_x86_kernel_uses_avx512():  # compiled, not run: any host can check the assembly
    asm = _asm(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"}))
    assert re.search(r"vfmadd\w*ps\s+.*%zmm", asm), "no 512-bit FMA in the dequant-matmul"


def test_aarch64_kernel_uses_neon():
    asm = _asm(AARCH64)
    assert re.search(r"\bfmla\s+v\d+\.4s", asm), "no NEON fmla in the dequant-matmul"


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed")
def test_cuda_kernels_compile_to_sm80_cubin(tmp_path):
    from elf import cuda_sm

    for name, func in [("dq", kernels.dequant_matmul(576, 648, 2, 648)), ("had", kernels.hadamard(576, 64, False))]:
        lib = tvm.compile(tvm.IRModule({"main": schedule_func(func, CUDA, act_bits=32)}), CUDA)
        source = lib.mod.imports[0].inspect_source("")
        assert "threadIdx.x" in source and "__global__" in source
        (tmp_path / f"{name}.cu").write_text(source)
        subprocess.run([nvcc_path(), "--cubin", "-arch=sm_80", "-o", tmp_path / f"{name}.cubin", tmp_path / f"{name}.cu"],
                       check=True, capture_output=True)
        assert cuda_sm(tmp_path / f"{name}.cubin") == 80


def test_kernels_are_written_once_per_arguments():
    """`parsed_once`: equal arguments (defaults applied, lists as tuples, frozen dataclasses with
    dict fields by value) give the same PrimFunc object; other arguments another kernel."""
    from fq_tvm.schedules import cpu_hadamard, cpu_int8, cpu_transform

    assert cpu_hadamard.hadamard(96, 32, False) is cpu_hadamard.hadamard(96, 32, False, lanes=16)
    assert cpu_hadamard.hadamard(96, 32, True) is not cpu_hadamard.hadamard(96, 32, False)
    steps = [("hadamard", 64, 64, 0), ("frame", 16, 4, 4, 0)]
    assert cpu_transform.transform(steps, 16) is cpu_transform.transform(tuple(steps), 16)
    isa = cpu_int8.ISAS[1]
    one, two = (cpu_int8.Plan(64, 128, 2, 0, isa) for _ in range(2))
    assert one is not two and cpu_int8.dequant_matmul(one) is cpu_int8.dequant_matmul(two)
    assert cpu_int8.dequant_matmul(one) is not cpu_int8.dequant_matmul(cpu_int8.Plan(64, 128, 4, 0, isa))


def test_kernels_are_kept_on_disk_for_the_next_process(tmp_path, monkeypatch):
    """`parsed_once` keeps each kernel under FQ_CACHE_DIR/kernels/<digest of the schedule sources>:
    another process (here: a fresh in-process cache) loads it instead of parsing, structurally
    equal; a damaged entry is parsed again; FQ_KERNEL_CACHE=0 or a key that is not plain values
    (an object without a stable repr) writes nothing."""
    import tvm

    from fq_tvm.schedules import common, cpu_int8

    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    parses = []

    def kernel(K: int, isa, lanes: int = 8, tag=None):
        parses.append(K)
        return cpu_int8.dequant_matmul.__wrapped__(cpu_int8.Plan(K, 128, 2, 0, isa))

    isa = cpu_int8.ISAS[1]  # a frozen dataclass holding module-level functions: a plain key
    first = common.parsed_once(kernel)(64, isa)
    files = list((tmp_path / "kernels").glob("*/kernel-*.json"))
    assert len(files) == 1 and parses == [64]
    again = common.parsed_once(kernel)(64, isa, lanes=8)  # a new process's cache
    assert parses == [64] and again is not first
    tvm.ir.assert_structural_equal(again, first)
    files[0].write_text("{broken")
    tvm.ir.assert_structural_equal(common.parsed_once(kernel)(64, isa), first)
    assert parses == [64, 64] and tvm.ir.load_json(files[0].read_text()) is not None  # rewritten

    common.parsed_once(kernel)(64, isa, tag=object())  # no stable key: parsed, not kept
    monkeypatch.setenv("FQ_KERNEL_CACHE", "0")
    common.parsed_once(kernel)(32, isa)
    assert parses == [64, 64, 64, 32] and len(list((tmp_path / "kernels").glob("*/*.json"))) == 1


def test_a_read_only_kernel_cache_is_no_error(tmp_path, monkeypatch):
    """A cache directory that cannot be written (or read): kernels are parsed, nothing fails."""
    import os

    from fq_tvm.schedules import common, cpu_hadamard

    if os.geteuid() == 0:  # root writes anywhere: a file where the directory should be instead
        (tmp_path / "kernels").write_text("not a directory")
    else:
        tmp_path.chmod(0o500)
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    func = common.parsed_once(cpu_hadamard.hadamard.__wrapped__)(96, 32, False)
    assert func is not None and not list(tmp_path.glob("kernels/*/*.json"))
