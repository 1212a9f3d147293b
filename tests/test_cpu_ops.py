"""CPU legalization overrides (schedules/cpu_ops.py) against numpy."""

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from fq_tvm.schedules import cpu_ops

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def test_sigmoid_matches_numpy_and_keeps_nan():
    @I.ir_module
    class Sigmoid:
        @R.function
        def main(x: R.Tensor((3, 37), "float32")):
            with R.dataflow():
                y = R.sigmoid(x)
                R.output(y)
            return y

    mod = relax.transform.LegalizeOps(cpu_ops.overrides())(Sigmoid)
    assert "sigmoid" in [g.name_hint for g in mod.get_global_vars()]
    x = np.random.default_rng(0).standard_normal((3, 37)).astype(np.float32) * 8
    x[0, :6] = [np.nan, -np.inf, np.inf, -100.0, 100.0, 0.0]
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    assert np.isnan(ours[0, 0]) and np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    assert np.abs(ours[finite] - ref[finite]).max() < 1e-7  # values in [0, 1]: about 2 ulp at 1


def test_gelu_matches_numpy_without_libm():
    """R.nn.gelu (an ONNX Gelu) legalizes to the erf polynomial, vectorisable, not libm's erff."""
    import math

    @I.ir_module
    class Gelu:
        @R.function
        def main(x: R.Tensor((3, 37), "float32")):
            with R.dataflow():
                y = R.nn.gelu(x)
                R.output(y)
            return y

    mod = relax.transform.LegalizeOps(cpu_ops.overrides())(Gelu)
    (func,) = [f for g, f in mod.functions_items() if g.name_hint == "gelu"]
    assert "T.erf" not in func.script()
    x = np.random.default_rng(1).standard_normal((3, 37)).astype(np.float32) * 3
    x[0, :5] = [np.nan, np.inf, -100.0, 100.0, 0.0]
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x)).numpy()
    xd = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ref = 0.5 * xd * (1 + np.vectorize(math.erf)(xd / np.sqrt(2)))
    assert np.isnan(ours[0, 0]) and np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=2e-6, atol=1e-6)


def _build(mod):
    from fq_tvm.schedules import relax_pipeline

    return relax.VirtualMachine(tvm.compile(mod, HOST, relax_pipeline=relax_pipeline(HOST)), tvm.cpu())


def test_kv_concat_copies_rows_with_symbolic_lengths():
    @I.ir_module
    class Cache:
        @R.function
        def main(past: R.Tensor((1, 3, "p", 64), "float32"), new: R.Tensor((1, 3, "n", 64), "float32")):
            with R.dataflow():
                y = R.concat((past, new), axis=2)
                R.output(y)
            return y

    mod = relax.transform.LegalizeOps(cpu_ops.overrides())(Cache)
    assert "concat_rows" in [g.name_hint for g in mod.get_global_vars()]
    vm = _build(Cache)
    rng = np.random.default_rng(0)
    for p, n in [(0, 5), (7, 1), (130, 1), (3, 0)]:
        a = rng.standard_normal((1, 3, p, 64)).astype(np.float32)
        b = rng.standard_normal((1, 3, n, 64)).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
        assert np.array_equal(out, np.concatenate([a, b], axis=2))


def test_concat_of_three_on_a_leading_axis_with_an_odd_row():
    @I.ir_module
    class Three:
        @R.function
        def main(a: R.Tensor((2, 5, 3), "float32"), b: R.Tensor((1, 5, 3), "float32"), c: R.Tensor((4, 5, 3), "float32")):
            with R.dataflow():
                y = R.concat((a, b, c), axis=0)
                R.output(y)
            return y

    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(s).astype(np.float32) for s in [(2, 5, 3), (1, 5, 3), (4, 5, 3)]]
    out = _build(Three)["main"](*[tvm.runtime.tensor(x) for x in xs]).numpy()
    assert np.array_equal(out, np.concatenate(xs, axis=0))


def test_last_axis_concat_keeps_topi_so_it_can_fuse():
    @I.ir_module
    class Halves:
        @R.function
        def main(a: R.Tensor((4, 32), "float32"), b: R.Tensor((4, 32), "float32")):
            with R.dataflow():
                y = R.concat((a, b), axis=-1)
                R.output(y)
            return y

    mod = relax.transform.LegalizeOps(cpu_ops.overrides())(Halves)
    assert "concat_rows" not in [g.name_hint for g in mod.get_global_vars()]
    a, b = np.ones((4, 32), np.float32), np.zeros((4, 32), np.float32)
    out = _build(Halves)["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy()
    assert np.array_equal(out, np.concatenate([a, b], axis=-1))


def test_fallback_runs_small_work_without_a_parallel_launch():
    """cpu.fallback: a function whose buffers stay under SERIAL_WORK elements gets no parallel
    loop; one with symbolic rows gets both schedules behind `if size < SERIAL_WORK` (each giving
    numpy's softmax x w); a large static one stays parallel."""
    from tvm import te, tirx, topi

    from fq_tvm.schedules import cpu

    m = tirx.Var("m", "int64")
    rng = np.random.default_rng(3)
    w = rng.standard_normal(576).astype(np.float32)
    for rows, parallel, branch in [(m, True, True), (4, False, False), (64, True, False)]:
        x = te.placeholder((rows, 576), "float32", "x")
        wp = te.placeholder((576,), "float32", "w")
        func, left = cpu.fallback(te.create_prim_func([x, wp, topi.multiply(topi.nn.softmax(x), wp)]), HOST)
        assert not left and cpu._has_parallel(func) == parallel
        assert ("if " in func.script()) == branch
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("tirx.is_scheduled", True)}), HOST)
        for n in ((1, 300) if rows is m else (rows,)):  # 1 x 576 < SERIAL_WORK <= 300 x 576
            a = rng.standard_normal((n, 576)).astype(np.float32)
            out = tvm.runtime.tensor(np.zeros((n, 576), np.float32))
            lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
            e = np.exp(a.astype(np.float64) - a.max(1, keepdims=True))
            np.testing.assert_allclose(out.numpy(), e / e.sum(1, keepdims=True) * w, rtol=1e-5, atol=1e-6)


def test_softmax_rows_match_numpy_with_tails_nan_and_masked_rows():
    """cpu_softmax on the last axis (any row count and length, vector tails), NaN kept, an all -inf
    row NaN as in ORT, masked keys zero and an all-masked row uniform; the [rows, n] views around
    it are VM reshapes, not copies."""
    import re

    @I.ir_module
    class Softmax:
        @R.function
        def main(x: R.Tensor(("b", 3, "s", "t"), "float32")):
            with R.dataflow():
                p = R.nn.softmax(x, axis=-1)
                y = R.multiply(p, R.const(2.0, "float32"))
                R.output(y)
            return y

    lib = tvm.compile(Softmax, HOST, relax_pipeline=_relax_pipeline())
    calls = re.findall(r"call\s+(\S+)", lib.mod["as_text"]())
    assert "softmax_rows" in calls and not [c for c in calls if c.startswith("reshape")], sorted(set(calls))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    rng = np.random.default_rng(0)
    for shape in [(1, 3, 1, 5), (2, 3, 7, 37), (1, 3, 2, 45), (1, 3, 2, 100), (2, 3, 4, 128)]:  # groups of 4 vectors, single ones, tails
        x = (rng.standard_normal(shape) * 6).astype(np.float32)
        x[0, 0, 0, 1] = np.nan
        if shape[2] > 1:
            x[0, 1, 1, :] = -np.inf
        if shape[-1] == 128:  # masked keys: skipped vectors (exp 0), an all-masked row (uniform), and
            x[1, 2, :, 64:] = -1e30  # keys 87.9 below the row's max (exp ~1e-38, computed)
            x[1, 0, 0, :] = -1e30
            x[1, 2, 3, 70] = np.nan  # among masked keys: the row is NaN
            x[1, 1, 2, 100:] = x[1, 1, 2, :100].max() - 87.9
        ours = vm["main"](tvm.runtime.tensor(x)).numpy()
        with np.errstate(invalid="ignore"):
            e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        ref = 2 * e / e.sum(-1, keepdims=True)
        assert np.array_equal(np.isnan(ours), np.isnan(ref)) and np.isnan(ours[0, 0, 0]).all()
        finite = ~np.isnan(ref)
        assert np.abs(ours[finite] - ref[finite]).max() < 2e-6


def _relax_pipeline():
    from fq_tvm.schedules import relax_pipeline

    return relax_pipeline(HOST)


def test_row_kernels_are_parsed_once_per_shape():
    """softmax / layer norm / RMS norm kernels come from a cache: one TVMScript parse per shape, not
    one per call (SmolLM2's 30 softmax calls took 4 s of its compile)."""
    from fq_tvm.schedules import cpu_layer_norm, cpu_softmax

    assert cpu_softmax.softmax(16) is cpu_softmax.softmax(16)
    assert cpu_layer_norm.layer_norm(384, 1e-12, 16) is cpu_layer_norm.layer_norm(384, 1e-12, 16)
    assert cpu_layer_norm.rms_norm(576, 1e-5, 16) is not cpu_layer_norm.rms_norm(576, 1e-6, 16)


def test_layer_norm_rows_match_numpy():
    """cpu_layer_norm on a static last axis (a width with a vector tail too) and any row count; the
    views around it are VM reshapes."""
    import re

    for n in (384, 37):
        x = relax.Var("x", relax.TensorType([tvm.tirx.Var("b", "int64"), tvm.tirx.Var("s", "int64"), n], "float32"))
        g, b = (relax.Var(name, relax.TensorType([n], "float32")) for name in "gb")
        bb = relax.BlockBuilder()
        with bb.function("main", [x, g, b]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.layer_norm(x, g, b, axes=[-1], epsilon=1e-5))
                y = bb.emit_output(relax.op.multiply(h, relax.const(2.0, "float32")))
            bb.emit_func_output(y)
        Norm = bb.get()
        lib = tvm.compile(Norm, HOST, relax_pipeline=_relax_pipeline())
        calls = re.findall(r"call\s+(\S+)", lib.mod["as_text"]())
        assert "layer_norm_rows" in calls and not [c for c in calls if c.startswith("reshape")], sorted(set(calls))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        rng = np.random.default_rng(n)
        g, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        for rows in (1, 5, 64):
            x = (rng.standard_normal((1, rows, n)) * 3 + 5).astype(np.float32)
            ours = vm["main"](*[tvm.runtime.tensor(a) for a in (x, g, b)]).numpy()
            x64 = x.astype(np.float64)
            mean = x64.mean(-1, keepdims=True)
            ref = 2 * ((x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b)
            assert np.abs(ours - ref).max() < 1e-5 * np.abs(ref).max()


def test_rotate_half_is_vectorised_piece_by_piece():
    """RoPE's `x * cos + concat(-x[..., 32:], x[..., :32]) * sin` on heads of 64: the fallback
    partitions the last axis at the concatenate's bound (a whole number of vectors), so each
    piece's vector loop has no per-lane condition; exact against numpy. A bound inside a vector
    (head width 24 with 16 lanes) keeps the plain schedule."""
    from tvm import te, tirx, topi

    from fq_tvm.schedules import cpu

    lanes = cpu.vector_lanes(HOST)
    rng = np.random.default_rng(5)
    s = tirx.Var("s", "int64")
    for dim, pieces in [(64, 2), (4 * lanes, 2), (24, 0)]:
        half = dim // 2
        x = te.placeholder((s, 9, dim), "float32", "x")
        c = te.placeholder((s, 1, dim), "float32", "c")
        sn = te.placeholder((s, 1, dim), "float32", "sn")
        a = topi.strided_slice(x, [0], [half], [1], axes=[2])
        b = topi.strided_slice(x, [half], [dim], [1], axes=[2])
        y = topi.add(topi.multiply(x, c), topi.multiply(topi.concatenate([topi.negative(b), a], axis=2), sn))
        func, left = cpu.fallback(te.create_prim_func([x, c, sn, y]), HOST)
        assert not left and func.script().count("_partition\")") == (2 * pieces if dim % lanes == 0 else 0)
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("tirx.is_scheduled", True)}), HOST)
        for n in (1, 130):
            xs = rng.standard_normal((n, 9, dim)).astype(np.float32)
            cs, ss = (rng.standard_normal((n, 1, dim)).astype(np.float32) for _ in range(2))
            out = tvm.runtime.tensor(np.zeros((n, 9, dim), np.float32))
            lib["main"](*(tvm.runtime.tensor(v) for v in (xs, cs, ss)), out)
            rot = np.concatenate([-xs[..., half:], xs[..., :half]], axis=-1)
            np.testing.assert_allclose(out.numpy(), xs * cs + rot * ss, rtol=1e-6, atol=1e-6)


def test_rotate_half_of_rows_with_one_leading_axis():
    """The same piecewise vectorisation with a single leading (symbolic) axis: [s, 64] rows."""
    from tvm import te, tirx, topi

    from fq_tvm.schedules import cpu

    s = tirx.Var("s", "int64")
    x = te.placeholder((s, 64), "float32", "x")
    a = topi.strided_slice(x, [0], [32], [1], axes=[1])
    b = topi.strided_slice(x, [32], [64], [1], axes=[1])
    func, left = cpu.fallback(te.create_prim_func([x, topi.concatenate([topi.negative(b), a], axis=1)]), HOST)
    assert not left and "_partition\")" in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("tirx.is_scheduled", True)}), HOST)
    for n in (1, 300):
        xs = np.random.default_rng(n).standard_normal((n, 64)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((n, 64), np.float32))
        lib["main"](tvm.runtime.tensor(xs), out)
        assert np.array_equal(out.numpy(), np.concatenate([-xs[:, 32:], xs[:, :32]], axis=1))
