"""Choose, calibrate and quantize a model's dense layers; hand the results to the rewrite pass.

ONNX-level: layers are found in the ONNX graph (numerics.find_dense_layers), quantized with
numpy, and keyed by the Relax parameter name of their weight so that `passes.QuantizeDense` can
find them after import. Layers reading one activation get one input seed, so they share a
transform.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import FqError

MIN_FEATURES = 32  # layers with fewer input or output features stay fp32
PAD_LIMIT = 1.5  # a layer whose padding stores over PAD_LIMIT x the nominal bits stays fp32 (--pad-small)


@dataclass
class Plan:
    """Which dense layers get quantized, and why the others do not."""

    chosen: list = field(default_factory=list)  # numerics.DenseLayer
    skipped: list = field(default_factory=list)  # (DenseLayer, reason)
    padded: list = field(default_factory=list)  # (DenseLayer, warning): chosen although padding bloats it
    names: dict = field(default_factory=dict)  # node name -> readable layer name
    uses: dict = field(default_factory=dict)  # weight name -> every DenseLayer (node) reading it
    tied: set = field(default_factory=set)  # weight names of tied embedding tables chosen as heads (--quantize-head)

    def all_uses(self, layers) -> list:
        """Every node reading the weights of `layers` (a shared weight calibrates over all uses)."""
        return [use for layer in layers for use in self.uses.get(layer.weight, [layer])]


def scheme_config(name: str, **options):
    """The numerics QuantConfig for `name`, options (redundancy, l_den, ...) applied."""
    from .numerics import SCHEMES, get_scheme

    options = {k: v for k, v in options.items() if v is not None}
    try:
        return get_scheme(name, **options)
    except ValueError as err:
        raise FqError(f"scheme '{name}': {err}" if name in SCHEMES else str(err)) from None


def display_name(proto_node) -> str:
    """A readable layer name: the torch module path when the exporter recorded it (e.g.
    'model.layers.0.self_attn.q_proj'), else the node name."""
    for prop in proto_node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                break
            if len(scopes) > 1:
                return module_path(scopes[:-1])  # the last scope is the op ('linear')
    return proto_node.name


def module_path(scopes: list[str]) -> str:
    """The module path of nested name scopes, whether each scope is the full path so far (torch
    2.13: 'lm', 'lm.model', 'lm.model.layers.0') or only its own part ('lm', 'model', 'layers.0')."""
    path = ""
    for scope in scopes:
        path = scope if not path or scope.startswith(path + ".") else f"{path}.{scope}"
    return path


def stored_bits_per_weight(cfg, out_features: int, in_features: int) -> tuple[int, int, float]:
    """(rows, cols, bits per weight) of the record an N x K layer gets under `cfg`, from the shapes
    alone (the bits are what numerics.bits_per_weight gives after quantizing): FrameQuant pads both sides for its
    Hadamards (numerics.padded_dim) and widens the input by its frame; codes are packed per row,
    with a float32 scale and zero per row (or group)."""
    from .numerics import input_transforms, packed_width, padded_dim

    rows, cols = out_features, in_features
    if cfg.method == "framequant":
        had, frame = input_transforms(in_features, cfg, 0)
        rows, cols = padded_dim(out_features), had.dp if frame is None else frame.out_dim
    groups = -(-cols // (cfg.group_size or cols))
    return rows, cols, rows * (8 * packed_width(cols, cfg.bits) + 64 * groups) / (out_features * in_features)


def nominal_bits(cfg, in_features: int) -> float:
    """The scheme's bits per weight for a layer of K inputs without padding: bits x r (the frame's
    redundancy, 1 outside FrameQuant) plus the float32 scale and zero of each row (or group)."""
    from .numerics import nominal_bits_per_weight, storage_bits

    per = min(in_features, cfg.group_size or in_features)
    return nominal_bits_per_weight(storage_bits(cfg.bits), cfg.redundancy, per, scale_bits=32, zero_bits=32)


def padding_check(cfg, layer) -> str | None:
    """What padding costs, when it makes the layer store over PAD_LIMIT x the scheme's nominal
    bits per weight (100 -> 37 under fq2: 6.09 against 2.84), else None."""
    rows, cols, stored = stored_bits_per_weight(cfg, layer.out_features, layer.in_features)
    nominal = nominal_bits(cfg, layer.in_features)
    if stored <= PAD_LIMIT * nominal:
        return None
    return (f"padded to {rows}x{cols} it stores {stored:.2f} bits per weight, over {PAD_LIMIT}x {cfg.name}'s "
            f"nominal {nominal:.2f}")


def plan_layers(proto, skip: str | None = None, min_features: int = MIN_FEATURES, cfg=None,
                pad_small: bool = False, quantize_head: bool = False) -> Plan:
    """Choose the dense layers to quantize. With `cfg`, a layer that padding would make store over
    PAD_LIMIT x the scheme's nominal bits stays fp32 (a skipped reason), unless `pad_small`: then
    it is chosen and listed in `plan.padded` with a warning. quantize_head: the tied embedding /
    LM head (find_tied_head) is chosen too (`--skip` does not apply to it); FqError without one."""
    from .numerics import find_dense_layers

    try:
        pattern = re.compile(skip) if skip else None
    except re.error as err:
        raise FqError(f"bad --skip regular expression '{skip}': {err}") from None
    nodes = {n.name: n for n in proto.graph.node}
    plan = Plan()
    for layer in find_dense_layers(proto):
        name = display_name(nodes[layer.node]) if layer.node in nodes else layer.node
        plan.names[layer.node] = name
        plan.uses.setdefault(layer.weight, []).append(layer)
        if len(plan.uses[layer.weight]) > 1:
            continue  # a shared weight is one layer: its first use stands for all
        if pattern and any(pattern.search(s) for s in (name, layer.node, layer.weight)):
            plan.skipped.append((layer, f"matches --skip '{skip}'"))
        elif min(layer.in_features, layer.out_features) < min_features:
            plan.skipped.append((layer, f"too small ({layer.out_features}x{layer.in_features}, "
                                        f"under {min_features} features)"))
        elif cfg is not None and cfg.method != "none" and (cost := padding_check(cfg, layer)):
            if pad_small:
                plan.chosen.append(layer)
                plan.padded.append((layer, f"{name} [{layer.out_features}, {layer.in_features}]: {cost} "
                                           f"(--pad-small)"))
            else:
                plan.skipped.append((layer, f"{cost.replace(' it stores ', ' it would store ')} (--pad-small "
                                            f"quantizes it)"))
        else:
            plan.chosen.append(layer)
    for layer, reason in unsupported_dense(proto, set(plan.uses)):
        plan.names[layer.node] = display_name(nodes[layer.node]) if layer.node in nodes else layer.node
        plan.skipped.append((layer, reason))
    if quantize_head:
        _choose_head(proto, plan, nodes)
    return plan


def _choose_head(proto, plan: Plan, nodes: dict) -> None:
    head = find_tied_head(proto)
    if head is None:
        raise FqError("--quantize-head: the model has no tied embedding / LM head (a 2-D table both "
                      "gathered and multiplied transposed); nothing to quantize")
    plan.skipped = [(layer, reason) for layer, reason in plan.skipped if layer.node != head.node]
    plan.names[head.node] = display_name(nodes[head.node]) if head.node in nodes else head.node
    plan.uses[head.weight] = [head]
    plan.chosen.append(head)
    plan.tied.add(head.weight)


def find_tied_head(proto):
    """The tied LM head as a numerics.DenseLayer (weight: the table E [V, K], transposed), or None.
    After frontend.prepare a tied table E is read by Gather(E, ids, axis 0) and by a MatMul(h,
    Transpose(E)); the table must be used no other way. The first such MatMul is the head."""
    from .numerics.calibrate import DenseLayer

    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    users: dict = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for i, node in enumerate(proto.graph.node):
        table = _transposed_table(node, inits, users)
        if table is None:
            continue
        matmuls = [n for n in users.get(node.output[0], []) if n.op_type == "MatMul" and n.input[1] == node.output[0]]
        if matmuls and len(matmuls) == len(users[node.output[0]]):
            head = matmuls[0]
            V, K = inits[table]
            return DenseLayer(head.name or f"MatMul_{i}", "MatMul", head.input[0], table, True, K, V, head.output[0])
    return None


def _transposed_table(node, inits: dict, users: dict) -> str | None:
    """E when `node` is Transpose(E, perm [1, 0]) of a 2-D initializer that is otherwise only
    gathered along axis 0."""
    if node.op_type != "Transpose" or node.input[0] not in inits or len(inits[node.input[0]]) != 2:
        return None
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
    if perm != [1, 0]:
        return None
    others = [n for n in users[node.input[0]] if n is not node]
    gathers = [n for n in others if n.op_type == "Gather" and n.input[0] == node.input[0]
               and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0]
    return node.input[0] if gathers and len(gathers) == len(others) else None


def unsupported_dense(proto, found: set) -> list:
    """(DenseLayer, reason) for MatMul / Gemm nodes with a constant weight the rewrite cannot take."""
    from .numerics.calibrate import DenseLayer

    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    out = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        a, b = node.input[0], node.input[1]
        if b in found or (a not in inits and b not in inits):
            continue
        weight = b if b in inits else a
        dims = inits[weight]
        if a in inits and b in inits:
            reason = "both inputs are constants"
        elif a in inits:
            reason = "the constant weight is the left operand"
        elif node.op_type == "Gemm":
            reason = "Gemm with transA=1"
        else:
            reason = f"the weight has rank {len(dims)}, not 2"
        rows, cols = (dims[-1], dims[-2]) if len(dims) >= 2 else (dims[0] if dims else 1, 1)
        out.append((DenseLayer(node.name or f"{node.op_type}_{i}", node.op_type, a, weight, False, cols, rows,
                               node.output[0]), reason))
    return out


MASK_INPUT = "attention_mask"  # when the model has this input, padded positions do not calibrate


_LAST_CALIBRATION: dict = {}  # one entry: compiling one model under several schemes calibrates once


def calibrate_layers(proto, layers, calib, progress: bool = True, samples: int | None = None) -> dict:
    """{activation name: HessianStat} for the activations read by `layers`. The last result is
    kept in memory, keyed by digests of the model and of the calibration file, and reused.
    samples: use the first N samples (`--calib-samples`)."""
    import sys

    from . import calib_data
    from .numerics import calibrate

    tensors = list(dict.fromkeys(layer.activation for layer in layers))
    key = _calibration_key(proto, calib, tensors)
    key = key and key + (samples,)
    if key is not None and key in _LAST_CALIBRATION:
        return _LAST_CALIBRATION[key]
    data, batch, notes = calib_data.validate(proto, calib_data.read(calib), samples)
    for note in notes if progress else []:
        print(f"    note: {note}", file=sys.stderr)
    mask = MASK_INPUT if any(i.name == MASK_INPUT for i in proto.graph.input) else None
    try:
        stats = calibrate(proto, data, tensors=tensors, progress=progress, mask_input=mask, batch_size=batch)
    except ValueError as err:
        raise FqError(f"calibration failed: {err}") from None
    if key is not None:
        _LAST_CALIBRATION.clear()
        _LAST_CALIBRATION[key] = stats
    return stats


def _calibration_key(proto, calib, tensors):
    """None (no caching) unless calib is a file; else digests of model, file and tensor list."""
    import hashlib
    from pathlib import Path

    if not isinstance(calib, (str, Path)):
        return None
    from .artifact import sha256_input

    return _model_digest(proto), sha256_input(Path(calib)), tuple(tensors)


def _model_digest(proto) -> str:
    """sha256 of the model's graph and weights, the large weights tensor by tensor (a model over
    2 GB cannot be serialized in one piece)."""
    import hashlib

    from .frontend import weightless

    light, moved = weightless(proto)
    digest = hashlib.sha256(light.SerializeToString())
    for init in proto.graph.initializer:
        if init.name in moved:
            digest.update(init.SerializeToString())
    return digest.hexdigest()


def quantize_layers(proto, plan: Plan, cfg, hessians: dict | None, progress: bool = True, head_cfg=None,
                    configs: dict | None = None) -> dict:
    """{weight initializer name: numerics.QuantizedLinear} for the chosen layers. Each layer gets
    the HessianStat of its activations, so the held-out guard (numerics.guard) can choose its option.
    A tied head (plan.tied) is quantized with head_cfg where given, else with cfg. configs:
    {weight: QuantConfig} replacing cfg for those layers (quantize_allocated)."""
    records = {}
    for layer in _bar(plan.chosen, progress, f"quantizing ({cfg.name})"):
        h = _summed_hessian(hessians, plan.all_uses([layer])) if hessians else None
        records[layer.weight] = _quantize_one(proto, plan, layer, (configs or {}).get(layer.weight, cfg), h, head_cfg)
    return records


def quantize_allocated(proto, plan: Plan, cfg, hessians: dict, bits: float, progress: bool = True):
    """(configs, report) for `--bits`: every layer quantized under each option of
    numerics.allocation_options(cfg) on the plain Hessians, then numerics.allocate chooses one option
    per group of layers reading one activation (they share an input transform), least summed
    held-out error within bits x the layers' weights. configs: {weight: QuantConfig}. A tied head
    keeps its own config and is not counted."""
    from .numerics import layer_bits
    from .numerics.allocate import allocate, allocation_options

    try:
        options = allocation_options(cfg)
    except ValueError as err:
        raise FqError(f"--bits: {err}") from None
    body = [layer for layer in plan.chosen if layer.weight not in plan.tied]
    sub = Plan(chosen=body, names=plan.names, uses=plan.uses)
    records = {label: quantize_layers(proto, sub, ocfg, hessians, progress) for label, ocfg in options.items()}
    groups: dict = {}
    for layer in body:
        for label in options:
            rec = records[label][layer.weight]
            if rec.guard is None:
                raise FqError("--bits needs held-out calibration rows (at least 5 samples) to compare the options")
            bits_, err = groups.setdefault(layer.activation, {}).get(label, (0, 0.0))
            groups[layer.activation][label] = (bits_ + layer_bits(rec), err + rec.guard["held_out_err"][rec.guard["chosen"]])
    weights = sum(layer.out_features * layer.in_features for layer in body)
    least = sum(min(b for b, _ in opts.values()) for opts in groups.values())
    if bits * weights < least:
        raise FqError(f"--bits {bits:g} is below the fewest bits these layers can take: {least / weights:.3f} per "
                      f"weight (every group at its cheapest option)")
    choice = allocate(groups, bits * weights)
    configs = {layer.weight: options[choice[layer.activation]] for layer in body}
    used = sum(groups[act][label][0] for act, label in choice.items())
    labels = list(choice.values())
    report = {"budget_bits_per_weight": bits, "bits_per_weight": round(used / weights, 4),
              "groups": {label: labels.count(label) for label in options}}
    return configs, report


def _raw_weight(proto, layer) -> np.ndarray:
    """The layer's W [N, K] (float32) without Gemm's alpha, which Relax applies to the activation:
    what is quantized, and what the fp32 target aims through."""
    from .numerics import weight_matrix

    w = weight_matrix(proto, layer)
    return w / np.float32(layer.alpha) if layer.alpha != 1.0 else w


def _quantize_one(proto, plan: Plan, layer, cfg, h, head_cfg=None):
    from .numerics import quantize_layer, seed_for

    w = _raw_weight(proto, layer)
    if getattr(h, "cross", None) is not None or getattr(h, "target", None) is not None:  # aim at the fp32 outputs
        from .numerics.sequential import fp_target_weight

        w = fp_target_weight(w, h, cfg.fp_target_damp, cfg.fp_target_rows)
    return quantize_layer(
        plan.names[layer.node], w, h, head_cfg if head_cfg is not None and layer.weight in plan.tied else cfg,
        input_seed=seed_for(layer.activation + ":in", cfg.seed),
        output_seed=seed_for(layer.weight + ":out", cfg.seed),
        output_rotation=layer.weight not in plan.tied)  # a tied table gathers its rows


def quantize_sequential(proto, plan: Plan, cfg, calib, progress: bool = True, samples: int | None = None,
                        head_cfg=None, configs: dict | None = None) -> dict:
    """Records as quantize_layers gives them, but calibrated sequentially
    (numerics.sequential_calibrate): each layer's Hessian comes from the model whose layers before
    it (in graph order) are already quantized, and a layer is quantized as soon as the Hessians of
    all its activations are complete. Nothing is cached: the Hessians depend on the scheme.
    configs: as in quantize_layers."""
    import sys

    from . import calib_data
    from .numerics import effective_weight
    from .numerics.sequential import residual_inputs, sequential_calibrate

    data, batch, notes = calib_data.validate(proto, calib_data.read(calib), samples)
    for note in notes if progress else []:
        print(f"    note: {note}", file=sys.stderr)
    mask = MASK_INPUT if any(i.name == MASK_INPUT for i in proto.graph.input) else None
    acts = {layer.weight: set(use.activation for use in plan.all_uses([layer])) for layer in plan.chosen}
    stats, records = {}, {}

    def quantize(name, stat):
        stats[name] = stat
        new = {}
        for layer in plan.chosen:
            if layer.weight not in records and acts[layer.weight] <= set(stats):
                rec = _quantize_one(proto, plan, layer, (configs or {}).get(layer.weight, cfg),
                                    _summed_hessian(stats, plan.all_uses([layer])), head_cfg)
                records[layer.weight] = rec
                w = effective_weight(rec).astype(np.float32)  # [N, K]; the initializer is [N, K] when transposed
                new[layer.weight] = w if layer.transposed else w.T
        for act in [a for a in stats if all(w in records for w, used in acts.items() if a in used)]:
            del stats[act]  # every layer reading it is quantized
        return new

    tensors = list(dict.fromkeys(use.activation for use in plan.all_uses(plan.chosen)))
    residuals = residual_inputs(proto, plan.chosen) if cfg.fp_residual else None
    projections = _projections(proto, plan, acts, residuals or {}) if cfg.fp_target else None
    try:
        sequential_calibrate(proto, data, tensors, quantize, batch_size=batch, mask_input=mask, progress=progress,
                             keep_stats=False, fp_target=cfg.fp_target, residuals=residuals, projections=projections)
    except ValueError as err:
        raise FqError(f"calibration failed: {err}") from None
    return {layer.weight: records[layer.weight] for layer in plan.chosen}


def _projections(proto, plan: Plan, acts: dict, residuals: dict) -> dict:
    """{activation: W^T float32 [K, N]} where the fp32 target's sums are cheaper taken through the
    weight (sequential_calibrate's projections): the activation's only layer, with one use and no
    other activation, N < K / 2, or N < K where a residual is fitted too."""
    readers: dict = {}
    for weight, used in acts.items():
        for a in used:
            readers.setdefault(a, []).append(weight)
    out = {}
    for layer in plan.chosen:
        a = layer.activation
        if readers[a] != [layer.weight] or len(plan.uses.get(layer.weight, [layer])) != 1:
            continue
        n, k = layer.out_features, layer.in_features
        if 2 * n < k or (a in residuals and n < k):
            out[a] = np.ascontiguousarray(_raw_weight(proto, layer).T)
    return out


def _summed_hessian(hessians, uses):
    """The HessianStat over every use of one weight: the row statistics of all its activations
    pooled (fit and held-out parts alike)."""
    stats = [hessians[a] for a in dict.fromkeys(use.activation for use in uses)]
    if len(stats) == 1:
        return stats[0]
    from .numerics.calibrate import HessianStat

    return HessianStat.pooled(stats)


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False)


def to_packed(record):
    """numerics.QuantizedLinear -> passes.PackedLinear (plain arrays and shapes); `bits` there are
    the storage bits the kernels read, `code_bits` the codes' own where narrower (int7)."""
    from .numerics import storage_bits
    from .passes.lowering import Frame, PackedLinear, Rotation

    def rotation(had):
        if had is None:
            return None
        return Rotation(had.d, had.dp, had.block, np.asarray(had.signs, np.float32))

    frame = record.input_frame
    return PackedLinear(
        name=record.name, in_features=record.in_features, out_features=record.out_features,
        bits=storage_bits(record.bits), cols=record.cols, group_size=record.group_size,
        packed=record.packed, scale=record.scale, zero=record.zero,
        in_rot=rotation(record.input_hadamard),
        frame=None if frame is None else Frame(frame.nblk, np.asarray(frame.F, np.float32), frame.tail),
        out_rot=rotation(record.output_hadamard), act_group=record.act_group,
        code_bits=record.bits if record.bits != storage_bits(record.bits) else 0)


def simulated_model(proto, records: dict):
    """A copy of the ONNX model whose quantized weights are replaced by the weight each record
    really applies (numerics.effective_weight): the float simulation of the same codes."""
    import copy

    from onnx import numpy_helper

    from .numerics import effective_weight, find_dense_layers

    sim = copy.deepcopy(proto)
    missing = sorted(set(records) - {init.name for init in sim.graph.initializer})
    if missing:  # e.g. the raw export where the compiler quantized frontend.prepare's folded weights
        raise FqError(f"{len(missing)} quantized weights are not initializers of this model (first: "
                      f"'{missing[0]}'): simulate the model that was quantized (frontend.prepare)")
    layers = {layer.weight: layer for layer in find_dense_layers(sim)}
    for init in sim.graph.initializer:
        if init.name in records:
            w = effective_weight(records[init.name]).astype(np.float32)  # [N, K]
            w = w if init.name not in layers or layers[init.name].transposed else w.T  # not a layer: a tied table
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
    return sim
