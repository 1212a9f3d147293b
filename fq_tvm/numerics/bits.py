"""Storage accounting: bits per original weight, counting what a record stores (packed codes with
their padding, scales and zeros at their stored width). Frames and rotations are regenerated
from their parameters and cost nothing."""

from __future__ import annotations

from .record import QuantizedLinear


def layer_bits(record: QuantizedLinear, scale_bits: int | None = None, zero_bits: int | None = None) -> int:
    """Total stored bits of one layer. scale_bits / zero_bits default to the stored dtype (32)."""
    sb = record.scale.dtype.itemsize * 8 if scale_bits is None else int(scale_bits)
    zb = record.zero.dtype.itemsize * 8 if zero_bits is None else int(zero_bits)
    return record.packed.size * 8 + record.scale.size * sb + record.zero.size * zb


def bits_per_weight(record: QuantizedLinear, **widths) -> float:
    """layer_bits / (out_features * in_features)."""
    return layer_bits(record, **widths) / (record.out_features * record.in_features)


def model_bits_per_weight(records, **widths) -> float:
    """Stored bits of all layers over their original weight count."""
    records = list(records)
    weights = sum(r.out_features * r.in_features for r in records)
    return sum(layer_bits(r, **widths) for r in records) / weights if weights else 0.0


def nominal_bits_per_weight(bits: int, redundancy: float, in_features: int, scale_bits: int = 16,
                            zero_bits: int | None = None) -> float:
    """The paper's formula bits * r + (scale_bits + zero_bits) / K (per-row, zero in `bits` bits)."""
    zb = bits if zero_bits is None else zero_bits
    return bits * redundancy + (scale_bits + zb) / in_features
