"""``Mxfp4EmbeddingMethod``: an input embedding stored as MXFP4 (opt-in, ``w4a8-quantize
--quantize-vocab embed_tokens``).

The checkpoint holds ``weight`` uint8 ``[vocab, hidden/2]`` and ``weight_scale`` uint8 E8M0
``[vocab, hidden/32]``, one MX block per 32 hidden features of a row, like a linear layer's weight
with the vocabulary as its output dimension. A lookup gathers the rows of the ids it is given and
decodes them exactly; no activation is quantized (the embedding has no input activation). The
rows stay in the checkpoint layout: a lookup reads a few rows, so no kernel layout would pay off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config.compat import GroupQuantScaleParameter, ModelWeightParameter, QuantizeMethodBase
from ..formats import BLOCK_SIZE, dequantize_mxfp4, e2m1_table
from .linear import check_in_features, check_scales_not_nan
from .loading import checked_loader, require_loaded, track_loading

if TYPE_CHECKING:
    from ..config.config import W4A8Mxfp4Config


class Mxfp4EmbeddingMethod(QuantizeMethodBase):
    """Exact MXFP4 row lookup for ``VocabParallelEmbedding`` (vocabulary split across ranks)."""

    def __init__(self, quant_config: W4A8Mxfp4Config, prefix: str):
        self.quant_config = quant_config
        self.prefix = prefix

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        check_in_features(self.prefix, input_size_per_partition, input_size)
        loader = extra_weight_attrs["weight_loader"]
        rows, k = sum(output_partition_sizes), input_size_per_partition
        for name, width in (("weight", k // 2), ("weight_scale", k // BLOCK_SIZE)):
            cls = ModelWeightParameter if name == "weight" else GroupQuantScaleParameter
            param = cls(
                data=torch.empty(rows, width, dtype=torch.uint8),
                input_dim=1,
                output_dim=0,
                weight_loader=checked_loader(loader, lambda _shard, n=name: f"{self.prefix}.{n}",
                                             (torch.uint8,), trailing_dim=width),
            )
            layer.register_parameter(name, track_loading(param))
        layer.w4a8_out_dtype = params_dtype

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        for name in ("weight", "weight_scale"):
            require_loaded(getattr(layer, name), lambda _shard, n=name: f"{self.prefix}.{n}", 1)
        check_scales_not_nan(layer.weight_scale.data, f"{self.prefix}.weight_scale")
        # Made here, on the weight's device: inside a CUDA-graph capture it could not be copied.
        layer.w4a8_e2m1_table = e2m1_table(layer.weight.device)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return dequantize_mxfp4(layer.weight[input_], layer.weight_scale[input_],
                                layer.w4a8_out_dtype, layer.w4a8_e2m1_table)

    def apply(self, layer: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(
            f"w4a8_mxfp4: {self.prefix} is an MXFP4 input embedding; it only looks rows up")
