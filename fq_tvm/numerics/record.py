"""The quantized-layer record: what the numerics produce, the pass consumes, the artifact stores.

Inference math (numpy reference of what the kernels compute), W is N x K:
    xf = Frame(Had_K(x))            # [..., K_f]
    u  = xf @ dequant(packed)^T     # [..., N_p]
    y  = Had_N^T(u)[..., :N]        # (+ bias, kept in the graph, not here)
`to_state` / `from_state` give a dict of numpy arrays plus JSON-able metadata (npz + JSON, no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .activations import act_group, quantize_activations

from .frames import FusionFrame
from .hadamard import Hadamard
from .packing import pack_codes, packed_width, unpack_codes
from .transforms import Chain

FORMAT = "fq-quantized-linear"
VERSION = 1


@dataclass
class QuantizedLinear:
    name: str
    out_features: int  # N
    in_features: int  # K
    bits: int
    group_size: int  # columns per group; == cols for per-row
    packed: np.ndarray  # uint8 [rows, packed_width(cols, bits)]
    scale: np.ndarray  # float32 [rows, ngroups]
    zero: np.ndarray  # float32 [rows, ngroups]
    input_hadamard: Hadamard | None = None
    input_frame: FusionFrame | None = None
    output_hadamard: Hadamard | None = None
    scheme: str = ""
    guard: dict | None = None  # the held-out guard's choice and errors (numerics.guard), JSON-able

    def __post_init__(self):
        self.out_features, self.in_features = int(self.out_features), int(self.in_features)
        self.bits, self.group_size = int(self.bits), int(self.group_size)
        self.packed = np.ascontiguousarray(self.packed)
        if self.packed.dtype != np.uint8:
            raise ValueError(f"{self.name}: packed codes must be uint8, got {self.packed.dtype}")
        self.scale = np.ascontiguousarray(self.scale, dtype=np.float32)
        self.zero = np.ascontiguousarray(self.zero, dtype=np.float32)
        self._check()

    def _check(self):
        ins, outs = self.input_transform(), self.output_transform()  # checks the chain
        want = {
            "packed": (self.rows, packed_width(self.cols, self.bits)),
            "scale": (self.rows, self.ngroups),
            "zero": (self.rows, self.ngroups),
        }
        for key, shape in want.items():
            if getattr(self, key).shape != shape:
                raise ValueError(f"{self.name}: {key} has shape {getattr(self, key).shape}, expected {shape}")
        if self.group_size < 1:
            raise ValueError(f"{self.name}: group_size must be >= 1")
        del ins, outs

    @property
    def rows(self) -> int:
        """N_p: output rows of the stored matrix."""
        return self.output_hadamard.dp if self.output_hadamard else self.out_features

    @property
    def cols(self) -> int:
        """K_f: columns of the stored matrix (frame-domain length)."""
        return self.input_transform().out_dim

    @property
    def ngroups(self) -> int:
        return -(-self.cols // self.group_size)

    @property
    def act_group(self) -> int:
        """Columns per activation group of the int8 kernels: the weight group, else act_group."""
        return self.group_size if self.group_size < self.cols else act_group(self.cols, self.input_hadamard is not None)

    def input_transform(self) -> Chain:
        return Chain([self.input_hadamard, self.input_frame], self.in_features)

    def output_transform(self) -> Chain:
        return Chain([self.output_hadamard], self.out_features)

    @classmethod
    def from_codes(cls, name, out_features, in_features, bits, codes, scale, zero, group_size=None, **kw):
        """Build from unpacked codes [rows, cols]; group_size None means per row."""
        codes = np.asarray(codes)
        gs = codes.shape[1] if group_size is None else int(group_size)
        return cls(name, out_features, in_features, bits, gs, pack_codes(codes, bits), scale, zero, **kw)


def codes(record: QuantizedLinear) -> np.ndarray:
    """Unpacked codes uint8 [rows, cols]."""
    return unpack_codes(record.packed, record.bits, record.cols)


def dequantize(record: QuantizedLinear) -> np.ndarray:
    """float32 [rows, cols]: (q - zero[g]) * scale[g], g = column // group_size."""
    q = codes(record).astype(np.float32)
    g = np.arange(record.cols) // record.group_size
    return (q - record.zero[:, g]) * record.scale[:, g]


def effective_weight(record: QuantizedLinear) -> np.ndarray:
    """float64 [N, K]: W_hat = T_N^T dequant T_K, the weight the layer applies."""
    m = record.input_transform().adjoint(dequantize(record).astype(np.float64))  # [rows, K]
    return record.output_transform().adjoint_rows(m)


def gather_rows(record: QuantizedLinear, ids) -> np.ndarray:
    """float64 [..., K]: rows `ids` of W_hat read from the codes alone, T_K^T dequant(C[ids]) (a
    quantized tied embedding). Needs T_N = I (quantize_layer(..., output_rotation=False)): an
    output rotation mixes the rows of C."""
    if record.output_hadamard is not None:
        raise ValueError(f"{record.name}: rows cannot be gathered under an output rotation")
    ids = np.asarray(ids)
    rows = unpack_codes(record.packed[ids.reshape(-1)], record.bits, record.cols).astype(np.float32)
    g = np.arange(record.cols) // record.group_size
    flat = ids.reshape(-1)
    deq = (rows - record.zero[flat][:, g]) * record.scale[flat][:, g]
    return record.input_transform().adjoint(deq.astype(np.float64)).reshape(*ids.shape, record.in_features)


def apply(record: QuantizedLinear, x: np.ndarray, act_bits: int = 32) -> np.ndarray:
    """x [..., K] -> y [..., N] (float64), by the inference math; act_bits 8 quantizes the coded
    input as the int8 CPU kernels do (numerics.activations)."""
    xf = record.input_transform().apply(x)
    if act_bits == 8:
        xf = quantize_activations(xf, record.act_group)
    u = xf @ dequantize(record).astype(np.float64).T
    return record.output_transform().adjoint(u)


def _params_meta(p):
    return None if p is None else p.to_meta()


def to_state(record: QuantizedLinear, prefix: str = ""):
    """(arrays, meta): arrays {prefix+'packed'|'scale'|'zero': ndarray}, meta JSON-able."""
    arrays = {prefix + key: getattr(record, key) for key in ("packed", "scale", "zero")}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "name": record.name,
        "scheme": record.scheme,
        "out_features": record.out_features,
        "in_features": record.in_features,
        "bits": record.bits,
        "group_size": record.group_size,
        "rows": record.rows,
        "cols": record.cols,
        "input_hadamard": _params_meta(record.input_hadamard),
        "input_frame": _params_meta(record.input_frame),
        "output_hadamard": _params_meta(record.output_hadamard),
    }
    if record.guard is not None:
        meta["guard"] = record.guard
    return arrays, meta


def from_state(arrays, meta: dict, prefix: str = "") -> QuantizedLinear:
    """Inverse of to_state; validates format, version and every shape."""
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} v{VERSION} record: {meta.get('format')} v{meta.get('version')}")

    def load(key, cls):
        return None if meta.get(key) is None else cls.from_meta(meta[key])

    record = QuantizedLinear(
        name=meta["name"],
        out_features=meta["out_features"],
        in_features=meta["in_features"],
        bits=meta["bits"],
        group_size=meta["group_size"],
        packed=np.asarray(arrays[prefix + "packed"]),
        scale=np.asarray(arrays[prefix + "scale"]),
        zero=np.asarray(arrays[prefix + "zero"]),
        input_hadamard=load("input_hadamard", Hadamard),
        input_frame=load("input_frame", FusionFrame),
        output_hadamard=load("output_hadamard", Hadamard),
        scheme=meta.get("scheme", ""),
        guard=meta.get("guard"),
    )
    if (record.rows, record.cols) != (meta.get("rows", record.rows), meta.get("cols", record.cols)):
        raise ValueError(f"{record.name}: stored rows/cols disagree with the transforms")
    return record
