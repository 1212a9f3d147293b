"""The Relax passes in TVM's own test style: a Before module, the Expected module written out in
TVMScript, and `tvm.ir.assert_structural_equal` between the pass's output and Expected.

QuantizeDense: the Expected kernels are built here from `schedules.kernels` (not taken from the
pass's output), and every constant (Hadamard signs, frame block, packed codes, scales, zeros) from
the layer's record, so a different kernel, an extra reshape or copy, a constant in the wrong place
or a transform that is not shared makes the modules differ
(test_structural_check_catches_an_unshared_transform checks that the comparison does catch one).
The pass leaves the rewritten matmul's variable as an alias of its last kernel's output (`mm = o`;
the build's CanonicalizeBindings removes it), so Expected writes it too. StoreTiedWeightsOnce runs
on a bound module (weights as constants), as in the compile path.
"""

import re

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fq_tvm.numerics import get_scheme, quantize_layer, seed_for
from fq_tvm.passes.quantize_dense import QuantizeDense
from fq_tvm.passes.tied_weights import StoreTiedWeightsOnce
from fq_tvm.quantize import to_packed
from fq_tvm.schedules import kernels

FQ2 = get_scheme("fq2")


def _layer(name: str, n: int, k: int, input_seed=None):
    """A PackedLinear for a random N x K weight under fq2 (identity Hessian: no calibration)."""
    w = np.random.default_rng(seed_for(name)).standard_normal((n, k))
    return to_packed(quantize_layer(name, w, np.eye(k), FQ2, input_seed=input_seed))


def _kernels(out: tvm.IRModule, **expected) -> dict:
    """Check that the pass's module holds `main` and exactly the `expected` kernels ({name:
    PrimFunc}, built here from schedules.kernels, independently of the pass), each structurally
    equal; return their GlobalVars, for Expected's main to call (at the function level TVM compares
    GlobalVars by identity, so Expected must use the module's own)."""
    assert sorted(gv.name_hint for gv in out.get_global_vars()) == sorted([*expected, "main"])
    for name, func in expected.items():
        tvm.ir.assert_structural_equal(out[name], func.with_attr("global_symbol", name))
    return {name: out.get_global_var(name) for name in expected}


def _check_main(out: tvm.IRModule, main) -> None:
    tvm.ir.assert_structural_equal(out["main"], main.with_attr("global_symbol", "main"))


def _consts(layer):
    """Relax constants of one layer, as the pass binds them: input signs, frame block, packed,
    scale, zero, output signs."""
    return (relax.const(layer.in_rot.signs.astype(np.float32)), relax.const(layer.frame.block.astype(np.float32)),
            relax.const(layer.packed), relax.const(layer.scale), relax.const(layer.zero),
            relax.const(layer.out_rot.signs.astype(np.float32)))


def test_quantize_dense_permute_dims_form():
    """matmul(x, permute_dims(W)) (Gemm transB=1), x [n, 64], W [128, 64]: Hadamard, frame,
    dequant-matmul, inverse Hadamard; no reshape for a 2-D x, no pad or take for power-of-two
    sizes; the bias add stays; W is no longer read."""
    layer = _layer("fc", 128, 64)
    assert (layer.frame.nblk, layer.frame.block.shape, layer.cols, layer.rows) == (4, (18, 16), 72, 128)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32"), w: R.Tensor((128, 64), "float32"),
                 bias: R.Tensor((128,), "float32")) -> R.Tensor(("n", 128), "float32"):
            with R.dataflow():
                wt = R.permute_dims(w, [1, 0])
                mm = R.matmul(x, wt)
                y = R.add(mm, bias)
                R.output(y)
            return y

    rewrite = QuantizeDense({"w": layer})
    out = rewrite(Before)
    assert rewrite.rewritten_params == ["w"] and rewrite.num_input_transforms == 1
    g = _kernels(out, fq_hadamard_64_64=kernels.hadamard(64, 64, False),
                 fq_frame_4x18x16_0=kernels.frame_analysis(4, 16, 18, 0),
                 fq_dequant_matmul_128_72_b2_g72_a256=kernels.dequant_matmul(128, 72, 2, 72, 256),
                 fq_hadamard_inv_128_128=kernels.hadamard(128, 128, True))
    had, frame, dqmm, had_inv = g.values()
    s_in, f_blk, packed, scale, zero, s_out = _consts(layer)

    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), w: R.Tensor((128, 64), "float32"),
             bias: R.Tensor((128,), "float32")) -> R.Tensor(("n", 128), "float32"):
        with R.dataflow():
            h = R.call_tir(had, (x, s_in), out_ty=R.Tensor((n, 64), "float32"))
            f = R.call_tir(frame, (h, f_blk), out_ty=R.Tensor((n, 72), "float32"))
            u = R.call_tir(dqmm, (f, packed, scale, zero), out_ty=R.Tensor((n, 128), "float32"))
            o = R.call_tir(had_inv, (u, s_out), out_ty=R.Tensor((n, 128), "float32"))
            mm = o  # the pass leaves this alias (CanonicalizeBindings drops it in the build)
            y = R.add(mm, bias)
            R.output(y)
        return y

    _check_main(out, main)


def test_quantize_dense_matmul_form_with_reshape_pad_and_take():
    """matmul(x, W) with W [K, N] (torch's dynamo exporter), x [b, s, 48], N = 40: x is flattened
    to [b * s, 48] once, padded to the Hadamard's 64, and the output Hadamard's 64 rows are cut to
    40 before the one reshape back."""
    layer = _layer("proj", 40, 48)
    assert (layer.in_rot.padded, layer.cols, layer.rows, layer.out_rot.padded) == (64, 72, 64, 64)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("b", "s", 48), "float32"),
                 w: R.Tensor((48, 40), "float32")) -> R.Tensor(("b", "s", 40), "float32"):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    rewrite = QuantizeDense({"w": layer})
    out = rewrite(Before)
    assert rewrite.rewritten_params == ["w"] and rewrite.num_input_transforms == 1
    g = _kernels(out, fq_pad_48_64=kernels.pad_last(48, 64),
                 fq_hadamard_64_64=kernels.hadamard(64, 64, False),
                 fq_frame_4x18x16_0=kernels.frame_analysis(4, 16, 18, 0),
                 fq_dequant_matmul_64_72_b2_g72_a256=kernels.dequant_matmul(64, 72, 2, 72, 256),
                 fq_hadamard_inv_64_64=kernels.hadamard(64, 64, True),
                 fq_take_64_40=kernels.take_last(64, 40))
    pad, had, frame, dqmm, had_inv, take = g.values()
    s_in, f_blk, packed, scale, zero, s_out = _consts(layer)

    @R.function
    def main(x: R.Tensor(("b", "s", 48), "float32"),
             w: R.Tensor((48, 40), "float32")) -> R.Tensor(("b", "s", 40), "float32"):
        b = T.int64()
        s = T.int64()
        with R.dataflow():
            x2 = R.reshape(x, R.shape([b * s, 48]))
            p = R.call_tir(pad, (x2,), out_ty=R.Tensor((b * s, 64), "float32"))
            h = R.call_tir(had, (p, s_in), out_ty=R.Tensor((b * s, 64), "float32"))
            f = R.call_tir(frame, (h, f_blk), out_ty=R.Tensor((b * s, 72), "float32"))
            u = R.call_tir(dqmm, (f, packed, scale, zero), out_ty=R.Tensor((b * s, 64), "float32"))
            o = R.call_tir(had_inv, (u, s_out), out_ty=R.Tensor((b * s, 64), "float32"))
            t = R.call_tir(take, (o,), out_ty=R.Tensor((b * s, 40), "float32"))
            y = R.reshape(t, R.shape([b, s, 40]))
            R.output(y)
        return y

    _check_main(out, main)


def _qkv():
    """Q, K and V layers reading one activation: one input seed, as quantize_layers gives them."""
    seed = seed_for("h:in")
    return {name: _layer(name, 64, 64, input_seed=seed) for name in ("wq", "wk", "wv")}


@I.ir_module
class QKV:
    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), wq: R.Tensor((64, 64), "float32"),
             wk: R.Tensor((64, 64), "float32"), wv: R.Tensor((64, 64), "float32")) -> R.Tensor(("n", 64), "float32"):
        with R.dataflow():
            q = R.matmul(x, R.permute_dims(wq, [1, 0]))
            k = R.matmul(x, R.permute_dims(wk, [1, 0]))
            v = R.matmul(x, R.permute_dims(wv, [1, 0]))
            qk = R.add(q, k)
            y = R.add(qk, v)
            R.output(y)
        return y


def _qkv_rewrite():
    layers = _qkv()
    rewrite = QuantizeDense(layers)
    out = rewrite(QKV)
    assert rewrite.rewritten_params == ["wq", "wk", "wv"] and rewrite.num_input_transforms == 1
    g = _kernels(out, fq_hadamard_64_64=kernels.hadamard(64, 64, False),
                 fq_frame_4x18x16_0=kernels.frame_analysis(4, 16, 18, 0),
                 fq_dequant_matmul_192_72_b2_g72_a256=kernels.dequant_matmul(192, 72, 2, 72, 256),
                 fq_hadamard_inv_192_64=kernels.hadamard(192, 64, True))
    return out, layers, g


def _stacked_consts(layers):
    """The three layers' codes, scales, zeros and output signs stacked by rows, q then k then v."""
    parts = [layers[name] for name in ("wq", "wk", "wv")]
    return [relax.const(np.concatenate([getattr(layer, field) for layer in parts]))
            for field in ("packed", "scale", "zero")] + [
        relax.const(np.concatenate([layer.out_rot.signs for layer in parts]).astype(np.float32))]


def test_quantize_dense_qkv_share_one_input_transform():
    """One Hadamard + frame for the three layers, and one dequant-matmul and inverse Hadamard over
    their rows stacked (each keeps its codes, scales and output signs), sliced apart."""
    out, layers, g = _qkv_rewrite()
    had, frame, dqmm, had_inv = g.values()
    s_in, f_blk, *_ = _consts(layers["wq"])
    packed, scale, zero, s_out = _stacked_consts(layers)
    for other in (layers["wk"], layers["wv"]):  # shared means equal: what the pass may reuse
        assert other.input_key() == layers["wq"].input_key()
    assert not np.array_equal(layers["wq"].out_rot.signs, layers["wk"].out_rot.signs)  # output signs differ

    @R.function
    def main(x: R.Tensor(("n", 64), "float32"), wq: R.Tensor((64, 64), "float32"),
             wk: R.Tensor((64, 64), "float32"), wv: R.Tensor((64, 64), "float32")) -> R.Tensor(("n", 64), "float32"):
        n = T.int64()
        with R.dataflow():
            h = R.call_tir(had, (x, s_in), out_ty=R.Tensor((n, 64), "float32"))
            f = R.call_tir(frame, (h, f_blk), out_ty=R.Tensor((n, 72), "float32"))
            u = R.call_tir(dqmm, (f, packed, scale, zero), out_ty=R.Tensor((n, 192), "float32"))
            o = R.call_tir(had_inv, (u, s_out), out_ty=R.Tensor((n, 192), "float32"))
            q = R.strided_slice(o, [1], [0], [64], assume_inbound=True)
            k = R.strided_slice(o, [1], [64], [128], assume_inbound=True)
            v = R.strided_slice(o, [1], [128], [192], assume_inbound=True)
            qk = R.add(q, k)
            y = R.add(qk, v)
            R.output(y)
        return y

    _check_main(out, main)


def test_structural_check_catches_an_unstacked_rewrite():
    """The comparison is not vacuous: Expected with one dequant-matmul and inverse Hadamard per
    layer (the shared input transform kept, otherwise the same numbers) does not match."""
    out, layers, g = _qkv_rewrite()
    had, frame, dqmm, had_inv = g.values()
    s_in, f_blk, *q_consts = _consts(layers["wq"])
    _, _, *k_consts = _consts(layers["wk"])
    _, _, *v_consts = _consts(layers["wv"])

    @R.function(check_well_formed=False)  # the module's kernels are the stacked ones: only structure matters here
    def unstacked(x: R.Tensor(("n", 64), "float32"), wq: R.Tensor((64, 64), "float32"),
                  wk: R.Tensor((64, 64), "float32"), wv: R.Tensor((64, 64), "float32")) -> R.Tensor(("n", 64), "float32"):
        n = T.int64()
        with R.dataflow():
            h = R.call_tir(had, (x, s_in), out_ty=R.Tensor((n, 64), "float32"))
            f = R.call_tir(frame, (h, f_blk), out_ty=R.Tensor((n, 72), "float32"))
            uq = R.call_tir(dqmm, (f, q_consts[0], q_consts[1], q_consts[2]), out_ty=R.Tensor((n, 64), "float32"))
            q = R.call_tir(had_inv, (uq, q_consts[3]), out_ty=R.Tensor((n, 64), "float32"))
            uk = R.call_tir(dqmm, (f, k_consts[0], k_consts[1], k_consts[2]), out_ty=R.Tensor((n, 64), "float32"))
            k = R.call_tir(had_inv, (uk, k_consts[3]), out_ty=R.Tensor((n, 64), "float32"))
            uv = R.call_tir(dqmm, (f, v_consts[0], v_consts[1], v_consts[2]), out_ty=R.Tensor((n, 64), "float32"))
            v = R.call_tir(had_inv, (uv, v_consts[3]), out_ty=R.Tensor((n, 64), "float32"))
            qk = R.add(q, k)
            y = R.add(qk, v)
            R.output(y)
        return y

    with pytest.raises(ValueError, match="StructuralEqual check failed"):
        _check_main(out, unstacked)


def test_layers_stack_only_where_code_format_matches():
    """V with another activation group (or a weight read by two calls) keeps its own dequant-matmul;
    Q and K still stack."""
    import dataclasses

    from fq_tvm.passes import emit

    layers = _qkv()
    layers["wv"] = dataclasses.replace(layers["wv"], act_group=128)
    assert emit.joinable(layers["wq"], layers["wk"]) and not emit.joinable(layers["wq"], layers["wv"])
    text = QuantizeDense(layers)(QKV)["main"].script(show_meta=False)
    assert re.findall(r"R\.call_tir\((fq_dequant_matmul_\w+)", text) == [
        "fq_dequant_matmul_128_72_b2_g72_a256", "fq_dequant_matmul_64_72_b2_g72_a128"]
    assert len(re.findall(r"R\.strided_slice\(", text)) == 2

    @I.ir_module
    class Twice:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32"), wq: R.Tensor((64, 64), "float32"),
                 wk: R.Tensor((64, 64), "float32")) -> R.Tensor(("n", 64), "float32"):
            with R.dataflow():
                q = R.matmul(x, R.permute_dims(wq, [1, 0]))
                k = R.matmul(x, R.permute_dims(wk, [1, 0]))
                q2 = R.matmul(q, R.permute_dims(wq, [1, 0]))
                y = R.add(q2, k)
                R.output(y)
            return y

    text = QuantizeDense({name: layers[name] for name in ("wq", "wk")})(Twice)["main"].script(show_meta=False)
    assert len(re.findall(r"fq_dequant_matmul_64_72", text)) == 3 and "strided_slice" not in text


def test_quantize_dense_different_seeds_do_not_share():
    """A layer on the same activation with another input transform gets its own."""
    layers = _qkv()
    layers["wv"] = _layer("wv", 64, 64, input_seed=seed_for("other:in"))
    rewrite = QuantizeDense(layers)
    rewrite(QKV)
    assert rewrite.num_input_transforms == 2


VOCAB, HIDDEN = 50, 16
TABLE = np.random.default_rng(0).standard_normal((VOCAB, HIDDEN)).astype(np.float32)


def test_store_tied_weights_once():
    """take(E, ids, axis=0) and matmul(h, permute_dims(E)) on one constant E [V, K] become
    permute_dims(take(E^T, ids, axis=1)) and matmul(h, E^T): E^T is the only table left."""
    emb = relax.const(TABLE)

    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor(("b", "s"), "int64")) -> R.Tensor(("b", "s", VOCAB), "float32"):
            with R.dataflow():
                h = R.take(emb, ids, axis=0, mode="fast")
                et = R.permute_dims(emb, [1, 0])
                y = R.matmul(h, et)
                R.output(y)
            return y

    emb_t = relax.const(TABLE.T.copy())

    @R.function
    def expected(ids: R.Tensor(("b", "s"), "int64")) -> R.Tensor(("b", "s", VOCAB), "float32"):
        with R.dataflow():
            cols = R.take(emb_t, ids, axis=1, mode="fast")
            h = R.permute_dims(cols, [1, 2, 0])
            et = emb_t
            y = R.matmul(h, et)
            R.output(y)
        return y

    rewrite = StoreTiedWeightsOnce()
    out = rewrite(Before)
    assert rewrite.tied == 1
    assert [gv.name_hint for gv in out.get_global_vars()] == ["main"]
    tvm.ir.assert_structural_equal(out["main"], expected.with_attr("global_symbol", "main"))


def test_store_tied_weights_leaves_other_uses_alone():
    """A table also used another way (here added to) is not rewritten: the module is unchanged."""
    emb = relax.const(TABLE)

    @I.ir_module
    class Before:
        @R.function
        def main(ids: R.Tensor(("b", "s"), "int64")) -> R.Tensor((VOCAB, HIDDEN), "float32"):
            with R.dataflow():
                h = R.take(emb, ids, axis=0, mode="fast")
                et = R.permute_dims(emb, [1, 0])
                y = R.matmul(h, et)
                z = R.add(emb, emb)
                R.output(z)
            return z

    rewrite = StoreTiedWeightsOnce()
    tvm.ir.assert_structural_equal(rewrite(Before), Before)
    assert rewrite.tied == 0


def test_add_last_logits_slices_the_head_input_to_the_last_position():
    """AddLastLogits: `main` kept; `main_last` computes the first output from h[:, s-1:s] through a
    private head function (the norm's scale and the head matmul, the sequence length bound to 1)
    and drops the full-length head; the chain stops at the op with two tensor operands."""
    from fq_tvm.passes.last_logits import AddLastLogits

    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    g = np.random.default_rng(1).standard_normal(8).astype(np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("b", "s", 8), "float32")):
            with R.dataflow():
                h = R.add(x, x)
                n = R.multiply(h, R.const(g))
                y = R.matmul(n, R.const(w))
                out = (y, h)
                R.output(out)
            return out

    @I.ir_module
    class Expected:  # besides Before's main, unchanged
        @R.function(private=True)
        def last_logits_head(h: R.Tensor(("b", 1, 8), "float32")) -> R.Tensor(("b", 1, 4), "float32"):
            with R.dataflow():
                n = R.multiply(h, R.const(g))
                y = R.matmul(n, R.const(w))
                gv = y
                R.output(gv)
            return gv

        @R.function
        def main_last(x: R.Tensor(("b", "s", 8), "float32")):
            s = T.int64()
            with R.dataflow():
                h = R.add(x, x)
                last = R.strided_slice(h, axes=[1], begin=[s - 1], end=[s], assume_inbound=True)
                y = Expected.last_logits_head(last)
                out = (y, h)
                R.output(out)
            return out

    out = AddLastLogits()(Before)
    tvm.ir.assert_structural_equal(out["main"], Before["main"])
    added = tvm.IRModule({gvar: func for gvar, func in out.functions_items() if gvar.name_hint != "main"})
    tvm.ir.assert_structural_equal(added, Expected)


def test_add_last_logits_leaves_a_module_without_such_a_head():
    from fq_tvm.passes.last_logits import AddLastLogits

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("b", "s", 8), "float32")):
            with R.dataflow():
                y = R.nn.softmax(x, axis=1)  # mixes positions: not a row-wise head
                out = (y,)
                R.output(out)
            return out

    out = AddLastLogits()(Before)
    assert [g.name_hint for g in out.get_global_vars()] == ["main"]


def test_shape_function_stores_are_sorted_by_slot():
    """`ordered_shape_stores` puts the independent stores of Relax's shape functions in heap-slot
    order (VMShapeLower emits them in hash order); other PrimFuncs are left alone."""
    from fq_tvm.schedules import ordered_shape_stores

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def shape_func(H: T.Buffer((T.int64(5),), "int64")):
            H[T.int64(4)] = T.int64(8) * H[T.int64(0)]
            H[T.int64(2)] = H[T.int64(0)] * H[T.int64(1)]
            H[T.int64(3)] = T.int64(4) * H[T.int64(1)]

        @T.prim_func(private=True)
        def other(H: T.Buffer((T.int64(5),), "int64")):
            H[T.int64(4)] = H[T.int64(0)]
            H[T.int64(2)] = H[T.int64(1)]

    @I.ir_module
    class Expected:
        @T.prim_func(private=True)
        def shape_func(H: T.Buffer((T.int64(5),), "int64")):
            H[T.int64(2)] = H[T.int64(0)] * H[T.int64(1)]
            H[T.int64(3)] = T.int64(4) * H[T.int64(1)]
            H[T.int64(4)] = T.int64(8) * H[T.int64(0)]

        @T.prim_func(private=True)
        def other(H: T.Buffer((T.int64(5),), "int64")):
            H[T.int64(4)] = H[T.int64(0)]
            H[T.int64(2)] = H[T.int64(1)]

    tvm.ir.assert_structural_equal(ordered_shape_stores(Before), Expected)


def test_quantize_dense_int7_layer_tells_the_kernel_its_code_bits():
    """An int7 layer (no transforms): its codes as bytes (`bits` 8) and the kernel told that they are
    7-bit (`code_bits`, attr fq_code_bits, name suffix _c7); an int8 layer on the same input does
    not stack with it."""
    import dataclasses

    from fq_tvm.passes import emit

    w = np.random.default_rng(7).standard_normal((64, 48))
    layer = to_packed(quantize_layer("w", w, np.eye(48), get_scheme("int7")))
    assert (layer.bits, layer.code_bits, layer.act_group) == (8, 7, 256) and layer.packed.max() <= 127
    assert not emit.joinable(layer, dataclasses.replace(layer, code_bits=0))

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 48), "float32"), w: R.Tensor((64, 48), "float32")) -> R.Tensor(("n", 64), "float32"):
            with R.dataflow():
                mm = R.matmul(x, R.permute_dims(w, [1, 0]))
                R.output(mm)
            return mm

    out = QuantizeDense({"w": layer})(Before)
    (dqmm,) = _kernels(out, fq_dequant_matmul_64_48_b8_g48_a256_c7=kernels.dequant_matmul(64, 48, 8, 48, 256, 7)).values()
    assert int(out["fq_dequant_matmul_64_48_b8_g48_a256_c7"].attrs["fq_code_bits"]) == 7
    packed, scale, zero = (relax.const(a) for a in (layer.packed, layer.scale, layer.zero))

    @R.function
    def main(x: R.Tensor(("n", 48), "float32"), w: R.Tensor((64, 48), "float32")) -> R.Tensor(("n", 64), "float32"):
        n = T.int64()
        with R.dataflow():
            u = R.call_tir(dqmm, (x, packed, scale, zero), out_ty=R.Tensor((n, 64), "float32"))
            mm = u
            R.output(mm)
        return mm

    _check_main(out, main)
