"""Floor 1: pure numerics of W4A8 MXFP4 (no vLLM imports)."""

from .activations import (
    FP8_E4M3_MAX,
    INT8_MAX,
    dynamic_scale,
    fake_quantize_activation,
    quantize_activation,
    quantize_fp8,
    quantize_int8,
)
from .modes import (
    DEFAULT_ACTIVATION,
    DEFAULT_DYNAMIC_SCHEME,
    VOCAB_LAYERS,
    VOCAB_LAYERS_KEY,
    ActivationDtype,
    ActivationScheme,
    QuantAlgo,
)
from .mxfp4 import (
    BLOCK_SIZE,
    E2M1_VALUES,
    E8M0_BIAS,
    E8M0_NAN,
    dequantize_mxfp4,
    e2m1_to_float,
    e8m0_to_float,
    float_to_e2m1,
    pack_e2m1,
    quantize_mxfp4,
    unpack_e2m1,
)
from .reference import reference_linear

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_ACTIVATION",
    "DEFAULT_DYNAMIC_SCHEME",
    "E2M1_VALUES",
    "E8M0_BIAS",
    "E8M0_NAN",
    "FP8_E4M3_MAX",
    "INT8_MAX",
    "VOCAB_LAYERS",
    "VOCAB_LAYERS_KEY",
    "ActivationDtype",
    "ActivationScheme",
    "QuantAlgo",
    "dequantize_mxfp4",
    "dynamic_scale",
    "e2m1_to_float",
    "e8m0_to_float",
    "fake_quantize_activation",
    "float_to_e2m1",
    "pack_e2m1",
    "quantize_activation",
    "quantize_fp8",
    "quantize_int8",
    "quantize_mxfp4",
    "reference_linear",
    "unpack_e2m1",
]
