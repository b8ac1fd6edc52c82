"""Humming's MoE GEMMs composed into an MXFP4 MoE layer: the Humming baseline of bench_moe.py.

humming-kernels 0.1.19 has no MoE layer, only GEMMs that take MoE layouts
(``humming_forward(..., sorted_ids, expert_ids, num_tokens_padded, top_k)`` with
``GemmType.INDEXED``; read from the wheel: humming/forward.py, humming/testing/runner.py). The
layer here is what a user of the wheel would build from its parts, each the fastest the wheel
offers for the step:

1. vLLM's ``moe_align_block_size`` (a CUDA kernel; humming/testing/data.py builds the same
   layout in Python): each expert's routed (token, slot) pairs padded to the M block of
   Humming's tuning config for the call;
2. GEMM1, gate-up, indexed over the pairs (``top_k`` = the router's), input quantized by
   Humming (W4A8: dynamic per-token FP8) or taken as bf16 (W4A16);
3. SiLU-and-mul fused with the intermediate's quantization in one Humming ``process_input``
   launch (``activation_type="binary_split"``: the first half of a row is the gate, the second
   the up projection, as in vLLM's w13);
4. GEMM2, down, indexed over the pairs with ``top_k`` = 1;
5. the router-weighted top-k sum, one batched matmul in torch.

Tuning configs come from Humming's heuristics for the routed row count (``shape_m`` = pairs,
as its test runner passes for indexed GEMMs); the alignment uses each config's M block.
Needs vLLM (for the alignment kernel) and humming-kernels on an SM80+ GPU.
"""

from __future__ import annotations

import torch

# Humming's activation hook takes a C expression of (gate, up)
SILU_AND_MUL = "a / (1.0f + expf(-a)) * b"
INDEXED = {"gemm_type": "indexed"}
# input configs of the two variants (the dense bench_linear columns use the same)
VARIANTS = {
    "Humming W4A8 MoE": {"quant_method": "humming", "dtype": "float8e4m3"},
    "Humming W4A16 MoE": None,
}


def _experts(packed: torch.Tensor, scale: torch.Tensor, input_config):
    """One Humming layer over stacked MXFP4 experts: ``packed`` [E, N, K/2] E2M1 codes,
    ``scale`` [E, N, K/32] E8M0 bytes."""
    from humming.layer import HummingLayer

    e, n, k = packed.shape[0], packed.shape[1], packed.shape[2] * 2
    kw = {} if input_config is None else {"input_config": dict(input_config)}
    # bf16 activations: Humming's SM90 heuristics need N in whole 128-wide wgmma groups
    # (AssertionError in build_sm90_seed_config at gpt-oss-20b's N = 2880, H100 2026-11-25),
    # so its own N padding is asked for
    pad_n = 128 if input_config is None else 1
    layer = HummingLayer(shape_n=n, shape_k=k, weight_config={"quant_method": "mxfp4"},
                         num_experts=e, pad_n_to_multiple=pad_n, torch_dtype=torch.bfloat16,
                         **kw).to(packed.device)
    layer.load_from_tensors({"weight": packed, "weight_scale": scale})
    layer.transform()
    return layer


class HummingMoE:
    """``__call__(x [T, H] bf16, topk_weights [T, k], topk_ids [T, k]) -> [T, H] bf16``."""

    def __init__(self, w13_packed, w13_scale, w2_packed, w2_scale, input_config):
        from vllm.model_executor.layers.fused_moe.moe_align_block_size import (
            moe_align_block_size,
        )

        self._align = moe_align_block_size
        self.experts = w13_packed.shape[0]
        self.w13 = _experts(w13_packed, w13_scale, input_config)
        self.w2 = _experts(w2_packed, w2_scale, input_config)
        self._configs = {}

    def _tuning(self, layer, pairs):
        from humming.tune import get_heuristics_config

        key = (id(layer), pairs)
        if key not in self._configs:
            tc = get_heuristics_config(layer.humming_config, shape_m=pairs, gemm_type="indexed")
            if not isinstance(tc, dict) or "block_shape" not in tc:
                raise RuntimeError(f"Humming's heuristics gave no single indexed config for "
                                   f"{pairs} routed rows: {tc!r}")
            self._configs[key] = tc
        return self._configs[key]

    def _gemm(self, layer, inputs, input_scale, topk_ids, top_k, aligned):
        """``aligned``: block size -> the alignment of ``topk_ids``, shared by both GEMMs of a
        call (the sorted pair ids are the same; GEMM1 reads input row pair // top_k, GEMM2
        row pair)."""
        tc = self._tuning(layer, topk_ids.numel())
        block = tc["block_shape"][0]
        if block not in aligned:
            aligned[block] = self._align(topk_ids, block, self.experts)
        sorted_ids, expert_ids, padded = aligned[block]
        return layer(inputs, input_scale=input_scale, sorted_ids=sorted_ids,
                     expert_ids=expert_ids, num_tokens_padded=padded, top_k=top_k,
                     compute_config=INDEXED, tuning_config=tc)

    def __call__(self, x, topk_weights, topk_ids):
        from humming.forward import may_process_input

        t, k = topk_ids.shape
        aligned = {}
        x_in, _, x_scale = may_process_input(self.w13.humming_config, x)
        h = self._gemm(self.w13, x_in, x_scale, topk_ids, k, aligned)  # [pairs, 2I], pair order
        a, _, a_scale = may_process_input(self.w2.humming_config, h,
                                          activation_type="binary_split",
                                          activation_impl=SILU_AND_MUL)
        y = self._gemm(self.w2, a, a_scale, topk_ids, 1, aligned)  # [pairs, H]
        return torch.bmm(topk_weights.to(y.dtype).unsqueeze(1), y.view(t, k, -1)).squeeze(1)
