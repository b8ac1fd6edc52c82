"""``W4A8Mxfp4Config``: the QuantizationConfig vLLM knows as ``w4a8_mxfp4``."""

from __future__ import annotations

from typing import Any

import torch

from .. import QUANTIZATION_NAME
from ..formats import ActivationDtype, QuantAlgo
from .checkpoint import (
    CheckpointQuantSpec,
    activation_choice,
    extract_quant_algo,
    is_excluded,
    parse_quant_config,
)
from .compat import (
    ATTENTION_LAYERS,
    BaseKVCacheMethod,
    LinearBase,
    MoELayer,
    QuantizationConfig,
    QuantizeMethodBase,
    UnquantizedLinearMethod,
)

SERVED_ALGOS = frozenset(m.name for m in QuantAlgo)


class W4A8Mxfp4Config(QuantizationConfig):
    """MXFP4 weights with FP8 or INT8 activations, from ModelOpt-layout checkpoints."""

    def __init__(self, spec: CheckpointQuantSpec):
        super().__init__()
        self.spec = spec
        self.act_dtype, self.forced_dynamic_scheme = activation_choice(spec)
        self.exclude_modules: list[str] = list(spec.exclude_modules)

    def __repr__(self) -> str:
        return (
            f"W4A8Mxfp4Config(quant_algo={self.spec.quant_algo.name}, "
            f"activations={self.act_dtype.name}, kv_cache={self.spec.kv_cache_quant_algo}, "
            f"exclude={self.exclude_modules})"
        )

    def get_name(self) -> str:
        return QUANTIZATION_NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # The dequantize fallback needs bf16 and FP8 casts on the GPU: Ampere and newer.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return ["hf_quant_config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> W4A8Mxfp4Config:
        return cls(parse_quant_config(config))

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: Any, user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        if user_quant == QUANTIZATION_NAME:
            return QUANTIZATION_NAME
        return QUANTIZATION_NAME if extract_quant_algo(hf_quant_cfg) in SERVED_ALGOS else None

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        if self.exclude_modules:
            self.exclude_modules = list(hf_to_vllm_mapper.apply_list(self.exclude_modules))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from ..methods.linear import LINEAR_METHODS
        from ..methods.moe import MOE_METHODS

        if isinstance(layer, ATTENTION_LAYERS):
            return BaseKVCacheMethod(self)
        if isinstance(layer, LinearBase):
            if is_excluded(prefix, self.exclude_modules, self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return LINEAR_METHODS[self.act_dtype](self, prefix)
        if isinstance(layer, MoELayer):
            if is_excluded(prefix, self.exclude_modules, self.packed_modules_mapping):
                return None  # vLLM then uses its unquantized MoE method
            return MOE_METHODS[self.act_dtype](self, layer.moe_config, prefix)
        return None

    @property
    def serves_int8(self) -> bool:
        return self.act_dtype == ActivationDtype.INT8
