"""SmolLM2-135M (real weights), bounded: 2 windows of 256 tokens of Pride and Prejudice, calibration on
16 x 256 tokens of Wikipedia (never the evaluation text); the first 4 of 30 blocks quantized.

The export is checked against torch (inside `realmodels.export_smollm2`) and its ORT perplexity on
one window must be sane. The compiled fq2 artifact runs one window and must agree with the float
simulation of its own codes (ONNX Runtime on the effective weights); the simulation then ranks the
2-bit schemes. One calibration pass serves all of them: the ranking reuses the compile's Hessians
(`calibrate_layers` keeps the last result for the same prepared model and file) and its fq2 codes.
`fq-report smollm2` is the full-size version of this. All SmolLM2 tests live in this file, so that
pytest-xdist (`--dist loadfile`) exports the model once.
"""

import numpy as np
import onnx
import pytest

import fq_tvm
from fq_tvm import FqError, evaluate, onnx_io, realmodels
from fq_tvm.frontend import prepare
from fq_tvm.quantize import calibrate_layers, plan_layers, quantize_layers, scheme_config, simulated_model

pytestmark = pytest.mark.slow

WINDOWS, WINDOW = 2, 256
CALIB = (16, 256)  # windows x tokens: smaller than the default (64 x 512) to bound CI time
RANKED = ("rtn2", "gptq2", "fq2")  # fq2r1 (no redundancy) is ranked by fq-report smollm2 only, for CI time
# Bounded for CI time: blocks 4-29 and the tied head stay fp32, the first 4 blocks (28 layers) are
# quantized, compiled and ranked; fq-report smollm2 quantizes all 210.
SKIP = r"layers\.([4-9]|[12][0-9])\."  # the tied head is no dense layer (kept fp32 unless --quantize-head)
BLOCKS = 4


@pytest.fixture(scope="module")
def smollm2(smollm2_onnx):
    """(work dir, onnx path, prepared proto (what compile quantizes: the records' weight names),
    calib path, windows [2, 256])."""
    work, path = smollm2_onnx
    try:
        windows = evaluate.austen_windows(realmodels.smollm2_tokenizer(), WINDOWS, WINDOW)
    except FqError as err:
        pytest.fail(f"{err} (or run bash scripts/fetch_data.sh --smollm2)", pytrace=False)
    calib = realmodels.smollm2_calib(work / "calib.npz", n=CALIB[0], seq=CALIB[1])
    return work, path, prepare(onnx_io.load_model(path)), calib, windows


def _sim_ppl(work, proto, records, windows) -> float:
    path = work / "sim.onnx"
    onnx.save(simulated_model(proto, records), str(path))
    return evaluate.perplexity(evaluate.ort_runner(path), windows)


@pytest.fixture(scope="module")
def compiled_fq2(smollm2):
    work, path, proto, calib, windows = smollm2
    records = {}
    out = fq_tvm.compile(path, "host", work / "fq2", scheme="fq2", calib=calib, skip=SKIP,
                         quiet=True, records=records, act_bits=32)  # exact check against the simulation
    return out, records


@pytest.fixture(scope="module")
def simulated(smollm2, compiled_fq2):
    """{scheme: simulated perplexity on the 2 windows}, fp32 = ONNX Runtime on the export. The
    Hessians are the compile's (same prepared model, layers and file: a cache hit), fq2 its records."""
    work, path, proto, calib, windows = smollm2
    plan = plan_layers(proto, skip=SKIP)
    hessians = calibrate_layers(proto, plan.all_uses(plan.chosen), calib, progress=False)
    ppl = {"fp32": evaluate.perplexity(evaluate.ort_runner(path), windows)}
    for scheme in RANKED:
        records = compiled_fq2[1] if scheme == "fq2" else \
            quantize_layers(proto, plan, scheme_config(scheme), hessians, progress=False)
        ppl[scheme] = _sim_ppl(work, proto, records, windows)
    print({k: round(v, 2) for k, v in ppl.items()})
    return ppl


def test_compiled_fq2_agrees_with_its_simulation(smollm2, compiled_fq2):
    work, _, proto, _, windows = smollm2
    out, records = compiled_fq2
    assert len(records) == BLOCKS * 7  # the attention and MLP projections of the first BLOCKS blocks
    one = windows[:1]
    compiled = evaluate.perplexity(evaluate.artifact_runner(out), one)
    simulated = _sim_ppl(work, proto, records, one)
    assert abs(compiled / simulated - 1) < 0.01, (compiled, simulated)


def test_fq2_ranks_first_among_2bit_schemes(simulated):
    for other in ("rtn2", "gptq2"):
        assert simulated["fq2"] < simulated[other], (other, simulated)


def test_fp32_perplexity_is_sane(simulated):
    assert 5 < simulated["fp32"] < 40 and simulated["fq2"] > simulated["fp32"]


def test_smollm2_export_and_perplexity(smollm2):
    """Export (checked against torch inside), then ORT perplexity on one 256-token Austen window;
    the default calibration file is 64 x 512 tokens."""
    work, path, _, _, windows = smollm2
    ppl = evaluate.perplexity(evaluate.ort_runner(path), windows[:1])
    assert 5 < ppl < 40, ppl
    calib = np.load(realmodels.smollm2_calib(work / "calib_default.npz"))
    assert calib["input_ids"].shape == (64, 512) and calib["input_ids"].dtype == np.int64


def test_smollm2_tokenizer_is_built_once_and_cached(tmp_path, monkeypatch):
    """The first build (from the GGUF's metadata, 9-30 s) is saved under the cache dir; later
    processes load it (~0.3 s) and tokenize exactly alike; a damaged entry is built again."""
    monkeypatch.setenv("FQ_CACHE_DIR", str(tmp_path))
    realmodels.smollm2_tokenizer.cache_clear()
    try:
        built = realmodels.smollm2_tokenizer()
        folder = realmodels._tokenizer_cache()
        assert folder.parent == tmp_path / "tokenizers" and (folder / "tokenizer.json").is_file()
        assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left

        def no_gguf(what):
            raise AssertionError("the GGUF was read again")

        monkeypatch.setattr(realmodels, "_smollm2_load", no_gguf)
        realmodels.smollm2_tokenizer.cache_clear()
        cached = realmodels.smollm2_tokenizer()
        texts = [*realmodels.CHECK_TEXTS, realmodels.austen_text()[:4000], "<|im_start|>user\nHi<|im_end|>"]
        assert cached(texts)["input_ids"] == built(texts)["input_ids"]
        assert (cached.eos_token, cached.bos_token, len(cached)) == (built.eos_token, built.bos_token, len(built))

        (folder / "tokenizer.json").write_text("{")  # damaged: rebuilt and saved again
        monkeypatch.setattr(realmodels, "_smollm2_load", lambda what: built)
        realmodels.smollm2_tokenizer.cache_clear()
        assert realmodels.smollm2_tokenizer() is built
        monkeypatch.setattr(realmodels, "_smollm2_load", no_gguf)
        realmodels.smollm2_tokenizer.cache_clear()
        assert realmodels.smollm2_tokenizer()(texts)["input_ids"] == built(texts)["input_ids"]
    finally:
        realmodels.smollm2_tokenizer.cache_clear()
