"""The CPU dequant-matmul that computes in int8: activations quantized per row and group, packed
codes widened to bytes in registers, products accumulated in int32 by the ISA's dot instruction.

Same buffers as `kernels.dequant_matmul` (x, packed, scale, zero -> y), so `cpu.variant` can swap
it in; a `prelaid` plan instead reads 8-bit codes as words laid out at compile time
(`words_layout`, `cpu.prelay`). Three stages in one PrimFunc:
1. quantize: per row i and activation group a (numerics.act_group), `xq = rint(x / ax)` with
   `ax = max|x| / 127`, stored so that code t of packed byte b meets its activation with unit
   stride (the layout of `kernels.dequant_matmul`'s `xp`); `axs[i, a] = ax * sum(xq)` for the
   zero-point term;
2. integer products: a register tile of MR activation rows x NR weight rows; per block of V packed
   bytes, each weight row is loaded once, widened to V codes per bit position t, and dotted with
   the MR rows (`Isa.dot`, int32 lanes); a lone row masks its codes in place instead (`part_dot`);
3. per group, the int32 lanes become float and take the scales: with codes offset by c for a
   signed dot, `y = sum_a sum_g s (ax (sum (q - c) xq) - (z - c) axs)`.
From `Knobs.many_rows` rows (every row count where prelaid) the many-row path (`gemm_part`) replaces 2 and 3.

The last block of a row re-reads the V bytes ending at the row's end; its activations are zero
where a byte was already counted, so no code beyond the row is read and no padding is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import tvm
from tvm.script import tirx as T

from ..numerics.activations import act_group
from ..numerics.packing import packed_width
from .common import AHEAD, LINE, SERIAL_ROWS, STACK, lane_sums, parsed_once, prefetch, wide
from .kernels import OPAQUE

KIND = "dequant_matmul_int8"


def _intrin(dtype, name, *args):
    return T.call_llvm_pure_intrin(dtype, name, *args)


def _chain(acc, codes, xs, dot):
    for c, x in zip(codes, xs):
        acc = dot(acc, c, x)
    return acc


def _dot_vnni512(acc, codes, xs):
    return _chain(acc, codes, xs, lambda a, c, x: _intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", a, c, x))


def _dot_avx2(acc, codes, xs):
    """vpmaddubsw pairs summed in int16 over the codes of one byte (2-bit: |sum| <= 4 * 2 * 3 * 128,
    4-bit: 2 * 2 * 15 * 128), then one vpmaddwd into the int32 lanes."""
    pairs = None
    for c, x in zip(codes, xs):
        term = _intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", c, x)
        pairs = term if pairs is None else pairs + term
    return acc + _intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.Broadcast(T.int16(1), 16))


def _dot_avx2_signed(acc, codes, xs):
    """Signed 8-bit codes: |c| x (sign(c) x), so that vpmaddubsw's unsigned operand is |c| <= 128
    and a pair sums to at most 2 * 128 * 127 (activations are within +-127)."""
    (c,), (x,) = codes, xs
    magnitude = _intrin("int8x32", "llvm.x86.avx2.psign.b", c, c)
    return _dot_avx2(acc, [magnitude], [_intrin("int8x32", "llvm.x86.avx2.psign.b", x, c)])


def _dot_sdot(acc, codes, xs):
    return _chain(acc, codes, xs, lambda a, c, x: _intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", a, c, x))


def _dot_widen(acc, codes, xs):
    """No dot instruction: widen to int32 lanes (LLVM emits widening multiply-adds)."""
    return _chain(acc, codes, xs, lambda a, c, x: a + T.Cast("int32x16", c) * T.Cast("int32x16", x))


@dataclass(frozen=True)
class Isa:
    """One dot-product instruction family: V code bytes per step, int32 accumulator lanes, the
    register tile (MR activation rows x NR weight rows, and NR for a lone row), and the code
    offset per bit width (0: codes enter as unsigned u8; else codes - offset enter as signed i8).
    `dot(acc, codes, xs)` adds the products of the codes of one byte position to `acc`.
    `gemm` is the register tile of the many-row path (MR rows x NV vectors of weight rows) and
    `words` the 4-code words per `dot` call there, per bit width; None: no many-row path."""

    name: str
    features: tuple[str, ...]
    vbytes: int
    lanes: int
    tile: tuple[int, int]
    lone_rows: dict  # bits -> NR when a single activation row remains
    dot: Callable
    offsets: dict  # bits -> offset
    signed_dot: Callable | None = None  # used where offsets[bits] != 0, if given
    narrow_offsets: dict | None = None  # bits -> offset for 7-bit codes in bytes (None: `offsets`)
    gemm: tuple[int, int] | None = None
    words: dict | None = None  # bits -> words per dot call in the many-row path
    in_place: bool = False  # lone rows take codes masked in place (no shifts): needs an int32 4-way dot
    pdep: bool = False  # the many-row decode spreads a word's code bits with BMI2 `pdep` (no table)
    prelay: bool = False  # compiles pre-lay 8-bit codes as words (cpu.prelay): measured faster here


ISAS = [
    Isa("avx512-vnni", ("avx512bw", "avx512vnni", "bmi2"), 64, 16, (4, 2), {2: 4, 4: 4, 8: 4}, _dot_vnni512,
        {2: 0, 4: 0, 8: 0}, gemm=(4, 4), words={2: 4, 4: 4, 8: 4}, in_place=True, pdep=True, prelay=True),
    # words: vpmaddubsw pairs summed in int16 (2-bit: 4 * 2 * 3 * 128, 4-bit: 4 * 2 * 15 * 128)
    # lone rows: one for 4- and 8-bit codes, whose 4 interleaved weight-row streams halved a
    # one-row product's bandwidth (Zen 3: SmolLM2's int8 head 6.6 -> 2.9 ms from memory, a
    # 4096^2 int8 layer 1.72 -> 0.93 ms from cache); four for 2-bit, whose activation loads the
    # 4 rows share (1536 x 648 from cache: 26 us with 4, 62 with 1); pre-laid 8-bit words: on a
    # real Zen 3, 4096^2 0.38 -> 0.33 ms at M = 1, 24 -> 19-22 at 128; 1536 x 384 0.150 -> 0.099
    # at M = 16 (znver3 code on Zen 4 had read 1.25x slower at M = 1, hence off until 2026-11-28)
    # narrow_offsets: a code below 128 (scheme int7) times an activation within +-127 pairs to under
    # 2^15 unsigned: no vpsignb (4096^2 at 16 and 128 rows 1.2x faster than int8, Zen 3)
    Isa("avx2", ("avx2",), 32, 8, (4, 1), {2: 4, 4: 1, 8: 1}, _dot_avx2, {2: 0, 4: 0, 8: 128}, _dot_avx2_signed,
        narrow_offsets={2: 0, 4: 0, 8: 0}, gemm=(4, 1), words={2: 4, 4: 4, 8: 1}, prelay=True),
    Isa("neon-dotprod", ("neon", "dotprod"), 16, 4, (4, 2), {2: 4, 4: 4, 8: 4}, _dot_sdot, {2: 2, 4: 8, 8: 128},
        gemm=(4, 2), words={2: 4, 4: 4, 8: 4}, in_place=True),
    Isa("neon", ("neon",), 16, 16, (2, 1), {2: 2, 4: 2, 8: 2}, _dot_widen, {2: 0, 4: 0, 8: 0}),
]

GEMM_ROW_SPLIT = 2  # tasks per weight block where blocks are few and odd (9 on 2 threads ran 5 + 4; each
# task decodes its block: SmolLM2 down 576 x 1728 at 128 rows -5%, o 576 x 648 -2%; 15 blocks +1%, so not)


@dataclass(frozen=True)
class Knobs:
    """The schedule's tunable choices; the defaults are the hand schedule. fq-tune searches them
    (`FEW_ROW_SPACE`, `MANY_ROW_SPACE`) and a tuned build writes the kernel with its winners."""

    chunk_cols: int = 4096  # columns of one cache block of the reduction (4096 measured faster than 1024, 2048)
    chunk_rows: int = 64  # weight rows per parallel task
    unroll_cols: int = 512  # columns per unrolled step of the few-row reduction
    many_rows: int = 64  # activation rows from which the many-row path runs (its decoding pays off)
    gemm_task_rows: int = 64  # weight rows per parallel task of the many-row path
    gemm_chunk_cols: int = 1024  # columns per cache block of the many-row path
    gemm_tile_block: int = 8  # row tiles whose activations stay in L1 while every weight vector passes


# Candidates per knob (each holds its hand value): the few-row path's knobs act below `many_rows`
# activation rows, the many-row path's from it.
FEW_ROW_SPACE = {"chunk_cols": (1024, 2048, 4096, 8192), "chunk_rows": (32, 64, 128), "unroll_cols": (256, 512, 1024),
                 "many_rows": (16, 32, 64)}
MANY_ROW_SPACE = {"gemm_task_rows": (32, 64, 128), "gemm_chunk_cols": (512, 1024, 2048),
                  "gemm_tile_block": (4, 8, 16)}
GEMM_ROWS = Knobs().many_rows
ACC_VECTORS = 16  # int32 accumulator vectors a register tile may hold


def select_isa(target) -> Isa | None:
    """The first ISA whose features the target has; None where no int8 kernel applies."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return None
    for isa in ISAS:
        if all(codegen.llvm_cpu_has_features(f, target) for f in isa.features):
            return isa
    return None


@dataclass(frozen=True)
class Plan:
    """Block geometry of one layer for one ISA. (Loops below start at 0: TVM 0.27 miscompiled a
    `range(start, stop)` with a start that depends on an outer loop.)"""

    rows: int
    cols: int
    bits: int
    group_cols: int  # columns per weight group (0: one group per row)
    isa: Isa
    knobs: Knobs = Knobs()
    act_width: int = 0  # columns per activation group where there is no weight group (0: act_group's)
    prelaid: bool = False  # 8-bit codes stored as the many-row path's words (`words_layout`)
    code_bits: int = 0  # 7: codes below 128 stored in bytes (scheme int7); 0: `bits`

    @property
    def offset(self) -> int:  # what the codes enter the dot less (0: unsigned)
        table = self.isa.narrow_offsets if self.code_bits == 7 and self.isa.narrow_offsets else self.isa.offsets
        return table[self.bits]

    @property
    def many_rows(self) -> int:  # activation rows from which the many-row path runs
        return self.knobs.many_rows

    @property
    def ngroups(self) -> int:
        return -(-self.cols // self.group_cols) if self.group_cols else 1

    @property
    def per(self) -> int:
        return 8 // self.bits

    @property
    def width(self) -> int:  # packed bytes per row
        return packed_width(self.cols, self.bits)

    @property
    def nblocks(self) -> int:  # blocks of V bytes per row
        return -(-self.width // self.isa.vbytes)

    @property
    def block_cols(self) -> int:
        return self.isa.vbytes * self.per

    @property
    def blocks_per_group(self) -> int:
        return min(self.nblocks, self.act_cols // self.block_cols)

    @property
    def nact(self) -> int:  # activation groups per row
        return -(-self.nblocks // self.blocks_per_group)

    @property
    def groups_per_chunk(self) -> int:
        return max(1, self.knobs.chunk_cols // (self.blocks_per_group * self.block_cols))

    @property
    def act_cols(self) -> int:  # columns per activation group
        return self.group_cols or self.act_width or act_group(self.cols)

    @property
    def unroll(self) -> int:  # blocks per unrolled step: the largest divisor of a group's within unroll_cols
        most = max(1, self.knobs.unroll_cols // self.block_cols)
        return max(u for u in range(1, most + 1) if self.blocks_per_group % u == 0)

    @property
    def words(self) -> int:  # 4-code words per row in the many-row path, padded to whole dot calls
        step = self.isa.words[self.bits]
        return -(-(-(-self.cols // 4)) // step) * step

    @property
    def gemm_tile(self) -> tuple[int, int] | None:
        """(MR, NV) of the many-row path: the ISA's, halving NV until NV vectors of weight rows
        divide the rows; None where even one does not, or the ISA has no many-row path."""
        if self.isa.gemm is None:
            return None
        mr, nv = self.isa.gemm
        while nv > 1 and self.rows % (nv * self.isa.lanes):
            nv //= 2
        return (mr, nv) if self.rows % (nv * self.isa.lanes) == 0 else None

    @property
    def gemm(self) -> bool:
        return self.gemm_tile is not None

    def row_tiles(self) -> tuple[int, int]:
        """NR for full tiles and for a lone row: the ISA's, or 1 where it does not divide rows."""
        return tuple(n if self.rows % n == 0 else 1 for n in (self.isa.tile[1], self.isa.lone_rows[self.bits]))


def plan(rows: int, cols: int, bits: int, group_cols: int, target, many_rows: int = GEMM_ROWS,
         act_cols: int = 0, words: bool = False, code_bits: int = 0) -> Plan | None:
    """The layer's plan for `target`, or None where the int8 kernel does not apply (no ISA, a row
    shorter than one vector, weight or activation groups that are not whole blocks). act_cols:
    columns per activation group (0: numerics.act_group's for a rotated input). words: 8-bit
    codes pre-laid as the many-row path's words (`words_layout`, at compile time) where it applies;
    that path then runs for every row count, with no decoding and no horizontal sums. code_bits: 7
    for codes below 128 stored in bytes (scheme int7)."""
    isa = select_isa(target)
    if isa is None or bits not in isa.offsets:
        return None
    p = Plan(rows, cols, bits, 0 if group_cols >= cols else group_cols, isa, Knobs(many_rows=many_rows), act_cols,
             code_bits=code_bits if code_bits and code_bits < bits else 0)
    if p.width < isa.vbytes or p.group_cols % p.block_cols or p.act_cols % p.block_cols:
        return None
    return replace(p, prelaid=words and bits == 8 and p.gemm)


def _idx(values):
    return [tvm.tirx.IntImm("int32", v) for v in values]


def words_layout(packed: np.ndarray, p: Plan) -> np.ndarray:
    """8-bit codes [rows, cols] -> the pre-laid words uint32 [rows / L, words, L] that
    `dequant_matmul(p)` reads where `p.prelaid`: word w of row n holds its codes 4w .. 4w+3, each
    less the ISA's offset, lowest byte first; zeros past the row's end."""
    rows, L, offset = p.rows, p.isa.lanes, p.offset
    codes = np.zeros((rows, p.words * 4), np.uint8)
    codes[:, :p.cols] = (packed[:, :p.cols].astype(np.int32) - offset) & 255
    laid = codes.reshape(rows // L, L, p.words, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(laid).view("<u4").reshape(rows // L, p.words, L)


def _lut_word(byte, bits: int, offset: int):
    """The codes of one packed byte, each less `offset`, as bytes of a uint32 (lowest first)."""
    word = T.uint32(0)
    for t in range(8 // bits):
        code = ((T.Cast("uint32", byte) >> T.uint32(bits * t)) & T.uint32((1 << bits) - 1)) + T.uint32(256 - offset)
        word = word | ((code & T.uint32(255)) << T.uint32(8 * t))  # (no negative uint: TVM sign-extended it)
    return word


def _span_words(group: int, most: int, step: int) -> int:
    """Words per flush of the many-row path: the whole group where it fits `most`, else the
    largest multiple of `step` that divides it and does."""
    if group <= most:
        return group
    return max(w for w in range(step, most + 1, step) if group % w == 0)


def gemm_part(p: Plan):
    """The many-row path as a macro over (x words, packed, scale, zero, y, ax, axs, m).

    Per task of `gemm_task_rows` weight rows and cache block of columns, the codes are decoded once
    into 4-code words laid out [row vector][word][lane] (`block_words`, BMI2 pdep or a 256-entry
    table; pre-laid 8-bit codes are read as they are); a register tile of MR activation rows x NV
    vectors of weight rows then broadcasts 4 activation bytes per row against a vector of words
    (the ISA's dot adds the 4 products per int32 lane), and each span (an activation group, or an
    equal part of one) flushes into y with the scales: y += ax s sum(q xq), and the group's first
    span - axs s z."""
    isa = p.isa
    N, K, Bw, G, P, L = p.rows, p.cols, p.width, p.ngroups, p.per, isa.lanes
    MR, NV = p.gemm_tile
    S = isa.words[p.bits]
    offset = p.offset
    dot = isa.signed_dot if offset and isa.signed_dot is not None else isa.dot
    AG4 = p.act_cols // 4  # words per activation group
    NA = -(-K // p.act_cols)
    K4P = p.words
    pre = p.prelaid
    spread = isa.pdep and not offset  # decode by pdep, else by a 256-entry table
    table = not pre and not spread
    fast = spread and p.bits == 2 and L == 16  # 2-bit on AVX-512: decode 16 x 16 words in vectors
    mask = (1 << p.bits) - 1
    SW = _span_words(AG4, p.knobs.gemm_chunk_cols // 4, S)  # words per flush: a group, or an equal part of one
    NS = -(-K4P // SW)
    # spans per cache block, no more than the row has: a block sized past the row decoded its
    # padding too (K = 432 at 1024 columns: 256 words for 108; 1.19-1.29x slower at 64-128 rows, Zen 3)
    SPC = max(1, min(p.knobs.gemm_chunk_cols // 4 // SW, NS))
    KC4 = SPC * SW
    NKC = -(-NS // SPC)
    NC = max(p.knobs.gemm_task_rows // (NV * L), 1) * NV * L
    BPW = 4 // P  # packed bytes per word
    NTASK = -(-N // NC)
    MS = GEMM_ROW_SPLIT if NTASK % 2 and NTASK < 12 else 1  # few weight blocks, odd: rows split too
    TB = p.knobs.gemm_tile_block

    def wgroup(a):
        return a if G > 1 else 0

    def word_vec(wdec, nc, vec, w, xw):  # decoded: local vector and word; pre-laid: global
        if pre:
            return T.reinterpret(f"int8x{4 * L}", wdec.vload([nc * (NC // L) + vec, xw, 0], f"uint32x{L}"))
        return T.reinterpret(f"int8x{4 * L}", wdec.vload([(vec * KC4 + w) * L], f"uint32x{L}"))

    def x_bcast(xn, i, w):
        return T.reinterpret(f"int8x{4 * L}", T.Broadcast(
            T.reinterpret("int32", xn.vload([(i * K4P + w) * 4], "int8x4")), L))

    def word_dot(acc, wdec, nc, xn, vec, w, i, xw):  # S words of weight vector `vec` from local word w
        return dot(acc, [word_vec(wdec, nc, vec, w + u, xw + u) for u in range(S)],
                   [x_bcast(xn, i, xw + u) for u in range(S)])

    def block_words(packed, n0, b0):
        """Words b0 .. b0+15 (2-bit: one byte each) of rows n0 .. n0+15 as one [word][row] vector:
        16 byte loads, a 16 x 16 byte transpose in four rounds of interleaves, each byte's four
        codes spread into the bytes of a uint32."""
        vecs = [packed.vload([n0 + r, b0], "uint8x16") for r in range(16)]
        lo, hi = _idx(v for j in range(8) for v in (j, 16 + j)), _idx(v for j in range(8, 16) for v in (j, 16 + j))
        for _ in range(4):
            vecs = [tvm.tirx.Shuffle([vecs[i // 2], vecs[i // 2 + 8]], lo if i % 2 == 0 else hi) for i in range(16)]
        b = T.Cast("uint32x256", tvm.tirx.Shuffle(vecs, _idx(range(256))))
        words = b & T.Broadcast(T.uint32(3), 256)
        for t in range(1, 4):
            words = words | ((b << T.Broadcast(T.uint32(6 * t), 256)) & T.Broadcast(T.uint32(3 << (8 * t)), 256))
        return words

    def packed_word(packed, lut, n, k4):  # the 4 codes of word k4 of weight row n
        if spread:  # the word's packed bits, each code's spread into its own byte
            bits = T.uint32(0)
            for j in range(BPW):
                b = k4 * BPW + j
                byte = T.if_then_else(b < Bw, T.Cast("uint32", packed[n, T.min(b, Bw - 1)]), T.uint32(0))
                bits = bits | (byte << T.uint32(8 * j)) if j else byte
            return T.call_llvm_pure_intrin("uint32", "llvm.x86.bmi.pdep.32", bits, T.uint32(mask * 0x01010101))
        word = T.uint32(0)
        for j in range(BPW):
            b = k4 * BPW + j
            code = T.if_then_else(b < Bw, lut[T.Cast("int32", packed[n, T.min(b, Bw - 1)])], T.uint32(0))
            word = word | (code << T.uint32(8 * P * j)) if j else code
        return word

    @T.macro
    def decode(packed, lut, wdec, nc, kc):
        if fast:  # blocks of 16 rows x 16 words in vectors, the rest (and a row's end) word by word
            for vec in range(T.min(NC, N - nc * NC) // L):
                for wb in range(KC4 // 16):
                    if kc * KC4 + wb * 16 + 16 <= Bw:
                        wdec[T.ramp((vec * KC4 + wb * 16) * L, 1, 256)] = block_words(
                            packed, nc * NC + vec * L, kc * KC4 + wb * 16)
                    else:
                        for r in range(16):
                            for w in range(16):
                                wdec[(vec * KC4 + wb * 16 + w) * L + r] = packed_word(
                                    packed, lut, nc * NC + vec * L + r, kc * KC4 + wb * 16 + w)
                for r in range(16):
                    for w in range(KC4 % 16):
                        wdec[(vec * KC4 + KC4 // 16 * 16 + w) * L + r] = packed_word(
                            packed, lut, nc * NC + vec * L + r, kc * KC4 + KC4 // 16 * 16 + w)
        else:
            for nl in range(T.min(NC, N - nc * NC)):
                for w in range(KC4):
                    wdec[((nl // L) * KC4 + w) * L + nl % L] = packed_word(packed, lut, nc * NC + nl, kc * KC4 + w)

    def zero_term(axs, i, a, sp):  # the group's zero-point term, taken by its first span
        if SW == AG4:
            return axs[i * NA + a]
        return T.if_then_else(sp * SW % AG4 == 0, axs[i * NA + a], T.float32(0))

    @T.macro
    def tile(R, i0, nt, nc, kc, xn, wdec, scs, zss, ax, axs, y, iacc):
        for gs in range(T.min(SPC, NS - kc * SPC)):
            sp: T.let = kc * SPC + gs
            a: T.let = sp * SW // AG4
            for k in T.unroll(R * NV):
                iacc[T.ramp(k * L, 1, L)] = T.Broadcast(0, L)
            for st in range(T.min(SW, K4P - sp * SW) // S):
                for r in T.unroll(R):
                    for v in T.unroll(NV):
                        iacc[T.ramp((r * NV + v) * L, 1, L)] = word_dot(
                            iacc[T.ramp((r * NV + v) * L, 1, L)], wdec, nc, xn, nt * NV + v, gs * SW + st * S,
                            i0 + r, sp * SW + st * S)
            for r in T.unroll(R):
                for v in T.unroll(NV):
                    col: T.let = (nt * NV + v) * L
                    part: T.let = T.Cast(f"float32x{L}", iacc[T.ramp((r * NV + v) * L, 1, L)]) * T.Broadcast(
                        ax[(i0 + r) * NA + a], L) * scs[T.ramp(wgroup(a) * NC + col, 1, L)] - T.Broadcast(
                        zero_term(axs, i0 + r, a, sp), L) * zss[T.ramp(wgroup(a) * NC + col, 1, L)]
                    if sp == 0:
                        y[i0 + r, T.ramp(nc * NC + col, 1, L)] = part
                    else:
                        y[i0 + r, T.ramp(nc * NC + col, 1, L)] = y[i0 + r, T.ramp(nc * NC + col, 1, L)] + part

    @T.macro
    def prepare(packed, lut, wdec, nc, kc):  # the chunk's words: decoded here, or pre-laid already
        if not pre:
            if kc == 0 and table:
                for b in range(256):
                    lut[b] = _lut_word(b, p.bits, offset)
            decode(packed, lut, wdec, nc, kc)

    @T.macro
    def run(xn, packed, scale, zero, y, ax, axs, m):
        for task in T.parallel(NTASK * MS):
            nc: T.let = task // MS
            t0: T.let = m // MR * (task % MS) // MS  # this task's row tiles: t0 .. t0 + tn - 1
            tn: T.let = m // MR * (task % MS + 1) // MS - t0
            lut = T.alloc_buffer((256 if table else 1,), "uint32", annotations=STACK)
            wdec = T.alloc_buffer((1 if pre else NC * KC4,), "uint32")
            scs = T.alloc_buffer((G * NC,), "float32")
            zss = T.alloc_buffer((G * NC,), "float32")
            iacc = T.alloc_buffer((MR * NV * L,), "int32", annotations=STACK)
            for g in range(G):
                for nl in range(T.min(NC, N - nc * NC)):
                    scs[g * NC + nl] = scale[nc * NC + nl, g]
                    zss[g * NC + nl] = scale[nc * NC + nl, g] * (zero[nc * NC + nl, g] - T.float32(offset))
            for kc in range(NKC):
                prepare(packed, lut, wdec, nc, kc)
                src = packed if pre else wdec
                for ib in range((tn + TB - 1) // TB):  # a block of row tiles against every weight vector
                    for nt in range(T.min(NC, N - nc * NC) // (NV * L)):
                        for it in range(T.min(TB, tn - ib * TB)):
                            tile(MR, (t0 + ib * TB + it) * MR, nt, nc, kc, xn, src, scs, zss, ax, axs, y, iacc)
                if task % MS == MS - 1:
                    for nt in range(T.min(NC, N - nc * NC) // (NV * L)):
                        for ir in range(m % MR):
                            tile(1, m // MR * MR + ir, nt, nc, kc, xn, src, scs, zss, ax, axs, y, iacc)

    return run, K4P


@T.macro
def _no_gemm(xn, packed, scale, zero, y, ax, axs, m):
    T.evaluate(0)


@parsed_once
def dequant_matmul(p: Plan) -> tvm.tirx.PrimFunc:
    isa = p.isa
    N, K, Bw, G = p.rows, p.cols, p.width, p.ngroups
    P, V, L = p.per, isa.vbytes, isa.lanes
    NB, KPA, NA, GPC, U = p.nblocks, p.blocks_per_group, p.nact, p.groups_per_chunk, p.unroll
    NKC = -(-NA // GPC)
    MR = isa.tile[0]
    NR, NR1 = p.row_tiles()
    NC = max(p.knobs.chunk_rows // (NR * NR1) * NR * NR1, NR * NR1)  # rows per task: whole tiles of both
    offset = p.offset
    dot = isa.signed_dot if offset and isa.signed_dot is not None else isa.dot
    mask = (1 << p.bits) - 1
    step = P * V  # xq elements per block and row
    gemm, K4P = gemm_part(p) if p.gemm else (_no_gemm, 0)
    many = p.many_rows if p.gemm else 1 << 62  # rows from which the many-row path runs
    pre = p.prelaid
    if pre:
        many = 1
    PSHAPE, PTYPE = ((N // L, K4P, L), "uint32") if pre else ((N, Bw), "uint8")
    SP1 = P if isa.in_place else 1  # accumulators per output of a lone row: one per code position
    SPT = SP1 if MR * NR * SP1 <= ACC_VECTORS else 1  # and of a full tile, where they fit the registers

    def start(kb):  # first byte read by block kb
        return T.min(kb * V, Bw - V)

    def wgroup(a):
        return a if G > 1 else 0

    def lanes(buf, k):
        return buf[T.ramp(k * L, 1, L)]

    def block_dot(acc, packed, n, xq, i, kb):
        word = packed.vload([n, start(kb)], f"uint8x{V}")
        codes = []
        for t in range(P):
            q = (word >> T.Broadcast(T.uint8(p.bits * t), V)) & T.Broadcast(T.uint8(mask), V)
            if offset:
                q = q - T.Broadcast(T.uint8(offset), V)
            codes.append(T.reinterpret(f"int8x{V}", q))
        xs = [xq.vload([(i * NB + kb) * step + t * V], f"int8x{V}") for t in range(P)]
        return dot(acc, codes, xs)

    def part_dot(acc, packed, n, xq, i, kb, t, SP):
        """acc plus the products of code position t (all P where SP is 1). SP = P: the codes are
        masked in place, so scaled by 2^(bits t), which `int_sums` shifts out once per group."""
        if SP == 1:
            return block_dot(acc, packed, n, xq, i, kb)
        word = packed.vload([n, start(kb)], f"uint8x{V}")
        q = word & T.Broadcast(T.Cast("uint8", T.uint32(mask) << T.Cast("uint32", p.bits * t)), V)
        if offset:
            q = q - T.Broadcast(T.Cast("uint8", T.uint32(offset) << T.Cast("uint32", p.bits * t)), V)
        return dot(acc, [T.reinterpret(f"int8x{V}", q)], [xq.vload([(i * NB + kb) * step + t * V], f"int8x{V}")])

    def int_sums(iacc, k, SP):  # the int32 lanes of output k
        if SP == 1:
            return lanes(iacc, k)
        total = lanes(iacc, k * SP)
        for t in range(1, SP):
            total = total + (lanes(iacc, k * SP + t) >> T.Broadcast(p.bits * t, L))  # exact: multiples
        return total

    @T.macro
    def tile(R, NT, SP, i0, n0, kc, packed, scale, zero, y, xq, ax, axs, facc, zacc, iacc):
        for k in T.unroll(R * NT):
            facc[T.ramp(k * L, 1, L)] = T.Broadcast(T.float32(0), L)
            zacc[k] = T.float32(0)
        for ga in range(T.min(GPC, NA - kc * GPC)):
            a: T.let = kc * GPC + ga
            for k in T.unroll(R * NT * SP):
                iacc[T.ramp(k * L, 1, L)] = T.Broadcast(0, L)
            for j in range((T.min(KPA, NB - a * KPA) + U - 1) // U):
                for u in T.unroll(U):  # unrolled here: LLVM's own unrolling differs between modules
                    if j * U + u < NB - a * KPA:
                        for mi in T.unroll(R):
                            for r in T.unroll(NT):
                                for t in T.unroll(SP):
                                    iacc[T.ramp(((mi * NT + r) * SP + t) * L, 1, L)] = part_dot(
                                        lanes(iacc, (mi * NT + r) * SP + t), packed, n0 + r, xq, i0 + mi,
                                        a * KPA + j * U + u, t, SP)
            for mi in T.unroll(R):
                for r in T.unroll(NT):
                    if G > 1:
                        facc[T.ramp((mi * NT + r) * L, 1, L)] = lanes(facc, mi * NT + r) + T.Cast(
                            f"float32x{L}", int_sums(iacc, mi * NT + r, SP)) * T.Broadcast(
                            ax[(i0 + mi) * NA + a] * scale[(n0 + r) * G + a], L)
                        zacc[mi * NT + r] = zacc[mi * NT + r] + axs[(i0 + mi) * NA + a] * scale[(n0 + r) * G + a] * (
                            zero[(n0 + r) * G + a] - T.float32(offset))
                    else:  # one weight group: its scale and zero once per output, below
                        facc[T.ramp((mi * NT + r) * L, 1, L)] = lanes(facc, mi * NT + r) + T.Cast(
                            f"float32x{L}", int_sums(iacc, mi * NT + r, SP)) * T.Broadcast(ax[(i0 + mi) * NA + a], L)
                        zacc[mi * NT + r] = zacc[mi * NT + r] + axs[(i0 + mi) * NA + a]
        for mi in T.unroll(R):  # the NT sums of row mi, side by side in y
            cols = T.ramp(n0, 1, NT) if NT > 1 else n0
            sums: T.let = lane_sums([lanes(facc, mi * NT + r) for r in range(NT)], L)
            total: T.let = sums - zacc[T.ramp(mi * NT, 1, NT) if NT > 1 else mi * NT] if G > 1 else scale[cols] * (
                sums - (zero[cols] - wide(T.float32(offset), NT)) * wide(zacc[mi * NT], NT))
            if kc == 0:
                y[i0 + mi, cols] = total
            else:
                y[i0 + mi, cols] = y[i0 + mi, cols] + total

    @T.macro
    def quantize_row(i, x, xq, xn, ax, axs, m):  # stage 1 for activation row i
        qrow = T.alloc_buffer((K,), "int8", annotations=STACK)
        amax = T.alloc_buffer((1,), "int32", annotations=STACK)
        qsum = T.alloc_buffer((1,), "int32", annotations=STACK)
        for a in range(NA):
            # max |x| as the int32 bits of |x| (monotonic for floats >= 0): an integer
            # reduction LLVM vectorises; then the group rounded in column order
            amax[0] = 0
            for c in range(T.min(KPA * step, K - a * KPA * step)):
                amax[0] = T.max(amax[0], T.reinterpret("int32", T.fabs(x[i, a * KPA * step + c])))
            top: T.let = T.reinterpret("float32", amax[0])
            ax[i * NA + a] = top / T.float32(127)
            inv: T.let = T.if_then_else(top > T.float32(0), T.float32(127) / top, T.float32(0))
            qsum[0] = 0
            for c in range(T.min(KPA * step, K - a * KPA * step)):
                q: T.let = T.Cast("int32", T.nearbyint(x[i, a * KPA * step + c] * inv))
                qrow[a * KPA * step + c] = T.Cast("int8", q)
                qsum[0] = qsum[0] + q
            axs[i * NA + a] = ax[i * NA + a] * T.Cast("float32", qsum[0])
        if m >= many:  # natural column order, zeros to the padded end
            for c in range(K4P * 4):
                xn[i * K4P * 4 + c] = T.if_then_else(c < K, qrow[T.min(c, K - 1)], T.int8(0))
        else:
            for kb in range(NB):  # into the code order of the packed bytes
                for t in range(P):
                    for v in range(V):
                        col: T.let = (start(kb) + v) * P + t
                        xq[(i * NB + kb) * step + t * V + v] = T.if_then_else(
                            tvm.tirx.all(start(kb) + v >= kb * V, col < K), qrow[T.min(col, K - 1)],
                            T.int8(0))

    TILE1 = NR1 * Bw  # bytes of a lone row's tile (whole rows: NKC == 1)
    TILES_AHEAD = -(-AHEAD // TILE1) if NKC == 1 else 0  # lone-row tiles prefetched ahead

    @T.macro
    def prefetch_tiles(pflat, n0, ntiles):  # the lines of ntiles lone-row tiles from weight row n0
        for line in range((ntiles * TILE1 + LINE - 1) // LINE + 1):
            prefetch(pflat[T.min(n0 * Bw + line * LINE, N * Bw - 1)])

    @T.macro
    def few_rows(packed, pflat, sflat, zflat, y, xq, ax, axs, m):  # register tiles over the packed bytes
        for nc in T.parallel((N + NC - 1) // NC):
            facc = T.alloc_buffer((MR * max(NR, NR1) * L,), "float32", annotations=STACK)
            zacc = T.alloc_buffer((MR * max(NR, NR1),), "float32", annotations=STACK)
            iacc = T.alloc_buffer((max(MR * NR * SPT, NR1 * SP1) * L,), "int32", annotations=STACK)
            for kc in range(NKC):
                for it in range(m // MR):
                    for nt in range(T.min(NC, N - nc * NC) // NR):
                        tile(MR, NR, SPT, it * MR, nc * NC + nt * NR, kc, packed, sflat, zflat, y, xq, ax, axs,
                             facc, zacc, iacc)
                for ir in range(m % MR):
                    for nt in range(T.min(NC, N - nc * NC) // NR1):
                        if TILES_AHEAD > 0:  # a lone row is latency-bound on weights from DRAM
                            if nt == 0:
                                prefetch_tiles(pflat, nc * NC, TILES_AHEAD)
                            prefetch_tiles(pflat, nc * NC + (nt + TILES_AHEAD) * NR1, 1)
                        tile(1, NR1, SP1, m // MR * MR + ir, nc * NC + nt * NR1, kc, packed, sflat, zflat, y, xq,
                             ax, axs, facc, zacc, iacc)

    @T.prim_func(private=True)
    def func(x_h: T.handle, packed: T.Buffer(PSHAPE, PTYPE), scale: T.Buffer((N, G), "float32"),
             zero: T.Buffer((N, G), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, K), "float32")
        y = T.match_buffer(y_h, (m, N), "float32")
        sflat = T.decl_buffer((N * G,), "float32", data=scale.data)  # flat views: NT scales in one load
        zflat = T.decl_buffer((N * G,), "float32", data=zero.data)
        pflat = T.decl_buffer((N * Bw,), "uint8", data=packed.data)  # (byte layout only: unused where pre-laid)
        xq = T.alloc_buffer((T.if_then_else(m < many, m, T.int64(0)) * NB * step,), "int8")
        xn = T.alloc_buffer((T.if_then_else(m < many, T.int64(0), m) * K4P * 4,), "int8")
        ax = T.alloc_buffer((m * NA,), "float32")
        axs = T.alloc_buffer((m * NA,), "float32")
        if m < SERIAL_ROWS:  # one row (a decode step): no parallel launch, which costs more than the row
            for i in range(m):
                quantize_row(i, x, xq, xn, ax, axs, m)
        else:
            for i in T.parallel(m):
                quantize_row(i, x, xq, xn, ax, axs, m)
        if pre:  # static: the pre-laid words have no byte layout for the few-row path
            gemm(xn, packed, scale, zero, y, ax, axs, m)
        elif m >= many:
            gemm(xn, packed, scale, zero, y, ax, axs, m)
        else:
            few_rows(packed, pflat, sflat, zflat, y, xq, ax, axs, m)

    return func.with_attrs({"fq_kernel": KIND, "op_pattern": OPAQUE, "fq_isa": isa.name, **_plan_attrs(p)})


def _plan_attrs(p: Plan) -> dict:
    """What `plan_of` needs to write the kernel again (with other knobs: a tuned build)."""
    return {"fq_rows": p.rows, "fq_cols": p.cols, "fq_bits": p.bits, "fq_group": p.group_cols,
            "fq_act_group": p.act_width, "fq_words": int(p.prelaid), "fq_code_bits": p.code_bits}


def runs_many_rows(p: Plan, m: int) -> bool:
    """Whether `m` activation rows take the many-row path."""
    return p.prelaid or (p.gemm and m >= p.many_rows)


def same_code_at(p: Plan, knobs: Knobs, m: int) -> bool:
    """Whether the kernel with `knobs` runs the same code as `p`'s at `m` rows: the same path,
    and that path's knobs equal."""
    other = replace(p, knobs=knobs)
    if runs_many_rows(p, m) != runs_many_rows(other, m):
        return False
    space = MANY_ROW_SPACE if runs_many_rows(p, m) else FEW_ROW_SPACE
    return all(getattr(p.knobs, k) == getattr(knobs, k) for k in space if k != "many_rows")


def plan_of(attrs, target) -> Plan | None:
    """The hand plan of a kernel `dequant_matmul` wrote, from its attributes."""
    return plan(int(attrs["fq_rows"]), int(attrs["fq_cols"]), int(attrs["fq_bits"]), int(attrs["fq_group"]), target,
                act_cols=int(attrs["fq_act_group"]), words=bool(int(attrs["fq_words"])),
                code_bits=int(attrs["fq_code_bits"]))


def arg_shapes(p: Plan, m: int) -> list[tuple[str, tuple]]:
    """(dtype, shape) of the kernel's buffers x, codes, scale, zero, y for m activation rows."""
    codes = (("uint32", (p.rows // p.isa.lanes, p.words, p.isa.lanes)) if p.prelaid
             else ("uint8", (p.rows, p.width)))
    return [("float32", (m, p.cols)), codes, ("float32", (p.rows, p.ngroups)), ("float32", (p.rows, p.ngroups)),
            ("float32", (m, p.rows))]
