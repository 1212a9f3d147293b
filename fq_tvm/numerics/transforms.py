"""Composition of orthonormal / Parseval operators acting on the last axis."""

from __future__ import annotations

import numpy as np


class Chain:
    """T = ops[-1] o ... o ops[0] (apply order); empty means the identity on `dim`."""

    def __init__(self, ops, dim: int):
        self.ops = tuple(op for op in ops if op is not None)
        self.dim = int(dim)
        for a, b in zip(self.ops, self.ops[1:]):
            if a.out_dim != b.in_dim:
                raise ValueError(f"transform chain mismatch: {a.out_dim} -> {b.in_dim}")
        if self.ops and self.ops[0].in_dim != self.dim:
            raise ValueError(f"transform chain expects {self.ops[0].in_dim} inputs, not {self.dim}")

    @property
    def in_dim(self) -> int:
        return self.dim

    @property
    def out_dim(self) -> int:
        return self.ops[-1].out_dim if self.ops else self.dim

    def apply(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64)
        for op in self.ops:
            y = op.apply(y)
        return y

    def adjoint(self, u: np.ndarray) -> np.ndarray:
        y = np.asarray(u, dtype=np.float64)
        for op in reversed(self.ops):
            y = op.adjoint(y)
        return y

    def apply_rows(self, m: np.ndarray) -> np.ndarray:
        """T applied to every column of m (first axis): returns T @ m."""
        return self.apply(np.asarray(m).T).T

    def adjoint_rows(self, m: np.ndarray) -> np.ndarray:
        """T^T @ m."""
        return self.adjoint(np.asarray(m).T).T

    def matrix(self) -> np.ndarray:
        """Dense out_dim x in_dim matrix (tests only)."""
        return self.apply(np.eye(self.dim)).T
