"""vLLM linear methods for W4A8 MXFP4: ``Mxfp4Fp8LinearMethod`` and ``Mxfp4Int8LinearMethod``.

Per layer the checkpoint holds (DESIGN.md §2): ``weight`` uint8 ``[out, in/2]``, ``weight_scale``
uint8 E8M0 ``[out, in/32]`` and optionally ``input_scale`` float32 scalar (static activations).
Fused layers (QKV, gate-up) get one input-scale slot per shard; the served scale is their max.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..config.compat import (
    GroupQuantScaleParameter,
    LinearMethodBase,
    ModelWeightParameter,
    PerTensorScaleParameter,
    register_weight_loader_v2_supported_method,
)
from ..formats import (
    BLOCK_SIZE,
    DEFAULT_DYNAMIC_SCHEME,
    E8M0_NAN,
    ActivationDtype,
    ActivationScheme,
)
from ..formats.activations import QMAX
from ..kernels import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel, choose_linear_kernel
from .loading import (
    checked_loader,
    checkpoint_tensor_name,
    loaded_shards,
    require_loaded,
    track_loading,
)

if TYPE_CHECKING:
    from ..config.config import W4A8Mxfp4Config

FLOAT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_in_features(prefix: str, in_features: int, full_in_features: int) -> None:
    if in_features % BLOCK_SIZE:
        tp = full_in_features // in_features if in_features else 0
        raise ValueError(
            f"w4a8_mxfp4: layer {prefix!r} has {in_features} input features per tensor-parallel "
            f"rank ({full_in_features} in total, split {tp} ways); MXFP4 needs a multiple of "
            f"{BLOCK_SIZE}. Use a tensor-parallel size that keeps each rank's share a multiple "
            f"of {BLOCK_SIZE}, or exclude the layer from quantization."
        )


def check_scales_not_nan(scale: torch.Tensor, tensor_name: str) -> None:
    nan_blocks = scale == E8M0_NAN
    if bool(nan_blocks.any()):
        first = tuple(int(i) for i in nan_blocks.nonzero()[0])
        raise ValueError(
            f"w4a8_mxfp4: checkpoint tensor {tensor_name} holds {int(nan_blocks.sum())} E8M0 "
            f"NaN scale(s) (0xFF), first at index {first}; the checkpoint is corrupt"
        )


def served_input_scale(
    stored: torch.Tensor, checkpoint_act: ActivationDtype, served_act: ActivationDtype
) -> torch.Tensor:
    """Convert a calibrated scale (amax / qmax) to the served activation dtype's qmax."""
    amax = stored.float().amax().reshape(1) * QMAX[checkpoint_act]
    return amax / QMAX[served_act]


class Mxfp4LinearMethodBase(LinearMethodBase):
    act_dtype: ClassVar[ActivationDtype]

    def __init__(self, quant_config: W4A8Mxfp4Config, prefix: str):
        self.quant_config = quant_config
        self.prefix = prefix
        self.kernel: Mxfp4LinearKernel | None = None

    def _name(self, suffix: str):
        mapping = self.quant_config.packed_modules_mapping
        return lambda shard: checkpoint_tensor_name(self.prefix, suffix, shard, mapping)

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
        out_features = sum(output_partition_sizes)
        k = input_size_per_partition
        weight = ModelWeightParameter(
            data=torch.empty(out_features, k // 2, dtype=torch.uint8),
            input_dim=1,
            output_dim=0,
            weight_loader=checked_loader(
                loader, self._name("weight"), (torch.uint8,), trailing_dim=input_size // 2
            ),
        )
        weight_scale = GroupQuantScaleParameter(
            data=torch.empty(out_features, k // BLOCK_SIZE, dtype=torch.uint8),
            input_dim=1,
            output_dim=0,
            weight_loader=checked_loader(
                loader,
                self._name("weight_scale"),
                (torch.uint8,),
                trailing_dim=input_size // BLOCK_SIZE,
            ),
        )
        input_scale = PerTensorScaleParameter(
            data=torch.ones(len(output_partition_sizes), dtype=torch.float32),
            weight_loader=checked_loader(
                loader, self._name("input_scale"), FLOAT_SCALE_DTYPES, scalar=True
            ),
        )
        for name, param in (
            ("weight", weight),
            ("weight_scale", weight_scale),
            ("input_scale", input_scale),
        ):
            layer.register_parameter(name, track_loading(param))
        layer.w4a8_num_shards = len(output_partition_sizes)
        layer.w4a8_out_dtype = params_dtype
        layer.w4a8_in_features = k
        layer.w4a8_out_features = out_features

    def _activation_scheme(self, layer: torch.nn.Module) -> ActivationScheme:
        arrived = loaded_shards(layer.input_scale)
        num_shards = layer.w4a8_num_shards
        if None in arrived or len(arrived) >= num_shards:
            return ActivationScheme.STATIC_PER_TENSOR
        if arrived:
            name = self._name("input_scale")
            raise ValueError(
                f"w4a8_mxfp4: checkpoint has {sorted(name(s) for s in arrived)} but not the "
                f"input_scale of every part of the fused layer {self.prefix!r}; its parts must "
                "all be calibrated or all dynamic"
            )
        forced = self.quant_config.forced_dynamic_scheme
        return forced if forced is not None else DEFAULT_DYNAMIC_SCHEME[self.act_dtype]

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        num_shards = layer.w4a8_num_shards
        require_loaded(layer.weight, self._name("weight"), num_shards)
        require_loaded(layer.weight_scale, self._name("weight_scale"), num_shards)
        check_scales_not_nan(layer.weight_scale.data, f"{self.prefix}.weight_scale")

        scheme = self._activation_scheme(layer)
        stored = layer.input_scale.data
        del layer.input_scale
        if scheme == ActivationScheme.STATIC_PER_TENSOR:
            scale = served_input_scale(
                stored, self.quant_config.spec.checkpoint_activation, self.act_dtype
            )
            layer.input_scale = torch.nn.Parameter(scale, requires_grad=False)
        else:
            layer.input_scale = None

        config = LinearKernelConfig(
            act_dtype=self.act_dtype,
            act_scheme=scheme,
            out_features=layer.w4a8_out_features,
            in_features=layer.w4a8_in_features,
            out_dtype=layer.w4a8_out_dtype,
        )
        kernel_cls = choose_linear_kernel(config, DeviceInfo.of(layer.weight.device))
        self.kernel = kernel_cls(config)
        self.kernel.process_weights_after_loading(layer)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.kernel.apply(layer, x, bias)


@register_weight_loader_v2_supported_method
class Mxfp4Fp8LinearMethod(Mxfp4LinearMethodBase):
    """MXFP4 weights × FP8 E4M3 activations."""

    act_dtype = ActivationDtype.FP8_E4M3


@register_weight_loader_v2_supported_method
class Mxfp4Int8LinearMethod(Mxfp4LinearMethodBase):
    """MXFP4 weights × INT8 activations (this project's W4A8_MXFP4_INT8 format)."""

    act_dtype = ActivationDtype.INT8


LINEAR_METHODS = {
    ActivationDtype.FP8_E4M3: Mxfp4Fp8LinearMethod,
    ActivationDtype.INT8: Mxfp4Int8LinearMethod,
}
