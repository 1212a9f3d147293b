"""Kernel definitions (`kernels`) and their schedules per target family (`cpu`, `gpu`).

`apply(mod, target)` schedules every PrimFunc carrying `fq_kernel` and marks it scheduled, so that
the rest of the build (dlight included) leaves it alone. Adding a schedule for a new kernel kind is
one entry in a family's RULES; adding a target family is one module with RULES and DEFAULT.
"""

from __future__ import annotations

import tvm
import tvm.s_tir as s_tir


def family(target):
    from . import cpu, gpu

    return gpu if "gpu" in target.keys else cpu


def schedule_func(func, target):
    rules = family(target)
    kind = str(func.attrs["fq_kernel"])
    sch = s_tir.Schedule(func)
    rules.RULES.get(kind, rules.DEFAULT)(sch, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def apply(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Schedule our kernels in `mod` for `target`; other functions are left untouched."""
    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and "fq_kernel" in func.attrs:
            updates[gvar] = schedule_func(func, target)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
