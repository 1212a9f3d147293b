"""MiniLM (real weights, real data), quantized: the ordering the paper reports, over the Lee
documents (bounded: one metric set, 50 documents). fq2 runs as a compiled artifact; fp32 as ONNX
Runtime on the export (test_real_models.py checks the fp32 artifact against torch); rtn2, gptq2 and
fq2r1 as the float simulation of their codes (ORT on the effective weights: the compiled artifact of
every scheme computes it, tests/test_quantized_compile.py), for CI time.

Calibration uses 128 Wikipedia passages (CALIB), evaluation the Lee corpus (never the same text).
"""

import onnx
import pytest

import fq_tvm
from fq_tvm import FqError, evaluate, onnx_io, realmodels
from fq_tvm.compiler import _quantize
from fq_tvm.frontend import prepare
from fq_tvm.quantize import scheme_config, simulated_model

pytestmark = pytest.mark.slow

# Wikipedia passages; the default is 256. Bounded for CI time: 128 cost 97 s against 137 s for the
# four quantizations on a 2-core Zen 3 (fq2 cosine to fp32 .902 against .916, fq2r1 .832 / .844,
# gptq2 .560 / .556, seed 0), the same ordering with the same margins
CALIB = 128


@pytest.fixture(scope="module")
def lee_results(tmp_path_factory):
    try:
        realmodels.minilm_dir()
        realmodels.gensim_data_dir()
    except FqError as err:
        pytest.fail(f"{err} (or run bash scripts/fetch_data.sh)", pytrace=False)
    work = tmp_path_factory.mktemp("minilm_q")
    onnx_path = realmodels.export_minilm(work)
    calib = realmodels.minilm_calib(work / "calib.npz", n=CALIB)
    proto = prepare(onnx_io.load_model(onnx_path))  # what fq_tvm.compile quantizes
    results, reference = {}, None
    for scheme in ("fp32", "rtn2", "gptq2", "fq2r1", "fq2"):
        if scheme == "fp32":
            run = evaluate.ort_runner(onnx_path)
        elif scheme == "fq2":
            run = evaluate.artifact_runner(fq_tvm.compile(onnx_path, "host", work / scheme, scheme=scheme,
                                                          calib=calib, quiet=True))
        else:
            _, _, records = _quantize(proto, scheme_config(scheme), calib, None, quiet=True)
            onnx.save(simulated_model(proto, records), str(work / f"{scheme}.onnx"))
            run = evaluate.ort_runner(work / f"{scheme}.onnx")
        results[scheme] = evaluate.evaluate_minilm(run, reference_embeddings=reference, metrics=("lee",))
        reference = reference if reference is not None else results[scheme]["lee_embeddings"]
    print({s: (round(r["lee_spearman"], 4), round(r.get("cos_to_reference", 1.0), 4)) for s, r in results.items()})
    return results


def test_fq2_beats_gptq2_and_rtn2_on_lee(lee_results):
    """Cosine to fp32 (the layer error) against both; Lee Spearman against rtn2 only. gptq2's Lee
    sits at fp32's (.5085 vs .5083) with a cosine of .55, and fq2's Lee moves inside its +-.02 seed
    spread with calibration rounding (.5251 -> .507 when the batches went by length, 2026-11-28,
    cosine .9156 -> .9162): that comparison is noise, rtn2's (.30) is not."""
    fq2 = lee_results["fq2"]
    assert fq2["lee_spearman"] > lee_results["rtn2"]["lee_spearman"] + 0.1
    for other in ("gptq2", "rtn2"):
        assert fq2["cos_to_reference"] > lee_results[other]["cos_to_reference"] + 0.2, other


def test_redundancy_helps(lee_results):
    """Cosine to fp32 measures the layer error here (2026-11-26: fq2 0.851, r = 1.0 0.806). Lee
    Spearman is not compared: the two moved 0.5018 / 0.5020 -> 0.5064 / 0.5136 with float-order and
    guard changes, inside the +-0.04 spread that rotation seeds give (docs/numerics.md)."""
    assert lee_results["fq2"]["cos_to_reference"] > lee_results["fq2r1"]["cos_to_reference"]


def test_fq2_close_to_fp32(lee_results):
    """The goal the project set (0.05 Spearman); cosine is reported, the 0.9 goal not yet reached."""
    assert abs(lee_results["fq2"]["lee_spearman"] - lee_results["fp32"]["lee_spearman"]) < 0.05
    assert lee_results["fq2"]["cos_to_reference"] > 0.75
