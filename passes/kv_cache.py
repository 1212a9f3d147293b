"""A third entry point of a causal LM with a KV cache that appends to the cache in place.

The exported graph (fq_tvm/kvcache.py) takes the past keys and values [batch, kv_heads, past,
head_dim] and returns the present ones, `concat(past, new)`: every decode step copies the whole
cache of every layer into freshly allocated tensors (SmolLM2 at 192 tokens of past: 8.8 MB per
token). This pass adds `main_kv`, built from `main_last` (or `main`):

  main_kv(input_ids, position_ids, total: R.Shape([total]), cache_key.0, cache_value.0, ...) -> logits

Each cache argument is one buffer [batch, capacity, kv_heads, head_dim] (seq-major) whose first
total - seq rows hold the past; `R.memory.view` takes its first `total` rows (a seq-major prefix is
contiguous; the view checks total <= capacity), each concat becomes a `call_tir_inplace` of
`kv_append` writing rows total - seq .. total - 1 of the view, and attention reads it through
`permute_dims` (no copy on CPU: `cpu_attention` reads seq-major heads in place). The caller keeps
the buffers and passes the length (fq_tvm/generate.py): no view is made in Python per step.

Runs on the bound module after AddLastLogits; a module whose past inputs do not all feed one
concat along the sequence axis is returned unchanged.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.utils import copy_with_new_vars

from .last_logits import NAME as LAST, _own_symbolic_vars

NAME = "main_kv"
STEP = "main_kv1"


def _kernels():
    from ..schedules import kernels

    return kernels


def AddCacheInPlace(past_inputs: int):  # noqa: N802 - a pass, named like TVM's
    """Add `main_kv` to a module whose entry takes (input_ids, position_ids, *past) with
    `past_inputs` past tensors, each used once by `concat((past, new), axis=2)`."""

    @tvm.transform.module_pass(opt_level=0, name="fq.AddCacheInPlace")
    def _pass(mod, _ctx):
        names = [gvar.name_hint for gvar in mod.get_global_vars()]
        source = mod[LAST] if LAST in names else mod["main"]
        found = _concats(source, past_inputs)
        if found is None:
            return mod
        rewrite = _InPlace(mod, found)
        func = _own_symbolic_vars(relax.analysis.remove_all_unused(rewrite.rewrite(source)))
        rewrite.builder_.add_func(func.with_attr("global_symbol", NAME), NAME)
        return rewrite.builder_.get()

    return _pass


def AddDecodeStep():  # noqa: N802 - a pass, named like TVM's
    """Add `main_kv1`: `main_kv` for one token of one sequence (batch and seq bound to 1), the
    decoding step. Its shapes are static but for the cache length, so the VM loads them as
    constants instead of building each at run time (SmolLM2: 1331 shapes built a step)."""

    @tvm.transform.module_pass(opt_level=0, name="fq.AddDecodeStep")
    def _pass(mod, _ctx):
        if NAME not in [gvar.name_hint for gvar in mod.get_global_vars()]:
            return mod
        kv = copy_with_new_vars(mod[NAME])  # (its own vars, symbolic ones too)
        ids = getattr(kv.params[0].ty, "shape", None) or []
        ones = {dim: 1 for dim in ids if isinstance(dim, tvm.tirx.Var)}
        if not ones:
            return mod
        step = kv.bind_symbolic_vars(ones).with_attr("global_symbol", STEP)
        out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs, global_infos=mod.global_infos)
        out[STEP] = step
        return out

    return _pass


def _concats(func, count: int):
    """{concat var: past param} when each of the last `count` params is used exactly once, by a
    concat along axis 2 with one other operand; else None."""
    params = list(func.params)
    if count < 1 or len(params) < count + 1:
        return None
    past = params[-count:]
    uses = {p: [] for p in past}
    for block in func.body.blocks:
        for binding in block.bindings:
            for p in relax.analysis.free_vars(binding.value):
                if p in uses:
                    uses[p].append(binding)
    found = {}
    for p in past:
        shape = getattr(p.ty, "shape", None)
        if (len(uses[p]) != 1 or shape is None or len(shape) != 4
                or not all(isinstance(d, tvm.tirx.IntImm) for d in (shape[1], shape[3]))):  # static heads, dim
            return None
        binding = uses[p][0]
        value = binding.value
        if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.concat")
                and int(value.attrs.axis) == 2 and isinstance(value.args[0], relax.Tuple)
                and len(value.args[0].fields) == 2 and value.args[0].fields[0].same_as(p)):
            return None
        found[binding.var] = p
    dims = {str(p.ty.shape[2]) for p in past}
    return found if len(dims) == 1 and isinstance(past[0].ty.shape[2], tvm.tirx.Var) else None


@mutator
class _InPlace(PyExprMutator):
    """The source function with seq-major cache params, in-place appends, and the logits returned."""

    def __init__(self, mod, found):
        super().__init__(mod)
        self.found = found
        self.kernels = {}

    def rewrite(self, func):
        past = list(self.found.values())
        seq_len = past[0].ty.shape[2]
        total, capacity = tvm.tirx.Var("total", "int64"), tvm.tirx.Var("capacity", "int64")
        n_new = func.params[0].ty.shape[-1]  # input_ids [batch, seq]
        self.caches, self.total = {}, total
        params = list(func.params[:-len(past)]) + [relax.Var("total", relax.ShapeType([total]))]
        for p in func.params[-len(past):]:
            batch, heads, _, dim = p.ty.shape
            cache = relax.Var(p.name.replace("past_", "cache_"),
                              relax.TensorType([batch, capacity, heads, dim], p.ty.dtype))
            self.caches[p] = cache
            params.append(cache)
        body = self.visit_expr(func.body)
        out = self.lookup_binding(body.body) if isinstance(body.body, relax.Var) else body.body
        if isinstance(out, relax.Tuple) and out.fields:  # the logits only: the caches are written in place
            body = self.builder_.normalize(relax.SeqExpr(body.blocks, out.fields[0]))
        # past = total - seq: bound while the old past params still define it, then dropped (unused)
        bound = relax.Function(params + past, body, None, func.is_pure, func.attrs)
        bound = bound.bind_symbolic_vars({seq_len: total - n_new})
        return relax.Function(list(bound.params[:len(params)]), bound.body, None, func.is_pure, func.attrs)

    def visit_var_binding_(self, binding):
        if binding.var not in self.found:
            return super().visit_var_binding_(binding)
        buffer = self.caches[self.found[binding.var]]
        batch, _, heads, dim = buffer.ty.shape
        cache = self.builder_.emit(relax.op.memory.view(buffer, relax.ShapeExpr([batch, self.total, heads, dim])))
        new = self.visit_expr(binding.value.args[0].fields[1])
        new, seq_major = self._seq_major(new)
        heads, dim = int(heads), int(dim)
        key = (heads, dim, seq_major)
        if key not in self.kernels:
            name = f"kv_append_{heads}x{dim}{'_seq' if seq_major else ''}"
            self.kernels[key] = self.builder_.add_func(_kernels().kv_append(heads, dim, seq_major), name)
        written = self.builder_.emit(relax.op.call_tir_inplace(self.kernels[key], [cache, new], [0], cache.ty))
        heads_major = self.builder_.emit(relax.op.permute_dims(written, [0, 2, 1, 3]))
        self.set_var_remap(binding.var, heads_major)

    def _seq_major(self, new):
        """(tensor, True) when `new` is permute_dims(x, [0, 2, 1, 3]) of a seq-major x, else (new, False)."""
        bound = self.lookup_binding(new) if isinstance(new, relax.Var) else None
        if (isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.permute_dims")
                and bound.attrs.axes is not None and [int(a) for a in bound.attrs.axes] == [0, 2, 1, 3]):
            return bound.args[0], True
        return new, False
