"""Shared fixtures: small seeded ONNX models, built once per test session."""

import numpy as np
import onnxruntime as ort
import pytest

from fq_tvm import models


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_onnx(model_dir):
    return models.mlp_gemm(model_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def encoder_onnx(model_dir):
    return models.encoder_block(model_dir / "encoder.onnx")


def ort_run(onnx_path, inputs: dict) -> list:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def max_rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())
