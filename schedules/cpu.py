"""CPU schedules (llvm: x86 AVX-512 and aarch64 NEON alike): parallel over output rows/columns,
vectorised over the target's vector width."""

from __future__ import annotations

import functools
import itertools

import numpy as np

import tvm
import tvm.s_tir as s_tir

from . import cpu_frame, cpu_hadamard, cpu_int8, cpu_transform
from .common import SERIAL_WORK, blocks, is_reduction


def vector_lanes(target) -> int:
    """float32 lanes of the target's widest vector unit, from its features (LLVM's reported vector
    width says 512 for AVX2-only Zen 3)."""
    from tvm.target import codegen

    for feature, lanes in (("avx512f", 16), ("avx", 8)):
        try:
            if codegen.llvm_cpu_has_features(feature, target):
                return lanes
        except Exception:  # noqa: BLE001 - a target LLVM cannot describe: assume 128-bit
            break
    return 4


def dequant_matmul(sch: s_tir.Schedule, target) -> None:
    """Rows of the packed matrix in parallel; per row and group, the byte loop is split by the
    vector width and reduced into per-lane partial sums (rfactor) kept in registers."""
    lanes = vector_lanes(target)
    yq = sch.get_sblock("yq")
    i, n, g, t, b = sch.get_loops(yq)
    sch.reorder(n, g, i, t, b)
    _, b_in = sch.split(b, [None, lanes])
    partial = sch.rfactor(b_in, 3)
    sch.set_scope(partial, 0, "local")
    ln, lg, _, lt, lbo, lbi = sch.get_loops(partial)
    sch.reorder(lbo, lt)
    sch.vectorize(lbi)
    sch.unroll(lt)
    sch.parallel(ln)
    sch.decompose_reduction(partial, lbo)
    sch.reverse_compute_at(yq, lg)
    y_i, y_n, _ = sch.get_loops(sch.get_sblock("y"))
    sch.reorder(y_n, y_i)
    sch.parallel(y_n)
    for name in ("xp", "xs"):
        sch.parallel(sch.get_loops(sch.get_sblock(name))[0])


def elementwise(sch: s_tir.Schedule, target) -> None:
    """Every block: rows in parallel, the last spatial axis vectorised (reductions stay serial)."""
    lanes = vector_lanes(target)
    for block in blocks(sch):
        loops = sch.get_loops(block)
        if is_reduction(sch, block):
            sch.parallel(loops[0])
            continue
        _, inner = sch.split(loops[-1], [None, lanes])
        sch.vectorize(inner)
        sch.parallel(loops[0])


def kv_append(sch: s_tir.Schedule, target) -> None:
    """The KV cache's new rows, copied without a parallel launch (a decode step copies 2 x 192
    floats a layer; the launch cost ~3 us on two threads), the last axis vectorised."""
    (block,) = blocks(sch)
    last, lanes = sch.get_loops(block)[-1], vector_lanes(target)
    if int(sch.get(last).extent) % lanes == 0:
        sch.vectorize(sch.split(last, [None, lanes])[1])


RULES = {"dequant_matmul": dequant_matmul, "kv_append": kv_append}
DEFAULT = elementwise


def finish(func):
    """A scheduled kernel as it is (the GPU family narrows its index arithmetic here)."""
    return func


WRITTEN_SCHEDULED = (cpu_int8.KIND, cpu_hadamard.KIND, cpu_frame.KIND, cpu_frame.SYNTHESIS_KIND, cpu_transform.KIND)


def rewrite(mod: tvm.IRModule, target, act_bits: int = 8) -> tvm.IRModule:
    """Each run of row transforms that `cpu_transform` covers (one side of a layer) becomes one
    kernel: one launch and no intermediate tensors instead of one per step. With int8
    activations, 8-bit codes are laid out as the int8 kernel's words (`prelay`)."""
    mod = _fuse_transforms(mod, target)
    return prelay(mod, target) if act_bits == 8 else mod


def prelay(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Dequant-matmuls whose int8 plan is `prelaid` (8-bit codes) read their codes as a constant in
    that kernel's word layout (`cpu_int8.words_layout`), laid out here once. A table that another
    call reads too keeps its byte layout, so nothing is stored twice: a tied int8 head (its
    embedding gathers the codes; a gather reading words gained nothing measurable: SmolLM2 decode
    at two threads, median 162 tokens/s against 182, runs 152-180 against 133-183)."""
    from tvm import relax

    from .chains import callee, drop_unused
    from .common import mutate_relax_functions

    plans = _word_plans(mod, target)
    if not plans:
        return mod

    @relax.expr_functor.mutator
    class _Prelay(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.funcs, self.words = {}, {}

        def visit_call_(self, call):
            func = callee(mod, call)
            if func is None or str(func.attrs["fq_kernel"]) != "dequant_matmul" or call.args[1].fields[1] not in plans:
                return super().visit_call_(call)
            first, codes, scale, zero = call.args[1].fields
            p = plans[codes]
            name = call.args[0].name_hint + "_words"
            if name not in self.funcs:
                kernel = cpu_int8.dequant_matmul(p).with_attr("global_symbol", name)
                self.funcs[name] = self.builder_.add_func(kernel, name)
            if codes not in self.words:
                self.words[codes] = relax.const(cpu_int8.words_layout(codes.value.numpy(), p))
            return relax.call_tir(self.funcs[name], [self.visit_expr(first), self.words[codes], scale, zero], call.ty)

    return drop_unused(mutate_relax_functions(mod, _Prelay(mod)))


def _word_plans(mod, target) -> dict:
    """{code table: its prelaid int8 plan} for the constant tables that only dequant-matmuls with
    such a plan read."""
    readers, plans = _const_readers(mod), {}
    for call, kernel in _calls(mod):
        if kernel is None or str(kernel.attrs["fq_kernel"]) != "dequant_matmul":
            continue
        p, codes = _int8_plan(kernel.attrs, target, words=True), call.args[1].fields[1]
        if p is not None and p.prelaid and p.isa.prelay and isinstance(codes, tvm.ir.expr.Constant) \
                and readers[codes] == {"dequant_matmul"}:
            plans[codes] = p
    return plans


def _const_readers(mod) -> dict:
    """{constant: the kinds of our kernels that read it, "" for any other call}."""
    readers = {}
    for call, kernel in _calls(mod):
        for arg in list(call.args[1].fields) if kernel is not None else list(call.args):
            if isinstance(arg, tvm.ir.expr.Constant):
                readers.setdefault(arg, set()).add(str(kernel.attrs["fq_kernel"]) if kernel is not None else "")
    return readers


def _calls(mod):
    """(call, our kernel it calls or None) for every call bound in the Relax functions of `mod`."""
    from tvm import relax

    from .chains import callee

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    if isinstance(binding.value, relax.Call):
                        yield binding.value, callee(mod, binding.value)


def _int8_plan(attrs, target, words: bool = False):
    """cpu_int8's plan for a `dequant_matmul` kernel's attributes (None where none applies)."""
    return cpu_int8.plan(int(attrs["fq_rows"]), int(attrs["fq_cols"]), int(attrs["fq_bits"]),
                         int(attrs.get("fq_group", 0)), target, act_cols=int(attrs.get("fq_act_group", 0)), words=words,
                         code_bits=int(attrs.get("fq_code_bits", 0)))


def _fuse_transforms(mod: tvm.IRModule, target) -> tvm.IRModule:
    from tvm import relax

    from .chains import bindings, drop_unused, transform_name, transform_plans
    from .common import mutate_relax_functions

    plans = {call: plan for call, plan in transform_plans(mod).items() if cpu_transform.sides(plan[1]) is not None}
    tables = [bindings(func) for func in mod.functions.values() if isinstance(func, relax.Function)]
    residuals = _residual_adds(mod, plans, tables)
    gelus = _gelu_ends(mod, plans, tables)
    norms = _normed_sources(plans, tables)
    if not plans and not residuals and not gelus:
        return mod

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.added = {}

        def visit_call_(self, call):
            if call in residuals:
                return self._with_residual(call, *residuals[call])
            if call in gelus:
                return self._with_gelu(call, *gelus[call])
            if call not in plans:
                return super().visit_call_(call)
            source, steps, consts = plans[call]
            if call in norms:  # rms_norm(x) -> reshape -> the side: the side reads x, normalising each row
                x, eps, weight = norms[call]
                flat = self.builder_.emit(relax.op.reshape(self.visit_expr(x), source.ty.shape))
                args = [flat, *self._consts(consts), self.visit_expr(weight)]
                return relax.call_tir(self._kernel(steps, norm=eps), args, call.ty)
            return relax.call_tir(self._kernel(steps), [self.visit_expr(source), *self._consts(consts)], call.ty)

        def _with_residual(self, add, plan, residual, rows_ty, bias):
            """add(residual, reshape(side(x)) [+ bias]) -> reshape(side(x) [+ bias] + reshape(residual)),
            one kernel."""
            source, steps, consts = plan
            flat = self.builder_.emit(relax.op.reshape(self.visit_expr(residual), rows_ty.shape))
            args = [self.visit_expr(source), *self._consts(consts)] + ([bias] if bias is not None else []) + [flat]
            total = self.builder_.emit(relax.call_tir(self._kernel(steps, residual=True, bias=bias is not None),
                                                      args, rows_ty))
            return relax.op.reshape(total, add.ty.shape)

        def _with_gelu(self, call, plan, rows_ty, bias):
            """GELU(reshape(side(x)) [+ bias]) -> reshape(GELU(side(x) [+ bias])), one kernel."""
            source, steps, consts = plan
            args = [self.visit_expr(source), *self._consts(consts)] + ([bias] if bias is not None else [])
            out = self.builder_.emit(relax.call_tir(self._kernel(steps, bias=bias is not None, gelu=True), args, rows_ty))
            return relax.op.reshape(out, call.ty.shape)

        def _kernel(self, steps, residual: bool = False, norm: float | None = None, bias: bool = False,
                    gelu: bool = False):
            name = transform_name(steps) + ("_bias" if bias else "") + ("_residual" if residual else "") + \
                ("_gelu" if gelu else "")
            if norm is not None:  # in the order the kernel runs them: fq_rms_norm_1em06_hadamard_...
                name = name.replace("fq_", "fq_rms_norm_" + f"{norm:g}".replace("-", "m").replace(".", "p") + "_", 1)
            if name not in self.added:
                func = cpu_transform.transform(steps, vector_lanes(target), residual, norm, bias, gelu)
                func = func.with_attr("global_symbol", name)
                self.added[name] = self.builder_.add_func(func, name)
            return self.added[name]

        def _consts(self, consts):
            return [self._transposed(c) if len(c.ty.shape) == 2 else self.visit_expr(c) for c in consts]

        def _transposed(self, frame):
            """The frame block as the fused kernel reads it, F^T (contiguous output vectors)."""
            if isinstance(frame, tvm.ir.expr.Constant):
                return relax.const(np.ascontiguousarray(frame.value.numpy().T))
            return self.builder_.emit(relax.op.permute_dims(self.visit_expr(frame)))

    return drop_unused(mutate_relax_functions(mod, _Fuse(mod)))


def _residual_adds(mod, plans, tables) -> dict:
    """{add: (plan, residual, 2-D type, bias or None)} for each `add(residual, reshape(y) [+ bias])`
    (either order each) where y is the output side of a layer: the end of a run in `plans` or a
    lone inverse Hadamard, used only there, with one parameter (signs); the residual has the
    reshaped y's shape, a bias is a constant vector as wide. `tables`: `chains.bindings` of each
    Relax function."""
    from tvm import relax
    from tvm_ffi import structural_equal

    found = {}
    for bound, uses in tables:
        for add in bound.values():
            if not (isinstance(add, relax.Call) and add.op == tvm.ir.Op.get("relax.add") and len(add.args) == 2):
                continue
            for y, residual in (list(add.args), list(add.args)[::-1]):
                y, bias = _through_bias(y, bound, uses)
                shaped = bound.get(y)
                if not (isinstance(shaped, relax.Call) and shaped.op == tvm.ir.Op.get("relax.reshape")
                        and uses.get(y) == 1 and uses.get(shaped.args[0]) == 1):
                    continue
                end = bound.get(shaped.args[0])
                plan = _side_plan(mod, end, plans)
                if plan is None:
                    continue
                ty, rty = y.ty, residual.ty
                if isinstance(rty, relax.TensorType) and rty.dtype == ty.dtype == "float32" and rty.shape is not None \
                        and structural_equal(rty.shape, ty.shape) and len(end.ty.shape) == 2:
                    found[add] = (plan, residual, end.ty, bias)
                    break
    return found


def _side_plan(mod, end, plans):
    """The plan (source, steps, params) of the output side `end` computes: the end of a run in
    `plans` or a lone inverse Hadamard, one side with one parameter; else None."""
    from tvm import relax

    from .chains import callee, step

    plan = plans.get(end)
    kernel = callee(mod, end) if plan is None and isinstance(end, relax.Call) else None
    if kernel is not None:
        one = step(kernel, end)
        if one is not None and one[0] == "hadamard" and one[3]:
            plan = (end.args[1].fields[0], [one], list(end.args[1].fields)[1:])
    return plan if plan is not None and _output_side(plan[1]) else None


def _gelu_ends(mod, plans, tables) -> dict:
    """{call: (plan, 2-D type, bias or None)} for each call computing GELU(reshape(y) [+ bias])
    (`_gelu_source`) where y is the output side of a layer (`_side_plan`) used only there and the
    bias a constant vector as wide: BERT's intermediate dense and its activation."""
    from tvm import relax
    from tvm_ffi import structural_equal

    found = {}
    for bound, uses in tables:
        for var, value in bound.items():
            if not isinstance(value, relax.Call):
                continue
            source = _gelu_source(value, bound, uses)
            if source is None:
                continue
            x, refs = source
            y, bias = _through_bias(x, bound, uses, readers=refs)
            shaped = bound.get(y)
            if not (isinstance(shaped, relax.Call) and shaped.op == tvm.ir.Op.get("relax.reshape")
                    and uses.get(y) == (1 if bias is not None else refs) and uses.get(shaped.args[0]) == 1):
                continue
            end = bound.get(shaped.args[0])
            plan = _side_plan(mod, end, plans)
            if plan is not None and len(end.ty.shape) == 2 and var.ty.shape is not None \
                    and structural_equal(var.ty.shape, y.ty.shape):
                found[value] = (plan, end.ty, bias)
    return found


GELU_NODES = 8  # elementwise calls at most in a GELU written out (the exports use 5)
_GELU_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.erf")


def _gelu_source(value, bound, uses):
    """(x, calls reading x) where the call `value` computes GELU(x), erf form, on a float32 tensor:
    R.nn.gelu(x), or adds, subtracts, multiplies and divides by scalar constants and erf over x
    alone, each intermediate used only there. The calls are evaluated on sample points and
    compared with x / 2 (1 + erf(x / sqrt 2)), so any order the exporters write is found."""
    from tvm import relax

    ty = value.ty
    if not (isinstance(ty, relax.TensorType) and ty.dtype == "float32"):
        return None
    if value.op == tvm.ir.Op.get("relax.nn.gelu"):
        return (value.args[0], 1) if isinstance(value.args[0], relax.Var) else None
    leaves, calls, erfs = [], [0], [0]

    def walk(expr, call):  # a function of the samples, or None
        if isinstance(expr, tvm.ir.expr.Constant):
            c = expr.value.numpy()
            return (lambda xs, c=float(c.reshape(()).item()): c) if c.size == 1 and c.dtype == np.float32 else None
        if isinstance(expr, relax.Var):
            inner = bound.get(expr)
            if uses.get(expr) == 1 and isinstance(inner, relax.Call):
                mark = len(leaves), calls[0]
                f = walk(inner, True)
                if f is not None:
                    return f
                del leaves[mark[0]:]  # not part of the GELU: expr is its input
                calls[0] = mark[1]
            leaves.append(expr)
            return lambda xs: xs
        if not (call and isinstance(expr, relax.Call) and getattr(expr.op, "name", None) in _GELU_OPS):
            return None
        calls[0] += 1
        if calls[0] > GELU_NODES:  # (before the arguments: a long chain is not walked again from every call)
            return None
        args = [walk(a, False) if isinstance(a, tvm.ir.expr.Constant) else walk(a, True) for a in expr.args]
        if None in args:
            return None
        erfs[0] += expr.op.name == "relax.erf"
        op = _NUMPY_OPS[expr.op.name]
        return lambda xs: op(*(a(xs) for a in args))

    f = walk(value, True)
    if f is None or not erfs[0] or not leaves or not all(v.same_as(leaves[0]) for v in leaves):
        return None
    xs, want = _gelu_samples()
    with np.errstate(all="ignore"):
        got = np.broadcast_to(f(xs), xs.shape)
    return (leaves[0], len(leaves)) if np.all(np.abs(got - want) <= 1e-9 + 1e-6 * np.abs(want)) else None


@functools.cache
def _gelu_samples():
    """(x, GELU(x)) on the sample points `_gelu_source` checks a chain of ops at."""
    xs = np.linspace(-6.0, 6.0, 241)
    return xs, 0.5 * xs * (1.0 + _erf(xs / np.sqrt(2.0)))


def _erf(xs):
    import math

    return np.vectorize(math.erf)(xs)


_NUMPY_OPS = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
              "relax.divide": np.divide, "relax.erf": _erf}


def _through_bias(y, bound, uses, readers: int = 1):
    """(z, b) where y = add(z, b) (either order), used by `readers` bindings only (the caller's), b a
    constant vector as wide as y's last axis; else (y, None)."""
    from tvm import relax

    value = bound.get(y)
    if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.add") and uses.get(y) == readers):
        return y, None
    for z, b in (list(value.args), list(value.args)[::-1]):
        last = z.ty.shape[-1] if isinstance(z, relax.Var) and getattr(z.ty, "shape", None) is not None else None
        if isinstance(b, tvm.ir.expr.Constant) and isinstance(last, tvm.tirx.IntImm) and b.value.dtype == "float32" \
                and tuple(b.value.shape) == (int(last),):
            return z, b
    return y, None


def _normed_sources(plans, tables) -> dict:
    """{end of a run: (x, epsilon, weight)} for each input side in `plans` whose input is
    `reshape(rms_norm(x, weight))` over the last axis, each used only there, weight a constant of
    the side's width. `tables`: `chains.bindings` of each Relax function."""
    from tvm import relax

    found = {}
    for end, (source, steps, _) in plans.items():
        side = cpu_transform.sides(steps)
        bound, uses = next((t for t in tables if source in t[0]), ({}, {}))  # the function binding source
        flat = bound.get(source)
        if side is None or side[1] is not None or side[0][1][3] != 0 or uses.get(source) != 1 \
                or not (isinstance(flat, relax.Call) and flat.op == tvm.ir.Op.get("relax.reshape")):
            continue
        norm = bound.get(flat.args[0])
        if not (isinstance(norm, relax.Call) and norm.op == tvm.ir.Op.get("relax.nn.rms_norm")
                and uses.get(flat.args[0]) == 1):
            continue
        x, weight = norm.args
        ty = x.ty
        axes = [int(a) % len(ty.shape) for a in norm.attrs.axes] if ty.shape is not None else []
        if ty.dtype == "float32" and axes == [len(ty.shape) - 1] and isinstance(weight, tvm.ir.expr.Constant) \
                and list(weight.value.shape) == [int(source.ty.shape[1])]:
            found[end] = (x, float(norm.attrs.epsilon), weight)
    return found


def _output_side(steps) -> bool:
    """A run of one side with one parameter (an inverse Hadamard, maybe a take after it)."""
    found = cpu_transform.sides(steps)
    return found is not None and found[1] is None and found[0][0] is None and found[0][2] is None \
        and found[0][1][3] == 1


def variant(func, target, act_bits: int):
    """Kernels written for CPUs with the same buffers: the Hadamard and the frame (and its
    transpose) one row at a time (`cpu_hadamard`, `cpu_frame`); with int8 activations, a
    dequant-matmul runs `cpu_int8` where the target has an ISA for it and the layer fits its
    blocks, else the float kernel above (`prelay` has already swapped in the pre-laid ones)."""
    written = _written(func.attrs, target, act_bits)
    return func if written is None else written.with_attr("global_symbol", func.attrs["global_symbol"])


def _written(attrs, target, act_bits: int):
    kind = str(attrs["fq_kernel"])
    if kind == "hadamard":
        return cpu_hadamard.hadamard(int(attrs["fq_dim"]), int(attrs["fq_block"]), bool(int(attrs["fq_inverse"])),
                                     vector_lanes(target))
    if kind == "swiglu":
        return cpu_transform.transform([("swiglu", int(attrs["fq_dim"]))], vector_lanes(target))
    if kind == "frame_analysis":
        return cpu_frame.frame_analysis(*(int(attrs[f"fq_{k}"]) for k in ("nblk", "two_l", "two_k", "tail")))
    if kind == "frame_synthesis":
        return cpu_frame.frame_synthesis(*(int(attrs[f"fq_{k}"]) for k in ("nblk", "two_l", "two_k", "tail")))
    if kind == "dequant_matmul" and act_bits == 8:
        plan = _int8_plan(attrs, target)
        return None if plan is None else cpu_int8.dequant_matmul(plan)
    return None


def _split_loops(sch, block):
    loops, iters = sch.get_loops(block), sch.get(block).iter_vars
    spatial = [lp for lp, it in zip(loops, iters) if it.iter_type != 2]
    reduce = [lp for lp, it in zip(loops, iters) if it.iter_type == 2]
    return spatial, reduce


def _reads_2d_weight(sch, block) -> bool:
    """A dense layer's matmul: one of its inputs is a 2-D parameter (a constant weight)."""
    params = {param.name for param in sch.mod["main"].params}
    return any(len(region.source.shape) == 2 and region.source.name in params for region in sch.get(block).reads)


UNROLL = 8  # vectors of output columns per weight row visit


def _constant(sch, loop) -> bool:
    return isinstance(sch.get(loop).extent, tvm.tirx.IntImm)


def _fuse_leading(sch, loops):
    """The leading loops fused for `parallel`, up to the first symbolic extent after the first
    (fusing over a symbolic extent divides by it to recover each index)."""
    keep = [loops[0]] + list(itertools.takewhile(lambda lp: _constant(sch, lp), loops[1:]))
    return sch.fuse(*keep) if len(keep) > 1 else keep[0]


def fp32_block(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Unscheduled (legalized) ops: dense matmuls stream each weight row once for all input rows,
    8 vectors of columns at a time; other blocks run rows in parallel (unless `parallel` is
    False), vectorised where spatial."""
    spatial, reduce = _split_loops(sch, block)
    if not spatial:
        return
    if reduce and _reads_2d_weight(sch, block):
        outer, group, vec = sch.split(spatial[-1], [None, UNROLL, lanes])
        sch.reorder(outer, *reduce, *spatial[:-1], group, vec)
        sch.unroll(group)
    elif (reduce and _reduces_last_axis(sch, block)) or not _constant(sch, spatial[-1]) or _writes_bool(sch, block):
        _whole_rows(sch, block, spatial, reduce, parallel)
        return
    elif reduce and _short_rows(sch, spatial[-1], lanes):
        # a short output row (attention's P @ V, 32-128 wide) stays in registers across the
        # reduction: one accumulator chain per vector instead of one chain for the whole row
        outer, vec = sch.split(spatial[-1], [None, lanes])
        sch.reorder(*spatial[:-1], *reduce, outer, vec)
        sch.unroll(outer)
        sch.vectorize(vec)
        if len(spatial) > 1 and parallel:
            sch.parallel(_fuse_leading(sch, spatial[:-1]))
        sch.decompose_reduction(block, reduce[0])
        return
    elif not reduce and (bounds := _piece_bounds(sch, block, lanes)):
        _by_pieces(sch, spatial, bounds, lanes, parallel)
        return
    else:
        outer, vec = sch.split(spatial[-1], [None, lanes])
        sch.reorder(*spatial[:-1], outer, *reduce, vec)
        if len(spatial) > 1 and not all(_constant(sch, lp) for lp in spatial[:-1]):
            outer = sch.fuse(*spatial[:-1])  # rows in parallel: one division by a symbolic extent per row
        elif len(spatial) > 1:
            outer = sch.fuse(*spatial[:-1], outer)
    if parallel:
        sch.parallel(outer)
    sch.vectorize(vec)
    if reduce:
        sch.decompose_reduction(block, reduce[0])


def _piece_bounds(sch, block, lanes: int) -> list:
    """Where the value along the last axis switches between expressions (a concatenate's
    `if_then_else(c <= v, ...)`: RoPE's rotate-half), in vectors, if every such bound c is a whole
    vector inside the axis; else []. TVM's vectoriser scalarises a loop whose vector condition
    varies, so such an axis is vectorised piece by piece (`_by_pieces`)."""
    stmt = sch.get(block)
    var, extent = stmt.iter_vars[-1].var, stmt.iter_vars[-1].dom.extent
    if not isinstance(extent, tvm.tirx.IntImm) or extent.value % lanes:
        return []
    bounds, odd = set(), []

    def visit(node):
        if isinstance(node, tvm.ir.Call) and node.op.same_as(tvm.ir.Op.get("prim.if_then_else")):
            cond = node.args[0]
            sides = (cond.a, cond.b) if isinstance(cond, (tvm.tirx.LT, tvm.tirx.LE, tvm.tirx.GT, tvm.tirx.GE)) else ()
            const = [e for e in sides if isinstance(e, tvm.tirx.IntImm)]
            if len(const) != 1 or not any(e.same_as(var) for e in sides):
                odd.append(cond)
                return
            # the first index where the condition's value changes: c, or c + 1 for `v <= c` / `c < v`
            c = const[0].value + (isinstance(cond, (tvm.tirx.LE, tvm.tirx.GT)) == cond.b.same_as(const[0]))
            if 0 < c < extent.value and c % lanes == 0:
                bounds.add(c)
            else:
                odd.append(cond)

    _visit_exprs(stmt.body, visit)
    return [] if odd or not bounds else sorted(c // lanes for c in bounds)


def _visit_exprs(node, visit) -> None:
    """visit(e) for every expression under a store or expression `node` (TVM 0.27 exposes no TIR
    visitor to Python)."""
    visit(node)
    for field in ("a", "b", "value", "condition", "true_value", "false_value"):
        child = getattr(node, field, None)
        if isinstance(child, tvm.ir.expr.Expr):
            _visit_exprs(child, visit)
    for child in list(getattr(node, "args", None) or []) + list(getattr(node, "indices", None) or []):
        if isinstance(child, tvm.ir.expr.Expr):
            _visit_exprs(child, visit)


def _by_pieces(sch, spatial, bounds: list, lanes: int, parallel: bool) -> None:
    """Leading axes fused in parallel; the last split into vectors and the vector loop partitioned
    at `bounds` (`_piece_bounds`), so each piece's condition is constant and its vector loop vectorises."""
    if len(spatial) > 1 and parallel:
        sch.parallel(spatial[0] if len(spatial) == 2 else sch.fuse(*spatial[:-1]))
    outer, _ = sch.split(spatial[-1], [None, lanes])
    widths = [b - a for a, b in zip([0] + bounds, bounds)]
    for piece in sch.loop_partition(outer, widths + [None]):
        for inner in sch.get_child_blocks(piece):
            sch.vectorize(sch.get_loops(inner)[-1])


def _writes_bool(sch, block) -> bool:
    """TVM 0.27 fails to build a vector store to a bool buffer (kept as int8): "dtype mismatch on
    BufferStore" (a mask of 8 tokens with 8 lanes). Such blocks are left to LLVM's vectoriser."""
    return any(region.source.dtype == "bool" for region in sch.get(block).writes)


def _short_rows(sch, loop, lanes: int) -> bool:
    extent = sch.get(loop).extent
    return _constant(sch, loop) and extent.value % lanes == 0 and extent.value <= 8 * lanes


def _reduces_last_axis(sch, block) -> bool:
    """A reduction over the contiguous last axis of every input (softmax, layer norm, mean; not a
    matmul, whose second input runs along the output axis)."""
    stmt = sch.get(block)
    reduce_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == 2}
    return bool(stmt.reads) and all(region.region and isinstance(region.region[-1].min, tvm.tirx.Var)
                                    and region.region[-1].min in reduce_vars for region in stmt.reads)


def _whole_rows(sch, block, spatial, reduce, parallel: bool = True) -> None:
    """Leading constant axes in parallel; innermost either the reduction over a contiguous last
    axis (scalar, in order), or a symbolic last axis (a sequence length) kept whole for LLVM's loop
    vectoriser: split + vectorize would leave a guarded, scalarised vector loop with divisions by
    the extent inside."""
    if reduce and _reduces_last_axis(sch, block):
        sch.reorder(*spatial, *reduce)
    else:
        sch.reorder(*spatial[:-1], *reduce, spatial[-1])
    if parallel:
        sch.parallel(_fuse_leading(sch, spatial[:-1]) if len(spatial) > 1 else spatial[0])
    if reduce:
        sch.decompose_reduction(block, reduce[0])


def fallback(func, target):
    """Schedule a PrimFunc fq-tvm did not write (legalized fp32 ops), block by block; a block the
    rule cannot handle is left as it is. Where the largest buffer may hold fewer than SERIAL_WORK
    elements (a decode step's norms, adds, softmax), a serial copy runs below that size: a
    parallel launch costs more than such work. Returns (func, what was left: ["block: error", ...])."""
    sch = s_tir.Schedule(func)
    try:
        blocks(sch)
    except Exception:  # noqa: BLE001 - no block structure (e.g. an extern/scan op): leave it alone
        return func, ["no blocks to schedule: a TOPI op written as loops (ir_builder)"]
    found = [sch.get(block).name_hint for block in _inline_elementwise(sch)]
    work = _largest_buffer(func)
    if isinstance(work, tvm.tirx.IntImm):
        return _schedule(sch, found, target, parallel=work.value >= SERIAL_WORK)
    par, left = _schedule(sch.copy(), found, target, parallel=True)
    if not _has_parallel(par):
        return par, left
    ser, _ = _schedule(sch, found, target, parallel=False)
    return _versioned(par, ser, work < SERIAL_WORK), left


def _schedule(sch, names: list, target, parallel: bool):
    """Each named block of `sch` (elementwise blocks already inlined) under fp32_block."""
    lanes = vector_lanes(target)
    left = []
    for name in names:
        trial = sch.copy()
        try:
            fp32_block(trial, trial.get_sblock(name), lanes, parallel)
        except Exception as err:  # noqa: BLE001 - the rule does not fit this block: keep it unscheduled
            left.append(f"{name}: {_first_line(err)}")
            continue
        sch = trial
    return sch.mod["main"], left


def _largest_buffer(func):
    """The element count of the function's largest parameter buffer (a PrimExpr, maybe symbolic)."""
    from tvm.sym.analyzer import Analyzer

    largest = tvm.tirx.const(0, "int64")
    for param in func.params:
        if not isinstance(param.ty, tvm.tirx.buffer.BufferType):
            continue
        size = tvm.tirx.const(1, "int64")
        for dim in param.ty.shape:
            size = size * tvm.tirx.Cast("int64", dim)
        largest = tvm.tirx.max(largest, size)
    return Analyzer().simplify(largest)  # an IntImm where every size is static


def _has_parallel(func) -> bool:
    def walk(node) -> bool:
        if isinstance(node, tvm.tirx.For) and node.kind == tvm.tirx.ForKind.PARALLEL:
            return True
        children = list(getattr(node, "seq", None) or [])
        children += [getattr(node, k, None) for k in ("block", "body", "init", "then_case", "else_case")]
        return any(walk(child) for child in children if isinstance(child, (tvm.tirx.Stmt, s_tir.SBlock)))

    return walk(func.body)


def _versioned(par, ser, small):
    """One function: `ser`'s loops where `small` holds, else `par`'s (two schedules of one PrimFunc;
    loop variables they share are renamed by ConvertSSA)."""
    a, b = par.body.block, ser.body.block
    allocs = list(a.alloc_buffers) + [buf for buf in b.alloc_buffers
                                       if not any(buf.same_as(other) for other in a.alloc_buffers)]
    root = s_tir.SBlock([], [], [], "root", tvm.tirx.IfThenElse(small, b.body, a.body), None, allocs)
    func = par.with_body(s_tir.SBlockRealize([], True, root))
    return tvm.tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))["main"]


def _inline_elementwise(sch) -> list:
    """Fold each elementwise block that feeds exactly one other block into it (GELU's bias, divide,
    erf, add and multiplies become one pass instead of five over a full-size buffer); a block read
    twice (softmax's exp) stays, so nothing is computed twice. Returns the blocks left."""
    changed = True
    while changed:
        changed = False
        for block in blocks(sch):
            if is_reduction(sch, block) or len(sch.get_consumers(block)) != 1:
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - an output block, or an access pattern inlining cannot take
                continue
            changed = True
            break
    return blocks(sch)


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1][:120]}" if lines else type(err).__name__
