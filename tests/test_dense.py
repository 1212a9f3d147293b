"""The fp32 dense kernel (schedules/cpu_dense.py) against numpy, and its Relax dispatch: which
matmuls it takes, that a tied table is stored once (packed, its gathers reading the panels), and
compiled models against
ONNX Runtime."""

import json

import numpy as np
import pytest
import tvm
from tvm import relax

import fq_tvm
from fq_tvm import models
from fq_tvm.schedules import cpu, cpu_dense
from conftest import max_rel_err, ort_run

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
LANES = cpu.vector_lanes(HOST)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("K, N", [(300, 64), (600, 2 * cpu_dense.TASK_COLS + 32),
                                  (40, 34 * cpu_dense.panel_cols(LANES))])  # wide tasks, the last one short
def test_dense_kernel_equals_numpy(K, N, packed):
    """K over one cache block and not a multiple of it; N over one task; rows 1-13 cover every tail
    height of the row tile."""
    N = N // cpu_dense.panel_cols(LANES) * cpu_dense.panel_cols(LANES)
    lib = tvm.compile(tvm.IRModule({"main": cpu_dense.dense(K, N, LANES, packed).with_attr("global_symbol", "main")}),
                      HOST)
    rng = np.random.default_rng(K + N)
    w = rng.standard_normal((K, N)).astype(np.float32)
    weight = tvm.runtime.tensor(cpu_dense.pack(w, LANES) if packed else w)
    for m in (1, 2, 3, 4, 5, 6, 7, 13):
        x = rng.standard_normal((m, K)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((m, N), np.nan, np.float32))
        lib.mod["main"](tvm.runtime.tensor(x), weight, y)
        assert max_rel_err(y.numpy(), x.astype(np.float64) @ w) < 1e-5, m


def test_pack_layout():
    w = np.arange(6 * 32, dtype=np.float32).reshape(6, 32)
    c = cpu_dense.panel_cols(8)
    wp = cpu_dense.pack(w, 8)
    assert wp.shape == (32 // c, 6, c)
    assert np.array_equal(wp[1, 4], w[4, c:2 * c])


def _calls(mod, function: str = "main") -> list[str]:
    names = []

    @relax.expr_functor.visitor
    class Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            if call.op == tvm.ir.Op.get("relax.call_tir"):
                names.append(call.args[0].name_hint)
            elif isinstance(call.op, tvm.ir.Op):
                names.append(call.op.name)
            super().visit_call_(call)

    Calls().visit_expr(mod[function])
    return names


def _module(w: np.ndarray, other: str | None, bound: bool = False):
    """main(x, ids): x @ W, and with `other` W read once more: "columns" take(W, ids, axis=1) (a
    tied embedding), "rows" take(W, ids, axis=0)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("b", "int64"), 5, w.shape[0]], "float32"))
    ids = relax.Var("ids", relax.TensorType([3, 2], "int64"))
    with bb.function("main", [x, ids]):
        with bb.dataflow():
            table = bb.emit(relax.const(w)) if bound else relax.const(w)  # bound: SmolLM2's tied head
            y = bb.emit(relax.op.matmul(x, table))
            if other is not None:
                gathered = bb.emit(relax.op.take(table, ids, axis=1 if other == "columns" else 0))
            out = bb.emit_output(relax.Tuple([y, gathered]) if other else y)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize("other", [None, "columns", "rows"])
def test_dispatch_takes_constant_matmuls(other, bound):
    """W is stored once: packed, and a column gather reads the panels; W read any other way stays
    in place."""
    w = np.random.default_rng(0).standard_normal((40, 4 * cpu_dense.panel_cols(LANES))).astype(np.float32)
    counts = {}
    out = cpu_dense.dispatch(LANES, counts)(_module(w, other, bound))
    calls = _calls(out)
    suffix = "_in_place" if other == "rows" else ""
    assert f"fq_dense_40_{w.shape[1]}{suffix}" in calls and "relax.matmul" not in calls
    assert ("relax.take" in calls) == (other == "rows")
    assert (f"fq_gather_columns_40_{w.shape[1]}" in calls) == (other == "columns")
    assert counts == {cpu_dense.KIND: 1}
    sizes = sorted(tuple(c.value.shape) for c in _constants(out))
    assert sizes == ([w.shape] if other == "rows" else [cpu_dense.pack(w, LANES).shape])  # one copy of W


def test_packed_table_gathers_match_numpy():
    """The dispatched module (dense on the panels, column gather on the same panels) runs and
    matches numpy; ids outside the table read its first or last column."""
    w = np.random.default_rng(1).standard_normal((40, 4 * cpu_dense.panel_cols(LANES))).astype(np.float32)
    mod = cpu_dense.dispatch(LANES, {})(_module(w, "columns"))
    vm = relax.VirtualMachine(tvm.compile(mod, HOST), tvm.cpu())
    x = np.random.default_rng(2).standard_normal((2, 5, 40)).astype(np.float32)
    ids = np.array([[0, w.shape[1] - 1], [77 % w.shape[1], 5], [-3, w.shape[1] + 9]], np.int64)
    y, cols = (t.numpy() for t in vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(ids)))
    assert max_rel_err(y, x.astype(np.float64) @ w) < 1e-5
    assert np.array_equal(cols, w[:, np.clip(ids, 0, w.shape[1] - 1)])


def test_dispatch_packs_a_weight_of_two_functions_once():
    """A weight both `main` and `main_last` (passes/last_logits.py) multiply by is packed once and
    the packed constant shared: no in-place kernel, no second copy."""
    from fq_tvm.passes.last_logits import AddLastLogits

    w = np.random.default_rng(0).standard_normal((40, 4 * cpu_dense.panel_cols(LANES))).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, tvm.tirx.Var("s", "int64"), 40], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(relax.op.add(x, x))
            y = bb.emit(relax.op.matmul(h, relax.const(w)))
            out = bb.emit_output(relax.Tuple([y, h]))
        bb.emit_func_output(out)
    out = cpu_dense.dispatch(LANES, {})(AddLastLogits()(bb.get()))
    packed = cpu_dense.pack(w, LANES).shape
    found = {}
    for name in ("main", "last_logits_head"):
        calls = _calls(out, name)
        assert f"fq_dense_40_{w.shape[1]}" in calls and "relax.matmul" not in calls, (name, calls)
        found[name] = _constants(out, name)
        assert [tuple(c.value.shape) for c in found[name]] == [packed]
    assert found["main"][0].same_as(found["last_logits_head"][0])


def test_dispatch_leaves_odd_widths_and_activation_matmuls():
    w = np.ones((40, cpu_dense.panel_cols(LANES) + 1), np.float32)
    counts = {}
    out = cpu_dense.dispatch(LANES, counts)(_module(w, None))
    assert "relax.matmul" in _calls(out) and counts == {}


def _constants(mod, function: str = "main") -> list:
    found = []

    @relax.expr_functor.visitor
    class Consts(relax.PyExprVisitor):
        def visit_generic_const_(self, const):
            if not any(const.same_as(seen) for seen in found):
                found.append(const)

    Consts().visit_expr(mod[function])
    return found


def test_compiled_fp32_model_runs_dense_and_matches_ort(tmp_path):
    onnx_path = models.linear(tmp_path / "linear.onnx", 300, 8 * cpu_dense.panel_cols(LANES))
    out = fq_tvm.compile(onnx_path, "host", tmp_path / "fp32", scheme="fp32", quiet=True)
    counts = json.loads((out / "manifest.json").read_text())["kernels"]["counts"]
    assert counts[cpu_dense.KIND] == 1
    model = fq_tvm.load(out)
    for shape in ((1, 1, 300), (3, 7, 300)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        assert max_rel_err(model.run({"x": x})["y"], ort_run(onnx_path, {"x": x})[0]) < 1e-5


def test_dispatch_takes_a_transposed_constant_and_drops_the_transpose():
    """ONNX Gemm with transB imports as matmul(x, permute_dims(W)): W.T is packed, the transpose
    and the unpacked W leave the module."""
    w = np.random.default_rng(1).standard_normal((4 * cpu_dense.panel_cols(LANES), 40)).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tvm.tirx.Var("m", "int64"), 40], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(relax.const(w)))
            out = bb.emit_output(relax.op.matmul(x, wt))
        bb.emit_func_output(out)
    counts = {}
    out = cpu_dense.dispatch(LANES, counts)(bb.get())
    assert counts == {cpu_dense.KIND: 1} and "relax.permute_dims" not in _calls(out)
    (const,) = _constants(out)
    assert np.array_equal(const.value.numpy(), cpu_dense.pack(w.T, LANES))
