"""The dequantize MoE fallback against an independent per-expert reference loop."""

from __future__ import annotations


import pytest
import torch

from reference_model import exact_experts_forward
from w4a8_backend.formats import (
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    quantize_mxfp4,
)
from w4a8_backend.kernels.moe_base import MoEKernelConfig
from w4a8_backend.kernels.moe_fallback import DequantFallbackMoEKernel

SCHEMES = [
    (ActivationDtype.FP8_E4M3, ActivationScheme.STATIC_PER_TENSOR),
    (ActivationDtype.FP8_E4M3, ActivationScheme.DYNAMIC_PER_TENSOR),
    (ActivationDtype.FP8_E4M3, ActivationScheme.DYNAMIC_PER_TOKEN),
    (ActivationDtype.INT8, ActivationScheme.STATIC_PER_TENSOR),
    (ActivationDtype.INT8, ActivationScheme.DYNAMIC_PER_TOKEN),
]


def _layer(num_experts, hidden, inter, gen, static):
    layer = torch.nn.Module()
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * torch.logspace(
        -2, 1, 2 * inter)[None, :, None]
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.3
    for name, w in (("w13", w13), ("w2", w2)):
        packed, scale = quantize_mxfp4(w)
        layer.register_parameter(f"{name}_weight", torch.nn.Parameter(packed, requires_grad=False))
        layer.register_parameter(f"{name}_weight_scale",
                                 torch.nn.Parameter(scale, requires_grad=False))
    layer.w13_input_scale = torch.tensor([0.02]) if static else None
    layer.w2_input_scale = torch.tensor([0.05]) if static else None
    return layer


def _reference(layer, x, topk_ids, topk_weights, act, scheme, inter):
    weights = {}
    for e in range(layer.w13_weight.shape[0]):
        w13 = dequantize_mxfp4(layer.w13_weight[e], layer.w13_weight_scale[e])
        weights[(e, "gate")], weights[(e, "up")] = w13[:inter], w13[inter:]
        weights[(e, "down")] = dequantize_mxfp4(layer.w2_weight[e], layer.w2_weight_scale[e])
    forward = exact_experts_forward(weights, act, (scheme, scheme),
                                    (layer.w13_input_scale, layer.w2_input_scale))
    return forward(None, x, topk_ids, topk_weights).float()


@pytest.mark.parametrize("act,scheme", SCHEMES, ids=[f"{a.name}-{s.name}" for a, s in SCHEMES])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("path", ["routed_pairs", "all_experts"])
def test_fallback_moe_matches_per_expert_loop(act, scheme, top_k, path):
    gen = torch.Generator().manual_seed(1000 * top_k + int(act) * 10 + int(scheme))
    num_experts, hidden, inter, tokens = 6, 64, 96, 11
    static = scheme == ActivationScheme.STATIC_PER_TENSOR
    layer = _layer(num_experts, hidden, inter, gen, static)
    x = torch.randn(tokens, hidden, generator=gen)
    # Route only to experts 0..3: experts 4 and 5 receive no tokens.
    scores = torch.rand(tokens, 4, generator=gen)
    topk_weights, topk_ids = scores.softmax(-1).topk(top_k, dim=-1)
    reference = _reference(layer, x, topk_ids, topk_weights, act, scheme, inter)

    config = MoEKernelConfig(act, scheme, scheme, num_experts, hidden, inter, top_k, "silu",
                             torch.float32)
    kernel = DequantFallbackMoEKernel(config)
    kernel.process_weights_after_loading(layer)
    if path == "routed_pairs":
        out = kernel.apply(layer, x, topk_weights, topk_ids, None, False)
    else:  # the accelerator path (no host sync), run here on CPU tensors
        from w4a8_backend.kernels.moe_fallback import _codes, _scale_for

        s1 = _scale_for(x, act, scheme, layer.w13_input_scale)
        codes = _codes(x, act, s1, torch.float32)
        out = kernel.all_experts(codes, s1, topk_ids.long(), topk_weights.float(),
                                 layer.w13_weight, layer.w2_weight, layer)
    rel = (out.float() - reference).norm() / reference.norm()
    # Both sides quantize identical values; a different fp32 summation order can still move an
    # intermediate value across an FP8/INT8 rounding boundary (one code: ~1e-4 relative here).
    assert rel < 1e-3, f"relative error {rel:.2e}"


def test_expert_parallel_map_drops_remote_experts():
    """Under EP, pairs routed to experts of other ranks (expert_map -> -1) contribute nothing."""
    gen = torch.Generator().manual_seed(7)
    act, scheme = ActivationDtype.FP8_E4M3, ActivationScheme.STATIC_PER_TENSOR
    layer = _layer(2, 64, 64, gen, static=True)
    x = torch.randn(5, 64, generator=gen)
    topk_ids = torch.tensor([[0, 3], [1, 2], [2, 3], [3, 0], [1, 0]])
    topk_weights = torch.rand(5, 2, generator=gen)
    expert_map = torch.tensor([-1, -1, 0, 1])  # this rank holds global experts 2 and 3
    local_ids = expert_map[topk_ids]
    keep = local_ids >= 0
    reference = _reference(layer, x, local_ids.clamp(min=0), topk_weights * keep, act, scheme, 64)
    config = MoEKernelConfig(act, scheme, scheme, 2, 64, 64, 2, "silu", torch.float32,
                             num_global_experts=4)
    kernel = DequantFallbackMoEKernel(config)
    kernel.process_weights_after_loading(layer)
    out = kernel.apply(layer, x, topk_weights, topk_ids, expert_map, False)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)


def test_non_silu_activation_is_refused_with_reason():
    config = MoEKernelConfig(ActivationDtype.FP8_E4M3, ActivationScheme.STATIC_PER_TENSOR,
                             ActivationScheme.STATIC_PER_TENSOR, 2, 64, 64, 2, "gelu",
                             torch.bfloat16)
    ok, reason = DequantFallbackMoEKernel.can_implement(config)
    assert not ok and "gelu" in reason


def test_fallback_moe_compiles_without_graph_breaks():
    """vLLM compiles the model on CPU too: the routed-pairs path is one opaque custom op."""
    gen = torch.Generator().manual_seed(3)
    act, scheme = ActivationDtype.INT8, ActivationScheme.DYNAMIC_PER_TOKEN
    layer = _layer(4, 64, 64, gen, static=False)
    config = MoEKernelConfig(act, scheme, scheme, 4, 64, 64, 2, "silu", torch.float32)
    kernel = DequantFallbackMoEKernel(config)
    kernel.process_weights_after_loading(layer)
    torch.library.opcheck(
        torch.ops.w4a8_backend.moe_fallback_routed_pairs,
        (torch.randn(5, 64).round(), torch.rand(5, 1) + 0.1, torch.randint(0, 4, (5, 2)),
         torch.rand(5, 2), layer.w13_weight, layer.w2_weight, torch.empty(0), int(act),
         int(scheme)),
    )
    compiled = torch.compile(
        lambda x, w, ids: kernel.apply(layer, x, w, ids, None, False), fullgraph=True,
        dynamic=True)
    for tokens in (3, 9):
        x = torch.randn(tokens, 64, generator=gen)
        weights, ids = torch.rand(tokens, 4, generator=gen).softmax(-1).topk(2, dim=-1)
        assert torch.equal(compiled(x, weights, ids), kernel.apply(layer, x, weights, ids, None,
                                                                   False))
