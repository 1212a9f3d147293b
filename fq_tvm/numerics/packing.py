"""Packed codes, DESIGN.md layout: `per = 8 // sbits` codes per byte, code of column j in byte
j // per at bit offset sbits * (j % per) (little-endian in the byte), columns padded with zero
codes to a multiple of `per`. 3-bit codes are stored as 4-bit codes (sbits = 4), 7-bit codes as
bytes (sbits = 8)."""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 7, 8)


def storage_bits(bits: int) -> int:
    """Bits one code occupies in the packed array."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return {3: 4, 7: 8}.get(bits, bits)


def packed_width(ncols: int, bits: int) -> int:
    """Bytes per row: ceil(ncols * sbits / 8)."""
    return -(-int(ncols) * storage_bits(bits) // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., ncols] codes in [0, 2**bits) -> uint8 [..., packed_width(ncols, bits)]."""
    sb = storage_bits(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits")
    per = 8 // sb
    ncols = codes.shape[-1]
    width = packed_width(ncols, bits)
    padded = np.zeros(codes.shape[:-1] + (width * per,), dtype=np.uint8)
    padded[..., :ncols] = codes
    padded = padded.reshape(codes.shape[:-1] + (width, per))
    out = np.zeros(codes.shape[:-1] + (width,), dtype=np.uint8)
    for i in range(per):
        out |= padded[..., i] << np.uint8(sb * i)
    return out


def unpack_codes(packed: np.ndarray, bits: int, ncols: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 [..., width] -> uint8 [..., ncols]."""
    sb = storage_bits(bits)
    per = 8 // sb
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != packed_width(ncols, bits):
        raise ValueError(f"packed width {packed.shape[-1]} does not fit {ncols} columns of {bits} bits")
    mask = np.uint8((1 << sb) - 1)
    parts = [(packed >> np.uint8(sb * i)) & mask for i in range(per)]
    codes = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return np.ascontiguousarray(codes[..., :ncols])
