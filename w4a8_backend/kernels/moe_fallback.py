"""Dequantize-to-dense MoE fallback: any device, CPU included.

Expert weights are decoded once at load (float32 on CPU, bfloat16 elsewhere; exact in both).
Activations are quantized exactly as the format defines (``moe_base`` docstring) and the codes
are multiplied densely. On CPU only the routed (token, expert) pairs are computed, grouped by
expert; on accelerators every local expert runs on every token with non-routed pairs masked out,
which needs no host synchronisation and so stays CUDA-graph safe (slow for many experts: the
GPU MoE kernels exist for speed).
"""

from __future__ import annotations

import torch

from ..formats import ActivationScheme, dequantize_mxfp4, dynamic_scale
from ..formats.activations import quantize_fp8, quantize_int8
from ..formats.modes import ActivationDtype
from .base import DeviceInfo, Verdict
from .fallback import compute_dtype_for
from .moe_base import MoEKernelConfig, Mxfp4MoEKernel

SUPPORTED_ACTIVATIONS = ("silu",)


def _scale_for(x: torch.Tensor, act: ActivationDtype, scheme: ActivationScheme,
               static: torch.Tensor | None) -> torch.Tensor:
    if scheme == ActivationScheme.STATIC_PER_TENSOR:
        return static.float().reshape(1)
    return dynamic_scale(x, act, per_token=scheme == ActivationScheme.DYNAMIC_PER_TOKEN)


def _codes(x: torch.Tensor, act: ActivationDtype, scale: torch.Tensor, dtype: torch.dtype):
    quantize = quantize_fp8 if act == ActivationDtype.FP8_E4M3 else quantize_int8
    return quantize(x, scale).to(dtype)


def _gemm1(rows: torch.Tensor, rows_scale: torch.Tensor, w13_e: torch.Tensor) -> torch.Tensor:
    gate_up = torch.nn.functional.linear(rows.float(), w13_e) * rows_scale
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# The routed-pairs path sizes its work from the routing (host sync, data-dependent shapes), so it
# is one opaque op for torch.compile: vLLM compiles the model on CPU too.
@torch.library.custom_op("w4a8_backend::moe_fallback_routed_pairs", mutates_args=())
def routed_pairs(
    x_codes: torch.Tensor,
    s1: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w2_static_scale: torch.Tensor,
    act: int,
    w2_scheme: int,
) -> torch.Tensor:
    """Only the routed (token, expert) pairs, grouped by local expert; float32 ``[T, H]``.
    ``w2_static_scale`` is the static GEMM2 input scale, or empty for a dynamic scheme."""
    act_dtype, scheme = ActivationDtype(act), ActivationScheme(w2_scheme)
    num_experts, hidden, inter = w13.shape[0], w2.shape[1], w2.shape[2]
    flat_ids = local_ids.reshape(-1)
    token_of_pair = torch.arange(x_codes.shape[0], device=x_codes.device).repeat_interleave(
        local_ids.shape[1])
    keep = flat_ids >= 0
    flat_ids, token_of_pair = flat_ids[keep], token_of_pair[keep]
    pair_weights = weights.reshape(-1)[keep]
    order = torch.argsort(flat_ids, stable=True)
    flat_ids, token_of_pair, pair_weights = flat_ids[order], token_of_pair[order], pair_weights[order]
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()

    per_token_s1 = s1.shape[0] > 1
    hidden_rows = []
    start = 0
    for expert, count in enumerate(counts):
        rows = token_of_pair[start:start + count]
        rows_scale = s1[rows] if per_token_s1 else s1
        hidden_rows.append(_gemm1(x_codes[rows], rows_scale, w13[expert]))
        start += count
    h = torch.cat(hidden_rows) if hidden_rows else x_codes.new_zeros(0, inter).float()

    s2 = _scale_for(h, act_dtype, scheme, w2_static_scale)
    h_codes = _codes(h, act_dtype, s2, w2.dtype)
    out = torch.zeros(x_codes.shape[0], hidden, dtype=torch.float32, device=x_codes.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            sl = slice(start, start + count)
            pair_scale = s2[sl] if s2.shape[0] > 1 else s2
            y = torch.nn.functional.linear(h_codes[sl], w2[expert]).float() * pair_scale
            out.index_add_(0, token_of_pair[sl], y * pair_weights[sl, None])
        start += count
    return out


@routed_pairs.register_fake
def _(x_codes, s1, local_ids, weights, w13, w2, w2_static_scale, act, w2_scheme):
    return x_codes.new_empty((x_codes.shape[0], w2.shape[1]), dtype=torch.float32)


class DequantFallbackMoEKernel(Mxfp4MoEKernel):
    name = "fallback"

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        return True, None

    @classmethod
    def can_implement(cls, config: MoEKernelConfig) -> Verdict:
        if config.activation not in SUPPORTED_ACTIVATIONS:
            return False, (
                f"MoE activation {config.activation!r} is not implemented (supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # w13 is decoded to float32 on every device: GEMM1's output is quantized again for GEMM2,
        # and a bf16-rounded product would move many of those roundings. Decoding it once here
        # keeps the per-call path free of weight up-casts.
        dtypes = {"w13": torch.float32, "w2": compute_dtype_for(layer.w13_weight.device)}
        for name, dtype in dtypes.items():
            packed = getattr(layer, f"{name}_weight").data
            dense = dequantize_mxfp4(packed, getattr(layer, f"{name}_weight_scale").data, dtype)
            setattr(layer, f"{name}_weight", torch.nn.Parameter(dense, requires_grad=False))
            delattr(layer, f"{name}_weight_scale")

    def apply(self, layer, x, topk_weights, topk_ids, expert_map, apply_router_weight_on_input):
        cfg = self.config
        w13, w2 = layer.w13_weight, layer.w2_weight
        local_ids = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()]
        weights = topk_weights.float()
        if apply_router_weight_on_input:
            # vLLM allows this only for top_k == 1: scale the input instead of the output.
            x = x * topk_weights.to(x.dtype)
            weights = torch.ones_like(weights)

        s1 = _scale_for(x, cfg.act_dtype, cfg.w13_scheme, layer.w13_input_scale)
        x_codes = _codes(x, cfg.act_dtype, s1, torch.float32)
        if x.device.type == "cpu":
            w2_static = layer.w2_input_scale
            out = routed_pairs(
                x_codes, s1, local_ids, weights, w13, w2,
                w2_static if w2_static is not None else s1.new_empty(0),
                int(cfg.act_dtype), int(cfg.w2_scheme),
            )
        else:
            out = self.all_experts(x_codes, s1, local_ids, weights, w13, w2, layer)
        return out.to(cfg.out_dtype)

    def all_experts(self, x_codes, s1, local_ids, weights, w13, w2, layer):
        cfg = self.config
        experts = torch.arange(cfg.num_local_experts, device=x_codes.device)
        routed = local_ids.unsqueeze(0) == experts[:, None, None]  # [E, T, k]
        combine = (routed * weights.unsqueeze(0)).sum(-1)  # [E, T]
        is_routed = routed.any(-1)  # [E, T]
        h = torch.stack([_gemm1(x_codes, s1, w13[e]) for e in range(cfg.num_local_experts)])
        h = h * is_routed.unsqueeze(-1)  # non-routed pairs must not enter a dynamic amax
        flat = h.reshape(-1, cfg.intermediate_size)
        s2 = _scale_for(flat, cfg.act_dtype, cfg.w2_scheme, layer.w2_input_scale)
        h_codes = _codes(flat, cfg.act_dtype, s2, w2.dtype).reshape(h.shape)
        s2 = s2.reshape(cfg.num_local_experts, -1, 1) if s2.shape[0] > 1 else s2
        y = torch.einsum("eti,ehi->eth", h_codes, w2).float() * s2
        return (y * combine.unsqueeze(-1)).sum(0)
