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
