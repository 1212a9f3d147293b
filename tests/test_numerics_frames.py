import hashlib
import subprocess
import sys

import numpy as np
import pytest

from fq_tvm.numerics.frames import FusionFrame, frame_block, frame_k, tff_exists
from fq_tvm.numerics.hadamard import Hadamard
from fq_tvm.numerics.transforms import Chain
from conftest import gram_error

DIMS = (64, 384, 576, 1000, 1536, 4096, 11008)
REDUNDANCIES = (1.0, 1.1, 1.25, 1.5)


@pytest.mark.parametrize("r", REDUNDANCIES)
@pytest.mark.parametrize("d", DIMS)
def test_composed_transform_is_parseval(d, r):
    h = Hadamard.create(d, 17)
    f = FusionFrame.create(h.dp, 8, r, 17)
    T = Chain([h, f], d)
    assert T.out_dim == f.nblk * 2 * f.k + f.tail
    assert gram_error(T, d, columns=1024) < 1e-10  # every column up to 1024; 1024 random ones above


@pytest.mark.parametrize("k, l", [(8, 8), (9, 8), (10, 8), (12, 8), (1, 1), (3, 1), (5, 4), (18, 16)])
def test_block_is_parseval(k, l):
    F = frame_block(k, l)
    assert F.shape == (2 * k, 2 * l)
    assert np.allclose(F.T @ F, np.eye(2 * l), atol=1e-13)
    if k == l:
        assert np.allclose(F @ F.T, np.eye(2 * k), atol=1e-13)  # r = 1: an orthogonal block


def test_block_diagonal_contract():
    f = FusionFrame.create(40, 8, 1.25)  # 2 blocks of 16 coordinates + 8 left over
    assert (f.k, f.nblk, f.tail, f.out_dim) == (10, 2, 8, 48)
    dense = np.zeros((48, 40))
    dense[0:20, 0:16] = f.F
    dense[20:40, 16:32] = f.F
    dense[40:48, 32:40] = np.eye(8)
    assert np.array_equal(f.matrix(), dense)
    x = np.random.default_rng(0).standard_normal((2, 3, 40))
    assert np.allclose(f.apply(x), x @ dense.T)
    u = np.random.default_rng(1).standard_normal((4, 48))
    assert np.allclose(f.adjoint(u), u @ dense)


def test_block_is_modulated_spectral_tetris():
    """Each block is the real form of G[a, m] = exp(2 pi i a m / k) / sqrt(k)."""
    k, l = 9, 8
    G = np.exp(2j * np.pi * np.outer(np.arange(k), np.arange(l)) / k) / np.sqrt(k)
    x = np.random.default_rng(0).standard_normal(2 * l)
    c = G @ (x[0::2] + 1j * x[1::2])
    y = frame_block(k, l) @ x
    assert np.allclose(y[0::2], c.real) and np.allclose(y[1::2], c.imag)


def test_r_one_is_orthogonal_and_redundancy_counts():
    f = FusionFrame.create(64, 8, 1.0)
    assert f.k == 8 and f.out_dim == 64
    m = f.matrix()
    assert np.allclose(m @ m.T, np.eye(64), atol=1e-13)
    assert FusionFrame.create(4096, 8, 1.1).redundancy == 9 / 8
    assert [frame_k(8, r) for r in REDUNDANCIES] == [8, 9, 10, 12]
    assert frame_k(10, 1.05) == 11  # round half up


def test_existence_rejects_impossible_parameters():
    with pytest.raises(ValueError, match=r"no tight fusion frame for dim=64, l_den=8, r=0\.9: k=7 subspaces"):
        FusionFrame.create(64, 8, 0.9)
    with pytest.raises(ValueError, match=r"k=5 subspaces of dimension L=2 in C\^16"):
        FusionFrame(32, 8, 1.0, k=5)
    with pytest.raises(ValueError, match="one block needs 2\\*l_den=16 coordinates"):
        FusionFrame.create(12, 8, 1.1)
    with pytest.raises(ValueError, match="positive number"):
        FusionFrame.create(64, 8, float("nan"))
    with pytest.raises(ValueError, match="l_den must be >= 1"):
        FusionFrame.create(64, 0, 1.1)


@pytest.mark.parametrize(
    "k, l, n, ok",
    [(8, 4, 32, True), (7, 4, 28, True), (6, 4, 28, False), (2, 1, 2, True), (1, 1, 2, False), (1, 3, 3, True),
     (5, 4, 11, True), (4, 4, 11, False), (3, 2, 5, False), (4, 2, 5, True), (5, 3, 7, True), (0, 1, 4, False),
     (3, 5, 4, False)],
)
def test_tff_existence_test(k, l, n, ok):
    assert tff_exists(k, l, n) is ok


def test_regeneration_is_bit_identical():
    f = FusionFrame.create(1536, 8, 1.1, seed=3)
    again = FusionFrame.from_meta(f.to_meta())
    assert again == f and again.F.tobytes() == f.F.tobytes()
    assert f.to_meta() == {"dim": 1536, "l_den": 8, "r": 1.1, "k": 9, "seed": 3}
    code = (
        "from fq_tvm.numerics import FusionFrame, Hadamard, Chain; import hashlib; "
        "h = Hadamard.create(1000, 5); f = FusionFrame.create(h.dp, 8, 1.1, 5); "
        "print(hashlib.sha256(Chain([h, f], 1000).matrix().tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    h = Hadamard.create(1000, 5)
    here = Chain([h, FusionFrame.create(h.dp, 8, 1.1, 5)], 1000).matrix()
    assert out == hashlib.sha256(here.tobytes()).hexdigest()
