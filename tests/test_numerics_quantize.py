import numpy as np
import pytest

from fq_tvm.numerics.packing import pack_codes, packed_width, storage_bits, unpack_codes
from fq_tvm.numerics.quantize import (
    SCHEMES,
    QuantConfig,
    dequantize_groups,
    get_scheme,
    grid_params,
    rtn,
)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"group_size": 0}, "group_size must be a positive int"),
        ({"clip_sigma": -1.0}, "clip_sigma"),
        ({"method": "magic"}, "unknown method"),
        ({"method": "rtn", "redundancy": 1.1}, "needs method 'framequant'"),
        ({"method": "framequant", "redundancy": 0.9}, "redundancy must be >= 1.0"),
        ({"method": "none", "bits": 2}, "bits=32"),
        ({"percdamp": -0.1}, "percdamp"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_registry():
    assert {"fp32", "int8", "rtn2", "gptq2", "had2", "fq2", "fq4"} <= set(SCHEMES)
    assert get_scheme("fq2").redundancy == 1.1 and get_scheme("fq2").clip_sigma == 1.75  # docs/numerics.md: measured
    assert get_scheme("fq2", redundancy=1.25).redundancy == 1.25
    with pytest.raises(ValueError, match="unknown scheme 'nope'; available: fp32"):
        get_scheme("nope")
    cfg = get_scheme("int8")
    assert QuantConfig.from_meta(cfg.to_meta()) == cfg


def test_minmax_grid_by_hand():
    w = np.array([[-1.0, 0.5, 2.0], [1.0, 2.0, 3.0]])
    s, z = grid_params(w, QuantConfig(bits=2))
    assert np.allclose(s, [1.0, 1.0]) and np.array_equal(z, [1.0, 0.0])
    codes, _, _ = rtn(w, QuantConfig(bits=2))
    assert codes.tolist() == [[0, 2, 3], [1, 2, 3]]  # rint(0.5 + 1) = 2 (half to even)


def test_int8_symmetric():
    w = np.array([[-2.54, 0.0, 1.3, 2.54]])
    codes, scale, zero = rtn(w, get_scheme("int8"))
    assert zero[0, 0] == 128 and np.isclose(scale[0, 0], 0.02)
    assert codes.tolist() == [[1, 128, 193, 255]]


def test_sigma_grid_by_hand():
    row = np.array([[1.0, 3.0, 1.0, 3.0]])  # mean 2, std 1
    s, z = grid_params(row, QuantConfig(bits=2, clip_sigma=2.0))
    assert np.isclose(s[0], 4.0 / 3.0) and np.isclose(z[0], 1.5 - 2.0 / (4.0 / 3.0), atol=1e-6)
    levels = (np.arange(4) - z[0]) * s[0]
    assert np.allclose(levels, [0.0, 4 / 3, 8 / 3, 4.0], atol=1e-6)  # mean -+ 2 sigma are the end levels


def test_grouped_rtn_and_dequantize():
    w = np.random.default_rng(0).standard_normal((5, 10))
    codes, scale, zero = rtn(w, QuantConfig(bits=4, group_size=4))
    assert scale.shape == (5, 3)
    deq = dequantize_groups(codes, scale, zero, 4)
    assert np.all(np.abs(deq - w) <= np.repeat(scale, 4, axis=1)[:, :10] / 2 + 1e-12)


def test_pack_layout_by_hand():
    codes = np.array([[1, 2, 3, 0, 1]], dtype=np.uint8)
    assert pack_codes(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4, 1]]
    assert pack_codes(codes, 4).tolist() == [[1 | 2 << 4, 3, 1]]
    assert pack_codes(codes, 3).tolist() == [[1 | 2 << 4, 3, 1]]  # 3-bit codes stored as 4-bit
    assert pack_codes(codes, 8).tolist() == [[1, 2, 3, 0, 1]]
    assert pack_codes(codes, 7).tolist() == [[1, 2, 3, 0, 1]]  # 7-bit codes stored as bytes
    assert storage_bits(3) == 4 and packed_width(5, 2) == 2 and packed_width(5, 3) == 3
    assert storage_bits(7) == 8 and packed_width(5, 7) == 5


@pytest.mark.parametrize("bits", (2, 3, 4, 7, 8))
@pytest.mark.parametrize("ncols", (1, 3, 4, 5, 64, 129))
def test_pack_round_trip(bits, ncols):
    codes = np.random.default_rng(ncols).integers(0, 2**bits, (7, ncols)).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, -(-ncols * storage_bits(bits) // 8))
    assert np.array_equal(unpack_codes(packed, bits, ncols), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(np.array([[4]], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="packed width"):
        unpack_codes(np.zeros((1, 3), np.uint8), 2, 5)
