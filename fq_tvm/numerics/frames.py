"""Real tight fusion frames by spectral tetris with modulation, in the block-diagonal form of
DESIGN.md: `nblk` copies of one dense block F (2k x 2l, F^T F = I), then the identity on `tail`.

Spectral tetris with an integer ratio n/L = l_den puts l_den consecutive ones in each row; the
modulation by exp(2 pi i a c / k) then spans k subspaces whose fusion frame is tight when the
existence test holds. Using the in-block column index for the phase (a unit scalar per basis
vector: the subspaces do not change) makes every block the same complex k x l_den matrix
G[a, m] = exp(2 pi i a m / k) / sqrt(k); F is its real form (pairs (2m, 2m+1) are one complex
coordinate, outputs (2a, 2a+1) are Re/Im of coefficient a). See docs/numerics.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np


def tff_exists(k: int, l: int, n: int) -> bool:
    """Existence test for a tight fusion frame of k subspaces of dimension l in C^n reachable by
    spectral tetris (Casazza, Fickus, Mixon, Wang, Zhou 2011): Naimark/spatial complements
    reduce (k, l, n) until l divides n, where the answer is k >= n / l."""
    if k < 1 or l < 1 or n < 1 or l > n:
        return False
    while True:
        if l == n:
            return True
        if 2 * l > n:
            l = n - l  # spatial complement
        if n % l == 0:
            return k >= n // l
        c = -(-n // l)
        if k != c + 1:
            return k > c + 1
        n = k * l - n  # Naimark complement, then spatial complement
        l = n - l
        if l < 1:
            return False


def frame_k(l_den: int, r: float) -> int:
    """Number of subspaces for redundancy r: round half up of l_den * r."""
    return math.floor(l_den * float(r) + 0.5 + 1e-9)


def frame_block(k: int, l: int) -> np.ndarray:
    """The real (2k x 2l) block: real form of G[a, m] = exp(2 pi i a m / k) / sqrt(k)."""
    a = np.arange(k)[:, None]
    m = np.arange(l)[None, :]
    theta = 2.0 * np.pi * ((a * m) % k) / k  # reduce the argument: exact phases
    c, s = np.cos(theta) / np.sqrt(k), np.sin(theta) / np.sqrt(k)
    F = np.empty((2 * k, 2 * l))
    F[0::2, 0::2], F[0::2, 1::2] = c, -s
    F[1::2, 0::2], F[1::2, 1::2] = s, c
    return F


@dataclass(frozen=True)
class FusionFrame:
    """Analysis operator P (out_dim x dim) with P^T P = I. `seed` is recorded for provenance; the
    spectral tetris frame itself is deterministic in (dim, l_den, k)."""

    dim: int
    l_den: int
    r: float
    k: int | None = None
    seed: int = 0

    def __post_init__(self):
        dim, l_den, r = int(self.dim), int(self.l_den), float(self.r)
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"frame redundancy r must be a positive number, got r={self.r}")
        if l_den < 1:
            raise ValueError(f"frame l_den must be >= 1, got l_den={self.l_den}")
        k = frame_k(l_den, r) if self.k is None else int(self.k)
        object.__setattr__(self, "k", k)
        nblk = dim // (2 * l_den)
        if nblk < 1:
            raise ValueError(
                f"no fusion frame for dim={dim}, l_den={l_den}: one block needs 2*l_den={2 * l_den} coordinates"
            )
        n_c = nblk * l_den  # complex dimension, L = nblk-dimensional subspaces
        if not tff_exists(k, nblk, n_c):
            raise ValueError(
                f"no tight fusion frame for dim={dim}, l_den={l_den}, r={r}: k={k} subspaces of dimension "
                f"L={nblk} in C^{n_c} fail the existence test (need k >= l_den, i.e. r >= 1)"
            )

    @classmethod
    def create(cls, dim: int, l_den: int = 8, r: float = 1.1, seed: int = 0) -> FusionFrame:
        return cls(int(dim), int(l_den), float(r), None, int(seed))

    @property
    def l(self) -> int:
        return self.l_den

    @property
    def nblk(self) -> int:
        return self.dim // (2 * self.l_den)

    @property
    def tail(self) -> int:
        return self.dim - self.nblk * 2 * self.l_den

    @property
    def in_dim(self) -> int:
        return self.dim

    @property
    def out_dim(self) -> int:
        return self.nblk * 2 * self.k + self.tail

    @property
    def redundancy(self) -> float:
        """Effective redundancy out_dim / dim."""
        return self.out_dim / self.dim

    @cached_property
    def F(self) -> np.ndarray:
        return frame_block(self.k, self.l_den)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """[..., dim] -> [..., out_dim]."""
        x = np.asarray(x, dtype=np.float64)
        _check_last(x, self.dim, "FusionFrame.apply")
        lead, cut = x.shape[:-1], self.nblk * 2 * self.l_den
        body = x[..., :cut].reshape(*lead, self.nblk, 2 * self.l_den) @ self.F.T
        return np.concatenate([body.reshape(*lead, -1), x[..., cut:]], axis=-1)

    def adjoint(self, u: np.ndarray) -> np.ndarray:
        """[..., out_dim] -> [..., dim] (synthesis, P^T)."""
        u = np.asarray(u, dtype=np.float64)
        _check_last(u, self.out_dim, "FusionFrame.adjoint")
        lead, cut = u.shape[:-1], self.nblk * 2 * self.k
        body = u[..., :cut].reshape(*lead, self.nblk, 2 * self.k) @ self.F
        return np.concatenate([body.reshape(*lead, -1), u[..., cut:]], axis=-1)

    def matrix(self) -> np.ndarray:
        """Dense out_dim x dim matrix (tests only)."""
        return self.apply(np.eye(self.dim)).T

    def to_meta(self) -> dict:
        return {"dim": self.dim, "l_den": self.l_den, "r": float(self.r), "k": self.k, "seed": int(self.seed)}

    @classmethod
    def from_meta(cls, meta: dict) -> FusionFrame:
        return cls(int(meta["dim"]), int(meta["l_den"]), float(meta["r"]), int(meta["k"]), int(meta.get("seed", 0)))


def _check_last(x: np.ndarray, n: int, where: str) -> None:
    if x.ndim < 1 or x.shape[-1] != n:
        raise ValueError(f"{where}: last axis must have length {n}, got shape {x.shape}")
