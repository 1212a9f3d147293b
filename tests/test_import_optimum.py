"""An Optimum-style encoder export (issue 10). optimum-onnx 0.1.0 cannot run here: it needs
transformers < 4.58 and imports helpers transformers 5 removed. This export does what its
`optimum-cli export onnx --task feature-extraction` does for BERT: `AutoModel` with default (sdpa)
attention and its pooler, the legacy exporter at opset 14 with constant folding, three inputs with
`batch_size` / `sequence_length` axes, two outputs. fp32 matches ONNX Runtime within 1e-4 relative
(fq2 of the same legacy opset-14 BERT graph is checked in test_import_real.py; not repeated here
to keep CI short)."""

import contextlib
import io
import warnings

import numpy as np
import pytest

import fq_tvm
from conftest import max_rel_err, ort_run

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "pooler_output"]


def _export(path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    bert = transformers.AutoModel.from_config(cfg).eval()

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state, out.pooler_output

    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in NAMES + OUTPUTS[:1]} | {OUTPUTS[1]: {0: "batch_size"}}
    example = tuple(torch.from_numpy(v) for v in _feed(2, 8).values())
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Outputs(), example, str(path), dynamo=False, opset_version=14, do_constant_folding=True,
                          input_names=NAMES, output_names=OUTPUTS, dynamic_axes=axes)
    return path


def _feed(batch, seq, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[-1, seq // 2:] = 0
    return {"input_ids": rng.integers(0, 100, (batch, seq)), "attention_mask": mask,
            "token_type_ids": rng.integers(0, 2, (batch, seq))}


@pytest.mark.slow
def test_optimum_style_bert(tmp_path):
    path = _export(tmp_path / "model.onnx")
    art = fq_tvm.load(fq_tvm.compile(path, "host", tmp_path / "fp32", quiet=True))
    for batch, seq in [(1, 5), (3, 11)]:
        feed = _feed(batch, seq, seed=batch)
        ours, ref = art.run(feed), ort_run(path, feed)
        for name, want in zip(OUTPUTS, ref):
            assert max_rel_err(ours[name], want) < 1e-4, name
