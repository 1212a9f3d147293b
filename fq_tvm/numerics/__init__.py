"""FrameQuant numerics: pure numpy (ONNX Runtime only in `calibrate`, imported lazily there).

Randomized Hadamard and tight fusion frames, RTN / GPTQ / FrameQuant, packing, the
quantized-layer record, calibration and bits accounting. See docs/numerics.md.
The functions `gptq`, `framequant` and `calibrate` shadow their modules as package attributes:
import names with `from fq_tvm.numerics[.module] import name`.
"""

from .activations import ACT_BITS, ACT_GROUP, act_group, quantize_activations
from .bits import (
    bits_per_weight,
    layer_bits,
    model_bits_per_weight,
    nominal_bits_per_weight,
)
from .calibrate import (
    DenseLayer,
    HessianStat,
    calibrate,
    find_dense_layers,
    weight_matrix,
)
from .framequant import framequant, input_transforms, normalized_hessian, quantize_layer
from .frames import FusionFrame, frame_block, frame_k, tff_exists
from .gptq import gptq, inverse_hessian_factor
from .guard import Candidate, auto_damp, candidates, choose, output_error
from .hadamard import Hadamard, fwht, padded_dim, random_signs, seed_for
from .packing import pack_codes, packed_width, storage_bits, unpack_codes
from .quantize import SCHEMES, QuantConfig, get_scheme, grid_params, rtn
from .record import (
    QuantizedLinear,
    apply,
    codes,
    dequantize,
    effective_weight,
    from_state,
    gather_rows,
    to_state,
)
from .transforms import Chain

__all__ = [
    "Candidate", "auto_damp", "candidates", "choose", "output_error",
    "ACT_BITS", "ACT_GROUP", "act_group", "quantize_activations", "SCHEMES", "Chain", "DenseLayer", "FusionFrame",
    "Hadamard", "HessianStat", "QuantConfig",
    "QuantizedLinear", "apply", "bits_per_weight", "calibrate", "codes", "dequantize",
    "effective_weight", "find_dense_layers", "frame_block", "frame_k", "framequant", "from_state",
    "fwht", "gather_rows", "get_scheme", "gptq", "grid_params", "input_transforms", "inverse_hessian_factor",
    "layer_bits", "model_bits_per_weight", "nominal_bits_per_weight", "normalized_hessian",
    "pack_codes", "packed_width", "padded_dim", "quantize_layer", "random_signs", "rtn",
    "seed_for", "storage_bits", "tff_exists", "to_state", "unpack_codes", "weight_matrix",
]
