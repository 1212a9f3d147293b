import subprocess
import sys

import numpy as np
import pytest

from fq_tvm.numerics.hadamard import Hadamard, fwht, padded_dim, random_signs, seed_for
from conftest import gram_error

DIMS = (64, 384, 576, 1000, 1536, 4096, 11008)
M64 = (1 << 64) - 1


def _mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _signs_reference(n, seed):
    base = _mix(seed)
    return np.array([-1.0 if _mix((base + (i + 1) * 0x9E3779B97F4A7C15) & M64) >> 63 else 1.0 for i in range(n)])


def _sylvester_reference(n):
    i = np.arange(n)
    parity = np.bitwise_count(i[:, None] & i[None, :]) & 1
    return (1.0 - 2.0 * parity) / np.sqrt(n)


def _explicit(h: Hadamard, x):
    """R x by blocks of dense Hadamard matrices, x [..., d]."""
    xp = np.zeros(x.shape[:-1] + (h.dp,))
    xp[..., : h.d] = x
    xp = (xp * h.signs).reshape(x.shape[:-1] + (h.dp // h.block, h.block))
    return (xp @ _sylvester_reference(h.block).T).reshape(x.shape[:-1] + (h.dp,))


@pytest.mark.parametrize(
    "d, dp, block",
    [(64, 64, 64), (384, 384, 128), (576, 576, 64), (1536, 1536, 512), (11008, 11008, 256), (4096, 4096, 4096),
     (1000, 1024, 1024), (1, 1, 1), (3, 4, 4), (48, 64, 64), (96, 96, 32), (100, 128, 128), (999, 1024, 1024),
     (1040, 1088, 64), (7, 8, 8)],
)
def test_padding_rule(d, dp, block):
    h = Hadamard.create(d, 0)
    assert (h.dp, h.block) == (dp, block)
    assert padded_dim(d) == dp


@pytest.mark.parametrize("d", DIMS)
def test_orthogonality(d):
    assert gram_error(Hadamard.create(d, 5), d) < 1e-10


@pytest.mark.parametrize("d", (1, 3, 7, 64, 100, 384, 576, 1000, 1536))
def test_fast_equals_explicit_matrix(d):
    h = Hadamard.create(d, 11)
    x = np.random.default_rng(d).standard_normal((3, 2, d))
    assert np.allclose(h.apply(x), _explicit(h, x), atol=1e-12)
    dense = h.matrix()
    assert dense.shape == (h.dp, d)
    assert np.allclose(dense, _explicit(h, np.eye(d)).T, atol=1e-12)
    u = np.random.default_rng(1).standard_normal((5, h.dp))
    assert np.allclose(h.adjoint(u), u @ dense, atol=1e-12)


@pytest.mark.parametrize("d", (4096, 11008))
def test_fast_equals_explicit_large(d):
    h = Hadamard.create(d, 2)
    x = np.random.default_rng(0).standard_normal((4, d))
    assert np.allclose(h.apply(x), _explicit(h, x), atol=1e-10)


def test_fwht_is_sylvester_order():
    x = np.random.default_rng(0).standard_normal((2, 256))
    for b in (1, 2, 4, 64, 128, 256):
        ref = (x.reshape(2, -1, b) @ _sylvester_reference(b).T).reshape(2, 256)
        assert np.allclose(fwht(x, b), ref, atol=1e-12)


def test_signs_match_splitmix_reference():
    for n, seed in ((1, 0), (257, 7), (1000, 2**63 + 5)):
        assert np.array_equal(random_signs(n, seed), _signs_reference(n, seed))
    assert abs(random_signs(100000, 123).sum()) < 2000  # balanced


def test_signs_bit_identical_across_processes():
    code = "from fq_tvm.numerics.hadamard import Hadamard; import hashlib; " \
           "print(hashlib.sha256(Hadamard.create(1000, 42).matrix().tobytes()).hexdigest())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    import hashlib

    assert out == hashlib.sha256(Hadamard.create(1000, 42).matrix().tobytes()).hexdigest()


def test_params_round_trip_and_validation():
    h = Hadamard.create(1000, 9)
    assert Hadamard.from_meta(h.to_meta()) == h
    assert h.to_meta() == {"d": 1000, "dp": 1024, "block": 1024, "seed": 9}
    with pytest.raises(ValueError, match="power of two"):
        Hadamard(1000, 1024, 48, 0)
    with pytest.raises(ValueError, match="d <= dp"):
        Hadamard(1000, 512, 512, 0)
    with pytest.raises(ValueError, match="last axis"):
        h.apply(np.zeros((2, 999)))
    assert Hadamard(1000, 1024, 64, 3).matrix().shape == (1024, 1000)  # any valid block works


def test_seed_for_is_stable_and_distinct():
    assert seed_for("x", 0) == seed_for("x", 0)
    assert len({seed_for("x", 0), seed_for("y", 0), seed_for("x", 1)}) == 3
    assert 0 <= seed_for("anything") < 2**63
