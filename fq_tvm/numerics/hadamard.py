"""Randomized Hadamard transform R = H D for any dimension d (see docs/numerics.md).

The input x (length d) is zero-padded to dp, multiplied by a seeded +-1 vector (length dp), then
each consecutive block of `block` coordinates goes through an orthonormal Walsh-Hadamard transform
in Sylvester (natural) order: H[i, j] = (-1)**popcount(i & j) / sqrt(block).
As a matrix it is dp x d with orthonormal columns, so R^T R = I_d.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

MIN_BLOCK = 32  # below this power-of-two factor we pad instead of using tiny blocks
PAD_MULTIPLE = 64  # pad large dimensions to a multiple of this
SMALL_DIM = 64  # dimensions up to this pad to the next power of two

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_signs(n: int, seed: int) -> np.ndarray:
    """n seeded +-1.0 values: sign i is the top bit of mix64(mix64(seed) + (i + 1) * golden).

    Pure integer arithmetic, so it is identical on every platform and numpy version.
    """
    if not 0 <= int(seed) <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    with np.errstate(over="ignore"):
        base = _mix64(np.array([int(seed)], dtype=np.uint64))[0]
        state = base + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)
        top = _mix64(state) >> np.uint64(63)
    return 1.0 - 2.0 * top.astype(np.float64)


def seed_for(name: str, base_seed: int = 0) -> int:
    """A stable 63-bit seed derived from a name (a tensor or layer name) and a base seed."""
    digest = hashlib.sha256(f"{int(base_seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def pow2_factor(d: int) -> int:
    """Largest power of two dividing d (d >= 1)."""
    return d & -d


def next_pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


def padded_dim(d: int) -> int:
    """The padding rule: keep d when its power-of-two factor is >= MIN_BLOCK; else pad small d
    (<= SMALL_DIM) to the next power of two and larger d to the next multiple of PAD_MULTIPLE."""
    if d < 1:
        raise ValueError(f"Hadamard dimension must be >= 1, got {d}")
    if pow2_factor(d) >= MIN_BLOCK:
        return d
    if d <= SMALL_DIM:
        return next_pow2(d)
    return -(-d // PAD_MULTIPLE) * PAD_MULTIPLE


@lru_cache(maxsize=16)
def sylvester(n: int) -> np.ndarray:
    """Unnormalised n x n Sylvester Hadamard matrix (n a power of two), read-only."""
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def fwht(x: np.ndarray, block: int) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform (Sylvester order) on consecutive blocks of the last
    axis; float64, its own inverse. H_(ab) = H_a (x) H_b: one GEMM per factor (balanced, at most
    64) on the lowest index digit, then a digit rotation."""
    x = np.asarray(x, dtype=np.float64)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.size // block if block else 0
    y = x.reshape(rows, block)
    scale = 1.0 / np.sqrt(block)
    for f in _factors(block):
        y = (y.reshape(-1, f) @ (sylvester(f) * scale)).reshape(rows, block // f, f)
        y = y.transpose(0, 2, 1).reshape(rows, block)  # bottom digit -> top
        scale = 1.0
    return y.reshape(*lead, n) if block > 1 else x.copy()


FWHT_MAX_LOG = 6  # largest GEMM factor 2**6


def _factors(block: int) -> list[int]:
    """Balanced power-of-two factors of block, each at most 2**FWHT_MAX_LOG."""
    e = block.bit_length() - 1
    m = -(-e // FWHT_MAX_LOG)
    return [1 << (e // m + (1 if i < e % m else 0)) for i in range(m)] if e else []


@dataclass(frozen=True)
class Hadamard:
    """R = H D (dp x d). Build with `Hadamard.create(d, seed)` for the default padding rule."""

    d: int
    dp: int
    block: int
    seed: int

    def __post_init__(self):
        d, dp, block = int(self.d), int(self.dp), int(self.block)
        if d < 1 or dp < d:
            raise ValueError(f"Hadamard needs 1 <= d <= dp, got d={d}, dp={dp}")
        if block < 1 or block & (block - 1) or dp % block:
            raise ValueError(f"Hadamard block must be a power of two dividing dp={dp}, got {block}")
        if not 0 <= int(self.seed) <= _MASK64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @classmethod
    def create(cls, d: int, seed: int = 0) -> Hadamard:
        dp = padded_dim(int(d))
        return cls(int(d), dp, pow2_factor(dp), int(seed))

    @property
    def in_dim(self) -> int:
        return self.d

    @property
    def out_dim(self) -> int:
        return self.dp

    @cached_property
    def signs(self) -> np.ndarray:
        return random_signs(self.dp, self.seed)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """[..., d] -> [..., dp]: pad, sign, blockwise WHT."""
        x = np.asarray(x, dtype=np.float64)
        _check_last(x, self.d, "Hadamard.apply")
        if self.dp != self.d:
            x = np.concatenate([x, np.zeros(x.shape[:-1] + (self.dp - self.d,))], axis=-1)
        return fwht(x * self.signs, self.block)

    def adjoint(self, u: np.ndarray) -> np.ndarray:
        """[..., dp] -> [..., d]: blockwise WHT, sign, truncate (R^T)."""
        u = np.asarray(u, dtype=np.float64)
        _check_last(u, self.dp, "Hadamard.adjoint")
        return (fwht(u, self.block) * self.signs)[..., : self.d]

    def matrix(self) -> np.ndarray:
        """Dense dp x d matrix (tests only)."""
        return self.apply(np.eye(self.d)).T

    def to_meta(self) -> dict:
        return {"d": self.d, "dp": self.dp, "block": self.block, "seed": int(self.seed)}

    @classmethod
    def from_meta(cls, meta: dict) -> Hadamard:
        return cls(int(meta["d"]), int(meta["dp"]), int(meta["block"]), int(meta["seed"]))


def _check_last(x: np.ndarray, n: int, where: str) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"{where}: last axis must have length {n}, got shape {x.shape}")
