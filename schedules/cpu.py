"""CPU schedules (llvm: x86 AVX-512 and aarch64 NEON alike): parallel over output rows/columns,
vectorised over the target's vector width."""

from __future__ import annotations

import tvm.s_tir as s_tir

from .common import blocks, is_reduction


def vector_lanes(target) -> int:
    """float32 lanes of the target's widest vector unit."""
    from tvm.target import codegen

    try:
        bits = int(codegen.llvm_get_vector_width(target))
    except Exception:  # older/odd targets: assume 128-bit (NEON, SSE)
        bits = 128
    return max(4, bits // 32)


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


RULES = {"dequant_matmul": dequant_matmul}
DEFAULT = elementwise
