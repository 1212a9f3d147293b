"""KV-cache export, fq-generate and Model.generate on a tiny random Llama (2 layers, hidden 64,
4 heads / 2 KV heads, a 300-token BPE tokenizer trained here): exported once, compiled once."""

import gzip
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import fq_tvm  # noqa: E402
from fq_tvm import FqError, kvcache, realmodels  # noqa: E402
from fq_tvm.generate_cli import main as generate_main  # noqa: E402

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering "
        "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 4
PROMPT = "a single man in possession of a good"


def _tiny_llama(directory):
    """A seeded random LlamaForCausalLM and a BPE tokenizer saved as a Hugging Face directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model dir, KV onnx path, fp32 artifact, reference transformers model)."""
    work = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(work / "hf")
    onnx_path = realmodels.export_hf_kv(work / "hf", work / "export")
    artifact = fq_tvm.compile(onnx_path, "host", work / "tiny.fp32", quiet=True)
    lm, _ = realmodels.hf_causal_lm(work / "hf")
    return work / "hf", onnx_path, artifact, lm


def _info(onnx_path):
    import onnx

    return kvcache.read_generation(onnx.load(str(onnx_path)))


def _ids(n, seed=1, vocab=150):  # the tokenizer trained here has ~180 tokens
    return np.random.default_rng(seed).integers(3, vocab, (1, n))


def test_export_signature_names_and_metadata(tiny):
    import onnx

    _, onnx_path, _, _ = tiny
    model = onnx.load(str(onnx_path))
    inputs = [i.name for i in model.graph.input]
    assert inputs == ["input_ids", "position_ids", "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert [o.name for o in model.graph.output] == ["logits", "present_key.0", "present_value.0",
                                                    "present_key.1", "present_value.1"]
    past = [d.dim_param or d.dim_value for d in model.graph.input[2].type.tensor_type.shape.dim]
    assert past == ["batch", 2, "past", 16]
    names = {t.name for t in model.graph.initializer}
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= names
    info = _info(onnx_path)
    assert info["layers"] == 2 and info["kv_heads"] == 2 and info["head_dim"] == 16 and info["context"] == 128
    assert info["eos_ids"] == [2] and info["max_abs_diff_vs_transformers"] < 1e-4
    assert (onnx_path.parent / "tokenizer.json").is_file()


def test_artifact_prefill_then_decode_matches_whole_window(tiny):
    _, onnx_path, artifact, lm = tiny
    model, info = fq_tvm.load(artifact), _info(onnx_path)
    ids = _ids(24)
    with torch.no_grad():
        ref = lm(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    ours = kvcache.decode_steps(model.run, ids, info, split=16)  # a prefill of 16, 8 decode steps
    ort = kvcache.decode_steps(kvcache.ort_step(onnx_path), ids, info, split=5)
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ort - ref).max() < 1e-4


def test_manifest_generation_section(tiny):
    """The generation section, and the tokenizer carried gzip-compressed, byte for byte the export's."""
    _, onnx_path, artifact, _ = tiny
    manifest = json.loads((artifact / "manifest.json").read_text())
    g = manifest["generation"]
    assert g["kind"] == "causal_lm" and g["layers"] == 2 and g["eos_ids"] == [2]
    assert manifest["files"][g["tokenizer"]["file"]] == g["tokenizer"]["sha256"]
    assert g["tokenizer"]["file"] == "tokenizer.json.gz"
    packed = (artifact / "tokenizer.json.gz").read_bytes()
    assert gzip.decompress(packed) == (onnx_path.parent / "tokenizer.json").read_bytes()
    ranges = {spec["name"]: spec.get("range") for spec in manifest["inputs"]}
    assert ranges["position_ids"] == [0, 128]  # the rotary table's rows: fq-run refuses positions past it


def test_in_place_cache_function_matches_main(tiny):
    """`main_kv` (passes/kv_cache.py, built from passes/last_logits.py's last-row head) appends to
    seq-major cache buffers in place: a prefill and decode steps on one buffer of 20 rows give the
    last row of `main`'s logits (which copies the cache), its rows are `main`'s present keys, rows
    past the length (NaN here) are never read, and a length past the buffer is refused. It replaces
    `main_last`, which the artifact no longer carries."""
    import tvm
    from tvm_ffi import Shape

    _, onnx_path, artifact, _ = tiny
    model, info = fq_tvm.load(artifact), _info(onnx_path)
    g = json.loads((artifact / "manifest.json").read_text())["generation"]
    assert g["kv_in_place"] == "main_kv" and "last_logits" not in g
    assert _has(model, "main_kv") and not _has(model, "main_last")
    heads, dim, n = info["kv_heads"], info["head_dim"], 2 * info["layers"]
    past = kvcache.empty_past(info)
    bufs = [tvm.runtime.tensor(np.full((1, 20, heads, dim), np.nan, np.float32)) for _ in range(n)]
    ids, pos = _ids(14)[0], 0
    for chunk in (ids[:9], *[[t] for t in ids[9:]]):
        positions = np.arange(pos, pos + len(chunk))[None]
        full = model.run({"input_ids": np.asarray([chunk]), "position_ids": positions, **past})
        past = {name.replace("present_", "past_"): value for name, value in full.items() if name != "logits"}
        pos += len(chunk)
        last = model._vm["main_kv"](tvm.runtime.tensor(np.asarray([chunk], np.int64)), tvm.runtime.tensor(positions),
                                    Shape((pos,)), *bufs)
        assert last.numpy().shape == (1, 1, full["logits"].shape[-1])
        np.testing.assert_allclose(last.numpy()[0, 0], full["logits"][0, -1], rtol=1e-5, atol=1e-5)
    for buf, name in zip(bufs, kvcache.kv_names(info["layers"])[0]):
        np.testing.assert_array_equal(buf.numpy()[0, :pos].transpose(1, 0, 2), past[name][0])
        assert np.isnan(buf.numpy()[0, pos:]).all()
    with pytest.raises(Exception):
        model._vm["main_kv"](tvm.runtime.tensor(np.asarray([[1]], np.int64)), tvm.runtime.tensor(np.asarray([[20]])),
                             Shape((21,)), *bufs)


def test_decode_step_function_matches_main_kv(tiny):
    """`main_kv1` (passes/kv_cache.py AddDecodeStep) is `main_kv` for one token of one sequence,
    shapes static but the cache length: bit for bit the same logits and cache rows, step by step;
    generate decodes with it."""
    import tvm
    from tvm_ffi import Shape

    _, onnx_path, artifact, _ = tiny
    model, info = fq_tvm.load(artifact), _info(onnx_path)
    assert model.manifest["generation"]["kv_step"] == "main_kv1"
    heads, dim, n = info["kv_heads"], info["head_dim"], 2 * info["layers"]
    bufs = [[tvm.runtime.tensor(np.zeros((1, 16, heads, dim), np.float32)) for _ in range(n)] for _ in range(2)]
    for pos, token in enumerate(_ids(12)[0]):
        args = tvm.runtime.tensor(np.asarray([[token]], np.int64)), tvm.runtime.tensor(np.asarray([[pos]], np.int64))
        kv, step = (model._vm[name](*args, Shape((pos + 1,)), *b).numpy() for name, b in zip(("main_kv", "main_kv1"), bufs))
        np.testing.assert_array_equal(step, kv)
    for a, b in zip(*bufs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(Exception):  # one token only
        model._vm["main_kv1"](tvm.runtime.tensor(np.asarray([[1, 2]], np.int64)),
                              tvm.runtime.tensor(np.asarray([[0, 1]])), Shape((2,)), *bufs[1])


def _has(model, name: str) -> bool:
    try:
        model._vm[name]
        return True
    except Exception:  # the VM raises its own error type for a missing function
        return False


def test_positions_past_the_context_are_refused_by_run(tiny):
    _, onnx_path, artifact, _ = tiny
    feed = {"input_ids": np.ones((1, 1), np.int64), "position_ids": np.full((1, 1), 128, np.int64),
            **kvcache.empty_past(_info(onnx_path))}
    with pytest.raises(FqError, match="input 'position_ids' has values from 128 to 128"):
        fq_tvm.load(artifact).run(feed)


def test_greedy_32_tokens_equal_transformers(tiny):
    _, _, artifact, lm = tiny
    ids = _ids(7, seed=3)
    lm.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = lm.generate(torch.from_numpy(ids), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 7:].tolist()
    out = fq_tvm.load(artifact).generate(ids[0], max_new_tokens=32, stop_at_eos=False)
    assert len(ref) == 32 and out.tokens == ref
    assert out.prefill_tokens_per_s > 0 and out.decode_tokens_per_s > 0 and out.decode_steps == 31


def test_text_prompt_streams_and_sampling_is_seeded(tiny):
    _, _, artifact, _ = tiny
    model = fq_tvm.load(artifact)
    pieces = []
    out = model.generate(PROMPT, max_new_tokens=12, stream=pieces.append, stop_at_eos=False)
    assert out.text and "".join(pieces) == out.text and len(out.tokens) == 12
    a = model.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, stop_at_eos=False)
    b = model.generate(PROMPT, max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, stop_at_eos=False)
    assert a.tokens == b.tokens
    nucleus_of_one = model.generate(PROMPT, max_new_tokens=10, temperature=1.0, top_p=1e-9, seed=1,
                                    stop_at_eos=False)
    assert nucleus_of_one.tokens == model.generate(PROMPT, max_new_tokens=10, stop_at_eos=False).tokens


def test_cli_streams_text_and_reports_speed(tiny, capsys):
    _, _, artifact, _ = tiny
    assert generate_main([str(artifact), "--prompt", PROMPT, "--max-new-tokens", "6", "--no-stop"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "prefill: " in err and "decode: 5 tokens" in err and "tokens/s" in err


def _fails(argv, capsys, expected):
    assert generate_main(argv) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and err.count("\n") == 1, err


def test_bad_input_one_line_errors(tiny, tmp_path, capsys, mlp_onnx):
    hf, _, artifact, _ = tiny
    art = str(artifact)
    _fails([art, "--prompt", "a " * 200], capsys, "more than the model's context limit of 128")
    _fails([art, "--prompt", PROMPT, "--max-new-tokens", "0"], capsys, "--max-new-tokens must be at least 1, not 0")
    _fails([art, "--prompt", PROMPT, "--max-new-tokens", "125"], capsys, "exceeds the model's context limit of 128")
    _fails([art, "--prompt", PROMPT, "--tokenizer", str(tmp_path / "nope")], capsys, "no tokenizer.json there")
    _fails([art, "--prompt", PROMPT, "--temperature", "-1"], capsys, "--temperature must be 0 (greedy) or positive")
    plain = fq_tvm.compile(mlp_onnx, "host", tmp_path / "mlp.host", quiet=True)
    _fails([str(plain), "--prompt", PROMPT], capsys, "not a causal LM with a KV cache")
    model = fq_tvm.load(artifact)  # an artifact compiled without its tokenizer
    model.manifest = dict(model.manifest, generation={k: v for k, v in model.manifest["generation"].items()
                                                      if k != "tokenizer"})
    with pytest.raises(FqError, match="the artifact has no tokenizer; pass --tokenizer"):
        model.generate(PROMPT, max_new_tokens=2)
    assert model.generate(PROMPT, max_new_tokens=2, tokenizer=hf).text is not None


def test_manifest_generation_is_validated(tiny, tmp_path):
    from fq_tvm.artifact import FqError as ArtifactError
    from fq_tvm.artifact import read_manifest, write_manifest

    _, _, artifact, _ = tiny
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation"]["layers"] = 3  # the inputs name 2 layers
    write_manifest(copy, manifest, list(manifest["files"]))
    with pytest.raises(ArtifactError, match="a causal LM's inputs must be"):
        read_manifest(copy)
    manifest["generation"]["layers"] = 2
    manifest["generation"]["last_logits"] = "other"  # only main_last computes the last row alone
    write_manifest(copy, manifest, list(manifest["files"]))
    with pytest.raises(ArtifactError, match="'generation.last_logits' must be 'main_last'"):
        read_manifest(copy)
    del manifest["generation"]["last_logits"]
    manifest["generation"]["kv_in_place"] = "main"  # main returns the present tensors: not in place
    write_manifest(copy, manifest, list(manifest["files"]))
    with pytest.raises(ArtifactError, match="'generation.kv_in_place' must be 'main_kv'"):
        read_manifest(copy)
    manifest["generation"]["kv_in_place"] = "main_kv"
    manifest["generation"]["kv_step"] = "main_kv"  # a step function takes one token
    write_manifest(copy, manifest, list(manifest["files"]))
    with pytest.raises(ArtifactError, match="'generation.kv_step' must be 'main_kv1'"):
        read_manifest(copy)


def test_export_refuses_a_model_that_is_not_llama(tmp_path):
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(FqError, match="not a Llama-architecture causal LM|no tokenizer"):
        realmodels.export_hf_kv(tmp_path / "gpt2", tmp_path / "out")


@pytest.mark.slow
def test_fq2_build_runs_the_quantized_weights(tiny, tmp_path):
    """fq2 (all 14 dense layers, float activations) through the KV path equals ONNX Runtime on the
    graph with the dequantized weights, prefill and decode steps alike; then it generates."""
    import onnx

    from fq_tvm.frontend import prepare
    from fq_tvm.quantize import simulated_model

    _, onnx_path, _, _ = tiny
    info, records = _info(onnx_path), {}
    calib = realmodels.kv_calib(tmp_path / "calib.npz", _ids(64 * 8, seed=7).reshape(8, 64), info)
    fq2 = fq_tvm.compile(onnx_path, "host", tmp_path / "tiny.fq2", scheme="fq2", calib=calib, quiet=True,
                         pad_small=True, act_bits=32, records=records)
    manifest = json.loads((fq2 / "manifest.json").read_text())
    assert len(manifest["layers"]) == 14 and "generation" in manifest and len(records) == 14
    sim = tmp_path / "sim.onnx"
    onnx.save(simulated_model(prepare(onnx.load(str(onnx_path))), records), str(sim))
    ids = _ids(20, seed=4)
    ours = kvcache.decode_steps(fq_tvm.load(fq2).run, ids, info, split=12)
    ref = kvcache.decode_steps(kvcache.ort_step(sim), ids, info, split=12)
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    out = fq_tvm.load(fq2).generate(PROMPT, max_new_tokens=8, stop_at_eos=False)
    assert len(out.tokens) == 8 and out.text is not None


def test_fq_export_kv_options_one_line_errors(tmp_path, capsys):
    from fq_tvm.realcli import export_main

    for argv, expected in ((["minilm", "--kv-cache"], "--kv-cache applies to causal LMs"),
                           (["--hf", str(tmp_path)], "--hf exports causal LMs with a KV cache only"),
                           (["--hf", str(tmp_path), "--kv-cache"], "not a Hugging Face model directory"),
                           (["smollm2", "--hf", str(tmp_path), "--kv-cache"], "not both"),
                           ([], "no model given")):
        assert export_main([*argv, "-o", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


def test_fq_export_calib_samples(tmp_path, capsys, monkeypatch):
    """--calib-samples N reaches the calibration maker as n (the default otherwise); under 1 is one line."""
    from fq_tvm import realmodels
    from fq_tvm.realcli import export_main

    seen = []
    monkeypatch.setattr(realmodels, "export_minilm", lambda out, force=False: out / "minilm.onnx")
    monkeypatch.setattr(realmodels, "minilm_calib", lambda path, **kw: seen.append(kw) or path)
    assert export_main(["minilm", "--calib-samples", "1024", "-o", str(tmp_path)]) == 0
    assert export_main(["minilm", "-o", str(tmp_path)]) == 0
    assert seen == [{"n": 1024}, {}]
    capsys.readouterr()
    assert export_main(["minilm", "--calib-samples", "0", "-o", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--calib-samples must be at least 1" in err and err.count("\n") == 1, err


def test_compile_without_the_tokenizer_beside_the_model_warns(tiny, tmp_path):
    import onnx

    from fq_tvm.compiler import _generation
    from fq_tvm.errors import FqWarning

    _, onnx_path, _, _ = tiny
    lonely = tmp_path / "lonely.onnx"
    shutil.copyfile(onnx_path, lonely)
    with pytest.warns(FqWarning, match="tokenizer.json is missing: the artifact gets no tokenizer"):
        section = _generation(onnx.load(str(lonely)), lonely)
    assert "tokenizer" not in section and section["layers"] == 2
