"""Graph rewrites on Relax (target-independent)."""


def rewrite_functions(mod, rewriter):
    """(module, count): `rewriter` (a PyExprMutator built on `mod` that counts its rewrites in
    `count`) run over every Relax function, then dead code eliminated; `mod` itself where it
    rewrote nothing."""
    from tvm import relax

    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    if not rewriter.count:
        return mod, 0
    return relax.transform.DeadCodeElimination()(rewriter.builder_.finalize()), rewriter.count


def static_ints(values) -> list | None:
    """The values as ints where every one is an integer constant, else None."""
    import tvm

    return [int(v) for v in values] if all(isinstance(v, tvm.tirx.IntImm) for v in values) else None


def int_tuple(arg) -> list | None:
    """The integers of a Relax tuple of integer constants (a strided_slice's axes, begin, end,
    strides), None where it is not one."""
    from tvm import relax

    return static_ints(list(arg.fields)) if isinstance(arg, relax.Tuple) else None
