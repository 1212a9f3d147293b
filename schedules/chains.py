"""Runs of row transforms in a Relax module (pad, Hadamard, frame, take: our kernels, each a
call_tir of the previous one's output), which a target family fuses into one kernel per run."""

from __future__ import annotations

import tvm


def transform_plans(mod) -> dict:
    """{last call of a run: (its input, steps, constant args)} over every Relax function of `mod`."""
    from tvm import relax

    plans = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            plans.update(_chains(mod, func))
    return plans


def drop_unused(mod):
    """The module without our kernels that no Relax function calls any more."""
    from tvm import relax

    used = set()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            used.update(relax.analysis.all_global_vars(func))
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "fq_kernel" in func.attrs \
                and gvar not in used:
            del mod[gvar]
    return mod


def callee(mod, call):
    """Our kernel a `call_tir` calls, or None."""
    from tvm import relax

    if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
        return None
    gvar = call.args[0]
    if not isinstance(gvar, relax.GlobalVar) or gvar not in mod.functions:
        return None
    func = mod[gvar]
    if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "fq_kernel" in func.attrs:
        return func
    return None


def step(func, call) -> tuple | None:
    """A run's call as a `kernels.transform` step, or None: ("pad", dim, new), ("take", dim, keep),
    ("hadamard", dim, block, inverse), ("frame", nblk, two_l, two_k, tail), ("swiglu", dim)."""
    a = func.attrs
    kind = str(a["fq_kernel"])
    if kind == "hadamard":
        return ("hadamard", int(a["fq_dim"]), int(a["fq_block"]), int(a["fq_inverse"]))
    if kind == "frame_analysis":
        return ("frame", int(a["fq_nblk"]), int(a["fq_two_l"]), int(a["fq_two_k"]), int(a["fq_tail"]))
    if kind == "swiglu":
        return ("swiglu", int(a["fq_dim"]))
    if kind == "resize":
        dim = int(call.args[1].fields[0].ty.shape[1])
        new = int(call.ty.shape[1])
        return ("pad", dim, new) if new > dim else ("take", dim, new)
    return None


def bindings(func) -> tuple[dict, dict]:
    """({var: bound value}, {var: uses}) of a Relax function's bindings (uses by later bindings
    and by the function's result)."""
    from tvm import relax

    bound, uses = {}, {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                uses[var] = uses.get(var, 0) + 1
            if isinstance(binding, relax.VarBinding):
                bound[binding.var] = binding.value
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] = uses.get(var, 0) + 1
    return bound, uses


def _chains(mod, func) -> dict:
    """Every run of two or more row transforms in `func` where each intermediate feeds only the next."""
    from tvm import relax

    bound, uses = bindings(func)
    info = {}
    for var, value in bound.items():
        kernel = callee(mod, value) if isinstance(value, relax.Call) else None
        found = step(kernel, value) if kernel is not None else None
        if found is not None:
            info[var] = (value, found)
    fed = {info[v][0].args[1].fields[0] for v in info}
    plans = {}
    for var, (call, _) in info.items():
        if var in fed and uses.get(var, 0) == 1:
            continue  # not the end of its run
        calls = [call]
        source = call.args[1].fields[0]
        while source in info and uses.get(source, 0) == 1:
            calls.insert(0, info[source][0])
            source = calls[0].args[1].fields[0]
        if len(calls) > 1:
            steps = [step(callee(mod, c), c) for c in calls]
            consts = [arg for c in calls for arg in list(c.args[1].fields)[1:]]
            plans[call] = (source, steps, consts)
    return plans


def transform_name(steps) -> str:
    words = []
    for s in steps:
        words.append("hadamard_inv" if s[0] == "hadamard" and s[3] else s[0])
        words.append("x".join(str(v) for v in s[1:]))
    return "fq_" + "_".join(words)
