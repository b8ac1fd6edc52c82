"""The one place that knows where vLLM 0.26 … 0.33 keep the things this plugin uses.

Everything else imports from here, so version differences never spread through the code.
"""

from __future__ import annotations

import importlib
from typing import Any
import vllm

VLLM_VERSION = vllm.__version__


def _first(*candidates: tuple[str, str]) -> Any:
    errors = []
    for module, attr in candidates:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{module}.{attr}: {exc}")
    raise ImportError(
        f"w4a8_mxfp4 does not know where vLLM {VLLM_VERSION} keeps "
        f"{candidates[0][1]} (tried {'; '.join(errors)})"
    )


from vllm.model_executor.layers.linear import (  # noqa: E402
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config  # noqa: E402
from vllm.model_executor.layers.quantization.base_config import (  # noqa: E402
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod  # noqa: E402
from vllm.model_executor.parameter import (  # noqa: E402
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from vllm.model_executor.layers.fused_moe import (  # noqa: E402
    FusedMoEMethodBase,
    FusedMoeWeightScaleSupported,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.utils import set_weight_attrs  # noqa: E402

# The MoE layer that owns expert weights: RoutedExperts since 0.26's MoE refactor, FusedMoE before.
MoELayer = _first(
    ("vllm.model_executor.layers.fused_moe", "RoutedExperts"),
    ("vllm.model_executor.layers.fused_moe", "FusedMoE"),
)

# 0.32+: vllm.model_executor.layers.attention; earlier: vllm.attention.layer.
Attention = _first(
    ("vllm.model_executor.layers.attention", "Attention"),
    ("vllm.attention.layer", "Attention"),
    ("vllm.attention", "Attention"),
)
try:
    MLAAttention = _first(
        ("vllm.model_executor.layers.attention", "MLAAttention"),
        ("vllm.attention.layer", "MLAAttention"),
    )
except ImportError:  # versions without a separate MLA layer class
    MLAAttention = Attention
ATTENTION_LAYERS = (Attention, MLAAttention)


_BERT_PREFIX_AS_BUILT = ".attention.output.qkv_proj"
_BERT_PREFIX_ON_DISK = ".attention.self.qkv_proj"


def layer_module_path(layer: Any, prefix: str) -> str:
    """The module path checkpoint names refer to, for the ``prefix`` vLLM hands a layer.

    vLLM 0.32's BertAttention (the same line is in code derived from older vLLM) builds its
    BertSelfAttention with ``prefix=f"{prefix}.output"``, so the fused QKV layer that lives (and
    loads its weights) at
    ``…attention.self.qkv_proj`` is announced as ``…attention.output.qkv_proj``. Exclusions and
    error messages must use where the layer really is.
    """
    if isinstance(layer, QKVParallelLinear) and prefix.endswith(_BERT_PREFIX_AS_BUILT):
        return prefix[: -len(_BERT_PREFIX_AS_BUILT)] + _BERT_PREFIX_ON_DISK
    return prefix


def is_first_pipeline_rank() -> bool:
    """Whether this process holds the model's first pipeline stage (the input embedding); True
    when no pipeline group exists (a model built outside an engine)."""
    from vllm.distributed.parallel_state import get_pp_group, model_parallel_is_initialized

    return not model_parallel_is_initialized() or get_pp_group().is_first_rank


def add_compile_cache_factor(key: str, value: Any) -> bool:
    """Put ``value`` into vLLM's torch.compile cache key; False where that is not possible.

    The plugin's settings (activation dtype and scheme, forced kernel) are constants of the
    compiled graph, but vLLM hashes only the quantization method's *name* (``quant_config`` is
    skipped in ``VllmConfig.compute_hash``, 0.26-0.33): a graph compiled for FP8 activations was
    loaded from the cache for an INT8 run of the same checkpoint and served garbage. The
    ``additional_config`` dict is part of that hash in every supported version, and the worker's
    config is the current one while the model (and so each quant method) is built, before the
    first compile computes the hash.
    """
    from vllm.config import get_current_vllm_config_or_none

    config = get_current_vllm_config_or_none()
    extra = getattr(config, "additional_config", None)
    if not isinstance(extra, dict):
        return False
    extra[key] = value
    return True


__all__ = [
    "add_compile_cache_factor",
    "is_first_pipeline_rank",
    "ATTENTION_LAYERS",
    "VLLM_VERSION",
    "BaseKVCacheMethod",
    "FusedMoEMethodBase",
    "FusedMoeWeightScaleSupported",
    "GroupQuantScaleParameter",
    "LinearBase",
    "LinearMethodBase",
    "MoELayer",
    "ModelWeightParameter",
    "ParallelLMHead",
    "PerTensorScaleParameter",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "QKVParallelLinear",
    "UnquantizedLinearMethod",
    "VocabParallelEmbedding",
    "layer_module_path",
    "register_quantization_config",
    "register_weight_loader_v2_supported_method",
    "set_weight_attrs",
]
