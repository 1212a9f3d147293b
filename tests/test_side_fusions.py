"""cpu.rewrite joins the ops around a layer's sides into the side's kernel (Before/Expected, same
results): a residual add after an output side (`add(r, reshape(side(x)))`, either order, maybe
with a bias add between, as in BERT) becomes the side with r as a second input; an RMS norm before an input side (`side(reshape(rms_norm(x,
w)))`) becomes the side normalising each row first. What they cannot take stays: a broadcast
residual, an output side read twice, a norm read twice."""

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from fq_tvm.schedules import cpu, cpu_transform, kernels

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
DIM, KEEP = 64, 48
SIGNS = np.random.default_rng(1).choice([-1.0, 1.0], DIM).astype(np.float32)


BIAS = np.random.default_rng(8).standard_normal(DIM).astype(np.float32)


def _before(take: bool = False, swap: bool = False, residual_shape=None, twice: bool = False, bias: bool = False):
    """x [n, 64] -> inverse Hadamard (-> take 48) -> reshape [1, n, d] (-> add bias) -> add with r."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    d = KEEP if take else DIM
    x = relax.Var("x", relax.TensorType([n, DIM], "float32"))
    r = relax.Var("r", relax.TensorType(residual_shape or [1, n, d], "float32"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            had = bb.add_func(kernels.hadamard(DIM, DIM, True).with_attr("global_symbol", "had"), "had")
            y = bb.emit(relax.call_tir(had, [x, relax.const(SIGNS)], relax.TensorType([n, DIM], "float32")))
            if take:
                cut = bb.add_func(kernels.take_last(DIM, KEEP).with_attr("global_symbol", "take"), "take")
                y = bb.emit(relax.call_tir(cut, [y], relax.TensorType([n, KEEP], "float32")))
            y3 = bb.emit(relax.op.reshape(y, [1, n, d]))
            if bias:  # BERT: the dense's bias, then the residual
                y3 = bb.emit(relax.op.add(relax.const(BIAS[:d]), y3) if swap else relax.op.add(y3, relax.const(BIAS[:d])))
            total = bb.emit(relax.op.add(y3, r) if swap else relax.op.add(r, y3))
            out = bb.emit_output(relax.Tuple([total, y]) if twice else total)
        bb.emit_func_output(out)
    return bb.get()


def _expected(take: bool = False, bias: bool = False):
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    d = KEEP if take else DIM
    x = relax.Var("x", relax.TensorType([n, DIM], "float32"))
    r = relax.Var("r", relax.TensorType([1, n, d], "float32"))
    steps = [("hadamard", DIM, DIM, 1)] + ([("take", DIM, KEEP)] if take else [])
    name = "fq_hadamard_inv_64x64x1" + ("_take_64x48" if take else "") + ("_bias" if bias else "") + "_residual"
    with bb.function("main", [x, r]):
        with bb.dataflow():
            gvar = bb.add_func(cpu_transform.transform(steps, cpu.vector_lanes(HOST), True, bias=bias)
                               .with_attr("global_symbol", name), name)
            flat = bb.emit(relax.op.reshape(r, [n, d]))
            args = [x, relax.const(SIGNS)] + ([relax.const(BIAS[:d])] if bias else []) + [flat]
            total = bb.emit(relax.call_tir(gvar, args, relax.TensorType([n, d], "float32")))
            out = bb.emit_output(bb.emit(relax.op.reshape(total, [1, n, d])))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in arrays))
    return out.numpy() if hasattr(out, "numpy") else [o.numpy() for o in out]


def _names(mod):
    return sorted(g.name_hint for g in mod.get_global_vars())


@pytest.mark.parametrize("take, swap, bias", [(False, False, False), (True, True, False), (False, False, True),
                                             (True, True, True)])
def test_residual_add_joins_the_output_side(take, swap, bias):
    before = _before(take, swap, bias=bias)
    after = cpu.rewrite(before, HOST, 32)
    tvm.ir.assert_structural_equal(after, _expected(take, bias))
    rng = np.random.default_rng(2)
    d = KEEP if take else DIM
    for n in (1, 7):
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        r = rng.standard_normal((1, n, d)).astype(np.float32)
        y = (x @ np.linalg.inv(_hadamard_matrix()).T)[:, :d]  # the side, by its matrix
        np.testing.assert_array_equal(_run(after, x, r), _run(before, x, r))
        np.testing.assert_allclose(_run(after, x, r), r + y[None] + (BIAS[:d] if bias else 0), rtol=1e-5, atol=1e-5)


def _hadamard_matrix():
    """The forward randomized Hadamard of `kernels.hadamard` (one block): H diag(signs) / sqrt(dim)."""
    h = np.array([[1.0]])
    while h.shape[0] < DIM:
        h = np.block([[h, h], [h, -h]])
    return h @ np.diag(SIGNS) / np.sqrt(DIM)


@pytest.mark.parametrize("case", ["broadcast", "twice"])
def test_adds_it_cannot_take_stay(case):
    before = _before(residual_shape=[DIM]) if case == "broadcast" else _before(twice=True)
    after = cpu.rewrite(before, HOST, 32)
    assert not any(name.endswith("_residual") for name in _names(after))
    assert "relax.add" in after["main"].script() or "R.add" in after["main"].script()


FRAME = ("frame", 4, 16, 18, 0)  # 64 -> 72


def _frame_t():
    return np.random.default_rng(3).standard_normal((16, 18)).astype(np.float32)


def _normed_before(twice: bool = False):
    """x [1, n, 64] -> rms_norm -> reshape [n, 64] -> Hadamard -> frame (one run, as cpu.rewrite
    sees it: two kernels)."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, DIM], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            had = bb.add_func(kernels.hadamard(DIM, DIM, False).with_attr("global_symbol", "had"), "had")
            frame = bb.add_func(kernels.frame_analysis(*FRAME[1:]).with_attr("global_symbol", "frame"), "frame")
            normed = bb.emit(relax.op.nn.rms_norm(x, relax.const(WEIGHT), axes=[-1], epsilon=1e-5))
            flat = bb.emit(relax.op.reshape(normed, [n, DIM]))
            h = bb.emit(relax.call_tir(had, [flat, relax.const(SIGNS)], relax.TensorType([n, DIM], "float32")))
            y = bb.emit(relax.call_tir(frame, [h, relax.const(_frame_t().T.copy())], relax.TensorType([n, 72], "float32")))
            out = bb.emit_output(relax.Tuple([y, normed]) if twice else y)
        bb.emit_func_output(out)
    return bb.get()


WEIGHT = np.random.default_rng(4).standard_normal(DIM).astype(np.float32)


def _normed_expected():
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([1, n, DIM], "float32"))
    steps = [("hadamard", DIM, DIM, 0), FRAME]
    name = "fq_rms_norm_1em05_hadamard_64x64x0_frame_4x16x18x0"
    with bb.function("main", [x]):
        with bb.dataflow():
            gvar = bb.add_func(cpu_transform.transform(steps, cpu.vector_lanes(HOST), norm=1e-5)
                               .with_attr("global_symbol", name), name)
            flat = bb.emit(relax.op.reshape(x, [n, DIM]))
            args = [flat, relax.const(SIGNS), relax.const(_frame_t()), relax.const(WEIGHT)]
            y = bb.emit(relax.call_tir(gvar, args, relax.TensorType([n, 72], "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_rms_norm_joins_the_input_side():
    before = _normed_before()
    after = cpu.rewrite(before, HOST, 32)
    tvm.ir.assert_structural_equal(after, _normed_expected())
    rng = np.random.default_rng(6)
    for n in (1, 9):
        x = rng.standard_normal((1, n, DIM)).astype(np.float32) * 3
        ours = _run(after, x)
        np.testing.assert_allclose(ours, _run(before, x), rtol=1e-5, atol=1e-5)  # TVM's lowering of `before`
        normed = x[0] / np.sqrt((x[0].astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5) * WEIGHT
        h = normed @ _hadamard_matrix().T
        ref = np.einsum("nbk,kl->nbl", h.reshape(n, 4, 16), _frame_t()).reshape(n, 72)
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_a_norm_read_twice_stays():
    after = cpu.rewrite(_normed_before(twice=True), HOST, 32)
    assert not any("rms_norm" in name for name in _names(after))
    assert "R.nn.rms_norm" in after["main"].script()


@pytest.mark.parametrize("steps", [[("hadamard", 576, 64, 0), ("frame", 36, 16, 18, 0)],  # SmolLM2's
                                   [("pad", 300, 320), ("hadamard", 320, 64, 0)]])
def test_normed_side_is_the_norm_kernel_then_the_side(steps):
    """Bit for bit: the fused kernel runs `cpu_layer_norm.rms_norm`'s row code, then the side's."""
    from fq_tvm.schedules import cpu_layer_norm

    lanes, din = cpu.vector_lanes(HOST), steps[0][1]

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST).mod["main"]

    norm, side = build(cpu_layer_norm.rms_norm(din, 1e-5, lanes)), build(cpu_transform.transform(steps, lanes))
    fused = build(cpu_transform.transform(steps, lanes, norm=1e-5))
    rng = np.random.default_rng(7)
    params = [tvm.runtime.tensor(rng.choice([-1.0, 1.0], s[1]).astype(np.float32) if s[0] == "hadamard"
                                 else rng.standard_normal((s[2], s[3])).astype(np.float32))
              for s in steps if s[0] in ("hadamard", "frame")]
    w = tvm.runtime.tensor(rng.standard_normal(din).astype(np.float32))
    dout = 648 if steps[-1][0] == "frame" else 320
    for m in (1, 5, 70):
        x = tvm.runtime.tensor(rng.standard_normal((m, din)).astype(np.float32))
        normed, two, one = (tvm.runtime.tensor(np.zeros(shape, np.float32)) for shape in ((m, din), (m, dout), (m, dout)))
        norm(x, w, normed)
        side(normed, *params, two)
        fused(x, *params, w, one)
        np.testing.assert_array_equal(one.numpy(), two.numpy())


def _gelu_before(form: str, bias: bool = False, twice: bool = False, take: bool = False):
    """x [n, 64] -> inverse Hadamard (-> take 48) -> reshape [1, n, d] (-> add bias) -> GELU written as `form`:
    "op" R.nn.gelu (an ONNX Gelu), "div" x * (erf(x / sqrt 2) + 1) * 0.5 (torch's erf GELU
    exported), "mul" 0.5 * x * (1 + erf(x * 0.7071...)); "other" x * (1 + erf(x)) is no GELU."""
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, DIM], "float32"))

    def c(v):
        return relax.const(np.float32(v))

    with bb.function("main", [x]):
        with bb.dataflow():
            had = bb.add_func(kernels.hadamard(DIM, DIM, True).with_attr("global_symbol", "had"), "had")
            y = bb.emit(relax.call_tir(had, [x, relax.const(SIGNS)], relax.TensorType([n, DIM], "float32")))
            d = KEEP if take else DIM
            if take:
                cut = bb.add_func(kernels.take_last(DIM, KEEP).with_attr("global_symbol", "take"), "take")
                y = bb.emit(relax.call_tir(cut, [y], relax.TensorType([n, KEEP], "float32")))
            h = bb.emit(relax.op.reshape(y, [1, n, d]))
            if bias:
                h = bb.emit(relax.op.add(h, relax.const(BIAS[:d])))
            if form == "op":
                g = relax.op.nn.gelu(h)
            elif form == "div":
                e = bb.emit(relax.op.erf(bb.emit(relax.op.divide(h, c(np.sqrt(2.0))))))
                g = relax.op.multiply(bb.emit(relax.op.multiply(h, bb.emit(relax.op.add(e, c(1.0))))), c(0.5))
            elif form == "mul":
                e = bb.emit(relax.op.erf(bb.emit(relax.op.multiply(h, c(np.sqrt(0.5))))))
                g = relax.op.multiply(bb.emit(relax.op.multiply(c(0.5), h)), bb.emit(relax.op.add(c(1.0), e)))
            else:
                g = relax.op.multiply(h, bb.emit(relax.op.add(bb.emit(relax.op.erf(h)), c(1.0))))
            g = bb.emit(g)
            out = bb.emit_output(relax.Tuple([g, y]) if twice else g)
        bb.emit_func_output(out)
    return bb.get()


def _gelu_expected(bias: bool, take: bool = False):
    bb = relax.BlockBuilder()
    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, DIM], "float32"))
    d = KEEP if take else DIM
    steps = [("hadamard", DIM, DIM, 1)] + ([("take", DIM, KEEP)] if take else [])
    name = "fq_hadamard_inv_64x64x1" + ("_take_64x48" if take else "") + ("_bias" if bias else "") + "_gelu"
    with bb.function("main", [x]):
        with bb.dataflow():
            func = cpu_transform.transform(steps, cpu.vector_lanes(HOST), bias=bias, gelu=True)
            gvar = bb.add_func(func.with_attr("global_symbol", name), name)
            args = [x, relax.const(SIGNS)] + ([relax.const(BIAS[:d])] if bias else [])
            y = bb.emit(relax.call_tir(gvar, args, relax.TensorType([n, d], "float32")))
            out = bb.emit_output(bb.emit(relax.op.reshape(y, [1, n, d])))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("form, bias, take", [("div", True, False), ("div", False, False), ("mul", True, False),
                                             ("op", True, False), ("div", True, True)])
def test_gelu_joins_the_output_side(form, bias, take):
    """BERT's intermediate dense: the side (maybe with a take), its bias and the GELU as one kernel,
    whichever way the GELU is written; the results are numpy's GELU of the side's matrix product."""
    import math

    before = _gelu_before(form, bias, take=take)
    after = cpu.rewrite(before, HOST, 32)
    tvm.ir.assert_structural_equal(after, _gelu_expected(bias, take))
    rng = np.random.default_rng(5)
    d = KEEP if take else DIM
    for n in (1, 7):
        x = (3 * rng.standard_normal((n, DIM))).astype(np.float32)
        h = (x.astype(np.float64) @ np.linalg.inv(_hadamard_matrix()).T)[:, :d] + (BIAS[:d] if bias else 0)
        want = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
        np.testing.assert_allclose(_run(after, x)[0], want, rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(_run(after, x), _run(before, x), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("case", ["other", "twice"])
def test_what_is_no_gelu_stays(case):
    """x * (1 + erf(x)) is no GELU; a side also read elsewhere keeps its own kernel."""
    before = _gelu_before("other", True) if case == "other" else _gelu_before("div", True, twice=True)
    after = cpu.rewrite(before, HOST, 32)
    assert not any(name.endswith("_gelu") for name in _names(after))
    assert "R.erf" in after["main"].script()
