"""Small built-in models (ONNX) for the demo and the tests: seeded, so reproducible."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_gemm(path, sizes=(32, 64, 16), seed: int = 0) -> Path:
    """An MLP of Gemm(transB=1) + bias layers with Relu between, dynamic batch, built by hand."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(b, f"fc{i}.bias")]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"fc{i}.weight", f"fc{i}.bias"], [f"g{i}" if out != "y" else out],
                                      name=f"fc{i}", transB=1))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", sizes[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def _attention(h, q_proj, k_proj, v_proj, heads: int, causal: bool):
    """Multi-head softmax attention of h [b, s, hidden], heads merged back: [b, s, hidden]."""
    import torch

    b, s, hidden = h.shape

    def split(t):
        return t.reshape(b, s, heads, hidden // heads).transpose(1, 2)

    q, k, v = split(q_proj(h)), split(k_proj(h)), split(v_proj(h))
    scores = q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5
    if causal:
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, hidden)


def _encoder_module(hidden: int, heads: int, ffn: int):
    import torch
    from torch import nn

    class EncoderBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
            self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

        def forward(self, x):
            x = x + self.o(_attention(self.ln1(x), self.q, self.k, self.v, heads, causal=False))
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    return EncoderBlock()


def _decoder_module(hidden: int, heads: int, ffn: int):
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    class DecoderBlock(nn.Module):
        """Llama-style: RMSNorm, causal attention without biases, SiLU-gated MLP."""

        def __init__(self):
            super().__init__()
            self.norm1, self.norm2 = RMSNorm(), RMSNorm()
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(hidden, ffn, bias=False), nn.Linear(hidden, ffn, bias=False)
            self.down = nn.Linear(ffn, hidden, bias=False)

        def forward(self, x):
            x = x + self.o(_attention(self.norm1(x), self.q, self.k, self.v, heads, causal=True))
            h = self.norm2(x)
            return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    return DecoderBlock()


# How the blocks' dense weights are drawn. "uniform": torch's nn.Linear default, U(+-1/sqrt(K)),
# per-row kurtosis 1.8. "normal": Gaussian of the same variance, kurtosis 3, the shape of trained
# weights (median per-row kurtosis 3.2 in all-MiniLM-L6-v2 and SmolLM2-135M; docs/numerics.md,
# "Uniform weights"). A 4-level grid fits uniform rows unusually well, so plain GPTQ looks better on
# them than on any trained model.
WEIGHTS = ("uniform", "normal")


def _with_weights(module, weights: str):
    """`module` with every nn.Linear weight redrawn as `weights` says (biases left alone)."""
    import torch

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "normal":
        with torch.no_grad():
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(0.0, (3.0 * layer.in_features) ** -0.5)
    return module


def decoder_block(path, hidden: int = 576, heads: int = 9, ffn: int = 1536, seed: int = 0,
                  weights: str = "uniform") -> Path:
    """A Llama-style decoder block (SmolLM2-135M shapes by default), dynamo-exported, dynamic batch
    and sequence length. `weights`: see WEIGHTS."""
    import torch

    torch.manual_seed(seed)
    module = _with_weights(_decoder_module(hidden, heads, ffn), weights)
    _export(module.eval(), torch.randn(2, 8, hidden), path)
    return Path(path)


def linear(path, in_features: int = 1000, out_features: int = 384, bias: bool = True, seed: int = 0) -> Path:
    """One Linear layer (dynamo export, input x [batch, seq, K]), e.g. K = 1000 for odd dimensions."""
    import torch

    torch.manual_seed(seed)
    module = torch.nn.Linear(in_features, out_features, bias=bias).eval()
    _export(module, torch.randn(2, 8, in_features), path)
    return Path(path)


def encoder_block(path, hidden: int = 64, heads: int = 4, ffn: int = 256, seed: int = 0,
                  weights: str = "uniform") -> Path:
    """A pre-LN transformer encoder block exported by torch's dynamo exporter (MatMul with [K, N]
    weights, LayerNorm, softmax attention), dynamic batch and sequence length. `weights`: see
    WEIGHTS."""
    import torch

    torch.manual_seed(seed)
    module = _with_weights(_encoder_module(hidden, heads, ffn), weights).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for ln in (module.ln1, module.ln2):
            ln.weight.add_(0.1 * torch.randn(hidden))
            ln.bias.add_(0.1 * torch.randn(hidden))
    _export(module, torch.randn(2, 8, hidden), path)
    return Path(path)


def tied_lm(path, vocab: int = 20000, hidden: int = 64, seed: int = 0) -> Path:
    """A toy language model whose output head reuses the token embedding (tied weights, as in
    SmolLM2): ids [batch, seq] int64 -> logits [batch, seq, vocab]."""
    import torch

    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, hidden)
            self.norm = torch.nn.LayerNorm(hidden)
            self.proj = torch.nn.Linear(hidden, hidden)
            self.head = torch.nn.Linear(hidden, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.proj(self.norm(self.embed(ids)))))

    torch.manual_seed(seed)
    _export(TiedLM().eval(), torch.randint(0, vocab, (2, 8)), path)
    return Path(path)


def _export(module, example, path) -> None:
    import logging

    import torch

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=4096)
    quiet = open(os.devnull, "w")
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(io.StringIO()):
        torch.onnx.export(module, (example,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                          dynamic_shapes=({0: batch, 1: seq},), external_data=False)
    quiet.close()
