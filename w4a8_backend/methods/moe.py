"""vLLM MoE methods for W4A8 MXFP4 experts: ``Mxfp4Fp8MoEMethod`` and ``Mxfp4Int8MoEMethod``.

ModelOpt exports one 2-D linear per expert (Qwen3-MoE ``mlp.experts.E.{gate,up,down}_proj``,
Mixtral ``block_sparse_moe.experts.E.{w1,w3,w2}``); the model's expert-parameter mapping routes
them into the fused parameters below, and vLLM's MoE loader splits the intermediate dimension
across tensor-parallel ranks and keeps only this rank's experts under expert parallelism.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from ..config.compat import FusedMoEMethodBase, FusedMoeWeightScaleSupported, set_weight_attrs
from ..formats import BLOCK_SIZE, DEFAULT_DYNAMIC_SCHEME, ActivationDtype, ActivationScheme
from ..kernels import DeviceInfo
from ..kernels.dispatch import choose_moe_kernel
from ..kernels.moe_base import MoEKernelConfig, Mxfp4MoEKernel
from .linear import FLOAT_SCALE_DTYPES, check_scales_not_nan, served_input_scale
from .loading import check_checkpoint_tensor

if TYPE_CHECKING:
    from ..config.config import W4A8Mxfp4Config

SHARD_NAMES = {"w1": "gate (w1)", "w3": "up (w3)", "w2": "down (w2)"}


class _ExpertLoadTracker:
    """Which (expert, shard) pairs of each parameter arrived, and checked loading."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.loaded: dict[str, set[tuple[int, str]]] = {}

    def wrap(self, inner, param_name: str, dtypes, trailing_dim: int | None):
        self.loaded[param_name] = set()

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            where = (
                f"for {self.prefix}: expert {expert_id} {SHARD_NAMES.get(shard_id, shard_id)} "
                f"{param_name.split('_', 1)[1]} ({weight_name})"
            )
            check_checkpoint_tensor(loaded_weight, where, dtypes, trailing_dim,
                                    scalar=trailing_dim is None, ndims=(2, 3))
            try:
                loaded = inner(param, loaded_weight, weight_name, shard_id, expert_id,
                               return_success=True)
            except (AssertionError, RuntimeError) as exc:
                raise ValueError(
                    f"w4a8_mxfp4: checkpoint tensor {where} of shape "
                    f"{tuple(loaded_weight.shape)} does not fit the layer's parameter of shape "
                    f"{tuple(param.shape)}: {exc}"
                ) from None
            if loaded:
                self.loaded[param_name].add((expert_id, shard_id))
            return loaded if return_success else None

        return load

    def require_complete(self, param_name: str, shards: tuple[str, ...], num_experts: int):
        arrived = self.loaded[param_name]
        experts = {e for e, _ in arrived}
        if len(experts) == num_experts and all((e, s) in arrived for e in experts for s in shards):
            return
        missing = sorted(
            f"expert {e} {s}" for e in experts for s in shards if (e, s) not in arrived
        )
        raise ValueError(
            f"w4a8_mxfp4: {self.prefix}.{param_name} is incomplete: {len(experts)} of "
            f"{num_experts} local experts arrived" + (f"; missing {missing[:8]}" if missing else "")
        )

    def input_scale_state(self, param_name: str, num_experts: int) -> str:
        experts = {e for e, _ in self.loaded[param_name]}
        if not experts:
            return "dynamic"
        if len(experts) == num_experts:
            return "static"
        raise ValueError(
            f"w4a8_mxfp4: {self.prefix}.{param_name}: input_scale arrived for {len(experts)} of "
            f"{num_experts} local experts; a layer's experts must all be calibrated or all dynamic"
        )


class Mxfp4MoEMethodBase(FusedMoEMethodBase):
    act_dtype: ClassVar[ActivationDtype]

    def __init__(self, quant_config: W4A8Mxfp4Config, moe_config, prefix: str):
        super().__init__(moe_config)
        self.quant_config = quant_config
        self.prefix = prefix
        self.tracker = _ExpertLoadTracker(prefix)
        self.kernel: Mxfp4MoEKernel | None = None

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        tp_size = self.moe.moe_parallel_config.tp_size
        hidden, inter = hidden_size, intermediate_size_per_partition
        if hidden % BLOCK_SIZE:
            raise ValueError(
                f"w4a8_mxfp4: MoE layer {self.prefix!r} has hidden size {hidden}; MXFP4 needs a "
                f"multiple of {BLOCK_SIZE}"
            )
        if inter % BLOCK_SIZE:
            raise ValueError(
                f"w4a8_mxfp4: MoE layer {self.prefix!r} has {inter} intermediate features per "
                f"tensor-parallel rank ({inter * tp_size} in total, split {tp_size} ways); MXFP4 "
                f"needs a multiple of {BLOCK_SIZE} per rank. Choose a tensor-parallel size that "
                f"keeps each share a multiple of {BLOCK_SIZE}, or use expert parallelism."
            )
        if not self.moe.is_act_and_mul:
            raise ValueError(
                f"w4a8_mxfp4: MoE layer {self.prefix!r} uses a non-gated activation; only gated "
                "experts (w13 = [gate; up]) are supported"
            )
        loader = extra_weight_attrs.pop("weight_loader")
        group = {"quant_method": FusedMoeWeightScaleSupported.GROUP.value}
        full_inter = inter * tp_size
        specs = {
            # name: (shape, dtype, trailing dim of the checkpoint tensor, extra attrs)
            "w13_weight": ((num_experts, 2 * inter, hidden // 2), torch.uint8, hidden // 2, {}),
            "w13_weight_scale": (
                (num_experts, 2 * inter, hidden // BLOCK_SIZE), torch.uint8,
                hidden // BLOCK_SIZE, group,
            ),
            "w2_weight": ((num_experts, hidden, inter // 2), torch.uint8, full_inter // 2, {}),
            "w2_weight_scale": (
                (num_experts, hidden, inter // BLOCK_SIZE), torch.uint8,
                full_inter // BLOCK_SIZE, group,
            ),
            "w13_input_scale": ((num_experts,), torch.float32, None, {}),
            "w2_input_scale": ((num_experts,), torch.float32, None, {}),
        }
        for name, (shape, dtype, trailing, attrs) in specs.items():
            init = torch.ones if dtype == torch.float32 else torch.empty
            param = torch.nn.Parameter(init(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            dtypes = FLOAT_SCALE_DTYPES if dtype == torch.float32 else (torch.uint8,)
            set_weight_attrs(param, {**extra_weight_attrs, **attrs,
                                     "weight_loader": self.tracker.wrap(loader, name, dtypes,
                                                                        trailing)})
        layer.w4a8_out_dtype = params_dtype

    def _input_scale(self, layer: torch.nn.Module, name: str) -> tuple[ActivationScheme, object]:
        param = getattr(layer, name)
        state = self.tracker.input_scale_state(name, param.shape[0])
        delattr(layer, name)
        if state == "static":
            scale = served_input_scale(
                param.data, self.quant_config.spec.checkpoint_activation, self.act_dtype
            )
            return ActivationScheme.STATIC_PER_TENSOR, torch.nn.Parameter(scale, requires_grad=False)
        forced = self.quant_config.forced_dynamic_scheme
        return (forced if forced is not None else DEFAULT_DYNAMIC_SCHEME[self.act_dtype]), None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        num_experts = layer.w13_weight.shape[0]
        for name, shards in (("w13_weight", ("w1", "w3")), ("w13_weight_scale", ("w1", "w3")),
                             ("w2_weight", ("w2",)), ("w2_weight_scale", ("w2",))):
            self.tracker.require_complete(name, shards, num_experts)
        for name in ("w13_weight_scale", "w2_weight_scale"):
            check_scales_not_nan(getattr(layer, name).data, f"{self.prefix}.{name}")
        w13_scheme, layer.w13_input_scale = self._input_scale(layer, "w13_input_scale")
        w2_scheme, layer.w2_input_scale = self._input_scale(layer, "w2_input_scale")

        config = MoEKernelConfig(
            act_dtype=self.act_dtype,
            w13_scheme=w13_scheme,
            w2_scheme=w2_scheme,
            num_local_experts=num_experts,
            num_global_experts=self.moe.num_experts,
            hidden_size=layer.w13_weight.shape[2] * 2,
            intermediate_size=layer.w2_weight.shape[2] * 2,
            top_k=self.moe.experts_per_token,
            activation=getattr(self.moe.activation, "value", str(self.moe.activation)),
            out_dtype=layer.w4a8_out_dtype,
        )
        kernel_cls = choose_moe_kernel(config, DeviceInfo.of(layer.w13_weight.device))
        self.kernel = kernel_cls(config)
        self.kernel.process_weights_after_loading(layer)

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        # The plugin's MoE kernels are not vLLM modular kernels: nothing to describe to vLLM.
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input=None,
    ) -> torch.Tensor:
        # Shared experts (if any) are run by vLLM's MoE runner: without a vLLM modular kernel
        # this method cannot overlap them, so the runner runs them before calling here.
        return self.kernel.apply(
            layer, x, topk_weights, topk_ids, layer.expert_map, layer.apply_router_weight_on_input
        )


class Mxfp4Fp8MoEMethod(Mxfp4MoEMethodBase):
    """MXFP4 experts × FP8 E4M3 activations."""

    act_dtype = ActivationDtype.FP8_E4M3


class Mxfp4Int8MoEMethod(Mxfp4MoEMethodBase):
    """MXFP4 experts × INT8 activations (this project's W4A8_MXFP4_INT8 format)."""

    act_dtype = ActivationDtype.INT8


MOE_METHODS = {
    ActivationDtype.FP8_E4M3: Mxfp4Fp8MoEMethod,
    ActivationDtype.INT8: Mxfp4Int8MoEMethod,
}
