"""Helpers shared by the per-target schedule files."""

from __future__ import annotations

import tvm.s_tir as s_tir


def blocks(sch: s_tir.Schedule) -> list:
    """The compute blocks of the function (not the root)."""
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(var.iter_type == 2 for var in sch.get(block).iter_vars)  # 2: CommReduce
