"""The CPU randomized Hadamard: one pass per row instead of one kernel launch per butterfly stage.

Same buffers as `kernels.hadamard` (x, signs -> y), so `cpu.variant` can swap it in. Each row is
transformed while it sits in L1, rows in parallel. A row goes through in chunks of 8 vectors held
in registers: the forward signs and the normalisation on the way in, every butterfly stage whose
pairs lie in the chunk (pairs inside a vector: a lane shuffle and one multiply-add by a +-1 vector;
pairs across vectors: adds and subtracts), then out. Blocks wider than a chunk take their later
stages two per pass over the row (radix-4, radix-2 for an odd last one), a vector at a time; the
inverse signs are applied by the last stage. Blocks under 4 columns: scalar radix-2.

The earlier form (an 8 x 8 product, then stages left to LLVM's vectoriser) read the stages on 8-
and 16-column pairs as gathers and scatters across pairs: 5-13x slower on Zen 4 (2026-11-27).
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from .common import STACK, each_row, parsed_once, row_kernel, same_row
from .kernels import OPAQUE

KIND = "hadamard_rows"
CHUNK_VECTORS = 8  # vectors a row chunk keeps in registers (8 of AVX-512's 32, AVX2's 16)


@parsed_once
def hadamard(dim: int, block: int, inverse: bool, lanes: int = 16) -> tvm.tirx.PrimFunc:
    row = row_macro(dim, block, inverse, lanes)
    func = row_kernel(dim, dim, (dim,), each_row(same_row(row)))
    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE})


def row_macro(dim: int, block: int, inverse: bool, lanes: int = 16):
    """The macro row(xi, x, signs, yi, y): row xi of x transformed into row yi of y, with vectors of
    at most `lanes` floats (the target's width)."""
    if block < 4:
        return _radix2(dim, block, inverse)
    L = min(lanes, block)
    ch = min(block, CHUNK_VECTORS * L)
    norm = T.float32(1.0 / math.sqrt(block))
    chunk = _seq([_in_vector(d, L, ch) for d in _powers(1, L)] + [_across(d, L, ch) for d in _powers(L, ch)])
    later = _later_stages(dim, block, ch, L, inverse)
    sign_out = inverse and ch == block

    @T.macro
    def row(xi, x, signs, yi, y):
        a = T.alloc_buffer((ch,), "float32", annotations=STACK)
        t = T.alloc_buffer((L,), "float32", annotations=STACK)
        for c in range(dim // ch):
            for v in T.unroll(ch // L):
                if inverse:
                    a[T.ramp(v * L, 1, L)] = x[xi, T.ramp(c * ch + v * L, 1, L)] * T.Broadcast(norm, L)
                else:
                    a[T.ramp(v * L, 1, L)] = x[xi, T.ramp(c * ch + v * L, 1, L)] * (
                        signs[T.ramp(c * ch + v * L, 1, L)] * T.Broadcast(norm, L))
            chunk(a, t, signs)
            for v in T.unroll(ch // L):
                if sign_out:
                    y[yi, T.ramp(c * ch + v * L, 1, L)] = a[T.ramp(v * L, 1, L)] * signs[T.ramp(c * ch + v * L, 1, L)]
                else:
                    y[yi, T.ramp(c * ch + v * L, 1, L)] = a[T.ramp(v * L, 1, L)]
        later(yi, y, signs)

    return row


def _powers(lo: int, hi: int) -> list:
    """The powers of two d with lo <= d < hi."""
    return [1 << s for s in range(int(math.log2(lo)), int(math.log2(hi)))]


def _in_vector(d: int, L: int, ch: int):
    """The stage on pairs d apart inside each vector: v' = swap_d(v) + v * (+1 or -1 by lane)."""

    @T.macro
    def stage(a, t, signs):
        for v in T.unroll(ch // L):
            a[T.ramp(v * L, 1, L)] = _swap(a[T.ramp(v * L, 1, L)], d, L) + a[T.ramp(v * L, 1, L)] * _signs(d, L)

    return stage


def _swap(vec, d: int, L: int):
    """vec with each lane j exchanged for lane j ^ d."""
    return tvm.tirx.Shuffle([vec], [tvm.tirx.IntImm("int32", j ^ d) for j in range(L)])


def _signs(d: int, L: int):
    """The constant vector +1 on lanes whose bit d is clear, -1 on the others."""
    both = [tvm.tirx.Broadcast(T.float32(1), L), tvm.tirx.Broadcast(T.float32(-1), L)]
    return tvm.tirx.Shuffle(both, [tvm.tirx.IntImm("int32", L + j if j & d else j) for j in range(L)])


def _across(d: int, L: int, ch: int):
    """The stage on pairs d >= L apart in the chunk `a` (t: one vector of scratch)."""

    @T.macro
    def stage(a, t, signs):
        for b in T.unroll(ch // (2 * d)):
            for j in T.unroll(d // L):
                t[T.ramp(0, 1, L)] = a[T.ramp(b * 2 * d + j * L, 1, L)]
                a[T.ramp(b * 2 * d + j * L, 1, L)] = t[T.ramp(0, 1, L)] + a[T.ramp(b * 2 * d + d + j * L, 1, L)]
                a[T.ramp(b * 2 * d + d + j * L, 1, L)] = t[T.ramp(0, 1, L)] - a[T.ramp(b * 2 * d + d + j * L, 1, L)]

    return stage


def _later_stages(dim: int, block: int, ch: int, L: int, inverse: bool):
    """macro(yi, y, signs): the stages on pairs ch or more apart, in place on row yi of y: two per
    pass (radix-4), radix-2 for an odd last one; the inverse signs applied by the last."""
    dists = _powers(ch, block)
    passes = [(d, 4) for d in dists[0:len(dists) - 1:2]] + ([(dists[-1], 2)] if len(dists) % 2 else [])
    if not passes:
        @T.macro
        def none(yi, y, signs):
            T.evaluate(0)

        return none
    return _seq([_radix4(dim, d, L, inverse and i == len(passes) - 1) if n == 4
                      else _radix2_pass(dim, d, L, inverse) for i, (d, n) in enumerate(passes)])


def _seq(macros: list):
    """One macro(p, q, signs) running the given ones in order (TVMScript has no loop over Python
    values): the chunk's stages (a, t, signs) or the row's passes (yi, y, signs)."""
    if len(macros) == 1:
        return macros[0]
    first, rest = macros[0], _seq(macros[1:])

    @T.macro
    def both(p, q, signs):
        first(p, q, signs)
        rest(p, q, signs)

    return both


def _radix4(dim: int, d: int, L: int, last_inverse: bool):
    """Stages d and 2d in one pass: each 4 vectors d apart become their 4-point Hadamard, summed in
    the radix-2 order (same results), half the loads and stores of two passes."""

    @T.macro
    def stage(yi, y, signs):
        for b in range(dim // (4 * d)):
            for j in range(d // L):
                i0: T.let = b * 4 * d + j * L
                a0: T.let = y[yi, T.ramp(i0, 1, L)]
                a1: T.let = y[yi, T.ramp(i0 + d, 1, L)]
                a2: T.let = y[yi, T.ramp(i0 + 2 * d, 1, L)]
                a3: T.let = y[yi, T.ramp(i0 + 3 * d, 1, L)]
                if last_inverse:
                    y[yi, T.ramp(i0, 1, L)] = (a0 + a1 + (a2 + a3)) * signs[T.ramp(i0, 1, L)]
                    y[yi, T.ramp(i0 + d, 1, L)] = (a0 - a1 + (a2 - a3)) * signs[T.ramp(i0 + d, 1, L)]
                    y[yi, T.ramp(i0 + 2 * d, 1, L)] = (a0 + a1 - (a2 + a3)) * signs[T.ramp(i0 + 2 * d, 1, L)]
                    y[yi, T.ramp(i0 + 3 * d, 1, L)] = (a0 - a1 - (a2 - a3)) * signs[T.ramp(i0 + 3 * d, 1, L)]
                else:
                    y[yi, T.ramp(i0, 1, L)] = a0 + a1 + (a2 + a3)
                    y[yi, T.ramp(i0 + d, 1, L)] = a0 - a1 + (a2 - a3)
                    y[yi, T.ramp(i0 + 2 * d, 1, L)] = a0 + a1 - (a2 + a3)
                    y[yi, T.ramp(i0 + 3 * d, 1, L)] = a0 - a1 - (a2 - a3)

    return stage


def _radix2_pass(dim: int, d: int, L: int, inverse: bool):
    """The last stage alone (pairs d apart), the inverse signs applied."""

    @T.macro
    def stage(yi, y, signs):
        for b in range(dim // (2 * d)):
            for j in range(d // L):
                lo: T.let = b * 2 * d + j * L
                a: T.let = y[yi, T.ramp(lo, 1, L)]
                c: T.let = y[yi, T.ramp(lo + d, 1, L)]
                if inverse:
                    y[yi, T.ramp(lo, 1, L)] = (a + c) * signs[T.ramp(lo, 1, L)]
                    y[yi, T.ramp(lo + d, 1, L)] = (a - c) * signs[T.ramp(lo + d, 1, L)]
                else:
                    y[yi, T.ramp(lo, 1, L)] = a + c
                    y[yi, T.ramp(lo + d, 1, L)] = a - c

    return stage


def _radix2(dim: int, block: int, inverse: bool):
    """Blocks of 1 or 2 columns: scalar stages."""
    stages = int(math.log2(block))
    norm = 1.0 / math.sqrt(block)

    @T.macro
    def row(xi, x, signs, yi, y):
        for j in range(dim):
            y[yi, j] = x[xi, j] if inverse else x[xi, j] * signs[j]
        for s in T.unroll(stages):
            for b in range(dim >> (s + 1)):
                for j in range(1 << s):
                    lo: T.let = b * (2 << s) + j
                    a: T.let = y[yi, lo]
                    c: T.let = y[yi, lo + (1 << s)]
                    y[yi, lo] = a + c
                    y[yi, lo + (1 << s)] = a - c
        for j in range(dim):
            y[yi, j] = y[yi, j] * (signs[j] * T.float32(norm) if inverse else T.float32(norm))

    return row
