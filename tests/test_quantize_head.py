"""The tied embedding / LM head quantized (`--quantize-head`, passes/tied_head.py): the table is
stored once as packed codes without an output rotation; the head is a packed linear layer, the
embedding gathers the same code rows, dequantizes them and applies the inverse input transform.

Checked: the numpy reference (numerics.gather_rows) against the record's effective weight; the
pass in TVM's Before / Expected style; the plan and the bad inputs; and compiled toy tied models
(fq2, int8, rtn2) against a numpy evaluation of the same codes, with no fp32 table in the artifact;
the two new kernels (code_gather, frame_synthesis and its CPU variant) against numpy.
"""

import json

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import fq_tvm
from fq_tvm import FqError
from fq_tvm.cli import compile_main, summary, summary_text
from fq_tvm.compiler import ignored_options
from fq_tvm.frontend import prepare
from fq_tvm.numerics import apply, effective_weight, gather_rows, get_scheme, quantize_layer, seed_for
from fq_tvm.passes.tied_head import QuantizeTiedHead
from fq_tvm.quantize import find_tied_head, plan_layers, quantize_layers, scheme_config, to_packed
from fq_tvm.schedules import kernels

VOCAB, HIDDEN = 4096, 256  # 2-bit rows of 256 codes fill one AVX-512 vector (the int8 kernel's minimum)


@pytest.mark.parametrize("scheme", ["fq2", "int8", "rtn2", "gptq2"])
def test_gather_rows_are_rows_of_the_effective_weight(scheme):
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((300, 96)), rng.standard_normal((400, 96))
    record = quantize_layer("t", w, x.T @ x, scheme, output_rotation=False)
    assert record.output_hadamard is None and record.rows == 300
    ids = np.array([[3, 299, 0], [7, 7, 150]])
    assert np.abs(gather_rows(record, ids) - effective_weight(record)[ids]).max() < 1e-9


def test_gather_rows_refuses_an_output_rotation():
    w = np.random.default_rng(1).standard_normal((64, 64))
    with pytest.raises(ValueError, match="output rotation"):
        gather_rows(quantize_layer("t", w, np.eye(64), "fq2"), [0])


# ---- the pass, Before / Expected -------------------------------------------------------------------

V, K = 50, 64


def _head():
    w = np.random.default_rng(seed_for("emb")).standard_normal((V, K))
    return to_packed(quantize_layer("emb", w, np.eye(K), get_scheme("fq2"), output_rotation=False))


@I.ir_module
class Before:
    @R.function
    def main(ids: R.Tensor(("b", "s"), "int64"), h: R.Tensor(("b", "s", K), "float32"),
             emb: R.Tensor((V, K), "float32")) -> R.Tuple(R.Tensor(("b", "s", K), "float32"),
                                                        R.Tensor(("b", "s", V), "float32")):
        with R.dataflow():
            e = R.take(emb, ids, axis=0, mode="fast")
            et = R.permute_dims(emb, [1, 0])
            y = R.matmul(h, et)
            out = (e, y)
            R.output(out)
        return out


def test_quantize_tied_head_structure():
    """The embedding: ids flattened, code gather, frame synthesis, inverse Hadamard, reshape; the
    head: h flattened, Hadamard, frame, dequant-matmul (no output rotation: 50 rows, no padding),
    reshape. One set of packed constants for both; the table parameter is no longer read (as in
    QuantizeDense, main keeps its signature: binding the weights drops it)."""
    layer = _head()
    assert (layer.rows, layer.cols, layer.out_rot) == (V, 72, None)
    rewrite = QuantizeTiedHead({"emb": layer})
    out = rewrite(Before)
    assert rewrite.rewritten == ["emb"]
    expected = {"fq_code_gather_50_72_b2_g72": kernels.code_gather(V, 72, 2, 72),
                "fq_frame_synthesis_4x18x16_0": kernels.frame_synthesis(4, 16, 18, 0),
                "fq_hadamard_inv_64_64": kernels.hadamard(64, 64, True),
                "fq_hadamard_64_64": kernels.hadamard(64, 64, False),
                "fq_frame_4x18x16_0": kernels.frame_analysis(4, 16, 18, 0),
                "fq_dequant_matmul_50_72_b2_g72_a256": kernels.dequant_matmul(V, 72, 2, 72, 256)}
    assert sorted(gv.name_hint for gv in out.get_global_vars()) == sorted([*expected, "main"])
    for name, func in expected.items():
        tvm.ir.assert_structural_equal(out[name], func.with_attr("global_symbol", name))
    gather, synth, had_inv, had, frame, dqmm = (out.get_global_var(name) for name in expected)
    signs = relax.const(layer.in_rot.signs.astype(np.float32))
    block = relax.const(layer.frame.block.astype(np.float32))
    packed, scale, zero = relax.const(layer.packed), relax.const(layer.scale), relax.const(layer.zero)

    @R.function
    def main(ids: R.Tensor(("b", "s"), "int64"), h: R.Tensor(("b", "s", K), "float32"),
             emb: R.Tensor((V, K), "float32")) -> R.Tuple(R.Tensor(("b", "s", K), "float32"), R.Tensor(("b", "s", V), "float32")):
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            flat = R.reshape(ids, R.shape([b * s]))
            codes = R.call_tir(gather, (flat, packed, scale, zero), out_ty=R.Tensor((b * s, 72), "float32"))
            sy = R.call_tir(synth, (codes, block), out_ty=R.Tensor((b * s, 64), "float32"))
            rows = R.call_tir(had_inv, (sy, signs), out_ty=R.Tensor((b * s, 64), "float32"))
            e = R.reshape(rows, R.shape([b, s, K]))
            h2 = R.reshape(h, R.shape([b * s, K]))
            hh = R.call_tir(had, (h2, signs), out_ty=R.Tensor((b * s, 64), "float32"))
            f = R.call_tir(frame, (hh, block), out_ty=R.Tensor((b * s, 72), "float32"))
            u = R.call_tir(dqmm, (f, packed, scale, zero), out_ty=R.Tensor((b * s, V), "float32"))
            y = R.reshape(u, R.shape([b, s, V]))
            out = (e, y)
            R.output(out)
        return out

    tvm.ir.assert_structural_equal(out["main"], main.with_attr("global_symbol", "main"))


def test_a_table_with_another_use_is_left_alone():
    @I.ir_module
    class Other:
        @R.function
        def main(ids: R.Tensor((4,), "int64"), emb: R.Tensor((V, K), "float32")) -> R.Tensor((V, K), "float32"):
            with R.dataflow():
                e = R.take(emb, ids, axis=0, mode="fast")
                z = R.add(emb, emb)
                R.output(z)
            return z

    rewrite = QuantizeTiedHead({"emb": _head()})
    tvm.ir.assert_structural_equal(rewrite(Other), Other)
    assert rewrite.rewritten == []


# ---- plan and bad input ----------------------------------------------------------------------------

def tied_lm(path):
    """models.tied_lm's graph written with onnx.helper (no torch export: seconds saved): ids ->
    Gather(E) -> LayerNorm -> MatMul + bias -> Relu -> MatMul(Transpose(E)) -> logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"head.weight": rng.standard_normal((VOCAB, HIDDEN)), "norm.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
               "norm.bias": 0.1 * rng.standard_normal(HIDDEN), "proj": rng.standard_normal((HIDDEN, HIDDEN)) / 11,
               "proj.bias": 0.1 * rng.standard_normal(HIDDEN)}
    nodes = [helper.make_node("Gather", ["head.weight", "x"], ["embedding"], axis=0, name="embed"),
             helper.make_node("LayerNormalization", ["embedding", "norm.weight", "norm.bias"], ["normed"], axis=-1,
                              epsilon=1e-5, name="norm"),
             helper.make_node("MatMul", ["normed", "proj"], ["mm"], name="proj"),
             helper.make_node("Add", ["mm", "proj.bias"], ["biased"], name="proj_bias"),
             helper.make_node("Relu", ["biased"], ["hidden"], name="relu"),
             helper.make_node("Transpose", ["head.weight"], ["table_t"], perm=[1, 0], name="tied"),
             helper.make_node("MatMul", ["hidden", "table_t"], ["y"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    work = tmp_path_factory.mktemp("qhead")
    path = tied_lm(work / "tied.onnx")
    ids = np.random.default_rng(0).integers(0, VOCAB, (20, 16)).astype(np.int64)
    np.savez(work / "calib.npz", x=ids)
    return work, path


def test_plan_chooses_the_tied_head(tied):
    proto = prepare(onnx.load(str(tied[1])))
    head = find_tied_head(proto)
    assert (head.weight, head.transposed, head.out_features, head.in_features) == ("head.weight", True, VOCAB, HIDDEN)
    plan = plan_layers(proto, cfg=scheme_config("fq2"), quantize_head=True)
    assert plan.tied == {"head.weight"} and head.weight in [layer.weight for layer in plan.chosen]
    assert "head.weight" not in [layer.weight for layer in plan_layers(proto, cfg=scheme_config("fq2")).chosen]


def test_no_tied_head_is_one_clear_error(tied):
    """The tied model without its head (the table only gathered): one line, before any quantizing."""
    proto = prepare(onnx.load(str(tied[1])))
    nodes = proto.graph.node
    del nodes[next(i for i, node in enumerate(nodes) if list(node.output) == ["y"])]
    proto.graph.output[0].name = "hidden"
    with pytest.raises(FqError, match="no tied embedding / LM head") as err:
        plan_layers(proto, cfg=scheme_config("int8"), quantize_head=True)
    assert "\n" not in str(err.value)


def test_fp32_ignores_quantize_head_with_a_warning():
    assert ignored_options(scheme_config("fp32"), {"--quantize-head": True}) == \
        ["--quantize-head is ignored: scheme fp32 does not quantize"]
    assert ignored_options(scheme_config("fp32"), {"--pad-small": True, "--quantize-head": True}) == \
        ["--pad-small and --quantize-head are ignored: scheme fp32 does not quantize"]
    assert ignored_options(scheme_config("int8"), {"--quantize-head": True}) == []


# ---- compiled --------------------------------------------------------------------------------------

def _reference(proto, records: dict, ids, act_bits: int) -> np.ndarray:
    """The toy model (embed, layer norm, proj, relu, head) in numpy on the artifact's codes."""
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    table = records.pop("head.weight")
    (proj,) = records.values()
    e = gather_rows(table, ids)
    h = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
    h = h * weights["norm.weight"] + weights["norm.bias"]
    h = np.maximum(apply(proj, h, act_bits) + weights["proj.bias"], 0)
    return apply(table, h, act_bits)


def _check(out, path, records: dict, scheme: str, act_bits: int) -> None:
    """The artifact's head is quantized at the scheme's bits, computes the numpy reference of its
    codes, gathers with code_gather (the head: the int8 kernel under act_bits 8) and holds no fp32
    table."""
    manifest = json.loads((out / "manifest.json").read_text())
    bits = get_scheme(scheme).bits
    assert manifest["head"]["quantized"] and manifest["head"]["bits"] == bits
    assert [e["weight"] for e in manifest["layers"] if e.get("tied")] == ["head.weight"]
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 7)).astype(np.int64)
    got = fq_tvm.load(out).run({"x": ids})["y"]
    ref = _reference(onnx.load(str(path)), records, ids, act_bits)
    assert np.abs(got - ref).max() < (1e-4 if act_bits == 32 else 2e-2) * np.abs(ref).max()
    counts = manifest["kernels"]["counts"]
    assert counts["code_gather"] == 1 and ("dequant_matmul_int8" in counts) == (act_bits == 8)
    table = 4 * VOCAB * HIDDEN
    assert (out / "model.so").stat().st_size < table * (bits + 1) / 32 + 400_000  # codes, no fp32 table


@pytest.mark.parametrize("scheme,act_bits", [("fq2", 32), ("rtn2", 8)])
def test_compiled_quantized_head_matches_numpy_and_stores_no_fp32_table(tied, scheme, act_bits):
    work, path = tied
    records = {}
    out = fq_tvm.compile(path, "host", work / scheme, scheme=scheme, quiet=True, records=records, act_bits=act_bits,
                         calib=work / "calib.npz" if scheme == "fq2" else None, quantize_head=True)
    _check(out, path, records, scheme, act_bits)


def test_cli_quantize_head_int8(tied, capsys):
    """fq-compile --quantize-head: the JSON summary names the head quantized; int8 (RTN) codes are
    the plan's own, so the reference quantizes them again."""
    work, path = tied
    out = work / "cli-int8"
    argv = [str(path), "--scheme", "int8", "--act-bits", "32", "--quantize-head", "-o", str(out), "--json"]
    assert compile_main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["head"]["quantized"] and info["head"]["scheme"] == "int8" and info["layers_quantized"] == 2
    assert f"tied head quantized (int8, {8 + 64 / HIDDEN:.2f} bits per weight" in summary_text(info)  # + scale, zero
    proto = prepare(onnx.load(str(path)))
    plan = plan_layers(proto, cfg=scheme_config("int8"), quantize_head=True)
    _check(out, path, quantize_layers(proto, plan, scheme_config("int8"), None, progress=False), "int8", 32)



def test_head_scheme_int8_under_fq2(tied):
    """--head-scheme int8: the head at 8 bits (RTN), the body at fq2; both match numpy in int8."""
    work, path = tied
    records = {}
    out = fq_tvm.compile(path, "host", work / "fq2-head-int8", scheme="fq2", quiet=True, records=records,
                         calib=work / "calib.npz", head_scheme="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["scheme"] == "int8"
    assert [e["scheme"] for e in manifest["layers"] if not e.get("tied")] == ["fq2"]
    text = summary_text(summary(out, 1.0))
    assert "1 layer quantized (fq2, " in text and "tied head quantized (int8, " in text
    _check(out, path, records, "int8", 8)


@pytest.mark.parametrize("scheme,head,says", [("fq2", "fp32", "does not quantize"),
                                              ("int8", "fq2", "calibrates, scheme int8 does not"),
                                              ("fq2", "fq3", "unknown scheme 'fq3'")])
def test_bad_head_scheme_is_one_clear_error(tied, scheme, head, says):
    work, path = tied
    with pytest.raises(FqError, match=says):
        fq_tvm.compile(path, "host", work / f"bad-{head}", scheme=scheme, quiet=True, head_scheme=head,
                       calib=work / "calib.npz" if scheme == "fq2" else None)
    assert not (work / f"bad-{head}").exists()

# ---- kernels ---------------------------------------------------------------------------------------

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _run(func, *arrays, out_shape, variant=True):
    from fq_tvm.schedules import schedule_func

    func = schedule_func(func, HOST, act_bits=32) if variant else func.with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), HOST)
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib.mod["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("variant", [True, False])  # the CPU's written kernel, the te form
@pytest.mark.parametrize("nblk, two_l, two_k, tail", [(36, 16, 18, 0), (4, 16, 18, 5)])
def test_frame_synthesis_is_the_transposed_frame(nblk, two_l, two_k, tail, variant):
    from fq_tvm.schedules import schedule_func

    rng = np.random.default_rng(nblk)
    F = rng.standard_normal((two_k, two_l)).astype(np.float32)
    dense = np.zeros((nblk * two_k + tail, nblk * two_l + tail))
    for b in range(nblk):
        dense[b * two_k:(b + 1) * two_k, b * two_l:(b + 1) * two_l] = F
    dense[nblk * two_k:, nblk * two_l:] = np.eye(tail)
    func = kernels.frame_synthesis(nblk, two_l, two_k, tail)
    assert str(schedule_func(func, HOST).attrs["fq_kernel"]) == "frame_synthesis_rows"
    x = rng.standard_normal((5, dense.shape[0])).astype(np.float32)
    ours = _run(func, x, F, out_shape=(5, dense.shape[1]), variant=variant)
    assert np.abs(ours - x.astype(np.float64) @ dense).max() < 1e-4 * np.abs(x @ dense).max()


@pytest.mark.parametrize("bits, group", [(2, 72), (4, 24), (8, 72)])
def test_code_gather_decodes_rows_and_clamps_ids(bits, group):
    from fq_tvm.numerics import pack_codes

    rng = np.random.default_rng(bits)
    rows, cols = 50, 72
    codes = rng.integers(0, 2 ** bits, (rows, cols)).astype(np.uint8)
    scale = rng.random((rows, cols // group)).astype(np.float32)
    zero = rng.random((rows, cols // group)).astype(np.float32)
    ids = np.array([3, 0, 49, 7, 60, -2], np.int64)  # the last two out of range: clamped
    ours = _run(kernels.code_gather(rows, cols, bits, group), ids, pack_codes(codes, bits), scale, zero,
                out_shape=(len(ids), cols))
    rows_read = np.clip(ids, 0, rows - 1)
    g = np.arange(cols) // group
    ref = (codes[rows_read] - zero[rows_read][:, g]) * scale[rows_read][:, g]
    assert np.abs(ours - ref).max() < 1e-5
