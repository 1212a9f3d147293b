"""Target-independent TIR kernels for packed linear layers, built with te.

Every kernel takes a symbolic row count `m` (batch x sequence, int64) and carries the attribute
`fq_kernel` (its kind) so that `fq_tvm.schedules.apply` can find and schedule it for a target, and
`op_pattern` 8 (opaque) so that fusion never merges it with neighbours (which would drop our
schedule, or fold dequantization into a float constant).
"""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx

from .common import parsed_once

OPAQUE = 8


def _i64(value: int):
    return tirx.IntImm("int64", int(value))


def _rows():
    return tirx.Var("m", "int64")


def _finish(tensors, kind: str, **params) -> tvm.tirx.PrimFunc:
    func = te.create_prim_func(tensors)
    attrs = {"fq_kernel": kind, "op_pattern": OPAQUE, **{f"fq_{k}": v for k, v in params.items()}}
    return func.with_attrs(attrs) if hasattr(func, "with_attrs") else _with_attrs(func, attrs)


def _with_attrs(func, attrs: dict):
    for key, value in attrs.items():
        func = func.with_attr(key, value)
    return func


def _zero():
    return tirx.const(0.0, "float32")


def _decode(byte, t, bits: int):
    """Code number t (lowest bits first) of a packed uint8 byte, as float32."""
    mask = tirx.const(2**bits - 1, "uint8")
    return ((byte >> (t * bits).astype("uint8")) & mask).astype("float32")


def _weight(packed, scale, zero, n, byte, t, bits: int, g=0):
    """The weight (q - zero) * scale of code t of byte `byte` in row n, group g."""
    return (_decode(packed[n, byte], t, bits) - zero[n, g]) * scale[n, g]


def _x_or_zero(x, m, K, i, c):
    """x[i, c], or 0 past its m rows or K columns (a read padded to whole tiles)."""
    return tirx.if_then_else(tirx.all(i < m, c < K), x[te.min(i, m - _i64(1)), te.min(c, K - _i64(1))], _zero())


@parsed_once
def dequant_matmul(rows: int, cols: int, bits: int, group_size: int, act_group: int = 0,
                   code_bits: int = 0) -> tvm.tirx.PrimFunc:
    """y[m, rows] = x[m, cols] @ dequant(packed)^T, reading packed codes in the reduction.

    Per group g: sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j), so the inner loop is one
    decode and one multiply-add per code; `x` is regrouped once per call as xp[m, g, t, b] =
    x[m, (g*gb + b)*per + t] so that code t of byte b meets its activation with unit stride.
    act_group: columns per activation group of the int8 kernels that replace this one on CPUs
    (attr `fq_act_group`; 0: numerics.act_group's default for rotated inputs). code_bits: codes
    narrower than `bits` (7 in bytes), which the int8 kernels may multiply unsigned (attr
    `fq_code_bits`, only where given).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"dequant_matmul supports 2, 4 and 8-bit codes, not {bits}")
    per = 8 // bits
    width = -(-cols // per)
    ngroups = -(-cols // group_size)
    if ngroups > 1 and group_size % per:
        raise ValueError(f"group size {group_size} must be a multiple of {per} for {bits}-bit codes")
    gb = width if ngroups == 1 else group_size // per  # bytes per group
    gs = gb * per  # columns per group (padded)
    m = _rows()
    N, K, B, G, GB, P = (_i64(v) for v in (rows, cols, width, ngroups, gb, per))
    x = te.placeholder((m, K), "float32", "x")
    packed = te.placeholder((N, B), "uint8", "packed")
    scale = te.placeholder((N, G), "float32", "scale")
    zero = te.placeholder((N, G), "float32", "zero")

    def col(g, t, b):
        return (g * GB + b) * P + t

    def x_at(i, c):
        return tirx.if_then_else(c < K, x[i, te.min(c, K - 1)], _zero())

    xp = te.compute((m, G, P, GB), lambda i, g, t, b: x_at(i, col(g, t, b)), name="xp")
    kg = te.reduce_axis((0, _i64(gs)), "kg")
    xs = te.compute((m, G), lambda i, g: te.sum(x_at(i, g * _i64(gs) + kg), axis=kg), name="xs")

    def code(n, g, t, b):
        return _decode(packed[n, te.min(g * GB + b, B - 1)], t, bits)

    t = te.reduce_axis((0, P), "t")
    b = te.reduce_axis((0, GB), "b")
    yq = te.compute((m, N, G), lambda i, n, g: te.sum(xp[i, g, t, b] * code(n, g, t, b), axis=[t, b]), name="yq")
    gg = te.reduce_axis((0, G), "gg")
    y = te.compute((m, N), lambda i, n: te.sum(scale[n, gg] * (yq[i, n, gg] - zero[n, gg] * xs[i, gg]), axis=gg),
                   name="y")
    narrow = {"code_bits": code_bits} if code_bits else {}
    return _finish([x, packed, scale, zero, y], "dequant_matmul", rows=rows, cols=cols, bits=bits,
                   group=gs if ngroups > 1 else 0, act_group=act_group, **narrow)


@parsed_once
def dequant_matmul_tiled(rows: int, cols: int, bits: int, row_tile: int) -> tvm.tirx.PrimFunc:
    """The one-group-per-row dequant_matmul (same buffers) as one plain matmul acc = x @ w^T over
    the activation rows padded to a multiple of `row_tile`, with w[n, c] = (q - zero) * scale
    decoded by its own stage and x read through a zero-padded stage `xpad`, so that a GPU can tile
    it like a dense matmul (tiles of both staged in shared memory); y is acc's first m rows."""
    per = 8 // bits
    width = -(-cols // per)
    kp = width * per
    m = _rows()
    N, K, B, P, T = (_i64(v) for v in (rows, cols, width, per, row_tile))
    mp = (m + T - _i64(1)) // T * T
    x = te.placeholder((m, K), "float32", "x")
    packed = te.placeholder((N, B), "uint8", "packed")
    scale = te.placeholder((N, _i64(1)), "float32", "scale")
    zero = te.placeholder((N, _i64(1)), "float32", "zero")
    xpad = te.compute((mp, _i64(kp)), lambda i, c: _x_or_zero(x, m, K, i, c), name="xpad")
    w = te.compute((N, _i64(kp)), lambda n, c: _weight(packed, scale, zero, n, c // P, c % P, bits), name="w")
    c = te.reduce_axis((0, _i64(kp)), "c")
    acc = te.compute((mp, N), lambda i, n: te.sum(xpad[i, c] * w[n, c], axis=c), name="acc")
    y = te.compute((m, N), lambda i, n: acc[i, n], name="y")
    return _finish([x, packed, scale, zero, y], "dequant_matmul_tiled", rows=rows, cols=cols, bits=bits)


def dequant_matmul_tc(rows: int, cols: int, bits: int, tile: tuple[int, int, int],
                      splits: int = 1) -> tvm.tirx.PrimFunc:
    """The one-group-per-row dequant_matmul (same buffers) as a float16 matmul with float32
    accumulation, for tensor cores: part[s] = f16(x) @ f16(w)^T over the s-th of `splits` slices
    of the codes, w[n, c] = (q - zero) * scale, and y the sum of the parts (the first m rows and
    `rows` columns). Rows, weight rows and each slice are padded to multiples of `tile` (rows,
    weight rows, codes) with zeros, so no tile needs a guard."""
    per = 8 // bits
    width = -(-cols // per)
    tm, tn, tk = tile
    m = _rows()
    N, K, B, P, TM, S = (_i64(v) for v in (rows, cols, width, per, tm, splits))
    mp = (m + TM - _i64(1)) // TM * TM
    slice_ = -(-cols // (splits * tk)) * tk
    np_, ks = _i64(-(-rows // tn) * tn), _i64(slice_)
    x = te.placeholder((m, K), "float32", "x")
    packed = te.placeholder((N, B), "uint8", "packed")
    scale = te.placeholder((N, _i64(1)), "float32", "scale")
    zero = te.placeholder((N, _i64(1)), "float32", "zero")
    xh = te.compute((mp, S * ks), lambda i, c: _x_or_zero(x, m, K, i, c).astype("float16"), name="xh")

    def weight(n, c):
        value = _weight(packed, scale, zero, te.min(n, N - _i64(1)), te.min(c // P, B - _i64(1)), c % P, bits)
        return tirx.if_then_else(tirx.all(n < N, c < K), value, _zero()).astype("float16")

    wh = te.compute((np_, S * ks), weight, name="wh")
    c = te.reduce_axis((0, ks), "c")
    part = te.compute((S, mp, np_), lambda s, i, n: te.sum(
        xh[i, s * ks + c].astype("float32") * wh[n, s * ks + c].astype("float32"), axis=c), name="part")
    if splits == 1:
        y = te.compute((m, N), lambda i, n: part[0, i, n], name="y")
    else:
        r = te.reduce_axis((0, S), "r")
        y = te.compute((m, N), lambda i, n: te.sum(part[r, i, n], axis=r), name="y")
    return _finish([x, packed, scale, zero, y], "dequant_matmul_tc", rows=rows, cols=cols, bits=bits,
                   tile=list(tile), splits=splits)


@parsed_once
def dequant_gemv(rows: int, cols: int, bits: int, byte_tile: int = 1) -> tvm.tirx.PrimFunc:
    """The one-group-per-row dequant_matmul (same buffers) as one reduction for few activation
    rows: y[i, n] = sum over bytes b and codes t of (q - zero) * scale * x[i, b * per + t], the
    bytes padded with zero terms to a multiple of `byte_tile` (a GPU splits them evenly)."""
    per = 8 // bits
    width = -(-cols // per)
    padded = -(-width // byte_tile) * byte_tile
    m = _rows()
    N, K, B, P = (_i64(v) for v in (rows, cols, width, per))
    x = te.placeholder((m, K), "float32", "x")
    packed = te.placeholder((N, B), "uint8", "packed")
    scale = te.placeholder((N, _i64(1)), "float32", "scale")
    zero = te.placeholder((N, _i64(1)), "float32", "zero")
    b = te.reduce_axis((0, _i64(padded)), "b")
    t = te.reduce_axis((0, P), "t")

    def term(i, n):
        if padded == width and width * per == cols:
            return _weight(packed, scale, zero, n, b, t, bits) * x[i, b * P + t]
        col = te.min(b, B - _i64(1)) * P + t
        value = _weight(packed, scale, zero, n, te.min(b, B - _i64(1)), t, bits)
        return tirx.if_then_else(tirx.all(b < B, col < K), value * x[i, te.min(col, K - _i64(1))], _zero())

    y = te.compute((m, N), lambda i, n: te.sum(term(i, n), axis=[b, t]), name="y")
    return _finish([x, packed, scale, zero, y], "dequant_gemv", rows=rows, cols=cols, bits=bits)


@parsed_once
def hadamard(dim: int, block: int, inverse: bool) -> tvm.tirx.PrimFunc:
    """Blockwise orthonormal Walsh-Hadamard (Sylvester order) on the last axis, after (forward) or
    before (inverse) multiplying by `signs`: log2(block) butterfly stages, O(dim log block)."""
    if block < 1 or block & (block - 1) or dim % block:
        raise ValueError(f"Hadamard block {block} must be a power of two dividing {dim}")
    m = _rows()
    x = te.placeholder((m, _i64(dim)), "float32", "x")
    signs = te.placeholder((_i64(dim),), "float32", "signs")
    out = _hadamard(x, signs, m, dim, block, inverse)
    return _finish([x, signs, out], "hadamard", dim=dim, block=block, inverse=int(inverse))


def _hadamard(x, signs, m, dim: int, block: int, inverse: bool, prefix: str = "", last: str = "y"):
    D = _i64(dim)
    cur = x if inverse else te.compute((m, D), lambda i, j: x[i, j] * signs[j], name=f"{prefix}signed")
    stages = int(math.log2(block))
    for stage in range(0, stages - 1, 2):  # two stages per pass: half the passes (GPU: barriers)
        cur = _butterfly4(cur, m, D, 1 << stage, f"{prefix}stage{stage}")
    if stages % 2:
        cur = _butterfly(cur, m, D, _i64(1 << (stages - 1)), f"{prefix}stage{stages - 1}")
    norm = 1.0 / math.sqrt(block)
    if inverse:
        return te.compute((m, D), lambda i, j: cur[i, j] * (signs[j] * norm), name=last)
    return te.compute((m, D), lambda i, j: cur[i, j] * norm, name=last)


def _butterfly(prev, m, D, h, name):
    """One radix-2 stage: pairs (j, j + h) with bit h of j clear become (a + b, a - b)."""

    def body(i, j):
        low = prev[i, j] + prev[i, te.min(j + h, D - 1)]
        high = prev[i, te.max(j - h, _i64(0))] - prev[i, j]
        return tirx.if_then_else((j & h) == _i64(0), low, high)

    return te.compute((m, D), body, name=name)


def _butterfly4(prev, m, D, h: int, name):
    """Stages h and 2h at once: each output combines the 4 values whose indices differ only in
    bits h and 2h, signs from its own two bits (a 4-point Hadamard on those bits)."""
    H = _i64(h)

    def at(i, j0, k):
        return prev[i, te.min(j0 + _i64(k * h), D - 1)]

    def body(i, j):
        j0 = j - (j & _i64(3 * h))
        odd, high = (j & H) != _i64(0), (j & _i64(2 * h)) != _i64(0)
        low = tirx.if_then_else(odd, at(i, j0, 0) - at(i, j0, 1), at(i, j0, 0) + at(i, j0, 1))
        top = tirx.if_then_else(odd, at(i, j0, 2) - at(i, j0, 3), at(i, j0, 2) + at(i, j0, 3))
        return tirx.if_then_else(high, low - top, low + top)

    return te.compute((m, D), body, name=name)


@parsed_once
def swiglu(dim: int) -> tvm.tirx.PrimFunc:
    """y[m, dim / 2] = silu(x[:, :dim / 2]) * x[:, dim / 2:], silu(g) = g * sigmoid(g): the gated
    MLP's activation on a stacked gate / up projection (passes/swiglu.py)."""
    if dim % 2:
        raise ValueError(f"a gated activation needs an even width, not {dim}")
    m = _rows()
    x = te.placeholder((m, _i64(dim)), "float32", "x")
    return _finish([x, _swiglu(x, m, dim)], "swiglu", dim=dim)


def _swiglu(x, m, dim: int, name: str = "y"):
    half = _i64(dim // 2)
    return te.compute((m, half), lambda i, j: x[i, j] * te.sigmoid(x[i, j]) * x[i, j + half], name=name)


@parsed_once
def frame_analysis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    """y = blockdiag(F, ..., F, I_tail) x on the last axis; F is [two_k, two_l]."""
    m = _rows()
    x = te.placeholder((m, _i64(nblk * two_l + tail)), "float32", "x")
    F = te.placeholder((_i64(two_k), _i64(two_l)), "float32", "F")
    y = _frame(x, F, m, nblk, two_l, two_k, tail)
    shape = {"nblk": nblk, "two_l": two_l, "two_k": two_k, "tail": tail, "out": nblk * two_k + tail}
    return _finish([x, F, y], "frame_analysis", **shape)


def _frame(x, F, m, nblk: int, two_l: int, two_k: int, tail: int, prefix: str = "", last: str = "y"):
    body, din = nblk * two_k, nblk * two_l
    c = te.reduce_axis((0, _i64(two_l)), "c")
    TK, TL = _i64(two_k), _i64(two_l)
    coef = te.compute((m, _i64(body)), lambda i, j: te.sum(F[j % TK, c] * x[i, (j // TK) * TL + c], axis=c),
                      name=f"{prefix}coef" if tail else (last if prefix else "coef"))
    if tail == 0:
        return coef
    return te.compute((m, _i64(body + tail)), lambda i, j: tirx.if_then_else(
        j < _i64(body), coef[i, te.min(j, _i64(body - 1))], x[i, te.max(j - _i64(body - din), _i64(din))]), name=last)


@parsed_once
def frame_synthesis(nblk: int, two_l: int, two_k: int, tail: int) -> tvm.tirx.PrimFunc:
    """y = blockdiag(F, ..., F, I_tail)^T x on the last axis (frame_analysis transposed, P^T);
    F is [two_k, two_l]: x [m, nblk * two_k + tail] -> y [m, nblk * two_l + tail]."""
    m = _rows()
    body, din = nblk * two_k, nblk * two_l
    TK, TL = _i64(two_k), _i64(two_l)
    x = te.placeholder((m, _i64(body + tail)), "float32", "x")
    F = te.placeholder((TK, TL), "float32", "F")
    r = te.reduce_axis((0, TK), "r")
    coef = te.compute((m, _i64(din)), lambda i, j: te.sum(F[r, j % TL] * x[i, (j // TL) * TK + r], axis=r),
                      name="coef" if tail else "y")
    y = coef if tail == 0 else te.compute((m, _i64(din + tail)), lambda i, j: tirx.if_then_else(
        j < _i64(din), coef[i, te.min(j, _i64(din - 1))], x[i, te.max(j - _i64(din - body), _i64(body))]), name="y")
    shape = {"nblk": nblk, "two_l": two_l, "two_k": two_k, "tail": tail, "out": din + tail}
    return _finish([x, F, y], "frame_synthesis", **shape)


@parsed_once
def code_gather(rows: int, cols: int, bits: int, group_size: int) -> tvm.tirx.PrimFunc:
    """y[m, cols] = dequant(packed)[ids]: the stored rows `ids` of a packed matrix (the same
    buffers as dequant_matmul's weight), decoded, (q - zero) * scale per group. Ids are clamped
    to [0, rows) so that no read leaves the table."""
    per = 8 // bits
    width = -(-cols // per)
    ngroups = -(-cols // group_size)
    m = _rows()
    N, K, B, G, GS, P = (_i64(v) for v in (rows, cols, width, ngroups, group_size, per))
    ids = te.placeholder((m,), "int64", "ids")
    packed = te.placeholder((N, B), "uint8", "packed")
    scale = te.placeholder((N, G), "float32", "scale")
    zero = te.placeholder((N, G), "float32", "zero")

    def body(i, c):
        row = te.max(te.min(ids[i], N - _i64(1)), _i64(0))
        g = c // GS
        return _weight(packed, scale, zero, row, c // P, c % P, bits, g)

    y = te.compute((m, K), body, name="y")
    return _finish([ids, packed, scale, zero, y], "code_gather", rows=rows, cols=cols, bits=bits, group=group_size)


@parsed_once
def pad_last(dim: int, padded: int) -> tvm.tirx.PrimFunc:
    m = _rows()
    x = te.placeholder((m, _i64(dim)), "float32", "x")
    return _finish([x, _pad(x, m, dim, padded)], "resize")


def _pad(x, m, dim: int, padded: int, name: str = "y"):
    return te.compute((m, _i64(padded)), lambda i, j: tirx.if_then_else(
        j < _i64(dim), x[i, te.min(j, _i64(dim - 1))], _zero()), name=name)


@parsed_once
def take_last(dim: int, keep: int) -> tvm.tirx.PrimFunc:
    m = _rows()
    x = te.placeholder((m, _i64(dim)), "float32", "x")
    return _finish([x, _take(x, m, keep)], "resize")


def _take(x, m, keep: int, name: str = "y"):
    return te.compute((m, _i64(keep)), lambda i, j: x[i, j], name=name)


@parsed_once
def transform(steps: list[tuple]) -> tvm.tirx.PrimFunc:
    """Several of the row transforms above as one kernel: x [m, d0] -> y [m, dn]. Steps are
    ("pad", dim, new), ("take", dim, keep), ("hadamard", dim, block, inverse),
    ("frame", nblk, two_l, two_k, tail) and ("swiglu", dim); each Hadamard takes a signs [dim] and each frame an
    F [two_k, two_l] parameter, in step order, after x."""
    m = _rows()
    first = steps[0]
    width = first[1] if first[0] != "frame" else first[1] * first[2] + first[4]
    x = te.placeholder((m, _i64(width)), "float32", "x")
    cur, params, widths = x, [x], [width]
    for n, step in enumerate(steps):
        kind, last = step[0], ("y" if n == len(steps) - 1 else f"s{n}")
        if kind == "pad":
            cur = _pad(cur, m, step[1], step[2], last if last == "y" else f"copy{n}")
        elif kind == "take":
            cur = _take(cur, m, step[2], last if last == "y" else f"copy{n}")
        elif kind == "hadamard":
            signs = te.placeholder((_i64(step[1]),), "float32", f"signs{n}")
            params.append(signs)
            cur = _hadamard(cur, signs, m, step[1], step[2], bool(step[3]), f"h{n}_", last)
        elif kind == "frame":
            F = te.placeholder((_i64(step[3]), _i64(step[2])), "float32", f"F{n}")
            params.append(F)
            cur = _frame(cur, F, m, step[1], step[2], step[3], step[4], f"f{n}_", last)
        elif kind == "swiglu":
            cur = _swiglu(cur, m, step[1], last if last == "y" else f"gated{n}")
        else:
            raise ValueError(f"unknown transform step {kind!r}")
        widths.append(int(cur.shape[1]))
    return _finish(params + [cur], "transform", dim=max(widths), steps=len(steps))


def layout(seq_major: bool, batch, seq, heads: int, D: int) -> tuple:
    """A heads tensor's buffer shape: [batch, seq, heads, D] or [batch, heads, seq, D]."""
    return (batch, seq, heads, D) if seq_major else (batch, heads, seq, D)


def at(buf, seq_major: bool, b, i, h, d):
    """Element (b, position i, head h, d) of a heads tensor in either `layout`."""
    return buf[b, i, h, d] if seq_major else buf[b, h, i, d]


@parsed_once
def kv_append(heads: int, dim: int, seq_major: bool) -> tvm.tirx.PrimFunc:
    """In place (`R.call_tir_inplace`, argument 0): a KV cache [batch, total, heads, dim] gets the
    new keys or values [batch, seq, heads, dim] (seq_major) or [batch, heads, seq, dim] as its
    rows total - seq .. total - 1; the rows before them are not touched."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, check_well_formed=False)  # blocks, for the targets' schedule rules
    def func(cache_h: T.handle, new_h: T.handle):
        batch, total, seq = T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (batch, total, heads, dim), "float32")
        new = T.match_buffer(new_h, layout(seq_major, batch, seq, heads, dim), "float32")
        with T.sblock("root"):
            for b, s, h, d in T.grid(batch, seq, heads, dim):
                with T.sblock("append"):
                    vb, vs, vh, vd = T.axis.remap("SSSS", [b, s, h, d])
                    T.reads(at(new, seq_major, vb, vs, vh, vd))
                    T.writes(cache[vb, total - seq + vs, vh, vd])
                    cache[vb, total - seq + vs, vh, vd] = at(new, seq_major, vb, vs, vh, vd)

    return func.with_attrs({"fq_kernel": "kv_append", "op_pattern": OPAQUE})
