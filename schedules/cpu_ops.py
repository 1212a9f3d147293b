"""CPU legalizations that replace TVM's default lowering of a Relax op (`LegalizeOps` overrides).

- relu as `x < 0 ? 0 : x`: TVM's max(x, 0) turns NaN into 0, where ONNX Runtime (and the user
  chasing bad input) sees NaN.
- softmax over the last axis as `cpu_softmax`'s row kernel on a [rows, n] view (float32), with a
  polynomial exp (`exp_f32`) that LLVM vectorises: the default calls libm's scalar `expf`. Other
  axes keep the four TE stages (max, exp, sum, divide) with the same exp. NaN stays NaN (an all
  -inf row too, like ORT).
- layer norm and RMS norm over a static last axis as `cpu_layer_norm`'s row kernels on a [rows, n]
  view.
- GELU (`R.nn.gelu`, what an ONNX Gelu imports as) with the erf of TVM's `fast_erf` (`gelu_f32`),
  vectorisable: the default called libm's scalar `erff` per element.
- sigmoid as `1 / (1 + exp(-x))` with the same exp (SiLU's sigmoid with libm's `expf` was 4% of
  the SmolLM2 fp32 forward, more than its attention P @ V).
- concat on any axis but the last (a KV cache's past + new keys) as row copies: one parallel loop
  over the output's rows, each row copied from its input with a vector loop. TOPI's concat, once
  scheduled, divided by the symbolic row count for every 8 elements (4.4 of 30 ms per SmolLM2 fq2
  decode step). A last-axis concat (RoPE's halves) keeps TOPI's, which fuses with its neighbours.
"""

from __future__ import annotations

import math

import tvm
from tvm import te, tirx, topi

LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * LN2_HI is exact
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_MAX = 88.3762626647949  # exp overflows float32 above this


def overrides() -> dict:
    return {"relax.nn.relu": _relu, "relax.nn.softmax": _softmax, "relax.sigmoid": _sigmoid, "relax.nn.gelu": _gelu,
            "relax.concat": _concat, "relax.nn.layer_norm": _layer_norm, "relax.nn.rms_norm": _rms_norm}


def _relu(bb, call):
    def relu(x):
        return te.compute(x.shape, lambda *i: tirx.if_then_else(x(*i) < tirx.const(0, x.dtype),
                                                                 tirx.const(0, x.dtype), x(*i)), name="relu")

    return bb.call_te(relu, call.args[0])


def _gelu(bb, call):
    def gelu(x):
        if x.dtype != "float32":
            half = tirx.const(0.5, x.dtype)
            return te.compute(x.shape, lambda *i: half * x(*i) * (tirx.const(1, x.dtype) + tirx.erf(
                x(*i) * tirx.const(math.sqrt(0.5), x.dtype))), name="gelu")
        return te.compute(x.shape, lambda *i: gelu_f32(x(*i)), name="gelu")

    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _sigmoid(bb, call):
    def sigmoid(x):
        if x.dtype != "float32":
            return topi.sigmoid(x)
        one = tirx.const(1, "float32")
        return te.compute(x.shape, lambda *i: one / (one + exp_f32(-x(*i))), name="sigmoid")

    return bb.call_te(sigmoid, call.args[0], primfunc_name_hint="sigmoid")


def _softmax(bb, call):
    """float32 over the last axis: `cpu_softmax` on a [rows, n] view; else the TE form below."""
    from . import cpu_softmax

    x = call.args[0]
    shape = _shape(x)
    if _rows_of(x, shape) and int(call.attrs.axis) % len(shape) == len(shape) - 1:
        return _on_rows(bb, x, shape, cpu_softmax.softmax(_lanes()), "softmax_rows")

    def softmax(data):
        axis = int(call.attrs.axis) % len(data.shape)
        if data.dtype != "float32":
            return topi.nn.softmax(data, axis)

        def outer(i):
            return i[:axis] + (0,) + i[axis + 1:]

        top = topi.max(data, axis=axis, keepdims=True)
        exp = te.compute(data.shape, lambda *i: exp_f32(data(*i) - top(*outer(i))), name="exp")
        total = topi.sum(exp, axis=axis, keepdims=True)
        return te.compute(data.shape, lambda *i: exp(*i) / total(*outer(i)), name="softmax")

    return bb.call_te(softmax, call.args[0], primfunc_name_hint="softmax")


def _layer_norm(bb, call):
    """float32 over a static last axis with gamma and beta: `cpu_layer_norm` on a [rows, n] view;
    else TVM's lowering."""
    from . import cpu_layer_norm

    x, gamma, beta = call.args
    shape, attrs = _shape(x), call.attrs
    if _static_last_axis(x, shape, attrs.axes) and attrs.center and attrs.scale:
        func = cpu_layer_norm.layer_norm(int(shape[-1]), float(attrs.epsilon), _lanes())
        return _on_rows(bb, x, shape, func, "layer_norm_rows", gamma, beta)
    return tvm.ir.Op.get("relax.nn.layer_norm").get_attr("FLegalize")(bb, call)


def _rms_norm(bb, call):
    """float32 over a static last axis: `cpu_layer_norm.rms_norm` on a [rows, n] view; else TVM's
    lowering."""
    from . import cpu_layer_norm

    x, weight = call.args
    shape, attrs = _shape(x), call.attrs
    if _static_last_axis(x, shape, attrs.axes) and len(_shape(weight)) == 1:
        func = cpu_layer_norm.rms_norm(int(shape[-1]), float(attrs.epsilon), _lanes())
        return _on_rows(bb, x, shape, func, "rms_norm_rows", weight)
    return tvm.ir.Op.get("relax.nn.rms_norm").get_attr("FLegalize")(bb, call)


def _static_last_axis(x, shape: list, axes) -> bool:
    """A norm over the static last axis only, of float32 x with at least 2 axes (a row kernel)."""
    return (_rows_of(x, shape) and [int(a) % len(shape) for a in axes] == [len(shape) - 1]
            and isinstance(shape[-1], tirx.IntImm))


def _shape(x) -> list:
    """x's shape (empty where unknown)."""
    shape = getattr(x.ty, "shape", None)
    return list(shape) if shape is not None else []


def _rows_of(x, shape: list) -> bool:
    """Whether a row kernel on a [rows, n] view of x applies: float32 with at least 2 axes."""
    return len(shape) >= 2 and x.ty.dtype == "float32"


def _lanes() -> int:
    from . import cpu

    target = tvm.target.Target.current(allow_none=True)
    return cpu.vector_lanes(target) if target is not None else 4


def _on_rows(bb, x, shape: list, func, name: str, *params):
    """call_tir(func, [x viewed as [rows, n], *params]) viewed back as `shape` (the views become VM
    reshapes: no copies)."""
    from tvm import relax

    rows = shape[0]
    for extent in shape[1:-1]:
        rows = rows * extent
    flat = bb.emit(relax.op.reshape(x, [rows, shape[-1]]))
    gvar = bb.add_func(func, name)
    out = bb.emit(relax.call_tir(gvar, [flat, *params], relax.TensorType(flat.ty.shape, "float32")))
    return relax.op.reshape(out, shape)


def _concat(bb, call):
    from tvm import relax

    default = tvm.ir.Op.get("relax.concat").get_attr("FLegalize")
    fields, ndim = call.args[0], call.ty.ndim
    axis = call.attrs.axis
    if axis is None or ndim < 2 or int(axis) % ndim == ndim - 1 or not isinstance(fields, relax.Tuple):
        return default(bb, call)
    axis = int(axis) % ndim
    out = bb.call_te(lambda *ts: te.extern([_concat_shape(ts, axis)], list(ts),
                                           lambda ins, outs: _row_copies(ins, outs[0], axis), name="concat_rows"),
                     *fields.fields, primfunc_name_hint="concat_rows")
    gvar = out.args[0]
    bb.update_func(gvar, bb.get()[gvar].with_attr("tirx.is_scheduled", True))
    return out


def _concat_shape(tensors, axis: int) -> list:
    shape = list(tensors[0].shape)
    shape[axis] = sum((t.shape[axis] for t in tensors[1:]), tensors[0].shape[axis])
    return shape


def _row_copies(ins, out, axis: int):
    """for each output row r (all indices up to `axis`), in parallel: copy the row of the input
    that holds it, the innermost axis as one vector where its length is known."""
    index = str(out.shape[axis].ty)
    rows = 1
    for extent in out.shape[:axis + 1]:
        rows = rows * extent
    r = tirx.Var("r", index)
    lead, rest = [], r
    for extent in reversed(out.shape[:axis + 1]):
        lead.insert(0, tirx.floormod(rest, extent))
        rest = tirx.floordiv(rest, extent)
    inner = [tirx.Var(f"i{d}", index) for d in range(axis + 1, len(out.shape))]

    def copy(buf, offset):
        src = lead[:axis] + [lead[axis] - offset] + inner
        body = tirx.BufferStore(out, tirx.BufferLoad(buf, src), lead + inner)
        for d in reversed(range(len(inner))):
            extent = out.shape[axis + 1 + d]
            vector = d == len(inner) - 1 and isinstance(extent, tirx.IntImm) and int(extent) <= 256
            body = tirx.For(inner[d], tirx.const(0, index), extent,
                            tirx.ForKind.VECTORIZED if vector else tirx.ForKind.SERIAL, body)
        return body

    ends, end = [], tirx.const(0, index)
    for buf in ins:
        ends.append((end, end + buf.shape[axis]))
        end = end + buf.shape[axis]
    body = copy(ins[-1], ends[-1][0])
    for buf, (start, stop) in reversed(list(zip(ins[:-1], ends[:-1]))):
        body = tirx.IfThenElse(lead[axis] < stop, copy(buf, start), body)
    return tirx.For(r, tirx.const(0, index), rows, tirx.ForKind.PARALLEL, body)


ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
           -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # odd, highest first
ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
           -1.42647390514189e-02)  # even


def erf_clamp(v):
    """v clamped to [-4, 4], where TVM's `fast_erf` evaluates its rational form."""
    return tirx.max(tirx.min(v, tirx.const(4.0, "float32")), tirx.const(-4.0, "float32"))


def erf_rational(x, x2):
    """erf of x in [-4, 4] given x2 = x * x, as TVM's `fast_erf` computes it (within 4e-7 absolute):
    an odd polynomial over an even one."""
    p = tirx.const(ERF_NUM[0], "float32")
    for c in ERF_NUM[1:]:
        p = p * x2 + tirx.const(c, "float32")
    q = tirx.const(ERF_DEN[0], "float32")
    for c in ERF_DEN[1:]:
        q = q * x2 + tirx.const(c, "float32")
    return x * p / q


GELU_SCALE = 1 / math.sqrt(2)


def gelu_f32(v):
    """GELU, erf form: v / 2 (1 + erf(v / sqrt 2)); v a scalar or a vector. No Let expressions (TE
    and MetaSchedule reject them): the terms repeat and LLVM shares them; a kernel binds them once
    with statements and calls `gelu_of`. Agrees with the graph's erf after `fast_erf_tanh`."""
    x = erf_clamp(v * tirx.const(GELU_SCALE, "float32"))
    return gelu_of(v, x, x * x)


def gelu_of(v, x, x2):
    """GELU(v) given x = erf_clamp(v / sqrt 2) and x2 = x * x."""
    return tirx.const(0.5, "float32") * v * (tirx.const(1.0, "float32") + erf_rational(x, x2))


def exp_f32(v):
    """exp(v) in float32 (Cephes' expf; measured within 8.2e-8 relative on [-87, 88.3]): v = n ln2 + r,
    |r| <= ln2 / 2, a polynomial in r, 2^n built in the exponent bits; v a scalar or a vector. v is clamped to
    +-88.376 (exp(88.376) = 2.4e38, exp(-88.376) gives 0); NaN stays NaN."""
    f32 = "float32"
    x = tirx.max(tirx.min(v, tirx.const(EXP_MAX, f32)), tirx.const(-EXP_MAX, f32))
    n = tirx.floor(x * tirx.const(1 / math.log(2), f32) + tirx.const(0.5, f32))
    r = x - n * tirx.const(LN2_HI, f32) - n * tirx.const(LN2_LO, f32)
    p = tirx.const(EXP_POLY[0], f32)
    for c in EXP_POLY[1:]:
        p = p * r + tirx.const(c, f32)
    p = p * r * r + r + tirx.const(1, f32)
    lanes = int(v.ty.dtype.lanes)
    as_int, as_float = ("int32", f32) if lanes == 1 else (f"int32x{lanes}", f"float32x{lanes}")
    scale = tirx.reinterpret(as_float, (n.astype(as_int) + 127) << 23)
    if lanes > 1:  # if_then_else takes a scalar condition only
        return tirx.Select(tirx.isnan(v), v, p * scale)
    return tirx.if_then_else(tirx.isnan(v), v, p * scale)
