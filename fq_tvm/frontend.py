"""The import front end: ONNX as users have it -> a graph TVM's Relax importer converts.

`prepare` pins input shapes, folds constants and simplifies (onnxsim, see DESIGN.md "Import"),
infers shapes with data propagation and names every node. `convert` runs TVM's importer with
small per-node fixes for what it mishandles in 0.27, and turns any failure into one line naming
the ONNX node. `FQ_DEBUG=1` shows TVM's own output and traceback.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from . import onnx_io
from .errors import FqError
from .rnn import unroll_rnns

# weights over this: onnxsim and shape inference see a weightless copy (they serialize the model,
# which fails over 2 GB and would hold a second copy of the weights)
WEIGHTLESS_ABOVE = 1_000_000_000
WEIGHT_TENSOR = 1 << 16  # bytes: an initializer this large is a weight, never shape data


# ---- input shapes -------------------------------------------------------------------------------

def parse_input_shapes(items) -> dict:
    """`["pixel_values=1,3,224,224", "batch=1"]` or a dict -> {name: [int, ...] or int}."""
    if not items:
        return {}
    if isinstance(items, dict):
        pairs = items.items()
    else:
        pairs = []
        for item in [items] if isinstance(items, str) else items:
            name, sep, dims = str(item).partition("=")
            if not sep or not name.strip() or not dims.strip():
                raise FqError(f"--input-shape '{item}': expected NAME=DIMS, e.g. pixel_values=1,3,224,224 or batch=1")
            pairs.append((name.strip(), dims))
    out = {}
    for name, dims in pairs:
        try:
            values = [int(d) for d in dims.split(",")] if isinstance(dims, str) else [int(d) for d in np.atleast_1d(dims)]
        except ValueError:
            raise FqError(f"--input-shape {name}={dims}: dims must be positive integers") from None
        if not values or min(values) < 1:
            raise FqError(f"--input-shape {name}={dims}: dims must be positive integers")
        out[name] = values
    return out


def pin_shapes(model: onnx.ModelProto, shapes: dict) -> onnx.ModelProto:
    """Fix input dims: by input name (all dims) or by symbolic dim name (one int)."""
    if not shapes:
        return model
    inits = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in inits}
    symbols = {d.dim_param for v in inputs.values() for d in v.type.tensor_type.shape.dim if d.dim_param}
    fixed = {}  # dim_param -> value
    for name, dims in shapes.items():
        if name in inputs:
            fixed.update(_pin_input(inputs[name], dims))
        elif name in symbols:
            if len(dims) != 1:
                raise FqError(f"--input-shape {name}=...: '{name}' is a symbolic dim, give one integer")
            fixed[name] = dims[0]
        else:
            raise FqError(f"--input-shape {name}: no input or symbolic dim of that name (inputs: "
                          f"{', '.join(inputs)}; symbolic dims: {', '.join(sorted(symbols)) or 'none'})")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in fixed:
                d.dim_value = fixed[d.dim_param]
    return model


def _pin_input(value, dims) -> dict:
    shape = value.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        raise FqError(f"--input-shape {value.name}: {len(dims)} dims given, the input has rank {len(shape.dim)}")
    fixed = {}
    for d, new in zip(shape.dim, dims):
        if d.HasField("dim_value") and d.dim_value != new:
            raise FqError(f"--input-shape {value.name}: dim {d.dim_value} is fixed in the model, not {new}")
        if d.dim_param:
            fixed[d.dim_param] = new
        d.dim_value = new
    return fixed


# ---- fp16 / bf16 models -----------------------------------------------------------------------------

_HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
_FLOAT = onnx.TensorProto.FLOAT


def to_float32(model: onnx.ModelProto) -> None:
    """Compute an fp16 / bf16 model in fp32, in place: weights widened (quantization then starts
    from the stored values), casts to half retargeted to float; half inputs and outputs keep
    their type through a Cast at the graph's edge."""
    g = model.graph
    if not any(t.data_type in _HALF for t in g.initializer) and not any(
            v.type.tensor_type.elem_type in _HALF for v in list(g.input) + list(g.output)):
        return
    for i, init in enumerate(g.initializer):
        if init.data_type in _HALF:
            wide = numpy_helper.to_array(init).astype(np.float32)
            g.initializer[i].CopyFrom(numpy_helper.from_array(wide, init.name))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i in _HALF:
                attr.i = _FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in _HALF:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    _cast_edges(g)
    del g.value_info[:]


def _cast_edges(g) -> None:
    inits = {t.name for t in g.initializer}
    head, tail = [], []
    for value in g.input:
        if value.name not in inits and value.type.tensor_type.elem_type in _HALF:
            wide = f"{value.name}__fp32"
            for node in g.node:
                node.input[:] = [wide if i == value.name else i for i in node.input]
            head.append(onnx.helper.make_node("Cast", [value.name], [wide], to=_FLOAT, name=f"{wide}_cast"))
    for value in g.output:
        half = value.type.tensor_type.elem_type
        if half in _HALF:
            wide = f"{value.name}__fp32"
            for node in g.node:
                node.output[:] = [wide if o == value.name else o for o in node.output]
                node.input[:] = [wide if i == value.name else i for i in node.input]
            tail.append(onnx.helper.make_node("Cast", [wide], [value.name], to=half, name=f"{wide}_cast"))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)


# ---- simplification ------------------------------------------------------------------------------

def prepare(model: onnx.ModelProto, input_shapes: dict | None = None) -> onnx.ModelProto:
    """The model TVM's importer sees: shapes pinned, constants folded, shapes inferred, nodes named."""
    model = pin_shapes(model, input_shapes or {})
    to_float32(model)
    tables = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    model = simplify(model)
    fold_constants(model)
    model = _keep_tied_transposes(tables, model)
    model = infer_shapes(model)
    if unroll_rnns(model) | plain_dense_forms(model):
        _drop_unused_initializers(model.graph)
        model = infer_shapes(model)
    name_nodes(model)
    return model


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding and graph simplification with onnxsim (if installed); on any failure the
    model is returned unchanged (the importer's own error then names the node). A big model is
    simplified as a weightless copy whose graph is then put back around its weights."""
    try:
        import onnxsim
    except ImportError:
        return model
    big = onnx_io.is_big(model, WEIGHTLESS_ABOVE)
    light, moved = weightless(model) if big else (model, set())
    try:
        with quiet_output():
            out, _ = onnxsim.simplify(light, check_n=0, certify=False, perform_optimization=False)
    except Exception:  # noqa: BLE001 - best effort; the unsimplified model still gets our fixes
        return model
    _restore_node_metadata(light, out)
    if not big:
        return out
    _graft(model, out, moved)
    return model


def weightless(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set]:
    """A copy of `model` whose large initializers are graph inputs of the same type and shape,
    without data; and their names. Tools that serialize the model then never copy the weights."""
    g = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    lg = light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    listed, moved = {v.name for v in g.input}, set()
    for t in g.initializer:
        if onnx_io.tensor_bytes(t) < WEIGHT_TENSOR:
            lg.initializer.append(t)
            continue
        moved.add(t.name)
        if t.name not in listed:
            lg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light, moved


def _graft(model, out, moved: set) -> None:
    """Give `model` the graph of `out` (a simplified weightless copy), in place, keeping the
    weights `moved` where they are: large initializers are never copied."""
    g, o = model.graph, out.graph
    listed = {v.name for v in g.input}
    _remove(g.initializer, lambda t: t.name not in moved)
    g.initializer.extend(t for t in o.initializer if t.name not in moved)
    for field, new in [(g.node, o.node), (g.output, o.output), (g.value_info, o.value_info),
                       (g.input, [v for v in o.input if v.name not in moved or v.name in listed])]:
        del field[:]
        field.extend(new)


def _remove(field, drop) -> None:
    """Delete the items of a repeated protobuf field for which drop(item), in place (rebuilding
    the field would copy every tensor that stays)."""
    for i in reversed(range(len(field))):
        if drop(field[i]):
            del field[i]


def _restore_node_metadata(before, after) -> None:
    """onnxsim drops nodes' metadata_props (torch's module paths, our layer names): copy them back."""
    props = {n.name: n.metadata_props for n in before.graph.node if n.name and n.metadata_props}
    for node in after.graph.node:
        if node.name in props and not node.metadata_props:
            node.metadata_props.extend(props[node.name])


def _keep_tied_transposes(old: dict, after) -> onnx.ModelProto:
    """Folding turns Transpose(E) of a tied embedding into a second copy E^T; put the Transpose
    back so the head reads E (passes/tied_weights.py stores it once). old: the 2-D initializers
    before folding, by name."""
    shapes = {}
    for t in old.values():
        shapes.setdefault((t.dims[1], t.dims[0]), []).append(t)
    gathered = {n.input[0] for n in after.graph.node if n.op_type == "Gather"}
    copies = set()
    for init in after.graph.initializer:
        if init.name in old or len(init.dims) != 2:
            continue
        twins = [t for t in shapes.get(tuple(init.dims), []) if t.name in gathered and t.name != init.name]
        match = next((t for t in twins if np.array_equal(numpy_helper.to_array(t).T, numpy_helper.to_array(init))), None)
        if match is not None:
            copies.add(init.name)
            after.graph.node.insert(0, onnx.helper.make_node("Transpose", [match.name], [init.name], perm=[1, 0],
                                                             name=f"{init.name}_tied_transpose"))
    _remove(after.graph.initializer, lambda t: t.name in copies)
    return after


_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli", "If", "Loop", "Scan"}


def fold_constants(model: onnx.ModelProto) -> None:
    """Evaluate nodes whose inputs are all constants (Constant nodes, DequantizeLinear of int8
    weights, transposes...) into initializers, in place. onnxsim keeps Constant nodes and QDQ
    pairs on purpose; we want every weight to be an initializer the planner sees."""
    g = model.graph
    values = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    kept = []
    for node in g.node:
        foldable = (node.domain in ("", "ai.onnx") and node.op_type not in _NOT_FOLDED
                    and all(i in values for i in node.input if i) and not outputs & set(node.output))
        if not foldable:
            kept.append(node)
            continue
        try:
            feeds = {i: numpy_helper.to_array(values[i]) for i in node.input if i}
            results = _evaluate(model, node, feeds)
        except Exception:  # noqa: BLE001 - leave the node to the importer
            kept.append(node)
            continue
        for name, value in zip(node.output, results):
            values[name] = numpy_helper.from_array(np.asarray(value), name)
            g.initializer.append(values[name])
    del g.node[:]
    g.node.extend(kept)
    _drop_unused_initializers(g)


def _drop_unused_initializers(g) -> None:
    """Initializers nothing reads any more (the int8 source of a folded DequantizeLinear)."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dropped = {t.name for t in g.initializer if t.name not in used}
    if not dropped:
        return
    _remove(g.initializer, lambda t: t.name in dropped)
    _remove(g.input, lambda v: v.name in dropped)


def _evaluate(model, node, feeds):
    """Run one node in ONNX Runtime (onnx's reference evaluator lacks older opsets of some ops)."""
    import onnxruntime as ort

    inputs = [onnx.helper.make_tensor_value_info(i, numpy_helper.from_array(a).data_type, a.shape)
              for i, a in feeds.items()]
    outputs = [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in node.output]
    graph = onnx.helper.make_graph([node], "fold", inputs, outputs)
    one = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(one.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def plain_dense_forms(model: onnx.ModelProto) -> bool:
    """Rewrite dense ops the planner cannot take into its form `x @ W`, in place; True if any:
    Gemm(transA=1) reads Transpose(A); MatMul(W, x) with a 2-D constant W [M, K] and x of known
    rank r >= 2 becomes Transpose(MatMul(Transpose(x), W^T)), swapping the last two axes."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(g.value_info) + list(g.input)
             if v.type.tensor_type.HasField("shape")}
    nodes, changed = [], False
    for i, node in enumerate(g.node):
        a = node.input[0] if node.input else ""
        if node.op_type == "Gemm" and a not in inits and any(x.name == "transA" and x.i for x in node.attribute):
            at = f"{a}__transposed_{i}"
            nodes.append(onnx.helper.make_node("Transpose", [a], [at], perm=[1, 0], name=f"{at}_op"))
            for x in node.attribute:
                if x.name == "transA":
                    x.i = 0
            node.input[0] = at
            changed = True
        elif (node.op_type == "MatMul" and a in inits and len(inits[a].dims) == 2 and node.input[1] not in inits
              and ranks.get(node.input[1], 0) >= 2):
            nodes.extend(_left_matmul(node, inits[a], ranks[node.input[1]], g, i))
            changed = True
            continue
        nodes.append(node)
    if changed:
        del g.node[:]
        g.node.extend(nodes)
    return changed


def _left_matmul(node, weight, rank, g, i):
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    wt = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), f"{weight.name}__T")
    g.initializer.append(wt)
    xt, yt = f"{node.output[0]}__xt_{i}", f"{node.output[0]}__yt_{i}"
    return [onnx.helper.make_node("Transpose", [node.input[1]], [xt], perm=perm, name=f"{xt}_op"),
            onnx.helper.make_node("MatMul", [xt, wt.name], [yt], name=node.name or f"MatMul_{i}"),
            onnx.helper.make_node("Transpose", [yt], [node.output[0]], perm=perm, name=f"{yt}_op")]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Symbolic shapes for every tensor: ONNX Runtime's symbolic shape inference (sympy; relates
    the dims of legacy exports to the input dims, e.g. 'batch*seq', where onnx's own inference
    invents unrelated 'unk__N'), else onnx's with data propagation. Hints only: never fails."""
    if onnx_io.is_big(model, WEIGHTLESS_ABOVE):  # infer on a weightless copy, keep its shapes
        inferred = _infer(weightless(model)[0])
        if inferred is not None:
            g = model.graph
            for field, new in [(g.value_info, inferred.graph.value_info), (g.output, inferred.graph.output)]:
                del field[:]
                field.extend(new)
        return model
    return _infer(model) or model


def _infer(model):
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        with quiet_output(), _in_temp_dir():  # an incomplete inference saves sym_shape_infer_temp.onnx
            out = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        if out is not None:
            return out
    except Exception:  # noqa: BLE001
        pass
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def _in_temp_dir():
    """Run in an empty temporary working directory (for tools that write files into it)."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fq-shapes-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(cwd)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (errors and per-node fixes refer to nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}" if not node.name else f"{node.name}_{i}"
        seen.add(node.name)


@contextlib.contextmanager
def quiet_output():
    """Silence Python and C++ output (fd 1 and 2) unless FQ_DEBUG=1."""
    if os.environ.get("FQ_DEBUG") == "1":
        yield
        return
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
