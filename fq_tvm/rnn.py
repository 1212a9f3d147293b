"""Unroll ONNX LSTM nodes into MatMul + elementwise ops (TVM 0.27's Relax importer has no LSTM).

Needs a static sequence length (pin it with --input-shape). Per direction the input projection
is one MatMul over all steps (X @ W^T + b) and the recurrence one MatMul per step on a shared R^T,
so the planner sees two dense layers per direction (a weight shared by the steps is one layer).
Supported: layout 0 / 1, forward / reverse / bidirectional, optional initial_h / initial_c,
default activations; not: sequence_lens, peepholes, clip, input_forget (left to the importer,
which then names the node as unsupported).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_seq(model, x, layout) -> int | None:
    for v in list(model.graph.value_info) + list(model.graph.input):
        if v.name == x:
            dims = v.type.tensor_type.shape.dim
            d = dims[1 if layout else 0] if len(dims) == 3 else None
            return d.dim_value if d is not None and d.HasField("dim_value") else None
    return None


def _supported(node, attrs, inits) -> bool:
    ins = list(node.input) + [""] * (8 - len(node.input))
    default = [b"Sigmoid", b"Tanh", b"Tanh"]
    acts = attrs.get("activations")
    return (ins[1] in inits and ins[2] in inits and (not ins[3] or ins[3] in inits) and not ins[4] and not ins[7]
            and "clip" not in attrs and not attrs.get("input_forget", 0)
            and (acts is None or list(acts) in (default, default * 2)))


def unroll_lstms(model: onnx.ModelProto) -> bool:
    """Replace every supported LSTM with a static sequence length, in place; True if any was."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    nodes, changed = [], False
    for node in g.node:
        attrs = _attrs(node)
        seq = _static_seq(model, node.input[0], attrs.get("layout", 0)) if node.op_type == "LSTM" else None
        if not seq or not _supported(node, attrs, inits):
            nodes.append(node)
            continue
        new, weights = _Unroller(node, attrs, inits, seq).build()
        nodes.extend(new)
        g.initializer.extend(weights)
        changed = True
    if changed:
        del g.node[:]
        g.node.extend(nodes)
        del g.value_info[:]
    return changed


class _Unroller:
    def __init__(self, node, attrs, inits, seq):
        self.node, self.attrs, self.seq = node, attrs, seq
        self.ins = list(node.input) + [""] * (8 - len(node.input))
        self.W = numpy_helper.to_array(inits[self.ins[1]]).astype(np.float32)
        self.R = numpy_helper.to_array(inits[self.ins[2]]).astype(np.float32)
        self.B = numpy_helper.to_array(inits[self.ins[3]]).astype(np.float32) if self.ins[3] else None
        self.H = int(attrs.get("hidden_size", self.R.shape[-1]))
        self.layout = attrs.get("layout", 0)
        self.nodes, self.weights, self.count = [], [], 0

    def name(self, what):
        self.count += 1
        return f"{self.node.name or 'lstm'}/{what}_{self.count}"

    def op(self, op_type, inputs, **kw):
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **kw))
        return out

    def const(self, what, array):
        name = self.name(what)
        array = np.asarray(array)  # (np.ascontiguousarray would make a 0-d index 1-d)
        self.weights.append(numpy_helper.from_array(array.copy(order="C"), name))
        return name

    def build(self):
        x = self.ins[0]
        if self.layout:  # [batch, seq, in] -> [seq, batch, in]
            x = self.op("Transpose", [x], perm=[1, 0, 2])
        dirs = self.W.shape[0]
        direction = self.attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        outs = [self.direction(x, d, rev) for d, rev in enumerate(reverse[:dirs])]
        y = outs[0][0] if dirs == 1 else self.op("Concat", [o[0] for o in outs], axis=1)   # [seq, dirs, b, H]
        y_h = outs[0][1] if dirs == 1 else self.op("Concat", [o[1] for o in outs], axis=0)  # [dirs, b, H]
        y_c = outs[0][2] if dirs == 1 else self.op("Concat", [o[2] for o in outs], axis=0)
        if self.layout:
            y = self.op("Transpose", [y], perm=[2, 0, 1, 3])
            y_h = self.op("Transpose", [y_h], perm=[1, 0, 2])
            y_c = self.op("Transpose", [y_c], perm=[1, 0, 2])
        for produced, wanted in zip([y, y_h, y_c], self.node.output):
            if wanted:
                self.nodes.append(helper.make_node("Identity", [produced], [wanted], name=self.name("out")))
        return self.nodes, self.weights

    def direction(self, x, d, rev):
        H = self.H
        bias = np.zeros(4 * H, np.float32) if self.B is None else self.B[d, :4 * H] + self.B[d, 4 * H:]
        wt = self.const(f"W{d}", self.W[d].T)  # [in, 4H]: the planner's MatMul form
        rt = self.const(f"R{d}", self.R[d].T)  # [H, 4H], shared by every step
        xw = self.op("Add", [self.op("MatMul", [x, wt]), self.const(f"B{d}", bias)])  # [seq, b, 4H]
        h, c = self.initial(4, d), self.initial(5, d)
        steps = range(self.seq - 1, -1, -1) if rev else range(self.seq)
        ys = {}
        for t in steps:
            gates = self.op("Gather", [xw, self.const("t", np.array(t, np.int64))], axis=0)  # [b, 4H]
            if h is not None:
                gates = self.op("Add", [gates, self.op("MatMul", [h, rt])])
            i, o, f, cc = (self.op("Slice", [gates, self.const("s", np.array([k * H], np.int64)),
                                            self.const("e", np.array([(k + 1) * H], np.int64)),
                                            self.const("a", np.array([1], np.int64))]) for k in range(4))
            i, o, f, cc = self.op("Sigmoid", [i]), self.op("Sigmoid", [o]), self.op("Sigmoid", [f]), self.op("Tanh", [cc])
            new_c = self.op("Mul", [i, cc])
            c = new_c if c is None else self.op("Add", [self.op("Mul", [f, c]), new_c])
            h = self.op("Mul", [o, self.op("Tanh", [c])])
            ys[t] = self.op("Unsqueeze", [h, self.const("ax", np.array([0, 1], np.int64))])  # [1, 1, b, H]
        y = self.op("Concat", [ys[t] for t in range(self.seq)], axis=0)
        axis0 = self.const("ax", np.array([0], np.int64))
        return y, self.op("Unsqueeze", [h, axis0]), self.op("Unsqueeze", [c, axis0])

    def initial(self, index, d):
        if not self.ins[index]:
            return None
        return self.op("Gather", [self.ins[index], self.const("d", np.array(d, np.int64))], axis=0)
