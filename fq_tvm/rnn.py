"""Unroll ONNX LSTM, GRU and RNN nodes into MatMul + elementwise ops (TVM 0.27's Relax importer
converts none of them).

Needs a static sequence length (pin it with --input-shape). Per direction the input projection
is one MatMul over all steps (X @ W^T + b) and the recurrence one MatMul per step on a shared R^T,
so the planner sees two dense layers per direction (a weight shared by the steps is one layer;
a GRU with linear_before_reset=0 has three: R's z/r rows and its h rows are applied to
different inputs).
Supported: layout 0 / 1, forward / reverse / bidirectional, optional B / initial_h / initial_c,
activations Sigmoid / Tanh / Relu; not: sequence_lens, peepholes, clip, input_forget,
activation_alpha / beta (left to the importer, which then names the node as unsupported).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

RECURRENT = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
ACTS = {"Sigmoid", "Tanh", "Relu"}  # ONNX ops of the same name
INITIAL_H = 5  # input index; LSTM's initial_c is 6, its peepholes 7


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[a.name] = value
    return out


def _static_seq(model, x, layout) -> int | None:
    for v in list(model.graph.value_info) + list(model.graph.input):
        if v.name == x:
            dims = v.type.tensor_type.shape.dim
            d = dims[1 if layout else 0] if len(dims) == 3 else None
            return d.dim_value if d is not None and d.HasField("dim_value") else None
    return None


def _activations(node, attrs) -> list | None:
    """Per direction, the cell's activation names; None if unsupported."""
    default = DEFAULT_ACTS[node.op_type]
    acts = list(attrs.get("activations") or [])
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    acts = acts or default * dirs
    if len(acts) != len(default) * dirs or not set(acts) <= ACTS:
        return None
    return [acts[d * len(default):(d + 1) * len(default)] for d in range(dirs)]


def unsupported(model, node) -> str:
    """Why `node` (LSTM / GRU / RNN) is not unrolled, as a phrase; '' if it is supported."""
    inits = {t.name for t in model.graph.initializer}
    attrs = _attrs(node)
    ins = list(node.input) + [""] * (8 - len(node.input))
    reasons = [why for why, bad in [
        ("W and R must be constant", ins[1] not in inits or ins[2] not in inits or (ins[3] and ins[3] not in inits)),
        ("sequence_lens", ins[4]), ("peepholes", ins[7]), ("clip", "clip" in attrs),
        ("input_forget", attrs.get("input_forget", 0)),
        ("activations other than Sigmoid / Tanh / Relu or with alpha / beta",
         _activations(node, attrs) is None or "activation_alpha" in attrs or "activation_beta" in attrs),
    ] if bad]
    if reasons:
        return "not supported by the unroller: " + ", ".join(reasons)
    if not _static_seq(model, node.input[0], attrs.get("layout", 0)):
        names = sorted({d.dim_param for v in model.graph.input for d in v.type.tensor_type.shape.dim if d.dim_param})
        name = _seq_name(model, node.input[0], attrs.get("layout", 0))
        how = f"--input-shape {name}=N" if name in names else "--input-shape"
        how += f" (the inputs' symbolic dims: {', '.join(names)})" if names and name not in names else ""
        return f"its sequence length must be static to unroll it: pin it with {how}"
    return ""


def _seq_name(model, x, layout) -> str:
    """The symbolic name of x's sequence dim ('' if none)."""
    for v in list(model.graph.value_info) + list(model.graph.input):
        dims = v.type.tensor_type.shape.dim
        if v.name == x and len(dims) == 3:
            return dims[1 if layout else 0].dim_param
    return ""


def unroll_rnns(model: onnx.ModelProto) -> bool:
    """Replace every supported LSTM / GRU / RNN with a static sequence length, in place; True if any."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, changed = [], False
    for node in g.node:
        if node.op_type not in RECURRENT or unsupported(model, node):
            nodes.append(node)
            continue
        attrs = _attrs(node)
        seq = _static_seq(model, node.input[0], attrs.get("layout", 0))
        new, weights = _Unroller(node, attrs, inits, seq, opset).build()
        nodes.extend(new)
        g.initializer.extend(weights)
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(nodes)
        del g.value_info[:]
    return changed


class _Unroller:
    def __init__(self, node, attrs, inits, seq, opset):
        self.node, self.attrs, self.seq, self.opset = node, attrs, seq, opset
        self.kind = node.op_type
        self.ins = list(node.input) + [""] * (8 - len(node.input))
        self.W = numpy_helper.to_array(inits[self.ins[1]]).astype(np.float32)
        self.R = numpy_helper.to_array(inits[self.ins[2]]).astype(np.float32)
        self.B = numpy_helper.to_array(inits[self.ins[3]]).astype(np.float32) if self.ins[3] else None
        self.H = int(attrs.get("hidden_size", self.R.shape[-1]))
        self.layout = attrs.get("layout", 0)
        self.acts = _activations(node, attrs)
        self.nodes, self.weights, self.count = [], [], 0

    # ---- node helpers

    def name(self, what):
        self.count += 1
        return f"{self.node.name or self.kind.lower()}/{what}_{self.count}"

    def op(self, op_type, inputs, **kw):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **kw))
        return out

    def const(self, what, array):
        name = self.name(what)
        array = np.asarray(array)  # (np.ascontiguousarray would make a 0-d index 1-d)
        self.weights.append(numpy_helper.from_array(array.copy(order="C"), name))
        return name

    def unsqueeze(self, x, axes):
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const("ax", np.array(axes, np.int64))])
        return self.op("Unsqueeze", [x], axes=axes)

    def slices(self, x, count):
        """x [b, count*H] -> count tensors [b, H]."""
        H, one = self.H, self.const("a", np.array([1], np.int64))
        return [self.op("Slice", [x, self.const("s", np.array([k * H], np.int64)),
                                  self.const("e", np.array([(k + 1) * H], np.int64)), one]) for k in range(count)]

    # ---- the graph

    def build(self):
        x = self.ins[0]
        if self.layout:  # [batch, seq, in] -> [seq, batch, in]
            x = self.op("Transpose", [x], perm=[1, 0, 2])
        dirs = self.W.shape[0]
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[
            self.attrs.get("direction", "forward")]
        outs = [self.direction(x, d, rev) for d, rev in enumerate(reverse[:dirs])]
        y = outs[0][0] if dirs == 1 else self.op("Concat", [o[0] for o in outs], axis=1)  # [seq, dirs, b, H]
        states = [o[1:] for o in outs]
        finals = [s[0] if dirs == 1 else self.op("Concat", list(s), axis=0) for s in zip(*states)]  # [dirs, b, H]
        if self.layout:
            y = self.op("Transpose", [y], perm=[2, 0, 1, 3])
            finals = [self.op("Transpose", [f], perm=[1, 0, 2]) for f in finals]
        for produced, wanted in zip([y, *finals], self.node.output):
            if wanted:
                self.nodes.append(helper.make_node("Identity", [produced], [wanted], name=self.name("out")))
        return self.nodes, self.weights

    def direction(self, x, d, rev):
        G, H = GATES[self.kind], self.H
        wb = np.zeros(G * H, np.float32) if self.B is None else self.B[d, :G * H]
        rb = np.zeros(G * H, np.float32) if self.B is None else self.B[d, G * H:]
        cell = _CELLS[self.kind](self, d, rb)
        wt = self.const(f"W{d}", self.W[d].T)  # [in, G*H]: the planner's MatMul form
        xw = self.op("Add", [self.op("MatMul", [x, wt]), self.const(f"B{d}", wb + cell.input_bias)])  # [seq, b, G*H]
        state = [self.initial(INITIAL_H, d)] + ([self.initial(INITIAL_H + 1, d)] if self.kind == "LSTM" else [])
        steps = range(self.seq - 1, -1, -1) if rev else range(self.seq)
        ys = {}
        for t in steps:
            xt = self.op("Gather", [xw, self.const("t", np.array(t, np.int64))], axis=0)  # [b, G*H]
            state = cell.step(xt, *state)
            ys[t] = self.unsqueeze(state[0], [0, 1])  # [1, 1, b, H]
        y = self.op("Concat", [ys[t] for t in range(self.seq)], axis=0)
        return (y, *[self.unsqueeze(s, [0]) for s in state])

    def initial(self, index, d):
        if not self.ins[index]:
            return None
        # [dirs, b, H], or [b, dirs, H] with layout 1
        return self.op("Gather", [self.ins[index], self.const("d", np.array(d, np.int64))], axis=self.layout)


class _Lstm:
    """Gates i, o, f, c; R's bias is additive, so it joins W's."""

    def __init__(self, u, d, rb):
        self.u, self.f, self.g, self.h = u, *u.acts[d]
        self.rt = u.const(f"R{d}", u.R[d].T)  # [H, 4H], shared by every step
        self.input_bias = rb

    def step(self, xt, h, c):
        u = self.u
        gates = xt if h is None else u.op("Add", [xt, u.op("MatMul", [h, self.rt])])
        i, o, f, cc = u.slices(gates, 4)
        i, o, f, cc = u.op(self.f, [i]), u.op(self.f, [o]), u.op(self.f, [f]), u.op(self.g, [cc])
        new_c = u.op("Mul", [i, cc])
        c = new_c if c is None else u.op("Add", [u.op("Mul", [f, c]), new_c])
        return u.op("Mul", [o, u.op(self.h, [c])]), c


class _Gru:
    """Gates z, r, h. linear_before_reset=1 (torch's export): h~ = g(x_h + r * (h @ R_h^T + Rb_h)),
    one MatMul on all of R per step; =0: h~ = g(x_h + (r * h) @ R_h^T + Rb_h), two (R_zr, R_h)."""

    def __init__(self, u, d, rb):
        H = u.H
        self.u, self.f, self.g = u, *u.acts[d]
        self.before = bool(u.attrs.get("linear_before_reset", 0))
        if self.before:
            self.rt = u.const(f"R{d}", u.R[d].T)  # [H, 3H]
            self.rb_h = u.const(f"Rb{d}", rb[2 * H:])
            self.input_bias = np.concatenate([rb[:2 * H], np.zeros(H, np.float32)])
        else:
            self.rt = u.const(f"Rzr{d}", u.R[d, :2 * H].T)  # [H, 2H]
            self.rt_h = u.const(f"Rh{d}", u.R[d, 2 * H:].T)  # [H, H]
            self.input_bias = rb

    def step(self, xt, h):
        u = self.u
        xz, xr, xh = u.slices(xt, 3)
        if h is None:  # zero state: h @ R^T = 0
            z, r = u.op(self.f, [xz]), u.op(self.f, [xr])
            hh = u.op(self.g, [u.op("Add", [xh, u.op("Mul", [r, self.rb_h])]) if self.before else xh])
            return (u.op("Sub", [hh, u.op("Mul", [z, hh])]),)
        hr = u.slices(u.op("MatMul", [h, self.rt]), 3 if self.before else 2)
        z, r = u.op(self.f, [u.op("Add", [xz, hr[0]])]), u.op(self.f, [u.op("Add", [xr, hr[1]])])
        if self.before:
            rec = u.op("Mul", [r, u.op("Add", [hr[2], self.rb_h])])
        else:
            rec = u.op("MatMul", [u.op("Mul", [r, h]), self.rt_h])
        hh = u.op(self.g, [u.op("Add", [xh, rec])])
        return (u.op("Add", [hh, u.op("Mul", [z, u.op("Sub", [h, hh])])]),)  # (1 - z) h~ + z h


class _Rnn:
    def __init__(self, u, d, rb):
        self.u, (self.f,) = u, u.acts[d]
        self.rt = u.const(f"R{d}", u.R[d].T)  # [H, H]
        self.input_bias = rb

    def step(self, xt, h):
        u = self.u
        return (u.op(self.f, [xt if h is None else u.op("Add", [xt, u.op("MatMul", [h, self.rt])])]),)


_CELLS = {"LSTM": _Lstm, "GRU": _Gru, "RNN": _Rnn}
