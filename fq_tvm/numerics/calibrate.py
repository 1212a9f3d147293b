"""Calibration: find the dense layers of an ONNX model and collect, for every activation tensor
they read, the Hessian sum X X^T (float64) and the row count, streaming over sample batches.

The fp32 model runs in ONNX Runtime on a copy of the ModelProto whose graph outputs also list the
activation tensors. Activations of shape [..., K] are flattened to rows of length K. With
`mask_input`, rows whose leading shape equals that input's shape (e.g. [batch, seq] for an
attention mask) are weighted by it (0 drops padding); other activations are not weighted.

Held-out rows: every HOLDOUT_EVERY-th sample (index % 5 == 4, so all tokens of one sequence stay
together) also goes into a second sum, `held_xtx`; the rest is the fit part. With fewer than
HOLDOUT_EVERY samples the split is by row instead. The per-layer guard (guard.py) fits candidates
on the fit part and scores them on the held-out part.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DenseLayer:
    """One MatMul/Gemm whose weight is an initializer. y = x @ W^T (+ bias), W is [N, K]."""

    node: str  # node name (may be empty in the file; then "<op>_<index>")
    op_type: str  # "MatMul" or "Gemm"
    activation: str  # input tensor name
    weight: str  # initializer name
    transposed: bool  # True: the initializer is [N, K] (Gemm transB=1); False: [K, N]
    in_features: int
    out_features: int
    output: str  # the node's output tensor
    bias: str | None = None  # Gemm C, or the initializer of an Add right after a MatMul
    alpha: float = 1.0  # Gemm alpha, folded into weight_matrix


HOLDOUT_EVERY = 5  # sample i is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 (20%)


@dataclass
class HessianStat:
    """xtx = sum of x x^T over all rows (float64 [K, K]); count = rows (or summed mask weights).
    held_xtx / held_count: the same over the held-out rows only (a part of xtx / count); None / 0
    when no rows were held out. The fit part is the difference."""

    xtx: np.ndarray
    count: float
    held_xtx: np.ndarray | None = None
    held_count: float = 0.0
    cross: np.ndarray | None = None  # sequential with fp_target: sum of (x_fp32 - x) x^T over all rows
    resid: np.ndarray | None = None  # with fp_residual: sum of (r_fp32 - r) x^T, r the residual added to the output
    target: np.ndarray | None = None  # instead of both, for one reading layer W: sum of (W (x_fp32 - x) + r_fp32 - r) x^T

    def hessian(self) -> np.ndarray:
        """H = (2 / S) X X^T over all rows, the GPTQ convention."""
        return _scaled(self.xtx, self.count)

    @property
    def fit_count(self) -> float:
        return self.count - self.held_count

    @property
    def has_holdout(self) -> bool:
        """Both parts hold rows (the guard can run)."""
        return self.held_xtx is not None and self.held_count > 0 and self.fit_count > 0

    def fit_hessian(self) -> np.ndarray:
        """H over the fit rows (all rows minus the held-out ones)."""
        held = 0.0 if self.held_xtx is None else self.held_xtx
        return _scaled(self.xtx - held, self.fit_count)

    def held_hessian(self) -> np.ndarray:
        """H over the held-out rows (zeros when none)."""
        return _scaled(self.held_xtx if self.held_xtx is not None else np.zeros_like(self.xtx), self.held_count)

    @classmethod
    def pooled(cls, stats) -> HessianStat:
        """The row statistics of several activations pooled (a weight read by several nodes)."""
        stats = list(stats)
        held = [s.held_xtx for s in stats if s.held_xtx is not None]
        cross = [s.cross for s in stats]
        if any(s.target is not None for s in stats):
            raise ValueError("a target sum belongs to one activation's one layer: it does not pool")
        return cls(sum(s.xtx for s in stats), sum(s.count for s in stats),
                   sum(held) if held else None, sum(s.held_count for s in stats),
                   sum(cross) if all(c is not None for c in cross) else None)


def _scaled(xtx, count):
    return xtx * (2.0 / count) if count > 0 else np.zeros_like(xtx)


def _load(model):
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model))
    return model


def _attr(node, name, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_dense_layers(model) -> list[DenseLayer]:
    """Every MatMul with a 2-D initializer as B, and every Gemm (transA=0) with an initializer B."""
    model = _load(model)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for i, node in enumerate(graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = list(inits[node.input[1]].dims)
        if len(dims) != 2 or node.input[0] in inits:
            continue
        name = node.name or f"{node.op_type}_{i}"
        if node.op_type == "MatMul":
            K, N = dims
            layers.append(DenseLayer(name, "MatMul", node.input[0], node.input[1], False, K, N,
                                     node.output[0], _matmul_bias(node, consumers, inits, N)))
            continue
        if _attr(node, "transA", 0):
            continue
        trans = bool(_attr(node, "transB", 0))
        N, K = dims if trans else dims[::-1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        layers.append(DenseLayer(name, "Gemm", node.input[0], node.input[1], trans, K, N, node.output[0],
                                 bias, float(_attr(node, "alpha", 1.0))))
    return layers


def _matmul_bias(node, consumers, inits, N):
    users = consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    other = [n for n in users[0].input if n != node.output[0]]
    if len(other) == 1 and other[0] in inits and list(inits[other[0]].dims) == [N]:
        return other[0]
    return None


def weight_matrix(model, layer: DenseLayer) -> np.ndarray:
    """The layer's weight as float32 [N, K] (y = x @ W^T), Gemm alpha folded in."""
    from onnx import numpy_helper

    model = _load(model)
    init = next(t for t in model.graph.initializer if t.name == layer.weight)
    w = numpy_helper.to_array(init).astype(np.float32)
    w = w if layer.transposed else w.T
    return np.ascontiguousarray(w * np.float32(layer.alpha) if layer.alpha != 1.0 else w)


def _with_outputs(model, names):
    """Copy of model whose graph also outputs `names`. Element types come from the model's
    value_info (frontend.prepare records them), else from onnx's shape inference; FLOAT if unknown."""
    import onnx

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    if any(name not in types for name in names) and not _big(model):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
        except Exception:  # noqa: BLE001 - inference is best effort; FLOAT is the default below
            pass
    model = copy.deepcopy(model)
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            elem = types.get(name) or onnx.TensorProto.FLOAT
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model


def _big(model) -> bool:
    """Weights near the 2 GB protobuf limit (counted from their dims: ByteSize() would serialize)."""
    from ..onnx_io import is_big

    return is_big(model)


def _session(model, threads: int = 0):
    """An ORT session for `model`; threads: intra-op threads (0: ORT's choice, one per core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    # no spinning after a run: the Hessian products numpy runs between runs took 2-4x longer while
    # the pool spun on the same cores (MiniLM fq2 compile 103 -> 60 s)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not _big(model):
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    import onnx

    # ORT holds the weights (read or mapped) once the session exists, so the copy goes at once
    with tempfile.TemporaryDirectory(prefix="fq-calib-") as tmp:
        path = str(Path(tmp) / "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="weights.bin")
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _samples(samples):
    if isinstance(samples, (str, os.PathLike)):
        with np.load(samples) as data:
            return {k: data[k] for k in data.files}
    return dict(samples)


def _progress(total, enabled, unit: str = "sample"):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="calibrating", unit=unit, leave=False)
        except ImportError:
            pass
    return None


def calibrate(model, samples, tensors=None, batch_size: int = 8, mask_input: str | None = None,
              progress: bool = True) -> dict[str, HessianStat]:
    """Hessian sums for `tensors` (default: the activations of find_dense_layers).

    model: .onnx path or ModelProto. samples: .npz path or {input name: array}, samples along
    axis 0. Returns {tensor name: HessianStat}; layers reading one tensor share its entry."""
    model = _load(model)
    data = _samples(samples)
    if tensors is None:
        tensors = list(dict.fromkeys(layer.activation for layer in find_dense_layers(model)))
    graph_inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    missing = sorted(graph_inputs - set(data))
    if missing:
        raise ValueError(f"samples lack model inputs: {', '.join(missing)}")
    if mask_input is not None and mask_input not in data:
        raise ValueError(f"mask input '{mask_input}' is not among the samples")
    feeds = sorted(graph_inputs)
    total = len(data[feeds[0]]) if feeds else 0
    if any(len(data[name]) != total for name in feeds):
        raise ValueError("all sample arrays must have the same length along axis 0")
    fetch = [t for t in tensors if t not in graph_inputs]
    session = _session(_with_outputs(model, fetch))
    stats: dict[str, HessianStat] = {}
    bar = _progress(total, progress)
    plan = batches(model, data, feeds, mask_input, batch_size)
    for idx in plan:
        feed = plan.arrays(data, feeds, idx)
        values = dict(zip(fetch, session.run(fetch, feed))) if fetch else {}
        mask = None if mask_input is None else plan.rows(data, mask_input, idx)
        held = held_out_samples(idx, total)
        for name in tensors:
            _accumulate(stats, name, values[name] if name in values else feed[name], mask, held)
        if bar is not None:
            bar.update(len(next(iter(feed.values()))) if feed else 0)
    if bar is not None:
        bar.close()
    return stats


def held_out_samples(indices, total: int) -> np.ndarray | None:
    """Which of the samples `indices` (a batch's, in its order) are held out (bool, one per
    sample); None when there are fewer than HOLDOUT_EVERY samples (then rows are split instead)."""
    if total < HOLDOUT_EVERY:
        return None
    return np.asarray(indices) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


class Batches(list):
    """The calibration batches, each an array of sample indices (`batches`). `rows(data, name,
    indices)` gives one input's rows of a batch, cut to the batch's longest sample where the
    batches are cut (`cut`: the inputs of the mask's [samples, seq] shape, `lengths`); `arrays`
    those of several inputs."""

    def __init__(self, items, cut=(), lengths=None):
        super().__init__(items)
        self.cut, self.lengths = set(cut), lengths

    def rows(self, data, name, indices) -> np.ndarray:
        rows = np.asarray(data[name])[indices]
        return rows[:, : max(1, int(self.lengths[indices].max()))] if name in self.cut else rows

    def arrays(self, data, names, indices) -> dict:
        return {name: self.rows(data, name, indices) for name in names}


def batches(model, data, feeds, mask_input, batch_size: int) -> Batches:
    """Batches of `batch_size` samples in order; or, where `mask_input` is right padding ([samples,
    seq], each row ones then zeros) and the model's inputs of that shape have a dynamic sequence
    axis, the samples ordered by length (stable) and each batch cut to its longest: padding
    costs ONNX Runtime a token's work (22% of 1024 MiniLM passages' slots) and adds nothing to the
    sums. Which samples are held out does not change (by index, `held_out_samples`); where the
    batch axis is dynamic too, the held-out samples get batches of their own."""
    total = len(data[feeds[0]]) if feeds else 0
    plain = Batches(np.arange(s, min(s + batch_size, total)) for s in range(0, total, batch_size))
    if mask_input is None or np.ndim(data[mask_input]) != 2:
        return plain
    mask = np.asarray(data[mask_input]) != 0
    lengths = mask.sum(1)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        return plain
    cut = [n for n in dict.fromkeys([*feeds, mask_input]) if np.shape(data[n])[:2] == mask.shape]
    fed = [n for n in cut if n in feeds]
    if not fed or not all(_dynamic_axis(model, n, 1) for n in fed):
        return plain
    order = np.argsort(lengths, kind="stable")
    groups = [order]
    held = held_out_samples(order, total)
    if held is not None and all(_dynamic_axis(model, n, 0) for n in fed):
        groups = [order[~held], order[held]]  # a batch all fit or all held out: one Gram product each
    return Batches((g[s : s + batch_size] for g in groups for s in range(0, len(g), batch_size)), cut, lengths)


def _dynamic_axis(model, name: str, axis: int) -> bool:
    """Whether graph input `name` declares `axis` without a fixed size."""
    for value in model.graph.input:
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            return len(dims) > axis and not dims[axis].HasField("dim_value")
    return False


def _held_rows(held_samples, nrows: int) -> np.ndarray:
    """Held-out flag per flattened row. Rows of a batch of b samples are sample-major when the row
    count is a multiple of b ([b, seq, K] or [b * seq, K]); otherwise, or without a sample split,
    every HOLDOUT_EVERY-th row."""
    if held_samples is not None and len(held_samples) and nrows % len(held_samples) == 0:
        return np.repeat(held_samples, nrows // len(held_samples))
    return np.arange(nrows) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1


def _gram32(rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i x_i x_i^T of float32 rows, in float32. With every weight 1 (no mask, or a 0/1 mask
    whose zero rows are gone) it is `x.T @ x`, which BLAS runs as a symmetric rank-k update: half
    a general product's flops."""
    if (weights == 1).all():
        return rows.T @ rows
    return (rows * weights[:, None]).T @ rows


def _accumulate(stats, name, act, mask, held_samples=None):
    """Add a batch's rows of `act` (mask-weighted, padding skipped) to stats[name]. Products in
    float32 per batch (a few thousand rows: relative error ~1e-6, far under GPTQ's 1% damping;
    GPTQ's reference keeps H in float32), summed across batches in float64. A batch all fit or all
    held out (`batches` makes them so) costs one product and one add."""
    act = np.asarray(act, dtype=np.float32)
    rows = act.reshape(-1, act.shape[-1])
    weights = np.ones(len(rows), np.float32)
    if mask is not None and act.shape[:-1] == mask.shape:
        weights = mask.reshape(-1).astype(np.float32)
    held = _held_rows(held_samples, len(rows))
    if not held.any() or held.all():
        parts = {bool(held.all()): _weighted_gram(rows, weights)}
    else:
        parts = {True: _weighted_gram(rows[held], weights[held]),  # two products: no more flops than one
                 False: _weighted_gram(rows[~held], weights[~held])}
    stat = stats.get(name)
    if stat is None:
        K = rows.shape[1]
        stat = stats[name] = HessianStat(np.zeros((K, K)), 0.0, np.zeros((K, K)), 0.0)
    for is_held, (xtx, count) in parts.items():
        np.add(stat.xtx, xtx, out=stat.xtx)
        stat.count += count
        if is_held:
            np.add(stat.held_xtx, xtx, out=stat.held_xtx)
            stat.held_count += count


def _weighted_gram(rows, weights):
    """(float32 sum of w x x^T, sum of w) over the rows with a nonzero weight."""
    if not weights.all():  # padding adds nothing: skip its rows
        keep = weights != 0
        rows, weights = rows[keep], weights[keep]
    return _gram32(rows, weights), float(weights.sum(dtype=np.float64))
