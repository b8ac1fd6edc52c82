"""SM90 / SM89 / SM80 W4A8 MXFP4 MoE backend (Triton grouped expert GEMMs), one custom op per call.

Reuses the dense backend end to end: the expert weights are repacked by
``_sm90_repack.repack_mxfp4`` (exact MXFP4 -> E4M3 / int8 with a per-row reference exponent and
an exact side table for out-of-range blocks) applied to all experts' rows stacked into one
matrix (each expert's gate, up and down rows padded to a multiple of 128 rows, so that expert e
starts at a fixed row); the kernels decode with ``triton_w4a8._load_decoded`` and quantize
activations with ``triton_w4a8._quant_act``. The grouping (routing without a sort, grouped GEMMs
with SiLU-and-mul fused into GEMM1, out-of-range blocks added back in both GEMMs' epilogues,
top-k reduction) is in ``_sm90_moe_triton``.

Activation semantics (``moe_base``): the layer input is quantized once for all experts (static,
dynamic per tensor over the call's tokens, or per token); the intermediate rows of all routed
pairs once (static, dynamic per tensor over the routed pairs, or per pair).

Routing is this module's own (one Triton program per expert scans the ``T * top_k`` ids), not
vLLM's ``moe_align_block_size``: the kernels need no vLLM and the GPU tests run without it. A
token may name an expert several times (vLLM's routers never do); its pairs are all kept.

The module imports without triton (CPU machines): ``is_supported`` then says why it cannot run.
Design and measurements: docs/moe_kernels.md.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..formats import ActivationDtype, ActivationScheme
from . import _sm90_moe_cuda as mc
from ._sm90_repack import N_ALIGN, repack_mxfp4, row_offsets
from .base import DeviceInfo, Verdict
from .moe_base import MoEKernelConfig, Mxfp4MoEKernel
from .sm90_triton import (
    DEFAULT_MAX_CORRECTION,
    MAX_CORRECTION_ENV,
    _cuda_decode_loaded,
    _use_cuda_decode,
    int8_split_enabled,
    split_bytes,
)

logger = logging.getLogger("vllm.w4a8_mxfp4")  # reaches vLLM's handlers (see dispatch.py)

try:  # triton is optional: CPU installs have none
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    _TRITON_ERROR = f"triton is not importable ({exc})"

MIN_CAPABILITY = 80  # INT8 tensor cores
FP8_MIN_CAPABILITY = 89  # E4M3 tensor cores
SUPPORTED_ACTIVATIONS = ("silu",)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
PAD_SCALE = 127  # E8M0 of 1.0 for padding rows: in range in both modes, so never corrected


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def stack_expert_rows(packed: torch.Tensor, scale: torch.Tensor, rows: int):
    """``[E, G, R, K/2]`` / ``[E, G, R, K/32]`` -> ``[E * G * rows, ...]`` with each (expert,
    group) block of R rows padded to ``rows`` (zero codes, unit scales)."""
    r = packed.shape[-2]
    if rows > r:
        packed = torch.nn.functional.pad(packed, (0, 0, 0, rows - r), value=0)
        scale = torch.nn.functional.pad(scale, (0, 0, 0, rows - r), value=PAD_SCALE)
    return (packed.reshape(-1, packed.shape[-1]).contiguous(),
            scale.reshape(-1, scale.shape[-1]).contiguous())


_LOGGED_CUDA_MOE: list[bool] = []


def _cuda_weights(w: list[torch.Tensor]):
    from ._cuda_ext import MoeWeights

    packed, codes, row_scale, _rows, _ptr, blocks, values, row_ptr = w[:8]
    return MoeWeights(packed, codes, row_scale, row_ptr, blocks, values)


# --------------------------------------------------------------------------------------------
# custom op (registered on import; CPU-safe: the implementation imports triton lazily)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("w4a8_backend::mxfp4_w4a8_moe", mutates_args=())
def mxfp4_w4a8_moe(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_map: Optional[torch.Tensor],
    w13: list[torch.Tensor],
    w2: list[torch.Tensor],
    w13_input_scale: Optional[torch.Tensor],
    w2_input_scale: Optional[torch.Tensor],
    dims: list[int],
    act_int8: bool,
    scheme1: int,
    scheme2: int,
    out_dtype_code: int,
    apply_router_weight_on_input: bool,
    decode_cuda: bool,
) -> torch.Tensor:
    """``[T, H]`` routed-expert output. ``w13``/``w2``: (packed, codes, row_scale, corr_rows,
    corr_ptr, corr_blocks, corr_values, corr_row_ptr) of the stacked repacked experts, INT8
    stacks on sm_90 followed by the FP8 repacking's (codes, row_scale, corr_row_ptr,
    corr_blocks, corr_values) for the split path; ``dims``:
    (E, H, I, IP, HP). ``decode_cuda``: a few tokens run on the CUDA decode kernels
    (``_sm90_moe_cuda``) when the library is loaded in this process."""
    e, h, i, ip, hp = dims
    if (decode_cuda and mc.usable(x.shape[0], topk_ids.shape[1], e, h, i)
            and _cuda_decode_loaded(x.device)):
        return mc.moe_forward(
            x, topk_weights, topk_ids, expert_map, _cuda_weights(w13), _cuda_weights(w2),
            w13_input_scale, w2_input_scale, e, h, i, ip, hp, act_int8, scheme1, scheme2,
            _CODE_DTYPE[out_dtype_code], apply_router_weight_on_input,
        )
    from . import _sm90_moe_triton as mk

    return mk.moe_forward(
        x, topk_weights, topk_ids, expert_map, tuple(w13), tuple(w2), w13_input_scale,
        w2_input_scale, e, h, i, ip, hp, act_int8, scheme1, scheme2, _CODE_DTYPE[out_dtype_code],
        apply_router_weight_on_input,
    )


@mxfp4_w4a8_moe.register_fake
def _(x, topk_weights, topk_ids, expert_map, w13, w2, w13_input_scale, w2_input_scale, dims,
      act_int8, scheme1, scheme2, out_dtype_code, apply_router_weight_on_input, decode_cuda):
    return x.new_empty((x.shape[0], dims[1]), dtype=_CODE_DTYPE[out_dtype_code])


# --------------------------------------------------------------------------------------------
# backend class
# --------------------------------------------------------------------------------------------
class Sm90TritonMoEKernel(Mxfp4MoEKernel):
    name = "sm90_triton"

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        if device.type != "cuda":
            return False, f"needs a CUDA GPU (device is {device.type})"
        if _TRITON_ERROR is not None:
            return False, _TRITON_ERROR
        if device.capability is None or device.capability < MIN_CAPABILITY:
            return False, (
                f"needs sm_{MIN_CAPABILITY}+ tensor cores (INT8), sm_{FP8_MIN_CAPABILITY}+ for FP8 "
                f"(device is sm_{device.capability})"
            )
        return True, None

    @classmethod
    def can_implement(cls, config: MoEKernelConfig) -> Verdict:
        if config.activation not in SUPPORTED_ACTIVATIONS:
            return False, (
                f"MoE activation {config.activation!r} is not implemented (supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        if config.act_dtype == ActivationDtype.FP8_E4M3 and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major * 10 + minor < FP8_MIN_CAPABILITY:
                return False, (
                    f"FP8 activations need E4M3 tensor cores (sm_{FP8_MIN_CAPABILITY}+); the "
                    f"current device is sm_{major * 10 + minor}"
                )
        for what, v in (("hidden_size", config.hidden_size),
                        ("intermediate_size", config.intermediate_size)):
            if v <= 0 or v % 32:
                return False, f"{what}={v} is not a positive multiple of 32"
        if config.num_local_experts <= 0 or config.top_k <= 0:
            return False, (f"num_local_experts={config.num_local_experts}, "
                           f"top_k={config.top_k} must be positive")
        if config.out_dtype not in OUT_DTYPES:
            return False, f"out_dtype {config.out_dtype} is not one of {OUT_DTYPES}"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.config
        act_int8 = cfg.act_dtype == ActivationDtype.INT8
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        w13, s13 = layer.w13_weight.data, layer.w13_weight_scale.data
        w2, s2 = layer.w2_weight.data, layer.w2_weight_scale.data
        expected = {
            "w13_weight": (w13, (e, 2 * i, h // 2)),
            "w13_weight_scale": (s13, (e, 2 * i, h // 32)),
            "w2_weight": (w2, (e, h, i // 2)),
            "w2_weight_scale": (s2, (e, h, i // 32)),
        }
        for name, (t, shape) in expected.items():
            if t.dtype != torch.uint8 or tuple(t.shape) != shape:
                raise ValueError(f"layer.{name} must be uint8 {shape} for {cfg.describe()}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
        ip, hp = _round_up(i, N_ALIGN), _round_up(h, N_ALIGN)
        st13 = stack_expert_rows(w13.view(e, 2, i, h // 2), s13.view(e, 2, i, h // 32), ip)
        st2 = stack_expert_rows(w2.view(e, 1, h, i // 2), s2.view(e, 1, h, i // 32), hp)
        rp13 = repack_mxfp4(*st13, act_int8)
        rp2 = repack_mxfp4(*st2, act_int8)
        real_blocks = e * 3 * i * h // 32
        n_out = rp13.num_out_of_range + rp2.num_out_of_range
        frac = n_out / max(real_blocks, 1)
        limit = float(os.environ.get(MAX_CORRECTION_ENV, DEFAULT_MAX_CORRECTION))
        window = "4 binades per 256-wide K tile" if act_int8 else "12 binades per row"
        msg = (
            f"w4a8_mxfp4 sm90_triton MoE: {cfg.describe()}: {n_out} of {real_blocks} MXFP4 blocks "
            f"({100 * frac:.3f}%; w13 {rp13.num_out_of_range}, w2 {rp2.num_out_of_range}) lie "
            f"outside the exact {window} ({rp13.nan_blocks + rp2.nan_blocks} NaN scales)"
        )
        self.num_out_of_range = (rp13.num_out_of_range, rp2.num_out_of_range)
        self.delegate: Mxfp4MoEKernel | None = None
        if frac > limit:
            from .moe_fallback import DequantFallbackMoEKernel

            logger.warning("%s; above %s=%g, so this layer uses the dequantize fallback", msg,
                           MAX_CORRECTION_ENV, limit)
            self.delegate = DequantFallbackMoEKernel(cfg)
            self.delegate.process_weights_after_loading(layer)
            return
        if n_out:
            logger.info("%s; the GEMMs' epilogues add them back exactly", msg)
        else:
            logger.debug("%s", msg)
        self.dims = [e, h, i, ip, hp]
        split = act_int8 and int8_split_enabled(w13.device)
        for name, rp, st in (("w13", rp13, st13), ("w2", rp2, st2)):
            split_args = []
            if split:  # the INT8 split path's FP8 repacking (its nibbles are rp's)
                fp = repack_mxfp4(*st, act_int8=False, packed=rp.packed)
                split_args = [fp.codes, fp.row_scale,
                              row_offsets(fp.corr_rows, fp.corr_ptr, fp.packed.shape[0]),
                              fp.corr_blocks, fp.corr_values]
                logger.debug("w4a8_mxfp4 sm90_triton MoE: %s %s: the INT8 split path's FP8 "
                             "codes take %d bytes", cfg.describe(), name, split_bytes(split_args))
            setattr(layer, f"w4a8_{name}_split", split_args)
            setattr(layer, f"{name}_weight", torch.nn.Parameter(rp.packed, requires_grad=False))
            setattr(layer, f"{name}_weight_scale",
                    torch.nn.Parameter(rp.codes, requires_grad=False))
            setattr(layer, f"w4a8_{name}_row_scale", rp.row_scale)
            setattr(layer, f"w4a8_{name}_corr", [rp.corr_rows, rp.corr_ptr, rp.corr_blocks,
                                                  rp.corr_values,
                                                  row_offsets(rp.corr_rows, rp.corr_ptr,
                                                                 rp.packed.shape[0])])
        # a few tokens: the CUDA decode kernels (built here on first use), else Triton (logged)
        self.decode_cuda = w13.is_cuda and _use_cuda_decode(w13.device)
        if self.decode_cuda and not _LOGGED_CUDA_MOE:
            _LOGGED_CUDA_MOE.append(True)
            logger.info("w4a8_mxfp4 sm90_triton MoE: calls of up to %d tokens run on the CUDA "
                        "decode kernels (above one token: while the routed pairs are at most "
                        "%g x the experts)", mc.MAX_TOKENS, mc.MAX_PAIR_FRACTION)

    def _weights(self, layer, name):
        return [getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale"),
                getattr(layer, f"w4a8_{name}_row_scale"), *getattr(layer, f"w4a8_{name}_corr"),
                *getattr(layer, f"w4a8_{name}_split")]

    def apply(self, layer, x, topk_weights, topk_ids, expert_map, apply_router_weight_on_input):
        if self.delegate is not None:
            return self.delegate.apply(layer, x, topk_weights, topk_ids, expert_map,
                                       apply_router_weight_on_input)
        cfg = self.config
        if x.dim() != 2 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"MoE input must be [T, {cfg.hidden_size}], got {tuple(x.shape)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"MoE input must be bf16/fp16/fp32, got {x.dtype}")
        if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights "
                             f"{tuple(topk_weights.shape)} do not match x {tuple(x.shape)}")
        s1 = layer.w13_input_scale if cfg.w13_scheme == ActivationScheme.STATIC_PER_TENSOR else None
        s2 = layer.w2_input_scale if cfg.w2_scheme == ActivationScheme.STATIC_PER_TENSOR else None
        for name, scheme, s in (("w13", cfg.w13_scheme, s1), ("w2", cfg.w2_scheme, s2)):
            if scheme == ActivationScheme.STATIC_PER_TENSOR and s is None:
                raise ValueError(f"static {name} activation scheme but layer.{name}_input_scale "
                                 "is None")
        return torch.ops.w4a8_backend.mxfp4_w4a8_moe(
            x, topk_weights, topk_ids, expert_map, self._weights(layer, "w13"),
            self._weights(layer, "w2"),
            None if s1 is None else s1.float().reshape(1),
            None if s2 is None else s2.float().reshape(1),
            self.dims, cfg.act_dtype == ActivationDtype.INT8, int(cfg.w13_scheme),
            int(cfg.w2_scheme), _DTYPE_CODE[cfg.out_dtype], bool(apply_router_weight_on_input),
            self.decode_cuda,
        )
