"""Export of Llama-architecture causal LMs with a KV cache (`fq-export ... --kv-cache`).

One ONNX graph serves the prefill (many tokens, past length 0) and the decode step (one token):

  inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
           past_key.{i} / past_value.{i} [batch, kv_heads, past, head_dim] float32
  outputs  logits [batch, seq, vocab], present_key.{i} / present_value.{i}
           [batch, kv_heads, past + seq, head_dim] (the past with the new keys/values appended)

The module below runs the Hugging Face model's own weights (RMSNorm, MLP and projection modules)
but writes attention out plainly: rotary cos/sin are rows of a table gathered by position_ids
(a Gather, so the artifact's manifest bounds position_ids to the table's rows; where a row is two
equal halves, as in Llama's, the table keeps one and the graph joins it with itself),
past and new keys are joined with torch.cat, and the attention mask is derived inside the graph
from position_ids and a slice of a positions table as long as the keys (a key at a position after
the query's is masked). That keeps every shape expressible for TVM's importer (no arange, no cumsum,
no transformers cache object) and makes the position ids the only "mask" input: sequences in a
batch are unpadded. Weight initializers keep the Hugging Face names (model.layers.0.mlp.up_proj.weight).

The graph's metadata (ONNX metadata_props, key `fq_tvm.generation`) describes the cache and the
tokenizer file written beside it; fq-compile copies both into the artifact's manifest (see
fq_tvm/generate.py for the decoding loop).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import FqError

GENERATION_KEY = "fq_tvm.generation"
DEFAULT_CONTEXT = 8192  # the positions table is cut at this many rows (SmolLM2's own limit)


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value for each layer."""
    past = [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_") for name in past]


def llama_kv_torch(lm, context: int | None = None):
    """A torch module with the KV-cache signature above over `lm`, a transformers
    LlamaForCausalLM (or any model with its module layout: Llama, SmolLM2, Mistral without sliding
    windows). forward(input_ids, position_ids, *past) -> (logits, *present)."""
    import torch

    config = lm.config
    context = int(context or min(config.max_position_embeddings, DEFAULT_CONTEXT))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    class LlamaKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model, self.lm_head = lm.model, lm.lm_head
            positions = torch.arange(context)
            with torch.no_grad():
                cos, sin = lm.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[None])
            cos, sin = cos[0].float(), sin[0].float()
            half = cos.shape[-1] // 2
            # Llama's rotary rows are two equal halves (cat(freqs, freqs)): keep one (SmolLM2: 2.1 MB
            # of the artifact instead of 4.2) and join it with itself in the graph
            self.halves = bool(torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:]))
            if self.halves:
                cos, sin = cos[:, :half], sin[:, :half]
            self.register_buffer("rope_cos", cos.contiguous(), persistent=False)
            self.register_buffer("rope_sin", sin.contiguous(), persistent=False)
            self.register_buffer("positions", positions, persistent=False)

        def forward(self, input_ids, position_ids, *past):
            x = self.model.embed_tokens(input_ids)
            # embedding() exports to Gather: TVM's fast take, whose index input the manifest bounds to
            # [0, context) (indexing exports to GatherND, which nothing bounds)
            cos = torch.nn.functional.embedding(position_ids, self.rope_cos)[:, None]
            sin = torch.nn.functional.embedding(position_ids, self.rope_sin)[:, None]
            if self.halves:
                cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            presents = []
            for i, layer in enumerate(self.model.layers):
                h, key, value = _attention(layer.self_attn, layer.input_layernorm(x), cos, sin,
                                           past[2 * i], past[2 * i + 1], position_ids, self.positions)
                x = x + h
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                presents += [key, value]
            return (self.lm_head(self.model.norm(x)), *presents)

    def _attention(attn, x, cos, sin, past_key, past_value, position_ids, positions):
        batch, seq = x.shape[0], x.shape[1]
        q = attn.q_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        total = key.shape[2]
        # a key whose position is after the query's is masked
        later = positions[:total][None, None, :] > position_ids[:, :, None]
        mask = later.to(torch.float32)[:, None] * torch.finfo(torch.float32).min
        group = heads // kv_heads
        keys = key[:, :, None].expand(batch, kv_heads, group, total, head_dim).reshape(batch, heads, total, head_dim)
        values = value[:, :, None].expand(batch, kv_heads, group, total, head_dim).reshape(batch, heads, total,
                                                                                          head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * (head_dim ** -0.5) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), values)
        out = out.transpose(1, 2).reshape(batch, seq, heads * head_dim)
        return attn.o_proj(out), key, value

    def _rotate_half(t):
        half = t.shape[-1] // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    module = LlamaKV().eval()
    module.info = {"layers": len(lm.model.layers), "kv_heads": kv_heads, "heads": heads, "head_dim": head_dim,
                   "context": context, "vocab": int(config.vocab_size)}
    return module


def empty_past(info: dict, batch: int = 1, length: int = 0) -> dict:
    """Zero past keys/values of `length` positions, keyed by input name."""
    shape = (batch, info["kv_heads"], length, info["head_dim"])
    return {name: np.zeros(shape, np.float32) for name in kv_names(info["layers"])[0]}


def export_llama_kv(lm, path, tokenizer_json=None, eos_ids=(), bos_id=None, opset: int = 18,
                    context: int | None = None, check_ids=None) -> Path:
    """Export `lm` (a transformers Llama-style causal LM, fp32, eager) with a KV cache to `path`.
    tokenizer_json: a tokenizer.json to copy beside the model (its sha256 goes into the metadata).
    Checked with ONNX Runtime against the torch model: a prefill of check_ids then one decode step,
    and their logits against transformers' own whole-window forward (max |diff| < 1e-3)."""
    import torch

    from .realmodels import _quiet_export

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = llama_kv_torch(lm, context)
    info = module.info
    past_names, present_names = kv_names(info["layers"])
    ids = torch.tensor(np.asarray(check_ids if check_ids is not None else np.arange(1, 12) % info["vocab"]),
                       dtype=torch.int64).reshape(1, -1)
    example = _example(ids[:, :3], info, past=5)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=info["context"])
    past = torch.export.Dim("past", min=0, max=info["context"] - 1)
    dims = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in past_names))
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad():
        _quiet_export(lambda: torch.onnx.export(
            module, example, str(tmp), dynamo=True, external_data=False, opset_version=opset,
            input_names=["input_ids", "position_ids", *past_names], output_names=["logits", *present_names],
            dynamic_shapes=dims))
    _name_weights(tmp, module)
    diff = check_kv_onnx(tmp, lm, ids.numpy(), info)
    meta = generation_info(info, eos_ids, bos_id)
    if tokenizer_json is not None:
        target = path.parent / "tokenizer.json"
        if Path(tokenizer_json).resolve() != target.resolve():
            target.write_bytes(Path(tokenizer_json).read_bytes())
        from .artifact import sha256_file

        meta["tokenizer"] = {"file": target.name, "sha256": sha256_file(target)}
    meta["max_abs_diff_vs_transformers"] = diff
    _set_metadata(tmp, meta)
    os.replace(tmp, path)
    return path


def _example(ids, info, past: int):
    import torch

    positions = torch.arange(past, past + ids.shape[1])[None].repeat(ids.shape[0], 1)
    cache = empty_past(info, ids.shape[0], past)
    rng = np.random.default_rng(0)
    return (ids, positions, *(torch.from_numpy(rng.standard_normal(v.shape).astype(np.float32))
                              for v in cache.values()))


def generation_info(info: dict, eos_ids=(), bos_id=None) -> dict:
    return {"kind": "causal_lm", "kv_cache": True, "layers": info["layers"], "kv_heads": info["kv_heads"],
            "heads": info["heads"], "head_dim": info["head_dim"], "context": info["context"],
            "vocab": info["vocab"], "eos_ids": sorted({int(i) for i in eos_ids}),
            "bos_id": None if bos_id is None else int(bos_id)}


def check_kv_onnx(onnx_path, lm, ids: np.ndarray, info: dict, split: int | None = None) -> float:
    """Prefill ids[:, :split] then decode the rest one token at a time with ONNX Runtime; the
    max |diff| of all those logits against transformers' whole-window forward. FqError if >= 1e-3."""
    import torch

    with torch.no_grad():
        ref = lm(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    run = ort_step(onnx_path)
    logits = decode_steps(run, ids, info, split)
    diff = float(np.abs(logits - ref).max())
    if not diff < 1e-3:
        raise FqError(f"the KV-cache export differs from transformers (max |diff| of logits {diff:.2e})")
    return diff


def ort_step(onnx_path, threads: int | None = None):
    """A function feed -> {output name: array} running the graph with ONNX Runtime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


def decode_steps(run, ids: np.ndarray, info: dict, split: int | None = None) -> np.ndarray:
    """Logits [batch, seq, vocab] of ids computed as a prefill of the first `split` tokens (default
    half) and then one decode step per token, through `run(feed) -> outputs`."""
    split = max(1, ids.shape[1] // 2 if split is None else split)
    past_names, present_names = kv_names(info["layers"])
    cache = empty_past(info, ids.shape[0])
    chunks, start = [], 0
    for stop in [split, *range(split + 1, ids.shape[1] + 1)]:
        positions = np.broadcast_to(np.arange(start, stop, dtype=np.int64), (ids.shape[0], stop - start))
        out = run({"input_ids": np.ascontiguousarray(ids[:, start:stop]),
                   "position_ids": np.ascontiguousarray(positions), **cache})
        cache = {p: out[q] for p, q in zip(past_names, present_names)}
        chunks.append(out["logits"])
        start = stop
    return np.concatenate(chunks, axis=1)


def _name_weights(path, module) -> None:
    """Give each weight initializer its parameter's name: the exporter folds a Linear's transpose
    into a constant called val_N. Matched by content, the weight itself or its transpose (a value
    shared by several parameters, e.g. norms of ones in a fresh model, keeps the first name)."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    def key(array):
        array = np.ascontiguousarray(array, dtype=np.float32)
        return array.shape, hashlib.sha256(array.tobytes()).hexdigest()

    names = {}
    for name, param in module.named_parameters():
        weight = param.detach().numpy()
        for k in (key(weight), key(weight.T)) if weight.ndim == 2 else (key(weight),):
            names.setdefault(k, name)
    model = onnx.load(str(path))
    taken = {t.name for t in model.graph.initializer}
    renames = {}
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) == 0 or init.name in names.values():
            continue
        new = names.get(key(numpy_helper.to_array(init)))
        if new and new not in taken:
            renames[init.name] = new
            taken.add(new)
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(x, x) for x in node.input]
    onnx.save(model, str(path))


def _set_metadata(path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key=GENERATION_KEY, value=json.dumps(meta, sort_keys=True))
    onnx.save(model, str(path))


def read_generation(proto) -> dict | None:
    """The `fq_tvm.generation` metadata of an ONNX model, or None."""
    for prop in proto.metadata_props:
        if prop.key == GENERATION_KEY:
            try:
                meta = json.loads(prop.value)
            except ValueError:
                raise FqError(f"the model's '{GENERATION_KEY}' metadata is not JSON") from None
            return meta if isinstance(meta, dict) else None
    return None
