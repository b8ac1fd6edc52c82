"""``W4A8Mxfp4Config``: the QuantizationConfig vLLM knows as ``w4a8_mxfp4``."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .. import QUANTIZATION_NAME
from ..formats import VOCAB_LAYERS_KEY, QuantAlgo
from .checkpoint import (
    CheckpointQuantSpec,
    activation_choice,
    extract_quant_algo,
    is_excluded,
    parse_quant_config,
)
from .compat import (
    add_compile_cache_factor,
    is_first_pipeline_rank,
    ATTENTION_LAYERS,
    BaseKVCacheMethod,
    LinearBase,
    MoELayer,
    ParallelLMHead,
    QuantizationConfig,
    QuantizeMethodBase,
    UnquantizedLinearMethod,
    VocabParallelEmbedding,
    layer_module_path,
)
from .integrity import check_safetensors_files
from .validation import check_attention

SERVED_ALGOS = frozenset(m.name for m in QuantAlgo)


COMPILE_CACHE_ENV_PREFIXES = ("W4A8_MXFP4_", "W4A8_SM90_")


def compile_cache_factors(act_dtype) -> dict:
    """What, besides the checkpoint, decides this plugin's compiled graph: the served activation
    dtype, every ``W4A8_MXFP4_*`` and ``W4A8_SM90_*`` setting (kernel choices baked into the
    graph's op arguments) and the package version."""
    from .. import __version__

    settings = {k: v for k, v in sorted(os.environ.items())
                if k.startswith(COMPILE_CACHE_ENV_PREFIXES)}
    return {"version": __version__, "activations": act_dtype.name, "env": settings}


class Mxfp4KVCacheMethod(BaseKVCacheMethod):
    """Loads the checkpoint's FP8 ``k_scale``/``v_scale`` (vLLM maps ModelOpt's
    ``self_attn.{k,v}_proj.{k,v}_scale`` names), refusing values that are not finite and
    positive instead of letting them reach the cache."""

    def __init__(self, quant_config: QuantizationConfig, prefix: str):
        super().__init__(quant_config)
        self.prefix = prefix

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in ("k_scale", "v_scale"):
            param = getattr(layer, name, None)
            if param is None:
                continue
            value = float(param.detach().reshape(-1)[0])
            # -1.0 is vLLM's "not in the checkpoint" marker.
            if value != -1.0 and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"w4a8_mxfp4: checkpoint tensor {self.prefix}.{name} is {value}; a KV-cache "
                    "scale must be finite and positive"
                )
        super().process_weights_after_loading(layer)


class W4A8Mxfp4Config(QuantizationConfig):
    """MXFP4 weights with FP8 or INT8 activations, from ModelOpt-layout checkpoints."""

    def __init__(self, spec: CheckpointQuantSpec):
        self._compile_cache_keyed = False
        super().__init__()
        self.spec = spec
        self.act_dtype, self.forced_dynamic_scheme = activation_choice(spec)
        self.exclude_modules: list[str] = list(spec.exclude_modules)
        self._embedding_built = False

    def __repr__(self) -> str:
        return (
            f"W4A8Mxfp4Config(quant_algo={self.spec.quant_algo.name}, "
            f"activations={self.act_dtype.name}, kv_cache={self.spec.kv_cache_quant_algo}, "
            f"exclude={self.exclude_modules}, vocab_layers={sorted(self.spec.vocab_layers)})"
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
        algo = extract_quant_algo(hf_quant_cfg)
        if algo not in SERVED_ALGOS:
            return None
        if user_quant is not None:
            # vLLM would otherwise let this override replace the user's explicit choice.
            raise ValueError(
                f"the checkpoint's quant_algo is {algo}, served by --quantization "
                f"{QUANTIZATION_NAME}, but --quantization {user_quant} was given; drop the flag "
                f"or pass --quantization {QUANTIZATION_NAME}"
            )
        return QUANTIZATION_NAME

    def maybe_update_config(self, model_name: str, hf_config: Any = None,
                            revision: str | None = None) -> None:
        check_safetensors_files(model_name)
        text_config = hf_config.get_text_config() if hf_config is not None else None
        if self.spec.vocab_layers and getattr(text_config, "tie_word_embeddings", False):
            raise ValueError(
                f"w4a8_mxfp4: the checkpoint stores {sorted(self.spec.vocab_layers)} as MXFP4 "
                f"({VOCAB_LAYERS_KEY}), but the model ties its output head to its input "
                "embedding (tie_word_embeddings); quantized vocabulary layers need untied ones. "
                "Re-export without --quantize-vocab."
            )

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        if self.exclude_modules:
            self.exclude_modules = list(hf_to_vllm_mapper.apply_list(self.exclude_modules))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from ..methods.embedding import Mxfp4EmbeddingMethod
        from ..methods.linear import LINEAR_METHODS
        from ..methods.moe import MOE_METHODS

        if not self._compile_cache_keyed:
            self._compile_cache_keyed = add_compile_cache_factor(
                QUANTIZATION_NAME, compile_cache_factors(self.act_dtype))

        if isinstance(layer, ATTENTION_LAYERS):
            check_attention(
                prefix,
                layer.attn_backend.get_name(),
                layer.kv_cache_dtype,
                checkpoint_fp8_kv=self.spec.kv_cache_quant_algo == "FP8",
                activations=self.act_dtype.name,
            )
            return Mxfp4KVCacheMethod(self, prefix)
        if isinstance(layer, LinearBase):
            prefix = layer_module_path(layer, prefix)
            if is_excluded(prefix, self.exclude_modules, self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return LINEAR_METHODS[self.act_dtype](self, prefix)
        if isinstance(layer, ParallelLMHead):
            return self._lm_head_method(prefix)
        if isinstance(layer, VocabParallelEmbedding):
            self._embedding_built = True
            if "embed_tokens" in self.spec.vocab_layers:
                return Mxfp4EmbeddingMethod(self, prefix or "embed_tokens")
            return None
        if isinstance(layer, MoELayer):
            if is_excluded(prefix, self.exclude_modules, self.packed_modules_mapping):
                return None  # vLLM then uses its unquantized MoE method
            return MOE_METHODS[self.act_dtype](self, layer.moe_config, prefix)
        return None

    def _lm_head_method(self, prefix: str) -> QuantizeMethodBase | None:
        from ..methods.linear import LINEAR_METHODS

        if ("embed_tokens" in self.spec.vocab_layers and not self._embedding_built
                and is_first_pipeline_rank()):
            # Models build their input embedding before the head (on the first pipeline stage);
            # this one built it without the quantization config, so vLLM would load the MXFP4
            # bytes as numbers.
            raise ValueError(
                f"w4a8_mxfp4: the checkpoint stores embed_tokens as MXFP4 ({VOCAB_LAYERS_KEY}), "
                "but this model's vLLM implementation builds its input embedding without the "
                "quantization config, so it cannot load it. Re-export with --quantize-vocab "
                "lm_head only."
            )
        if "lm_head" not in self.spec.vocab_layers:
            return None
        return LINEAR_METHODS[self.act_dtype](self, prefix)
