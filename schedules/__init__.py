"""Kernel definitions (`kernels`) and their schedules per target family (`cpu`, `gpu`).

`apply(mod, target)` schedules every PrimFunc carrying `fq_kernel` and marks it scheduled, so that
the rest of the build (dlight included) leaves it alone. Adding a schedule for a new kernel kind is
one entry in a family's RULES; adding a target family is one module with RULES, DEFAULT, variant
and finish.
"""

from __future__ import annotations

import tvm
import tvm.s_tir as s_tir

from .common import quick_macros

quick_macros()


def family(target):
    from . import cpu, gpu

    return gpu if "gpu" in target.keys else cpu


def schedule_func(func, target, act_bits: int = 8):
    """Our kernel `func` scheduled for `target`: the family may first swap in a variant with the same
    buffers (CPU: the Hadamard and frame a row at a time, and with act_bits 8 the int8
    dequant-matmul, all written already scheduled; GPU: the tiled dequant-matmul)."""
    rules = family(target)
    func = rules.variant(func, target, act_bits)
    kind = str(func.attrs["fq_kernel"])
    if kind in rules.WRITTEN_SCHEDULED:
        return func.with_attr("tirx.is_scheduled", True)
    sch = s_tir.Schedule(func)
    rules.RULES.get(kind, rules.DEFAULT)(sch, target)
    return rules.finish(sch.mod["main"]).with_attr("tirx.is_scheduled", True)


def relax_pipeline(target, counts: dict | None = None, notes: list | None = None, before_fallback=None):
    """TVM's default Relax pipeline for `target`, with our schedules: on CPU, erf and tanh become
    TVM's vectorisable polynomial forms (`fast_erf_tanh`), matmuls by a constant weight
    run `cpu_dense` (register-tiled, weights packed at compile time), attention scores and attention
    outputs on the heads as the projections wrote them run `cpu_attention` and
    `cpu_attention_values`, and after legalization and
    fusion, every PrimFunc we did not write gets `cpu.fallback` (the stock CPU pipeline applies no
    schedule at all); GPU targets keep TVM's dlight rules. `counts`, if given, receives how many
    PrimFuncs the CPU rules scheduled ("fallback") and left with unscheduled blocks ("unscheduled");
    `notes`, if given, receives one line per function left so, naming its blocks and the reason.
    `before_fallback(mod) -> mod`, if given, runs on CPU after legalization and fusion, before the
    fallback: functions it marks `tirx.is_scheduled` keep its schedule (`fq_tvm.tuning`)."""
    from tvm import relax

    if "gpu" in target.keys:
        return tvm.transform.Sequential([relax.get_default_pipeline(target), _ordered_shape_stores_pass()])
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    from . import (cpu, cpu_attention, cpu_attention_fused, cpu_attention_values, cpu_dense, cpu_layer_norm, cpu_ops,
                   cpu_softmax)

    @tvm.transform.module_pass(opt_level=0, name="fq.CPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            tally = counts if counts is not None else {}
            mod = tvm.transform.Sequential([fast_erf_tanh(),
                                            cpu_dense.dispatch(cpu.vector_lanes(target), tally),
                                            cpu_attention.dispatch(cpu.vector_lanes(target), tally),
                                            cpu_attention_values.dispatch(cpu.vector_lanes(target), tally),
                                            cpu_attention_fused.dispatch(tally)]
                                           + cpu_pipeline.library_dispatch_passes(target)
                                           + [relax.transform.LegalizeOps(cpu_ops.overrides())]
                                           + cpu_pipeline.legalize_passes(target)
                                           + _reshapes_as_views())(mod)
            for func in mod.functions.values():  # kernels the legalization wrote (cpu_ops)
                kind = str(func.attrs.get("fq_kernel", "")) if isinstance(func, tvm.tirx.PrimFunc) and func.attrs else ""
                if kind in (cpu_softmax.KIND, cpu_layer_norm.KIND, cpu_layer_norm.RMS_KIND):
                    tally[kind] = tally.get(kind, 0) + 1
            if before_fallback is not None:
                mod = before_fallback(mod)
            for gvar, func in list(mod.functions_items()):
                if isinstance(func, tvm.tirx.PrimFunc) and not _scheduled(func):
                    func, left = cpu.fallback(func, target)
                    mod[gvar] = func.with_attr("tirx.is_scheduled", True)
                    key = "unscheduled" if left else "fallback"
                    tally[key] = tally.get(key, 0) + 1
                    if left and notes is not None:
                        notes.append(f"{gvar.name_hint} ({'; '.join(left)})")
            mod = tvm.transform.Sequential(cpu_pipeline.dataflow_lower_passes(target)
                                           + cpu_pipeline.finalize_passes(target))(mod)
            return ordered_shape_stores(restrict_single_buffer_funcs(mod))

    return _pipeline


def _reshapes_as_views() -> list:
    """Reshape kernels become views (`R.reshape`: no copy, no kernel call) before the fallback
    schedules them: TVM's RewriteDataflowReshape recognises only unscheduled reshape PrimFuncs.
    SmolLM2's decode step had ~480 reshape copies, each a kernel call plus its allocation."""
    from tvm import relax

    return [relax.transform.RewriteDataflowReshape(), _output_reshapes_as_views(),
            relax.transform.DeadCodeElimination()]


def _output_reshapes_as_views():
    """Reshape kernels that bind a dataflow block's output (which RewriteDataflowReshape leaves
    alone) as views too: SmolLM2's last reshape copied its 128 x 49152 logits (1.5 ms)."""
    from tvm import relax

    from .common import mutate_relax_functions

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class _Views(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod

        def visit_var_binding_(self, binding):
            value = binding.value
            if (not isinstance(binding.var, relax.DataflowVar) and isinstance(value, relax.Call)
                    and value.op.same_as(call_tir) and len(value.args) == 2 and len(value.args[1].fields) == 1
                    and isinstance(self.mod_[value.args[0]], tvm.tirx.PrimFunc)
                    and relax.analysis.has_reshape_pattern(self.mod_[value.args[0]])):
                view = self.builder_.normalize(relax.op.reshape(self.visit_expr(value.args[1].fields[0]),
                                                                binding.var.ty.shape))
                self.builder_.emit_normalized(relax.VarBinding(binding.var, view))
                return
            super().visit_var_binding_(binding)

    @tvm.transform.module_pass(opt_level=0, name="fq.OutputReshapesAsViews")
    def _pass(mod, _ctx):
        return mutate_relax_functions(mod, _Views(mod), prune=False)

    return _pass


def fast_erf_tanh():
    """erf and tanh as TVM's polynomials (erf within 4e-7 absolute; libm's scalar `erff` was 7% of
    MiniLM). Not TVM's `fast_softmax`: it writes two more full-size buffers and ran 1.6x slower than
    softmax with libm's `expf`; `cpu_ops` legalizes softmax with its own vectorisable exp."""
    from tvm import relax, topi

    from .common import mutate_relax_functions

    fast = {"relax.erf": topi.fast_erf, "relax.tanh": topi.fast_tanh}

    @relax.expr_functor.mutator
    class _Fast(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            return self.builder_.call_te(fast[name], call.args[0]) if name in fast else call

    @tvm.transform.module_pass(opt_level=0, name="fq.FastErfTanh")
    def _pass(mod, _ctx):
        return mutate_relax_functions(mod, _Fast(mod), prune=False)

    return _pass


def restrict_single_buffer_funcs(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark `tirx.noalias` on PrimFuncs with at most one pointer parameter (Relax's `shape_func`),
    where it is trivially true. TVM 0.27's LLVM codegen declares every function of a module before
    emitting any, and keeps the noalias flag of the last one declared: one function without it
    (the shape function) took `noalias` from all our kernels' buffers (the int8 dequant-matmul ran
    1.8x slower at M = 16)."""
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and "tirx.noalias" in func.attrs):
            continue
        pointers = [p for p in func.params if p.ty is not None and not isinstance(p.ty, tvm.ir.PrimType)]
        if len(pointers) <= 1:
            mod[gvar] = func.with_attr("tirx.noalias", True)
    return mod


def ordered_shape_stores(mod: tvm.IRModule) -> tvm.IRModule:
    """Sort the stores of Relax's shape functions by heap slot. TVM 0.27's VMShapeLower emits the
    shape values that become computable together in hash-map order, which moves with object
    addresses: two builds of one model gave libraries differing in `shape_func` alone. The stores
    of one shape function are independent (each reads matched slots, writes its own), so any
    order computes the same heap."""
    for gvar, func in list(mod.functions_items()):
        if not gvar.name_hint.startswith("shape_func") or not isinstance(func, tvm.tirx.PrimFunc):
            continue
        body = func.body
        if not isinstance(body, tvm.tirx.SeqStmt) or not all(_heap_store(s) for s in body.seq):
            continue
        stores = sorted(body.seq, key=lambda s: int(s.indices[0]))
        mod[gvar] = func.with_body(tvm.tirx.SeqStmt(stores))
    return mod


def _ordered_shape_stores_pass():
    @tvm.transform.module_pass(opt_level=0, name="fq.OrderedShapeStores")
    def _pass(mod, _ctx):
        return ordered_shape_stores(mod)

    return _pass


def _heap_store(stmt) -> bool:
    return (isinstance(stmt, tvm.tirx.BufferStore) and len(stmt.indices) == 1
            and isinstance(stmt.indices[0], tvm.tirx.IntImm))


def _scheduled(func) -> bool:
    return func.attrs is not None and "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"])


def apply(mod: tvm.IRModule, target, act_bits: int = 8, counts: dict | None = None) -> tvm.IRModule:
    """Schedule our kernels in `mod` for `target`; other functions are left untouched. `counts`, if
    given, receives how many functions of each kernel kind the build runs (after variants)."""
    rewrite = getattr(family(target), "rewrite", None)
    if rewrite is not None:  # fused row transforms (both); GPU: GEMV / tiled chosen by the row count
        mod = rewrite(mod, target, act_bits)
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "fq_kernel" in func.attrs:
            updates[gvar] = schedule_func(func, target, act_bits)
    for gvar, func in updates.items():
        mod[gvar] = func
        if counts is not None:
            kind = str(func.attrs["fq_kernel"])
            counts[kind] = counts.get(kind, 0) + 1
    return mod
