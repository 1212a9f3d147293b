"""The CPU attention kernels (schedules/cpu_attention.py: scores, cpu_attention_values.py: P @ V)
against numpy on the definition, and their Relax dispatch: the transposes and grouped-query copies
they read through are gone from the graph."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from fq_tvm.schedules import cpu_attention, cpu_attention_values

HOST = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


@pytest.mark.parametrize("lanes", [8, 4])
@pytest.mark.parametrize("batch, sq, sk, heads, dim", [
    (1, 128, 128, 12, 32),  # MiniLM: whole tiles
    (2, 37, 53, 3, 16),  # query rows and keys not whole tiles
    (1, 1, 77, 9, 64),  # one decoding step against a cache of 77 keys
    (2, 3, 9, 2, 16),  # under 4 query rows: keys read in place, 4 at a time, and a tail of 1
    (1, 2, 7, 3, 12),  # under 4 query rows, head_dim not whole vectors: the k^T tiles
    (3, 6, 5, 2, 8),  # fewer keys than one vector
])
def test_scores_match_numpy(batch, sq, sk, heads, dim, lanes):
    lib = tvm.compile(tvm.IRModule({"main": cpu_attention.scores(heads, dim, lanes).with_attr("global_symbol", "main")}),
                      HOST)
    rng = np.random.default_rng(sq * sk)
    q = rng.standard_normal((batch, sq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, sk, heads, dim)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((batch, heads, sq, sk), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
    ref = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6


def test_dispatch_reads_through_the_transposes():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", "s", 4, 8), "float32"), k: R.Tensor(("b", "s", 4, 8), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                kt = R.permute_dims(k, axes=[0, 2, 3, 1])
                o = R.matmul(qt, kt)
                R.output(o)
            return o

    counts = {}
    after = cpu_attention.dispatch(8, counts)(Before)
    text = after["main"].script()
    assert counts == {cpu_attention.KIND: 1}
    assert "permute_dims" not in text and "R.matmul" not in text and "fq_attention_scores_4_8" in text
    assert "R.Tensor((b, 4, s, s), dtype=\"float32\")" in text


def test_dispatch_takes_the_scale_and_the_mask_into_the_scores():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor(("b", "s", 4, 8), "float32"), k: R.Tensor(("b", "s", 4, 8), "float32"),
                 m: R.Tensor((1, 1, "s", "s"), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                kt = R.permute_dims(k, axes=[0, 2, 3, 1])
                o = R.matmul(qt, kt)
                scaled = R.multiply(o, R.const(0.125, "float32"))
                masked = R.add(m, scaled)
                R.output(masked)
            return masked

    counts = {}
    after = cpu_attention.dispatch(8, counts)(Before)
    calls = [b.value for b in after["main"].body.blocks[0].bindings]
    assert counts == {cpu_attention.KIND: 1} and len(calls) == 1
    callee = after[calls[0].args[0]]
    assert calls[0].args[0].name_hint == "fq_attention_scores_4_8_masked" and len(callee.params) == 4
    assert [str(a) for a in calls[0].args[1].fields] == ["q", "k", "m"]


def test_dispatch_leaves_a_sum_that_is_not_a_mask():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 6, 4, 8), "float32"), k: R.Tensor((1, 6, 4, 8), "float32"),
                 m: R.Tensor((2, 1, 1, 6, 6), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                kt = R.permute_dims(k, axes=[0, 2, 3, 1])
                o = R.matmul(qt, kt)
                wider = R.add(o, m)  # broadcasts to 5-D: not a mask of the scores
                R.output(wider)
            return wider

    after = cpu_attention.dispatch(8, {})(Before)
    text = after["main"].script()
    assert "R.add" in text and "fq_attention_scores_4_8(" not in text.replace("fq_attention_scores_4_8,", "(")


def test_dispatch_leaves_other_matmuls():
    @I.ir_module
    class Other:
        @R.function
        def main(q: R.Tensor((2, 5, 4, 8), "float32"), k: R.Tensor((2, 4, 8, 5), "float32")):
            with R.dataflow():
                qt = R.permute_dims(q, axes=[0, 2, 1, 3])
                o = R.matmul(qt, k)  # k not a transpose of [batch, seq, heads, dim]
                R.output(o)
            return o

    counts = {}
    after = cpu_attention.dispatch(8, counts)(Other)
    assert counts == {} and "R.matmul" in after["main"].script()
    tvm.ir.assert_structural_equal(after["main"], relax.analysis.remove_all_unused(Other["main"]))


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)


def _heads(rng, batch, seq, heads, dim, seq_major):
    x = rng.standard_normal((batch, seq, heads, dim)).astype(np.float32)
    return x, (x if seq_major else np.ascontiguousarray(x.transpose(0, 2, 1, 3)))


@pytest.mark.parametrize("q_seq, k_seq, group", [(False, False, 3), (False, True, 1), (True, False, 2)])
@pytest.mark.parametrize("batch, sq, sk, kv_heads, dim", [(1, 37, 53, 2, 16), (2, 5, 3, 1, 8), (1, 1, 20, 3, 64)])
def test_scores_heads_major_and_grouped_keys(batch, sq, sk, kv_heads, dim, q_seq, k_seq, group):
    """q and k either layout; k shared by `group` query heads (head h reads k head h // group)."""
    heads = kv_heads * group
    lib = _build(cpu_attention.scores(heads, dim, 8, q_seq, k_seq, group))
    rng = np.random.default_rng(sq + sk + group)
    q, q_buf = _heads(rng, batch, sq, heads, dim, q_seq)
    k, k_buf = _heads(rng, batch, sk, kv_heads, dim, k_seq)
    out = tvm.runtime.tensor(np.full((batch, heads, sq, sk), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(q_buf), tvm.runtime.tensor(k_buf), out)
    ref = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), np.repeat(k, group, axis=2).astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6


@pytest.mark.parametrize("kind", ["causal", "padding", "full"])
@pytest.mark.parametrize("op", ["multiply", "divide", None])
@pytest.mark.parametrize("batch, sq, sk", [(1, 37, 37), (2, 64, 80), (1, 1, 20), (2, 3, 9)])
def test_masked_scores_match_numpy(batch, sq, sk, kind, op):
    """o = (q k^T op scale) + mask, the mask broadcast; a tile hidden by the mask (below -1e30: a
    causal mask's upper triangle, padded keys) is not computed and takes the mask's values, which
    the exact sum rounds to as well: the output equals numpy's float32 result there exactly."""
    heads, dim, scale = 3, 16, 0.25
    if kind == "causal":  # the float32 minimum above the diagonal, as Hugging Face exports build it
        m = np.where(np.arange(sk)[None, :] > np.arange(sq)[:, None] + sk - sq, np.finfo(np.float32).min, 0)
        m, ones = m[None, None].astype(np.float32), (True, True, False, False)
    elif kind == "padding":  # -inf on each sequence's padded keys, [batch, 1, 1, sk]
        m = np.where(np.arange(sk)[None, :] >= np.array([sk - 5, sk])[:batch, None], -np.inf, 0)
        m, ones = m[:, None, None].astype(np.float32), (False, True, True, False)
    else:
        m = np.random.default_rng(1).standard_normal((batch, heads, sq, sk)).astype(np.float32)
        ones = (False, False, False, False)
    mask = cpu_attention.Mask(ones, op, scale)
    lib = _build(cpu_attention.scores(heads, dim, 8, True, True, 1, mask))
    rng = np.random.default_rng(sq + sk)
    q = rng.standard_normal((batch, sq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, sk, heads, dim)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((batch, heads, sq, sk), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), tvm.runtime.tensor(m), out)
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64)).astype(np.float32)
    s = s * np.float32(scale) if op == "multiply" else s / np.float32(scale) if op == "divide" else s
    ref = (s + m).astype(np.float32)
    got = out.numpy()
    hidden = np.broadcast_to(m, ref.shape) < -1e30
    assert np.array_equal(got[hidden], ref[hidden])
    assert np.abs(got[~hidden] - ref[~hidden]).max() / np.abs(ref[~hidden]).max() < 1e-5


def test_a_nan_key_reaches_only_the_rows_that_see_it():
    """Under a causal mask a NaN in the last key's values is in the scores of the rows that see
    that key; the tiles it would reach above the diagonal are hidden, not computed."""
    heads, dim, sq = 2, 16, 64
    m = np.where(np.arange(sq)[None, :] > np.arange(sq)[:, None], np.finfo(np.float32).min, 0)[None, None]
    lib = _build(cpu_attention.scores(heads, dim, 8, True, True, 1,
                                      cpu_attention.Mask((True, True, False, False), "multiply", 0.25)))
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, sq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((1, sq, heads, dim)).astype(np.float32)
    k[0, -1, 0, 3] = np.nan
    out = tvm.runtime.tensor(np.zeros((1, heads, sq, sq), np.float32))
    lib.mod["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), tvm.runtime.tensor(m.astype(np.float32)), out)
    col = out.numpy()[0, 0, :, -1]
    assert np.isnan(col[-1]) and not np.isnan(col[:sq - 16]).any()  # rows a key tile before: hidden
    assert not np.isnan(out.numpy()[0, 1]).any()  # the other head


@pytest.mark.parametrize("lanes", [8, 4])
@pytest.mark.parametrize("v_seq, group", [(True, 1), (False, 3), (True, 2)])
@pytest.mark.parametrize("batch, sq, sk, kv_heads, dim", [
    (1, 128, 128, 4, 32),  # whole tiles
    (2, 37, 53, 1, 24),  # rows not whole tiles; head_dim 3 vectors of 8 (one-vector tiles)
    (1, 1, 77, 2, 64),  # one decoding step
    (1, 3, 9, 1, 24),  # three query rows read v in place (decoding path), 3 vectors of 8
    (3, 6, 2, 1, 8),  # two keys
])
def test_values_match_numpy(batch, sq, sk, kv_heads, dim, v_seq, group, lanes):
    heads = kv_heads * group
    lib = _build(cpu_attention_values.values(heads, dim, lanes, v_seq, group))
    rng = np.random.default_rng(sq * sk + group)
    p = rng.random((batch, heads, sq, sk)).astype(np.float32)
    v, v_buf = _heads(rng, batch, sk, kv_heads, dim, v_seq)
    out = tvm.runtime.tensor(np.full((batch, sq, heads, dim), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(p), tvm.runtime.tensor(v_buf), out)
    ref = np.einsum("bhij,bjhd->bihd", p.astype(np.float64), np.repeat(v, group, axis=2).astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("sq, sk", [(128, 128), (37, 53), (40, 29)])
def test_values_skip_the_zero_keys_of_each_tile(sq, sk, lanes):
    """p zero after each row's last key (causal, as softmax leaves a masked row), a row of zeros,
    and a zero block between nonzero keys: the tiles stop after their last nonzero block of keys,
    the results still match numpy; a NaN in a value row that no earlier row attends to stays out of
    those rows."""
    heads, dim = 3, 32
    lib = _build(cpu_attention_values.values(heads, dim, lanes, True, 1))
    rng = np.random.default_rng(sq + sk)
    p = rng.random((1, heads, sq, sk)).astype(np.float32)
    p *= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq  # causal
    p[:, 1, 5] = 0  # a row of zeros
    p[:, 2, -1, 1:lanes + 3] = 0  # zeros inside a row
    v, v_buf = _heads(rng, 1, sk, heads, dim, True)
    out = tvm.runtime.tensor(np.full((1, sq, heads, dim), np.nan, np.float32))
    lib.mod["main"](tvm.runtime.tensor(p), tvm.runtime.tensor(v_buf), out)
    ref = np.einsum("bhij,bjhd->bihd", p.astype(np.float64), v.astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-6
    p_nan = p.copy()
    p_nan[0, 0, -2, -1] = np.nan  # a NaN probability (a NaN score's softmax) in the last key, a tail key
    lib.mod["main"](tvm.runtime.tensor(p_nan), tvm.runtime.tensor(v_buf), out)
    assert np.isnan(out.numpy()[0, -2, 0]).all() and not np.isnan(out.numpy()[0, :-2]).any()
    v_buf[0, -1, 0, 0] = np.nan  # the last key's value: only the last query attends to it
    lib.mod["main"](tvm.runtime.tensor(p), tvm.runtime.tensor(v_buf), out)
    got = out.numpy()[0, :, 0, 0]
    assert np.isnan(got[-1]) and not np.isnan(got[:sq - lanes - 8]).any()  # rows a block and a tile before


@I.ir_module
class Grouped:
    """Llama's attention as the dynamo exporter writes it: q and k transposed before RoPE (here a
    multiply), k and v repeated for 3 query heads each, the output transposed back."""

    @R.function
    def main(q: R.Tensor(("b", "s", 6, 16), "float32"), k: R.Tensor(("b", "s", 2, 16), "float32"),
             v: R.Tensor(("b", "s", 2, 16), "float32")):
        b, s = T.int64(), T.int64()
        with R.dataflow():
            qh = R.multiply(R.permute_dims(q, axes=[0, 2, 1, 3]), R.const(0.5, "float32"))
            kh = R.permute_dims(k, axes=[0, 2, 1, 3])
            kr = R.reshape(R.broadcast_to(R.expand_dims(kh, axis=[2]), R.shape([b, 2, 3, s, 16])), R.shape([b, 6, s, 16]))
            p = R.nn.softmax(R.matmul(qh, R.permute_dims(kr, axes=[0, 1, 3, 2])), axis=-1)
            vh = R.permute_dims(v, axes=[0, 2, 1, 3])
            vr = R.reshape(R.broadcast_to(R.expand_dims(vh, axis=[2]), R.shape([b, 2, 3, s, 16])), R.shape([b, 6, s, 16]))
            o = R.permute_dims(R.matmul(p, vr), axes=[0, 2, 1, 3])
            R.output(o)
        return o


@pytest.mark.parametrize("lanes", [8, 32])
def test_dispatch_reads_through_grouped_query_copies(lanes):
    """Both kernels, also where the vector is wider than a head (32 lanes, heads of 16: the values
    kernel takes 16-lane vectors, as AVX-512 does for heads of 8)."""
    mod = relax.transform.Normalize()(Grouped)
    counts = {}
    after = cpu_attention_values.dispatch(lanes, counts)(cpu_attention.dispatch(lanes, counts)(mod))
    text = after["main"].script()
    assert counts == {cpu_attention.KIND: 1, cpu_attention_values.KIND: 1}
    assert "broadcast_to" not in text and "expand_dims" not in text and "R.matmul" not in text
    assert "fq_attention_scores_6_16_hs_g3" in text and "fq_attention_values_6_16_g3" in text
    assert text.count("permute_dims") == 1  # q's, feeding the multiply; k and v are read in place
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, h, 16)).astype(np.float32) for h in (6, 2, 2))
    runs = []
    for m in (mod, after):
        vm = relax.VirtualMachine(tvm.compile(m, HOST), tvm.cpu())
        runs.append(vm["main"](*(tvm.runtime.tensor(a) for a in (q, k, v))).numpy())
    assert np.abs(runs[1] - runs[0]).max() < 1e-5


def test_values_dispatch_leaves_a_product_without_the_transpose():
    @I.ir_module
    class Plain:
        @R.function
        def main(p: R.Tensor((1, 4, 5, 5), "float32"), v: R.Tensor((1, 5, 4, 8), "float32")):
            with R.dataflow():
                o = R.matmul(p, R.permute_dims(v, axes=[0, 2, 1, 3]))
                R.output(o)
            return o

    counts = {}
    after = cpu_attention_values.dispatch(8, counts)(Plain)
    assert counts == {} and "R.matmul" in after["main"].script()


def _grouped_decoder(path, hidden=48, heads=6, kv_heads=2):
    """A Llama-style block with grouped-query attention as transformers writes it (k and v
    repeated by expand + reshape, heads transposed before the product and back after), RMSNorm
    and a SiLU-gated MLP, dynamo-exported with dynamic batch and sequence."""
    import torch
    from torch import nn

    from fq_tvm import models

    dim, group = hidden // heads, heads // kv_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)
            self.k, self.v = (nn.Linear(hidden, kv_heads * dim, bias=False) for _ in range(2))
            self.gate, self.up = nn.Linear(hidden, 64, bias=False), nn.Linear(hidden, 64, bias=False)
            self.down = nn.Linear(64, hidden, bias=False)

        def forward(self, x):
            b, s, _ = x.shape
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            q = self.q(h).view(b, s, heads, dim).transpose(1, 2)
            k, v = (p(h).view(b, s, kv_heads, dim).transpose(1, 2) for p in (self.k, self.v))
            k, v = (t[:, :, None].expand(b, kv_heads, group, s, dim).reshape(b, heads, s, dim) for t in (k, v))
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
            p = torch.softmax((q @ k.transpose(2, 3) / dim ** 0.5).masked_fill(mask, float("-inf")), dim=-1)
            x = x + self.o((p @ v).transpose(1, 2).reshape(b, s, hidden))
            return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    torch.manual_seed(0)
    models._export(Block().eval(), torch.randn(2, 8, hidden), path)
    return path


def test_grouped_query_decoder_matches_ort(tmp_path):
    """The compiled block runs both attention kernels (no fallback product) and matches ORT, at a
    sequence length that is no whole tile."""
    import json

    from conftest import max_rel_err, ort_run
    from fq_tvm import compile, load

    onnx_path = _grouped_decoder(tmp_path / "gqa.onnx")
    art = compile(onnx_path, "host", tmp_path / "gqa.host", quiet=True)
    counts = json.loads((art / "manifest.json").read_text())["kernels"]["counts"]
    assert counts[cpu_attention.KIND] == 1 and counts[cpu_attention_values.KIND] == 1, counts
    model = load(art)
    for shape in ((2, 13, 48), (1, 1, 48)):
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        assert max_rel_err(model.run({"x": x})["y"], ort_run(onnx_path, {"x": x})[0]) < 1e-5


def _three_calls(q, k, m, v, heads, dim, lanes, layouts, group, mask):
    """scores -> softmax_rows -> values, each our kernel alone: what the fused kernel replaces."""
    from fq_tvm.schedules import cpu_softmax

    q_seq, k_seq, v_seq = layouts
    scores = _build(cpu_attention.scores(heads, dim, lanes, q_seq, k_seq, group, mask))
    batch, sq, sk = q.shape[0], q.shape[1 if q_seq else 2], k.shape[1 if k_seq else 2]
    s = tvm.runtime.tensor(np.zeros((batch, heads, sq, sk), np.float32))
    scores.mod["main"](*[tvm.runtime.tensor(a) for a in ((q, k) if mask is None else (q, k, m))], s)
    p = tvm.runtime.tensor(np.zeros((batch * heads * sq, sk), np.float32))
    _build(cpu_softmax.softmax(lanes)).mod["main"](tvm.runtime.tensor(s.numpy().reshape(-1, sk)), p)
    out = tvm.runtime.tensor(np.zeros((batch, sq, heads, dim), np.float32))
    _build(cpu_attention_values.values(heads, dim, lanes, v_seq, group)).mod["main"](
        tvm.runtime.tensor(p.numpy().reshape(batch, heads, sq, sk)), tvm.runtime.tensor(v), out)
    return out.numpy()


@pytest.mark.parametrize("batch, sq, sk, kv_heads, dim, layouts, group, masked, lanes", [
    (1, 128, 128, 2, 32, (True, True, True), 1, True, 8),  # whole tiles (BERT: seq-major, masked)
    (2, 37, 53, 1, 16, (False, False, False), 3, True, 8),  # rows and keys not whole tiles; heads-major, grouped
    (2, 37, 53, 2, 16, (True, False, True), 2, False, 8),  # mixed layouts, no mask
    (1, 1, 77, 2, 64, (False, True, False), 3, True, 8),  # one decoding step: keys and values read in place
    (2, 3, 9, 1, 16, (True, True, True), 1, False, 8),  # under MR query rows
    (1, 40, 70, 2, 32, (True, True, True), 2, True, 16),  # AVX-512's 16 lanes (two vectors each on AVX2)
])
def test_fused_attention_matches_numpy_and_the_three_kernels(batch, sq, sk, kv_heads, dim, layouts, group, masked,
                                                             lanes):
    """One call = softmax(q k^T * scale + causal mask) v on the definition (float64 numpy), and for
    finite inputs the same bits as scores -> softmax -> values run one after another."""
    from fq_tvm.schedules import cpu_attention_fused

    heads, scale = kv_heads * group, 0.125
    q_seq, k_seq, v_seq = layouts
    rng = np.random.default_rng(sq * sk + group)
    q, q_buf = _heads(rng, batch, sq, heads, dim, q_seq)
    k, k_buf = _heads(rng, batch, sk, kv_heads, dim, k_seq)
    v, v_buf = _heads(rng, batch, sk, kv_heads, dim, v_seq)
    causal = np.arange(sk)[None, :] > np.arange(sq)[:, None] + sk - sq
    m = np.where(causal, np.finfo(np.float32).min, 0)[None, None].astype(np.float32)
    mask = cpu_attention.Mask((True, True, False, False), "multiply", scale) if masked else None
    lib = _build(cpu_attention_fused.attention(heads, dim, lanes, lanes, *layouts, group, mask))
    out = tvm.runtime.tensor(np.full((batch, sq, heads, dim), np.nan, np.float32))
    lib.mod["main"](*[tvm.runtime.tensor(a) for a in ((q_buf, k_buf, m, v_buf) if masked else (q_buf, k_buf, v_buf))],
                    out)
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), np.repeat(k, group, axis=2).astype(np.float64))
    s = s * scale + np.where(causal, -np.inf, 0) if masked else s
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), np.repeat(v, group, axis=2).astype(np.float64))
    assert np.abs(out.numpy() - ref).max() / np.abs(ref).max() < 1e-5
    assert np.array_equal(out.numpy(), _three_calls(q_buf, k_buf, m, v_buf, heads, dim, lanes, layouts, group, mask))


def _attention_module(second_use: bool):
    @I.ir_module
    class Module:
        @R.function
        def main(q: R.Tensor(("b", "s", 2, 8), "float32"), k: R.Tensor(("b", "s", 2, 8), "float32"),
                 v: R.Tensor(("b", "s", 2, 8), "float32")):
            b, s = T.int64(), T.int64()
            with R.dataflow():
                qt = R.permute_dims(q, [0, 2, 1, 3])
                kt = R.permute_dims(k, [0, 2, 3, 1])
                vt = R.permute_dims(v, [0, 2, 1, 3])
                scores = R.matmul(qt, kt)
                p = R.nn.softmax(scores, axis=-1)
                o = R.permute_dims(R.matmul(p, vt), [0, 2, 1, 3])
                out = (o, scores) if second_use else (o,)
                R.output(out)
            return out

    return Module


@pytest.mark.parametrize("second_use", [False, True])
def test_fuse_dispatch_takes_the_three_calls_unless_the_scores_are_used_again(second_use):
    from fq_tvm.schedules import cpu_attention_fused

    counts = {}
    mod = cpu_attention_values.dispatch(8, counts)(cpu_attention.dispatch(8, counts)(_attention_module(second_use)))
    after = cpu_attention_fused.dispatch(counts)(mod)
    calls = [c.args[0].name_hint for c in _calls(after["main"])]
    if second_use:
        assert calls == ["fq_attention_scores_2_8", "fq_attention_values_2_8"], calls
        assert counts == {cpu_attention.KIND: 1, cpu_attention_values.KIND: 1}
    else:
        assert calls == ["fq_attention_2_8"], calls
        assert counts == {cpu_attention_fused.KIND: 1}
        assert "softmax" not in after["main"].script()


def _calls(func):
    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call)
                                    and e.op == tvm.ir.Op.get("relax.call_tir") else None)
    return found
