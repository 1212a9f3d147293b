"""Sequential calibration: each activation's Hessian comes from the model with the dense layers
before it already quantized, as in GPTQ's reference implementation.

The ONNX graph's nodes (topologically sorted) are cut right after the producer of each
calibrated activation. Segment i runs the nodes between cut i-1 and cut i in ONNX Runtime on the
tensors live at cut i-1, batch by batch over all calibration samples, with the weights quantized
so far substituted. Its outputs are the tensors live at cut i; the activation at cut i gets its
Hessian, then `quantize` is called and may return new weights for later segments.

Every node runs once per sample in all, as in one plain calibration pass. Between segments the
live tensors of every batch (the residual stream, the attention mask, ...) are kept: in memory up
to `memory_bytes`, the rest in a temporary directory, so memory stays bounded.

With `fp_target` the fp32 model's runs and its target sums go on a thread of their own
(`_Fp32Side`), ONNX Runtime and numpy's BLAS on half the cores each: the fp32 runs need no
quantized weight, so they also go ahead while the segment before is quantized.
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from .calibrate import HessianStat, _accumulate, _load, _progress, _samples, _session, batches, held_out_samples
from .quantize import FP_TARGET_DAMP

MEMORY_BYTES = 1 << 30  # live activations kept in memory between segments; beyond it, on disk


def node_inputs(node) -> list[str]:
    """The tensors a node reads, including outer-scope names read inside its subgraphs (If, Loop)."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names += _outer_names(graph)
    return names


def _outer_names(graph) -> list[str]:
    inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    inner |= {o for node in graph.node for o in node.output}
    return [n for node in graph.node for n in node_inputs(node) if n not in inner]


def producer_index(model, tensors) -> dict[str, int]:
    """{tensor: index of the node that produces it}, -1 for graph inputs; ValueError for a name
    that is neither."""
    made = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    inputs = {i.name for i in model.graph.input}
    out = {}
    for name in tensors:
        if name in made:
            out[name] = made[name]
        elif name in inputs:
            out[name] = -1
        else:
            raise ValueError(f"tensor '{name}' is produced by no node and is not a graph input")
    return out


def segments(model, tensors) -> list[tuple[int, int, list[str]]]:
    """[(first node, last node + 1, tensors calibrated at the cut)] in graph order; a segment may
    be empty (several tensors at one cut, or a graph input)."""
    where = producer_index(model, tensors)
    cuts = sorted(set(where.values()))
    out, start = [], 0
    for cut in cuts:
        out.append((start, cut + 1, [t for t in tensors if where[t] == cut]))
        start = cut + 1
    return out


def _elem_types(model) -> dict[str, int]:
    import onnx

    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    made = {o for node in g.node for o in node.output}
    if not made <= set(types):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info})
        except Exception:  # noqa: BLE001 - best effort; a missing type fails in _segment_model
            pass
    return types


class _Store:
    """Per-batch dicts of live arrays: in memory up to `limit` bytes, the rest as .npy files."""

    def __init__(self, limit: int):
        self.limit, self.used, self.mem, self.disk, self.dir = limit, 0, {}, {}, None

    def put(self, i: int, live: dict) -> None:
        self.drop(i)
        size = sum(a.nbytes for a in live.values())
        if self.used + size <= self.limit:
            self.mem[i], self.used = live, self.used + size
            return
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="fq-seq-"))
        names = list(live)
        for j, name in enumerate(names):
            np.save(self.dir / f"{i}_{j}.npy", live[name])
        self.disk[i] = names

    def get(self, i: int) -> dict:
        if i in self.mem:
            return self.mem[i]
        return {name: np.load(self.dir / f"{i}_{j}.npy") for j, name in enumerate(self.disk[i])}

    def drop(self, i: int) -> None:
        if i in self.mem:
            self.used -= sum(a.nbytes for a in self.mem.pop(i).values())
        self.disk.pop(i, None)

    def close(self) -> None:
        self.mem.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def sequential_calibrate(model, samples, tensors, quantize, batch_size: int = 8, mask_input: str | None = None,
                         progress: bool = True, memory_bytes: int = MEMORY_BYTES,
                         keep_stats: bool = True, fp_target: bool = False,
                         residuals: dict | None = None, projections: dict | None = None) -> dict[str, HessianStat]:
    """{tensor: HessianStat} like calibrate(), each tensor measured on the model as it stands
    after the earlier `quantize` calls.

    quantize(name, stat) is called once per tensor, in graph order, as soon as its statistics are
    complete; it returns {initializer name: array} (possibly empty) that replace those initializers
    in every later segment (same layout as the model's), kept until their last reader has run.
    keep_stats False: each HessianStat is dropped once quantize has seen it (returns {}).
    fp_target: the fp32 model runs alongside (its live tensors kept the same way) and each
    HessianStat also gets `cross`, the sum of (x_fp32 - x) x^T (fp_target_weight). residuals
    ({tensor: residual tensor}, with fp_target; residual_inputs): `resid` too, the sum of
    (r_fp32 - r) x^T. projections ({tensor: W^T [K, N]}, with fp_target; the one layer reading the
    tensor): `target` instead of `cross` and `resid`, the sum of (W (x_fp32 - x) + r_fp32 - r) x^T
    [N, K], which is all fp_target_weight needs: 2 N K products a row against K^2 (+ N K), fewer
    where N < K / 2 (or N < K with a residual: an FFN's down projection)."""
    model = _load(model)
    data = _samples(samples)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    missing = sorted(set(graph_inputs) - set(data))
    if missing:
        raise ValueError(f"samples lack model inputs: {', '.join(missing)}")
    if mask_input is not None and mask_input not in data:
        raise ValueError(f"mask input '{mask_input}' is not among the samples")
    total = len(data[graph_inputs[0]]) if graph_inputs else 0
    if any(len(data[name]) != total for name in graph_inputs):
        raise ValueError("all sample arrays must have the same length along axis 0")
    last_use = _last_use(graph)
    types = _elem_types(model)
    replaced: dict[str, np.ndarray] = {}
    store = _Store(memory_bytes)
    fp_store = _Store(memory_bytes) if fp_target else None
    plan = batches(model, data, graph_inputs, mask_input, batch_size)
    for b, idx in enumerate(plan):
        for st in filter(None, (store, fp_store)):
            st.put(b, plan.arrays(data, graph_inputs, idx))
    stats: dict[str, HessianStat] = {}
    bar = _progress(len(tensors), progress, unit="activation")  # one step per layer input quantized
    segs = [(first, stop, names, {n for n, last in last_use.items() if last >= stop} | set(names))
            for first, stop, names in segments(model, tensors)]
    threads = _side_threads() if fp_target else 0
    side = None
    try:
        if fp_target:
            side = _Fp32Side(segs, len(plan), _fp32_runs(model, fp_store, inits, types, threads),
                             _target_sums(fp_store, stats, residuals, projections))
        for first, stop, names, keep in segs:
            run = _segment_runner(model, first, stop, keep, inits, replaced, types, threads)
            with _blas_threads(threads):  # the quantization below keeps all cores (GPTQ on one was slower)
                for b, idx in enumerate(plan):
                    live = store.get(b)
                    live = {**live, **run(live)}
                    mask = None if mask_input is None else plan.rows(data, mask_input, idx)
                    held = held_out_samples(idx, total)
                    for name in names:
                        _accumulate(stats, name, live[name], mask, held)
                    store.put(b, {n: a for n, a in live.items() if n in keep})
                    if side is not None:
                        side.put(b, live, mask)
                if side is not None:
                    side.wait()  # the segment's fp32-target sums are in
            replaced = {n: a for n, a in replaced.items() if last_use.get(n, -1) >= stop}
            for name in names:
                replaced.update(quantize(name, stats[name]) or {})
                if not keep_stats:
                    del stats[name]
                if bar is not None:
                    bar.update(1)
    finally:
        if side is not None:
            side.close()
        store.close()
        if fp_store is not None:
            fp_store.close()
        if bar is not None:
            bar.close()
    return stats


def _accumulate_cross(stat: HessianStat, other, act, mask, field: str = "cross") -> None:
    """stat.<field> += sum over rows of y x^T (y: `other`, x: `act`), mask-weighted like the Hessian
    (calibrate._accumulate). y is a difference of fp32 and quantized-model tensors, small against x,
    so float32 products per batch are accurate enough; the sum is float64."""
    other = np.asarray(other, dtype=np.float32).reshape(-1, np.shape(other)[-1])
    weighted = mask is not None and np.shape(act)[:-1] == np.shape(mask)
    act = np.asarray(act, dtype=np.float32).reshape(-1, np.shape(act)[-1])
    if weighted:  # padding adds nothing: skip its rows
        w = np.asarray(mask, dtype=np.float32).reshape(-1)
        keep = w != 0
        other, act = other[keep] * w[keep, None], act[keep]
    product = other.T @ act
    if getattr(stat, field) is None:
        setattr(stat, field, np.zeros(product.shape))
    np.add(getattr(stat, field), product, out=getattr(stat, field))


def _accumulate_target(stat: HessianStat, dx, dr, act, mask, proj=None) -> None:
    """The fp32 target's sums for one batch: `cross` and `resid` (dr None: none), or with
    proj = W^T, `target` directly."""
    if proj is None:
        _accumulate_cross(stat, dx, act, mask)
        if dr is not None:
            _accumulate_cross(stat, dr, act, mask, "resid")
        return
    y = np.asarray(dx, dtype=np.float32).reshape(-1, proj.shape[0]) @ proj
    if dr is not None:
        y += np.asarray(dr, dtype=np.float32).reshape(y.shape)
    _accumulate_cross(stat, y.reshape(*np.shape(dx)[:-1], -1), act, mask, "target")


def fp_target_damping(percdamp: float, max_rows: float | None, rows: float) -> float:
    """percdamp scaled by min(1, max_rows / rows): above max_rows calibration rows the damping falls as
    1 / rows, a constant ridge per row (the mean diagonal it is a fraction of grows with the rows), so
    a correction fitted on more rows is shrunk less (None: percdamp)."""
    if max_rows is None or rows <= max_rows:
        return percdamp
    return percdamp * max_rows / rows


def fp_target_weight(W: np.ndarray, stat: HessianStat, percdamp: float | None = None,
                     max_rows: float | None = None) -> np.ndarray:
    """The weight whose outputs on the quantized model's inputs X best match the fp32 model's:
    argmin_V ||W X_fp + R_fp - V X - R|| = W + (W E + D) A^-1 with A = X X^T, E = (X_fp - X) X^T
    (stat.cross) and D = (R_fp - R) X^T (stat.resid: the residual added to the layer's output, when
    known, else 0); A is damped by d = percdamp x its mean diagonal (None: FP_TARGET_DAMP; with
    max_rows, scaled down by fp_target_damping), which only shrinks the correction. Asymmetric
    calibration, as in GPTAQ (Li et al. 2025). stat.target, where summed (sequential_calibrate's
    projections), is W E + D already."""
    W = np.asarray(W, dtype=np.float64)
    if stat.cross is None and stat.target is None:
        return W
    A = stat.xtx
    percdamp = fp_target_damping(FP_TARGET_DAMP if percdamp is None else percdamp, max_rows, stat.count)
    Ad = A + percdamp * float(np.mean(np.diag(A))) * np.eye(len(A))
    if stat.target is not None:  # W E + D summed directly (projections)
        rhs = stat.target.T
    else:
        rhs = stat.cross.T @ W.T
        if stat.resid is not None:
            rhs += stat.resid.T
    return W + np.linalg.solve(Ad, rhs).T


def residual_inputs(model, layers) -> dict[str, str]:
    """{activation: r} for the layers that alone read their activation and whose output (after
    their bias Add, if any) goes only into an Add with another tensor r: the residual connection
    whose upstream error fp_residual lets the layer correct."""
    users: dict = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    inits = {t.name for t in model.graph.initializer}
    readers: dict = {}
    for layer in layers:
        readers.setdefault(layer.activation, set()).add(layer.weight)
    out = {}
    for layer in layers:
        if len(readers[layer.activation]) != 1:
            continue
        y = layer.output
        nxt = users.get(y, [])
        if layer.bias is not None and len(nxt) == 1 and nxt[0].op_type == "Add" and layer.bias in nxt[0].input:
            y, nxt = nxt[0].output[0], users.get(nxt[0].output[0], [])
        if len(nxt) == 1 and nxt[0].op_type == "Add" and len(nxt[0].input) == 2:
            r = [n for n in nxt[0].input if n != y]
            if len(r) == 1 and r[0] not in inits:
                out[layer.activation] = r[0]
    return out


def _last_use(graph) -> dict[str, int]:
    """{tensor: index of the last node reading it}."""
    last = {}
    for i, node in enumerate(graph.node):
        for name in node_inputs(node):
            last[name] = i
    return last


def _fp32_runs(model, fp_store, inits, types, threads):
    """runs(segment) -> run(b): batch b through the fp32 model's nodes of `segment`, the live tensors
    kept in fp_store."""

    def runs(seg):
        first, stop, names, keep = seg
        run = _segment_runner(model, first, stop, keep, inits, {}, types, threads)

        def run_batch(b):
            fp_live = fp_store.get(b)
            fp_live = {**fp_live, **run(fp_live)}
            fp_store.put(b, {n: a for n, a in fp_live.items() if n in keep})

        return run_batch

    return runs


def _target_sums(fp_store, stats, residuals, projections):
    """sums(segment, b, live, mask): batch b's fp32-target sums for the segment's activations, from
    the fp32 model's tensors (fp_store) and the quantized model's (`live`)."""

    def sums(seg, b, live, mask):
        fp_live = fp_store.get(b)
        for name in seg[2]:
            r = (residuals or {}).get(name)
            # (a residual neither side holds: no fit to it)
            dr = fp_live[r] - live[r] if r in live and r in fp_live else None
            _accumulate_target(stats[name], fp_live[name] - live[name], dr, live[name], mask,
                               (projections or {}).get(name))

    return sums


class _Fp32Side:
    """The fp32 model's half of sequential calibration, on a thread of its own. Segment by segment it
    runs the batches through the fp32 model (`runs`) and adds each batch's target sums (`sums`) as
    the quantized model's tensors of that batch arrive (put); the fp32 runs need no quantized
    weight, so while no batch waits they go ahead (beside the quantization of the segment before).
    wait() returns once the current segment's sums are complete and raises the side's error, if
    any; close() stops the thread."""

    DEPTH = 4  # batches handed over and not yet summed

    def __init__(self, segs, nbatch: int, runs, sums):
        self.inbox, self.done, self.stopped = queue.Queue(self.DEPTH), queue.Queue(), threading.Event()
        self.thread = threading.Thread(target=self._work, args=(segs, nbatch, runs, sums), name="fq-fp32-side",
                                       daemon=True)
        self.thread.start()

    def _work(self, segs, nbatch, runs, sums):
        try:
            for seg in segs:
                run, ran = runs(seg), 0
                for b in range(nbatch):
                    # fp32 runs ahead while no quantized batch waits (during the quantization, say)
                    while ran < nbatch and (ran <= b or self.inbox.empty()) and not self.stopped.is_set():
                        run(ran)
                        ran += 1
                    item = self.inbox.get()
                    if item is None or self.stopped.is_set():
                        return
                    sums(seg, *item)
                self.done.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's wait()
            self.done.put(e)

    def put(self, b: int, live: dict, mask) -> None:
        while True:
            try:
                self.inbox.put((b, live, mask), timeout=0.5)
                return
            except queue.Full:
                if not self.thread.is_alive():  # it stopped on an error: wait() raises it
                    self.wait()

    def wait(self) -> None:
        error = self.done.get()
        if error is not None:
            raise error

    def close(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.inbox.put(None, timeout=0.5)
            except queue.Full:
                continue
            self.thread.join()


def _side_threads() -> int:
    """Threads for each of the two sides (quantized model, fp32 model): half the physical cores
    (ONNX Runtime's default takes them all)."""
    from .. import _physical_cores

    return max(1, _physical_cores() // 2)


@contextlib.contextmanager
def _blas_threads(n: int):
    """numpy's BLAS on n threads inside (0: unchanged)."""
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _segment_runner(model, first, stop, keep, inits, replaced, types, threads: int = 0):
    """A function {live tensor: array} -> {tensor made in nodes first..stop-1 and in keep: array}
    (ORT on `threads` intra-op threads; 0: its default)."""
    nodes = model.graph.node[first:stop]
    if not nodes:
        return lambda live: {}
    made = {o for node in nodes for o in node.output}
    reads = list(dict.fromkeys(n for node in nodes for n in node_inputs(node)))
    outputs = [n for n in dict.fromkeys(o for node in nodes for o in node.output) if n in keep]
    feeds = [n for n in reads if n not in made and n not in inits]
    state = {}

    def run(live):
        if "session" not in state:  # input types come from the first batch's arrays
            seg = _segment_model(model, nodes, feeds, outputs, [n for n in reads if n in inits and n not in made],
                                 inits, replaced, types, live)
            state["session"] = _session(seg, threads)
        values = state["session"].run(outputs, {n: live[n] for n in feeds}) if outputs else []
        return dict(zip(outputs, values))

    return run


def _segment_model(model, nodes, feeds, outputs, weights, inits, replaced, types, live):
    from onnx import helper, numpy_helper

    def tensor(name):
        if name not in replaced:
            return inits[name]
        dtype = helper.tensor_dtype_to_np_dtype(inits[name].data_type)
        return numpy_helper.from_array(np.ascontiguousarray(replaced[name], dtype=dtype), name)

    unknown = [n for n in outputs if not types.get(n)]
    if unknown:
        raise ValueError(f"sequential calibration: no element type known for tensor '{unknown[0]}'")
    graph = helper.make_graph(
        list(nodes), "segment",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(live[n]).dtype), None)
         for n in feeds],
        [helper.make_tensor_value_info(n, types[n], None) for n in outputs],
        [tensor(n) for n in weights])
    seg = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    seg.functions.extend(model.functions)
    return seg
