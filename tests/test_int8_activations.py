"""The int8 CPU dequant-matmul (schedules/cpu_int8.py): its integer sums against numpy on the
definitions (numerics.activations), the instructions each target gets, and compiled layers
against the numpy inference math with int8 activations."""

import json
import re

import numpy as np
import pytest
import tvm

import fq_tvm
from fq_tvm import models
from fq_tvm.numerics import ACT_GROUP, act_group, quantize_activations
from fq_tvm.numerics.record import apply
from fq_tvm.schedules import cpu_int8, kernels, schedule_func
from conftest import int8_rows_match, max_rel_err, pack_reference

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
X86_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]})
X86_AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
RPI5 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"})
RPI4 = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})


def _layer(rows, cols, bits, group, seed):
    rng = np.random.default_rng(seed)
    ngroups = -(-cols // group) if group else 1
    codes = rng.integers(0, 2**bits, (rows, cols))
    scale = rng.uniform(0.01, 0.1, (rows, ngroups)).astype(np.float32)
    zero = rng.uniform(0, 2**bits - 1, (rows, ngroups)).astype(np.float32)
    g = np.arange(cols) // (group or cols)
    w = (codes - zero[:, g].astype(np.float64)) * scale[:, g]
    return pack_reference(codes, bits), scale, zero, w


def _run(lib, x, packed, scale, zero, rows):
    y = tvm.runtime.tensor(np.zeros((x.shape[0], rows), np.float32))
    lib.mod["main"](*(tvm.runtime.tensor(a) for a in (x, packed, scale, zero)), y)
    return y.numpy()


@pytest.mark.parametrize("group", [150, None])
def test_activation_quantization_definition(group):
    x = np.random.default_rng(0).standard_normal((3, 600)).astype(np.float32)
    x[1, 300:] = 0.0 if group else x[1, 300:]  # an all-zero group stays zero
    x[2] = 0.0
    q = quantize_activations(x, group)
    width = group or 600  # the default: one group for a row this short
    for lo in range(0, 600, width):
        part, qpart = x[:, lo:lo + width], q[:, lo:lo + width]
        step = np.abs(part).max(-1, keepdims=True) / 127
        assert np.all(np.abs(qpart - part) <= step / 2 * (1 + 1e-5) + 1e-12)
        levels = np.divide(qpart, step, out=np.zeros_like(qpart), where=step > 0)
        assert np.allclose(levels, np.rint(levels), atol=1e-3) and np.abs(levels).max() <= 127 + 1e-3
    assert np.all(q[2] == 0) and (group is None or np.all(q[1, 300:] == 0))


@pytest.mark.parametrize("cols, width", [(384, 512), (600, 768), (4096, 4096), (4608, 2304), (11008, 3840)])
def test_activation_groups_split_a_row_evenly(cols, width):
    """The fewest groups of at most ACT_GROUP columns, whole multiples of 256 columns."""
    assert act_group(cols) == width
    assert width % 256 == 0 and width <= ACT_GROUP and -(-cols // width) == -(-cols // ACT_GROUP)


# (rows, cols, bits, group): odd K (the last block re-reads bytes), rows not a multiple of the
# register tile, per-row and grouped scales, an odd count of weight blocks (rows split in tasks)
CASES = [(64, 1000, 2, 0), (30, 577, 2, 0), (64, 1001, 4, 0), (40, 577, 8, 0), (128, 4506, 2, 0),
         (64, 1024, 2, 256), (32, 768, 4, 256), (48, 512, 8, 256), (64, 577, 8, 0), (32, 1003, 2, 0),
         (32, 1003, 8, 0), (64, 1024, 8, 256),  # 8-bit with 32 | rows: pre-laid words
         (192, 700, 2, 0)]  # 3 weight blocks of the many-row path: each block's rows in two tasks


@pytest.mark.parametrize("target", ["host", "avx2"])
@pytest.mark.parametrize("rows, cols, bits, group", CASES)
def test_int8_kernel_equals_numpy_on_the_definitions(rows, cols, bits, group, target):
    """Integer sums are exact: the kernel equals float64 numpy on the quantized activations up to
    float32 rounding of the per-group scaling (an off-by-one code or activation would show as
    ~1e-3). "avx2": the AVX2 ISA (Zen 3 machines), which this AVX-512 host runs too."""
    target = {"host": HOST, "avx2": X86_AVX2}[target]
    plan = cpu_int8.plan(rows, cols, bits, group, target, many_rows=16, words=True)
    assert plan is not None, f"no int8 kernel for {target}"
    lanes = plan.isa.lanes
    assert plan.gemm or rows % lanes, "the many-row path applies wherever one vector of weight rows divides them"
    lib = tvm.compile(tvm.IRModule({"main": cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")}),
                      target)
    packed, scale, zero, w = _layer(rows, cols, bits, group, rows + cols + bits)
    assert plan.prelaid == (bits == 8 and plan.gemm)
    if plan.prelaid:
        packed = cpu_int8.words_layout(packed, plan)
    rng = np.random.default_rng(cols)
    for m in (1, 3, 4, 9, 16, 23):  # 16 rows and more: the many-row path
        x = rng.standard_normal((m, cols)).astype(np.float32)
        x[:, :: 97] *= 8.0  # outliers
        ref = quantize_activations(x, group or None).astype(np.float64) @ w.T
        ours = _run(lib, x, packed, scale, zero, rows)
        assert max_rel_err(ours, ref) < 2e-6, (m, max_rel_err(ours, ref))
        assert max_rel_err(ours, x.astype(np.float64) @ w.T) < 0.1  # int8 activations, unrotated outliers


@pytest.mark.parametrize("target", ["host", "avx2"])
@pytest.mark.parametrize("rows, cols, group, words", [(40, 577, 0, True), (48, 512, 256, True), (32, 1003, 0, True),
                                                     (64, 1024, 256, True), (64, 1000, 0, False)])
def test_int8_kernel_with_7bit_codes_equals_numpy(rows, cols, group, words, target):
    """code_bits 7 (scheme int7): codes below 128 in bytes, so AVX2 multiplies them unsigned
    (offset 0, no sign trick) and the sums stay exact; the kernel equals numpy on every path (few
    rows, many rows from bytes through the decode table, pre-laid words: a tied int7 head whose
    embedding gathers the same codes keeps the bytes)."""
    target = {"host": HOST, "avx2": X86_AVX2}[target]
    plan = cpu_int8.plan(rows, cols, 8, group, target, many_rows=16, words=words, code_bits=7)
    assert plan.prelaid == (words and plan.gemm)
    assert plan.code_bits == 7 and plan.offset == (0 if plan.isa.name == "avx2" else plan.isa.offsets[8])
    lib = tvm.compile(tvm.IRModule({"main": cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")}),
                      target)
    packed, scale, zero, w = _layer(rows, cols, 7, group, rows + cols)
    if plan.prelaid:
        packed = cpu_int8.words_layout(packed, plan)
    rng = np.random.default_rng(cols)
    for m in (1, 3, 16, 23):
        x = rng.standard_normal((m, cols)).astype(np.float32)
        x[:, :: 97] *= 8.0
        ref = quantize_activations(x, group or None).astype(np.float64) @ w.T
        ours = _run(lib, x, packed, scale, zero, rows)
        assert max_rel_err(ours, ref) < 2e-6, (m, max_rel_err(ours, ref))


def test_7bit_codes_drop_the_sign_trick_on_avx2():
    """Byte codes on AVX2: two vpsignb per vpmaddubsw for 8-bit codes, none for 7-bit ones."""
    def asm(code_bits):
        plan = cpu_int8.plan(256, 1024, 8, 0, X86_AVX2, code_bits=code_bits)
        func = cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")
        assert cpu_int8.plan_of(func.attrs, X86_AVX2) == plan
        return tvm.compile(tvm.IRModule({"main": func}), X86_AVX2).mod.inspect_source("asm")

    eight, seven = asm(0), asm(7)
    assert "vpsignb" in eight and "vpsignb" not in seven and re.search(r"vpmaddubsw\s+.*%ymm", seven)


def test_schedule_func_picks_the_int8_variant_only_with_int8_activations():
    func = kernels.dequant_matmul(64, 1000, 2, 1000)
    assert str(schedule_func(func, HOST, act_bits=8).attrs["fq_kernel"]) == cpu_int8.KIND
    assert str(schedule_func(func, HOST, act_bits=32).attrs["fq_kernel"]) == "dequant_matmul"
    short = kernels.dequant_matmul(64, 40, 2, 40)  # 10 bytes a row: shorter than one vector
    assert str(schedule_func(short, HOST, act_bits=8).attrs["fq_kernel"]) == "dequant_matmul"


def _asm(target, bits=2):
    plan = cpu_int8.plan(256, 1024, bits, 0, target)
    func = cpu_int8.dequant_matmul(plan).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target)
    return plan.isa.name, lib.mod.inspect_source("asm")


@pytest.mark.parametrize("bits", [2, 8])
def test_instructions_per_target(bits):
    isa, asm = _asm(X86_VNNI, bits)
    assert isa == "avx512-vnni" and re.search(r"vpdpbusd\s+.*%zmm", asm)
    isa, asm = _asm(X86_AVX2, bits)
    assert isa == "avx2" and re.search(r"vpmaddubsw\s+.*%ymm", asm) and "vpdpbusd" not in asm
    isa, asm = _asm(RPI5, bits)
    assert isa == "neon-dotprod" and re.search(r"\bsdot\s+v\d+\.4s", asm)
    isa, asm = _asm(RPI4, bits)
    assert isa == "neon" and not re.search(r"\b[su]dot\b", asm)
    assert re.search(r"\b[su]m(lal|ull)2?\s+v\d+\.", asm)  # vectorised widening multiplies


@pytest.fixture(scope="module")
def fq2_linear(tmp_path_factory):
    work = tmp_path_factory.mktemp("int8lin")
    onnx_path = models.linear(work / "linear.onnx", 1000, 384, bias=False)
    np.savez(work / "calib.npz", x=np.random.default_rng(0).standard_normal((32, 4, 1000)).astype(np.float32))
    records = {}
    out = fq_tvm.compile(onnx_path, "host", work / "fq2", scheme="fq2", calib=work / "calib.npz", quiet=True,
                         records=records)
    (record,) = records.values()
    return out, record


def test_compiled_fq2_layer_matches_numpy_with_int8_activations(fq2_linear):
    out, record = fq2_linear
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernels"]["act_bits"] == 8
    assert manifest["kernels"]["counts"][cpu_int8.KIND] == 1
    assert "dequant_matmul" not in manifest["kernels"]["counts"]
    assert manifest["kernels"]["counts"].get("unscheduled", 0) == 0
    model = fq_tvm.load(out)
    for shape in ((2, 7, 1000), (1, 70, 1000)):  # 64 rows and more: the many-row path
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        ours = model.run({"x": x})["y"]
        assert int8_rows_match(ours, apply(record, x, act_bits=8)), shape
        assert max_rel_err(ours, apply(record, x)) < 0.05


def test_act_bits_32_keeps_float_activations(fq2_linear, tmp_path):
    out, record = fq2_linear
    onnx_path = out.parent / "linear.onnx"
    float_out = fq_tvm.compile(onnx_path, "host", tmp_path / "fq2f", scheme="fq2", calib=out.parent / "calib.npz",
                               quiet=True, act_bits=32)
    manifest = json.loads((float_out / "manifest.json").read_text())
    assert manifest["kernels"] == {"act_bits": 32, "counts": manifest["kernels"]["counts"]}
    assert manifest["kernels"]["counts"]["dequant_matmul"] == 1
    x = np.random.default_rng(2).standard_normal((3, 1000)).astype(np.float32)[None]
    assert max_rel_err(fq_tvm.load(float_out).run({"x": x})["y"], apply(record, x)) < 1e-4


def test_bad_act_bits_is_one_line(fq2_linear, tmp_path):
    out, _ = fq2_linear
    with pytest.raises(fq_tvm.FqError, match=r"^--act-bits must be one of 8, 32, not 4$"):
        fq_tvm.compile(out.parent / "linear.onnx", "host", tmp_path / "x", act_bits=4)
    assert not (tmp_path / "x").exists()


def _int8_module(n, k, shared_gather=False):
    """A Relax module calling the float dequant-matmul kernel on an 8-bit layer's codes (and, if
    `shared_gather`, a code gather on the same constant, as a tied embedding does)."""
    from tvm import relax

    from fq_tvm.numerics import get_scheme, quantize_layer
    from fq_tvm.quantize import to_packed

    w = np.random.default_rng(n + k).standard_normal((n, k))
    layer = to_packed(quantize_layer("w", w, np.eye(k), get_scheme("int8")))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("m", "int64"), k], "float32"))
    codes, scale, zero = (relax.const(a) for a in (layer.packed, layer.scale, layer.zero))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.add_func(kernels.dequant_matmul(n, k, 8, k, layer.act_group).with_attr("global_symbol", "dq"), "dq")
            y = bb.emit(relax.call_tir(gv, [x, codes, scale, zero], relax.TensorType([x.ty.shape[0], n], "float32")))
            if shared_gather:
                gg = bb.add_func(kernels.code_gather(n, k, 8, k).with_attr("global_symbol", "gather"), "gather")
                ids = relax.const(np.zeros((2,), "int64"))
                g = bb.emit(relax.call_tir(gg, [ids, codes, scale, zero], relax.TensorType([2, k], "float32")))
                y = bb.emit(relax.op.add(y, relax.op.sum(g)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), layer


def test_prelay_stores_8bit_codes_as_the_kernels_words():
    """cpu.rewrite with int8 activations: the 8-bit layer calls the words kernel with its codes
    laid out once (words_layout of the record's codes); numpy's int8 math agrees on the result."""
    from fq_tvm.numerics.record import apply
    from fq_tvm.schedules import cpu

    mod, layer = _int8_module(64, 200)
    assert layer.act_group == 256  # int8 keeps outlier channels: 256-column activation groups
    out = cpu.rewrite(mod, X86_VNNI, 8)  # rewritten, not run: any host can check it
    call = out["main"].body.blocks[0].bindings[0].value
    func = out[call.args[0]]
    assert call.args[0].name_hint == "dq_words" and str(func.attrs["fq_kernel"]) == cpu_int8.KIND
    plan = cpu_int8.plan(64, 200, 8, 0, X86_VNNI, act_cols=256, words=True)
    np.testing.assert_array_equal(call.args[1].fields[1].value.numpy(), cpu_int8.words_layout(layer.packed, plan))
    assert "dq_words" not in [g.name_hint for g in cpu.rewrite(mod, X86_VNNI, 32).get_global_vars()]


def test_prelay_lays_7bit_codes_unsigned_on_avx2():
    """An int7 layer's kernel carries `fq_code_bits`, so AVX2's words hold the codes as they are
    (offset 0) where 8-bit codes are stored less 128."""
    from fq_tvm.schedules import cpu

    mod, layer = _int8_module(64, 200)
    for code_bits, offset in ((0, 128), (7, 0)):
        kernel = kernels.dequant_matmul(64, 200, 8, 200, layer.act_group, code_bits)
        assert int(kernel.attrs.get("fq_code_bits", 0)) == code_bits
        plan = cpu._int8_plan(kernel.attrs, X86_AVX2, words=True)
        assert plan.offset == offset and plan.prelaid
        codes = np.minimum(layer.packed, 127)
        laid = cpu_int8.words_layout(codes, plan).view(np.uint8).reshape(64 // 8, plan.words, 8, 4)
        stored = laid.transpose(0, 2, 1, 3).reshape(64, plan.words * 4)[:, :200]  # [row, column]
        np.testing.assert_array_equal(stored, (codes.astype(int) - offset) & 255)


def test_prelay_only_where_the_isa_gains_from_it():
    """Arm dotprod keeps the byte layout (no board has timed the words); AVX2 lays them out (faster
    on a real Zen 3 at 1, 16 and 128 rows)."""
    from fq_tvm.schedules import cpu

    mod, _ = _int8_module(64, 200)
    assert "dq_words" not in [g.name_hint for g in cpu.rewrite(mod, RPI5, 8).get_global_vars()]
    assert cpu_int8.plan(64, 200, 8, 0, RPI5, words=True).prelaid  # the kernel itself exists
    assert "dq_words" in [g.name_hint for g in cpu.rewrite(mod, X86_AVX2, 8).get_global_vars()]


def test_prelay_leaves_codes_that_a_gather_also_reads():
    """A tied table (gathered as the embedding, multiplied as the head) keeps its byte layout."""
    from fq_tvm.schedules import cpu

    mod, _ = _int8_module(64, 200, shared_gather=True)
    names = [g.name_hint for g in cpu.rewrite(mod, X86_VNNI, 8).get_global_vars()]
    assert "dq" in names and "dq_words" not in names


def test_compiled_int8_layer_matches_numpy_at_every_row_count(fq2_linear, tmp_path):
    """The int8 scheme (8-bit codes pre-laid as words, 256-column activation groups) end to end."""
    out, _ = fq2_linear
    records = {}
    int8 = fq_tvm.compile(out.parent / "linear.onnx", "host", tmp_path / "int8", scheme="int8", quiet=True,
                          records=records)
    (record,) = records.values()
    model = fq_tvm.load(int8)
    for shape in ((1, 1, 1000), (2, 7, 1000), (1, 70, 1000)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        assert int8_rows_match(model.run({"x": x})["y"], apply(record, x, act_bits=8)), shape


def test_cli_act_bits_choices_are_the_compilers():
    from fq_tvm import cli, tune_cli
    from fq_tvm.numerics import ACT_BITS

    for parser in (cli._compile_parser(), tune_cli._parser()):
        (action,) = [a for a in parser._actions if a.dest == "act_bits"]
        assert tuple(action.choices) == ACT_BITS and action.default == 8


def test_compiled_int7_layer_matches_numpy(fq2_linear, tmp_path):
    """Scheme int7: codes 0..127 stored as bytes (8 bits per weight on disk), the kernel told so
    (`fq_code_bits`), equal to numpy's int8-activation math at every row count."""
    out, _ = fq2_linear
    records = {}
    int7 = fq_tvm.compile(out.parent / "linear.onnx", "host", tmp_path / "int7", scheme="int7", quiet=True,
                          records=records)
    (record,) = records.values()
    assert record.bits == 7 and record.packed.shape == (384, 1000) and record.packed.max() <= 127
    assert record.packed.max() >= 126 and record.packed.min() <= 1  # the whole 7-bit grid is used
    model = fq_tvm.load(int7)
    for shape in ((1, 1, 1000), (2, 7, 1000), (1, 70, 1000)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        ours = model.run({"x": x})["y"]
        assert int8_rows_match(ours, apply(record, x, act_bits=8)), shape
        assert max_rel_err(ours, apply(record, x)) < 0.05  # float activations
