"""Quantization modes of this project.

The integer values are mirrored in ``csrc/quant_modes.h``; ``tests/test_modes.py`` fails when the
two drift apart.
"""

from __future__ import annotations

import enum

# This project's checkpoint key (ModelOpt always keeps the vocabulary layers in high precision):
# which of the output head and the input embedding a checkpoint stores as MXFP4.
VOCAB_LAYERS_KEY = "quantized_vocab_layers"
VOCAB_LAYERS = ("embed_tokens", "lm_head")


class QuantAlgo(enum.IntEnum):
    """``quant_algo`` values a checkpoint may carry (the enum name is the string in the config)."""

    W4A8_MXFP4_FP8 = 1  # ModelOpt 0.47's preset
    W4A8_MXFP4_INT8 = 2  # this project's format: same weights, INT8 activations

    @classmethod
    def from_string(cls, value: str) -> QuantAlgo:
        try:
            return cls[value.upper()]
        except KeyError:
            raise ValueError(
                f"quant_algo {value!r} is not served by w4a8_mxfp4; expected one of "
                f"{[m.name for m in cls]}"
            ) from None


class ActivationDtype(enum.IntEnum):
    FP8_E4M3 = 1
    INT8 = 2

    @classmethod
    def from_string(cls, value: str) -> ActivationDtype:
        aliases = {"fp8": cls.FP8_E4M3, "fp8_e4m3": cls.FP8_E4M3, "int8": cls.INT8}
        try:
            return aliases[value.lower()]
        except KeyError:
            raise ValueError(
                f"activation dtype {value!r} is not supported; expected one of {sorted(aliases)}"
            ) from None


class ActivationScheme(enum.IntEnum):
    """How the activation scale is obtained."""

    STATIC_PER_TENSOR = 1  # checkpoint input_scale
    DYNAMIC_PER_TENSOR = 2  # amax of the whole input, per call
    DYNAMIC_PER_TOKEN = 3  # amax of each row, per call

    @classmethod
    def from_string(cls, value: str) -> ActivationScheme:
        aliases = {
            "static": cls.STATIC_PER_TENSOR,
            "per_tensor": cls.DYNAMIC_PER_TENSOR,
            "per_token": cls.DYNAMIC_PER_TOKEN,
        }
        try:
            return aliases[value.lower()]
        except KeyError:
            raise ValueError(
                f"activation scheme {value!r} is not supported; expected one of {sorted(aliases)}"
            ) from None


DEFAULT_ACTIVATION = {
    QuantAlgo.W4A8_MXFP4_FP8: ActivationDtype.FP8_E4M3,
    QuantAlgo.W4A8_MXFP4_INT8: ActivationDtype.INT8,
}

# Dynamic scheme used when the checkpoint has no input_scale. FP8 follows ModelOpt's uncalibrated
# preset (per-tensor); INT8 needs per-token scales to keep outliers from flattening a whole batch.
DEFAULT_DYNAMIC_SCHEME = {
    ActivationDtype.FP8_E4M3: ActivationScheme.DYNAMIC_PER_TENSOR,
    ActivationDtype.INT8: ActivationScheme.DYNAMIC_PER_TOKEN,
}
