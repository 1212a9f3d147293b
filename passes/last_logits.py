"""A second entry point of a causal LM that computes the logits of the last position only.

A prefill of P tokens needs the next-token logits of the last one; `main` computes all P rows of
the LM head (SmolLM2: 128 x 49152 x 576 multiply-adds, about a fifth of the prefill). This pass
adds `main_last`: `main` with the head's input sliced to the last position, `h[:, s-1:s]`, before
the row-wise ops that end in the logits (the norm's scale, the head matmul or its quantized
kernels, reshapes); the rest of `main` is unchanged and the full head is dead code there. The
head's ops move into a private function whose sequence length is bound to 1, so every shape in it
is static. `main` is kept (perplexity needs every row).

The head chain is found from the first output back through bindings with exactly one tensor
operand that is not a constant; it stops at the first op that is not row-wise. Runs on the bound
module (weights as constants), after the quantization passes.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.ir.expr import GenericConst  # a Relax tensor constant
from tvm.relax.expr_functor import PyExprMutator, mutator

NAME = "main_last"
_ROWWISE = {"relax.matmul", "relax.multiply", "relax.add", "relax.subtract", "relax.divide", "relax.reshape",
            "relax.astype"}


def AddLastLogits(seq_axis: int = 1):  # noqa: N802 - a pass, named like TVM's
    """Add `main_last` to a module whose `main` returns (logits [batch, seq, vocab], ...) with seq
    the dim `seq_axis` of its first parameter; a module without such a head is returned unchanged."""

    @tvm.transform.module_pass(opt_level=0, name="fq.AddLastLogits")
    def _pass(mod, _ctx):
        last = last_logits_function(mod, seq_axis)
        if last is None:
            return mod
        main, head, found = last
        rewrite = _LastHead(mod, head, found)
        func = _own_symbolic_vars(relax.analysis.remove_all_unused(rewrite.visit_expr(main)))
        rewrite.builder_.add_func(func.with_attr("global_symbol", NAME), NAME)
        return rewrite.builder_.get()

    return _pass


def _own_symbolic_vars(func):
    """`func` with fresh symbolic variables for those its parameters define (it was built from
    `main`'s body, and each function defines its own)."""
    dims = [dim for param in func.params for dim in getattr(param.ty, "shape", None) or []]
    fresh = {}
    for dim in dims:
        if isinstance(dim, tvm.tirx.Var) and not any(dim.same_as(seen) for seen in fresh):
            fresh[dim] = tvm.tirx.Var(dim.name, "int64")
    return func.bind_symbolic_vars(fresh) if fresh else func


def last_logits_function(mod, seq_axis: int = 1):
    """(main, head function, (logits var, h var, seq var, seq axis)) or None when `main` has no such head."""
    main = mod["main"]
    if not main.params or len(main.params[0].ty.shape) <= seq_axis:
        return None
    seq = main.params[0].ty.shape[seq_axis]
    if not isinstance(seq, tvm.tirx.Var):
        return None
    bindings = {b.var: b.value for block in main.body.blocks for b in block.bindings}
    logits = _first_output(main.body.body, bindings)
    if logits is None:
        return None
    chain, h = _head_chain(mod, logits, bindings)
    shape = getattr(h.ty, "shape", None)
    if not chain or shape is None or len(shape) <= seq_axis or not shape[seq_axis].same_as(seq):
        return None
    return main, _head_function(chain, h, bindings, seq), (logits, h, seq, seq_axis)


def _first_output(body, bindings):
    value = bindings.get(body, body) if isinstance(body, relax.Var) else body
    if not isinstance(value, relax.Tuple) or not value.fields or not isinstance(value.fields[0], relax.Var):
        return None
    return value.fields[0]


def _constant(arg, bindings) -> bool:
    while isinstance(arg, relax.Var) and arg in bindings:
        arg = bindings[arg]
    return isinstance(arg, (tvm.ir.expr.Constant, relax.ShapeExpr))


def _head_chain(mod, var, bindings):
    """The bindings from the head's input h to `var`, and h."""
    chain = []
    while var in bindings:
        value = bindings[var]
        operands = _operands(mod, value)
        if operands is None:
            break
        data = [arg for arg in operands if not _constant(arg, bindings)]
        if len(data) != 1 or not isinstance(data[0], relax.Var) or not _rowwise(value, data[0]):
            break
        chain.insert(0, var)
        var = data[0]
    return chain, var


def _operands(mod, value):
    """The tensor operands of a call the chain may cross, or None."""
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    if value.op.name == "relax.call_tir":
        gvar = value.args[0]
        func = mod[gvar] if gvar in mod.functions else None
        ours = isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "fq_kernel" in func.attrs
        return list(value.args[1].fields) if ours else None  # our kernels work row by row on their first operand
    return list(value.args) if value.op.name in _ROWWISE else None


def _rowwise(value, data) -> bool:
    """Rows of `data` (all but its last axis) map to rows of the result one by one."""
    name = value.op.name
    if name == "relax.call_tir":
        return value.args[1].fields[0].same_as(data)
    if name == "relax.matmul":
        return value.args[0].same_as(data) and len(getattr(value.args[1].ty, "shape", [])) == 2
    out, shape = getattr(value.ty, "shape", None), getattr(data.ty, "shape", None)
    if out is None or shape is None or not _same_dim(out[-1], shape[-1]):
        return False
    if name in ("relax.reshape", "relax.astype"):
        return True
    other = [arg for arg in value.args if not arg.same_as(data)][0]
    other_shape = getattr(other.ty, "shape", None)
    return other_shape is not None and all(int(d) == 1 for d in list(other_shape)[:-1]
                                           if isinstance(d, tvm.tirx.IntImm)) and len(other_shape) <= len(shape)


def _same_dim(a, b) -> bool:
    from tvm_ffi import structural_equal

    return bool(structural_equal(a, b))


def _resolve(arg, bindings):
    while isinstance(arg, relax.Var) and arg in bindings and isinstance(bindings[arg], GenericConst):
        arg = bindings[arg]
    return arg


def _head_function(chain, h, bindings, seq):
    """A private function h_last -> logits of the chain's ops, the sequence length bound to 1."""
    param = relax.Var("h", h.ty)
    new = {h: param}

    def arg(a):
        return new.get(a, _resolve(a, bindings))

    bb = relax.BlockBuilder()
    with bb.function("head", [param], private=True):
        with bb.dataflow():
            for var in chain:
                value = bindings[var]
                if value.op.name == "relax.call_tir":
                    fields = relax.Tuple([arg(f) for f in value.args[1].fields])
                    call = relax.Call(value.op, [value.args[0], fields, *value.args[2:]], value.attrs, value.ty_args)
                else:
                    call = relax.Call(value.op, [arg(a) for a in value.args], value.attrs, value.ty_args)
                new[var] = bb.emit(call)
            out = bb.emit_output(new[chain[-1]])
        bb.emit_func_output(out)
    return _own_symbolic_vars(bb.get()["head"].bind_symbolic_vars({seq: 1}))


@mutator
class _LastHead(PyExprMutator):
    """`main` with its first output replaced by the head function on h's last position."""

    def __init__(self, mod, head, found):
        super().__init__(mod)
        self.head_gvar = self.builder_.add_func(head, "last_logits_head")
        self.logits, self.h, self.seq, self.axis = found

    def visit_tuple_(self, tup):
        tup = super().visit_tuple_(tup)
        if not tup.fields or not tup.fields[0].same_as(self.visit_expr(self.logits)):
            return tup
        h = self.visit_expr(self.h)
        last = self.builder_.emit(relax.op.strided_slice(h, axes=[self.axis], begin=[self.seq - 1], end=[self.seq],
                                                         assume_inbound=True))
        logits = self.builder_.emit(relax.Call(self.head_gvar, [last]))
        return relax.Tuple([logits, *tup.fields[1:]])
