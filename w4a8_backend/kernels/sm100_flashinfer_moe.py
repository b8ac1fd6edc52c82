"""Blackwell (SM100/SM103) MXFP4 MoE through FlashInfer's TensorRT-LLM-gen fused MoE.

BUILT, NOT RUN ON HARDWARE HERE (no Blackwell GPU was available). The weight preparation, the
activation quantization, the routing packing and the exact arguments handed to FlashInfer are
tested on CPU (``tests/test_sm100.py``); the kernel itself has never been executed.

Interface for the MoE method glue
---------------------------------
::

    from w4a8_backend.kernels.sm100_flashinfer_moe import (
        MoEKernelConfig, Sm100FlashInferMoEKernel)

    cfg = MoEKernelConfig(num_experts=E_global, top_k=k, hidden_size=H,
                          intermediate_size=I,            # per TP partition
                          local_num_experts=E_local, local_expert_offset=ep_rank * E_local,
                          act_scheme=ActivationScheme.STATIC_PER_TENSOR)  # or a dynamic one
    ok, why = Sm100FlashInferMoEKernel.is_supported(DeviceInfo.of(device))
    ok2, why2 = Sm100FlashInferMoEKernel.can_implement(cfg)   # both (bool, reason or None)
    kernel = Sm100FlashInferMoEKernel(cfg)
    # once, in process_weights_after_loading (vLLM layout, uint8, experts local to this rank):
    prepared = kernel.process_weights(w13, w13_scale, w2, w2_scale,
                                      w13_input_scale=None, w2_input_scale=None)
    # store `prepared` (a dataclass of tensors) on the layer; then per forward:
    out = kernel.apply(prepared, x, topk_weights, topk_ids)   # [T, H] in cfg.out_dtype

- ``w13`` ``[E, 2I, H/2]`` uint8 with rows ``[gate (w1); up (w3)]`` as vLLM's FusedMoE loads them,
  ``w13_scale`` ``[E, 2I, H/32]`` uint8 E8M0, ``w2`` ``[E, H, I/2]``, ``w2_scale`` ``[E, H, I/32]``.
- ``topk_weights``/``topk_ids`` ``[T, top_k]`` come from vLLM's router (global expert ids; the
  weights are applied by the kernel's finalize step, as ``apply_router_weight_on_input=False``).
- The activation is SwiGLU ``silu(gate) * up``; no biases (ModelOpt exports none).

Weight preparation (once, :func:`prepare_w13`, :func:`prepare_w2`)
-----------------------------------------------------------------
TRT-LLM-gen wants FC1 as ``[up; gate]`` ("w3_w1"), the two halves row-interleaved for its fused
gated-activation epilogue, and every weight matrix row-shuffled for its transposed-MMA epilogue
(``epilogue_tile_m = 128``); the E8M0 scales get the same row permutation and then the 128x4
interleave. The row permutations come from FlashInfer's own pure-torch helpers
(``get_reorder_rows_for_gated_act_gemm_row_indices``, ``get_shuffle_matrix_a_row_indices``),
composed into one gather for all experts; the scale interleave is FlashInfer's
``block_scale_interleave`` on the GPU (its byte-identical torch twin on CPU). This is the recipe
vLLM uses for its FlashInfer TRT-LLM NVFP4/MXFP8 MoE paths.

Activations (``MoEKernelConfig.act_mode``)
-----------------------------------------
- ``MXFP8`` (default): hidden states are re-quantized to MXFP8 (E4M3 with one E8M0 scale per 32
  values, scale = 2**ceil(log2(amax/448)), never clips) and FC1's output is re-quantized to MXFP8
  inside the kernel. This is FlashInfer's tested "MxFP4 x MxFP8" mode and what vLLM runs on
  B200 for MXFP4 MoE. It ignores the checkpoint's per-tensor ``input_scale``: the activations are
  quantized more finely than the format's per-tensor FP8, so results differ from
  ``reference_linear``-style per-tensor FP8 (normally they are closer to the unquantized model).
- ``FP8_PER_TENSOR``: the format's exact semantics (TensorRT-LLM's W4A8_MXFP4_FP8 path): E4M3
  hidden states with the static FC1 input scale, no block scales (FlashInfer then selects E4M3 x
  MxE2m1), and per-expert epilogue scales ``output1_scale_gate_scalar = s1`` (FC1 dequant),
  ``output1_scale_scalar = s1 / s2`` (FC1 dequant and re-quantization to FC2's static input
  scale), ``output2_scale_scalar = s2``. Needs static input scales for w13 and w2. FlashInfer's
  launcher accepts this combination, but its own test matrix covers only MxFP4 x {MxFP8, BF16,
  NvFP4}: treat this mode as the less proven of the two.

INT8 activations are not served (no MXFP4 x INT8 MoE exists in FlashInfer).
"""

from __future__ import annotations

import dataclasses
import enum

import torch

from ..formats import (
    BLOCK_SIZE,
    FP8_E4M3_MAX,
    ActivationDtype,
    ActivationScheme,
    quantize_fp8,
)
from .base import DeviceInfo, Verdict
from .moe_base import MoEKernelConfig as MoELayerConfig
from .moe_base import Mxfp4MoEKernel
from .sm100_flashinfer import (
    check_sm100_device,
    interleave_block_scales,
    missing_parameters,
    resolve_entry_point,
)

EPILOGUE_TILE_M = 128  # TRT-LLM-gen MoE epilogue tile; fixes the row shuffle (blocks of 32 rows)
MOE_HIDDEN_ALIGN = 256  # what vLLM pads H to for FlashInfer's TRT-LLM MXFP4 MoE
MOE_INTERMEDIATE_ALIGN = 128  # and I (also makes every scale matrix an exact 128x4 tiling)
MAX_PACKED_EXPERT_ID = (1 << 15) - 1  # packed routing keeps the expert id in an int16
E8M0_BIAS = 127
# flashinfer.tllm_enums.RoutingMethodType.Renormalize: the routing kernel is skipped for
# precomputed top-k; vLLM passes this value for its pre-routed calls too.
ROUTING_RENORMALIZE = 1
MOE_OUT_DTYPES = (torch.bfloat16, torch.float16)

MOE_ENTRY_NAME = "trtllm_fp4_block_scale_routed_moe"
# Parameters passed by name to trtllm_fp4_block_scale_routed_moe (present since FlashInfer 0.6.0).
MOE_CALL_PARAMETERS = (
    "topk_ids",
    "routing_bias",
    "hidden_states",
    "hidden_states_scale",
    "gemm1_weights",
    "gemm1_weights_scale",
    "gemm1_bias",
    "gemm1_alpha",
    "gemm1_beta",
    "gemm1_clamp_limit",
    "gemm2_weights",
    "gemm2_weights_scale",
    "gemm2_bias",
    "output1_scale_scalar",
    "output1_scale_gate_scalar",
    "output2_scale_scalar",
    "num_experts",
    "top_k",
    "n_group",
    "topk_group",
    "intermediate_size",
    "local_expert_offset",
    "local_num_experts",
    "routed_scaling_factor",
    "routing_method_type",
    "do_finalize",
    "output",
)
# Passed only when the installed FlashInfer accepts it (added after 0.6.x; declares the layout of
# hidden_states_scale, which must be linear for the routed GEMM).
MOE_OPTIONAL_PARAMETERS = ("hidden_states_scale_layout",)
SF_LAYOUT_LINEAR = 2  # flashinfer.tllm_enums.SfLayout.layout_linear

MOE_ENTRY_POINTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("flashinfer.fused_moe", (MOE_ENTRY_NAME,), MOE_CALL_PARAMETERS),
    (
        "flashinfer.utils",
        ("get_shuffle_matrix_a_row_indices",),
        ("input_tensor", "epilogue_tile_m"),
    ),
    ("flashinfer.fused_moe.core", ("get_reorder_rows_for_gated_act_gemm_row_indices",), ("x",)),
    ("flashinfer", ("block_scale_interleave",), ("unswizzled_sf",)),
)


class MoEActivationMode(enum.Enum):
    MXFP8 = "mxfp8"
    FP8_PER_TENSOR = "fp8_per_tensor"


@dataclasses.dataclass(frozen=True)
class MoEKernelConfig:
    num_experts: int  # global
    top_k: int
    hidden_size: int  # H
    intermediate_size: int  # I of this tensor-parallel partition
    act_dtype: ActivationDtype = ActivationDtype.FP8_E4M3
    act_scheme: ActivationScheme = ActivationScheme.DYNAMIC_PER_TENSOR
    act_mode: MoEActivationMode = MoEActivationMode.MXFP8
    local_num_experts: int | None = None  # None: all experts on this rank
    local_expert_offset: int = 0
    activation: str = "silu"
    out_dtype: torch.dtype = torch.bfloat16

    @property
    def num_local_experts(self) -> int:
        return self.num_experts if self.local_num_experts is None else self.local_num_experts

    def describe(self) -> str:
        return (
            f"E={self.num_experts} (local {self.num_local_experts} @ {self.local_expert_offset}) "
            f"top_k={self.top_k} H={self.hidden_size} I={self.intermediate_size} "
            f"act={self.act_dtype.name}/{self.act_scheme.name}/{self.act_mode.value} "
            f"{self.activation} out={self.out_dtype}"
        )


@dataclasses.dataclass
class PreparedMoEWeights:
    """What :meth:`Sm100FlashInferMoEKernel.process_weights` hands back to the glue."""

    w13: torch.Tensor  # uint8 [E, 2I, H/2], [up; gate] interleaved and shuffled
    w13_scale: torch.Tensor  # float8_e4m3fn view of E8M0 bytes [E, 2I, H/32], 128x4
    w2: torch.Tensor  # uint8 [E, H, I/2], shuffled
    w2_scale: torch.Tensor  # float8_e4m3fn view of E8M0 bytes [E, H, I/32], 128x4
    act_mode: MoEActivationMode
    fc1_input_scale: torch.Tensor | None = None  # float32 [1] (FP8_PER_TENSOR)
    output1_scale: torch.Tensor | None = None  # float32 [E] s1 / s2
    output1_gate_scale: torch.Tensor | None = None  # float32 [E] s1
    output2_scale: torch.Tensor | None = None  # float32 [E] s2


# --------------------------------------------------------------------------------------------
# Weight preparation
# --------------------------------------------------------------------------------------------


def w13_row_permutation(two_i: int, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    """``new_row -> old_row`` for FC1: swap ``[gate; up]`` to ``[up; gate]``, interleave the two
    halves for the gated-activation GEMM, shuffle for the transposed-MMA epilogue (the last two
    are FlashInfer's own index helpers)."""
    from flashinfer.fused_moe.core import get_reorder_rows_for_gated_act_gemm_row_indices
    from flashinfer.utils import get_shuffle_matrix_a_row_indices

    if two_i % 2:
        raise ValueError(f"w13 must have an even number of rows (2 * I), got {two_i}")
    half = two_i // 2
    swap = torch.cat([torch.arange(half, two_i), torch.arange(0, half)])
    probe = torch.empty((two_i, 1), dtype=torch.uint8)
    reorder = get_reorder_rows_for_gated_act_gemm_row_indices(probe)
    shuffle = get_shuffle_matrix_a_row_indices(probe, epilogue_tile_m)
    return swap[reorder[shuffle]]


def w2_row_permutation(rows: int, epilogue_tile_m: int = EPILOGUE_TILE_M) -> torch.Tensor:
    """``new_row -> old_row`` for FC2: FlashInfer's transposed-MMA epilogue shuffle."""
    from flashinfer.utils import get_shuffle_matrix_a_row_indices

    probe = torch.empty((rows, 1), dtype=torch.uint8)
    return get_shuffle_matrix_a_row_indices(probe, epilogue_tile_m)


def _check_expert_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if t.dtype != torch.uint8 or tuple(t.shape) != shape:
        raise ValueError(
            f"sm100_flashinfer_moe: {name} must be uint8 {list(shape)}, got {t.dtype} "
            f"{list(t.shape)}"
        )


def _permute_rows(weight: torch.Tensor, scale: torch.Tensor, perm: torch.Tensor):
    perm = perm.to(weight.device)
    w = weight.index_select(1, perm).contiguous()
    s = interleave_block_scales(scale.index_select(1, perm).contiguous())
    if tuple(s.shape) != tuple(scale.shape):
        raise ValueError(
            f"sm100_flashinfer_moe: scales {list(scale.shape)} are not whole 128x4 tiles "
            "(rows must be a multiple of 128, scale columns of 4)"
        )
    return w, s.view(torch.float8_e4m3fn)


def prepare_w13(w13: torch.Tensor, w13_scale: torch.Tensor):
    """vLLM's ``w13`` ``[E, 2I, H/2]`` / ``w13_scale`` ``[E, 2I, H/32]`` -> FlashInfer's FC1
    layout: ``(uint8 [E, 2I, H/2], float8_e4m3fn-viewed E8M0 [E, 2I, H/32])``."""
    if w13.dim() != 3:
        raise ValueError(f"sm100_flashinfer_moe: w13 must be [E, 2I, H/2], got {list(w13.shape)}")
    e, two_i, half_h = w13.shape
    _check_expert_tensor("w13", w13, (e, two_i, half_h))
    _check_expert_tensor("w13_scale", w13_scale, (e, two_i, half_h * 2 // BLOCK_SIZE))
    return _permute_rows(w13, w13_scale, w13_row_permutation(two_i))


def prepare_w2(w2: torch.Tensor, w2_scale: torch.Tensor):
    """vLLM's ``w2`` ``[E, H, I/2]`` / ``w2_scale`` ``[E, H, I/32]`` -> FlashInfer's FC2 layout."""
    if w2.dim() != 3:
        raise ValueError(f"sm100_flashinfer_moe: w2 must be [E, H, I/2], got {list(w2.shape)}")
    e, h, half_i = w2.shape
    _check_expert_tensor("w2", w2, (e, h, half_i))
    _check_expert_tensor("w2_scale", w2_scale, (e, h, half_i * 2 // BLOCK_SIZE))
    return _permute_rows(w2, w2_scale, w2_row_permutation(h))


# --------------------------------------------------------------------------------------------
# Activations and routing
# --------------------------------------------------------------------------------------------


def quantize_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 E4M3 per 32 values along the last dim: ``(fp8 [T, H], E8M0 uint8 [T, H/32])``.

    Block exponent ``e = ceil(log2(amax / 448))`` (exactly, via frexp), clamped to [-127, 127],
    so ``|x| / 2**e <= 448``: nothing clips; an all-zero block gets byte 0.
    """
    h = x.shape[-1]
    if h % BLOCK_SIZE:
        raise ValueError(f"MXFP8 needs the hidden size to be a multiple of 32, got {h}")
    blocks = x.reshape(-1, h // BLOCK_SIZE, BLOCK_SIZE).float()
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    mantissa, exponent = torch.frexp(amax / FP8_E4M3_MAX)  # ratio = mantissa * 2**exponent
    e = torch.where(mantissa == 0.5, exponent - 1, exponent)  # exact powers of two
    e = torch.where(amax == 0, torch.full_like(e, -E8M0_BIAS), e).clamp(-E8M0_BIAS, E8M0_BIAS)
    q = (blocks / torch.exp2(e.float())).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = q.to(torch.float8_e4m3fn).reshape(-1, h)
    return q, (e + E8M0_BIAS).to(torch.uint8).reshape(-1, h // BLOCK_SIZE)


def pack_topk(topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """FlashInfer's packed precomputed routing: int32 ``(expert_id << 16) | bf16 weight bits``
    (``PackedScoreIdx { bf16 score; int16 idx; }``, little endian)."""
    if topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"topk_ids {list(topk_ids.shape)} and topk_weights {list(topk_weights.shape)} differ"
        )
    ids = topk_ids.to(torch.int32)
    bits = topk_weights.to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return (ids << 16) | bits


# --------------------------------------------------------------------------------------------
# The FlashInfer call (a custom op: opaque to torch.compile, with a shape-only fake)
# --------------------------------------------------------------------------------------------


def moe_entry_point():
    fn = resolve_entry_point("flashinfer.fused_moe", (MOE_ENTRY_NAME,))
    if fn is None:
        raise RuntimeError(f"flashinfer.fused_moe has no {MOE_ENTRY_NAME}")
    return fn


def moe_call_arguments(
    fn,
    hidden_states: torch.Tensor,
    hidden_states_scale: torch.Tensor | None,
    packed_topk: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    output1_scale: torch.Tensor | None,
    output1_gate_scale: torch.Tensor | None,
    output2_scale: torch.Tensor | None,
    output: torch.Tensor,
    num_experts: int,
    top_k: int,
    intermediate_size: int,
    local_expert_offset: int,
    local_num_experts: int,
) -> dict:
    """The keyword arguments for ``fn`` (FlashInfer's ``trtllm_fp4_block_scale_routed_moe``)."""
    kwargs = dict(
        topk_ids=packed_topk,
        routing_bias=None,
        hidden_states=hidden_states,
        hidden_states_scale=hidden_states_scale,
        gemm1_weights=w13,
        gemm1_weights_scale=w13_scale,
        gemm1_bias=None,
        gemm1_alpha=None,  # plain SwiGLU
        gemm1_beta=None,
        gemm1_clamp_limit=None,
        gemm2_weights=w2,
        gemm2_weights_scale=w2_scale,
        gemm2_bias=None,
        output1_scale_scalar=output1_scale,
        output1_scale_gate_scalar=output1_gate_scale,
        output2_scale_scalar=output2_scale,
        num_experts=num_experts,
        top_k=top_k,
        n_group=None,
        topk_group=None,
        intermediate_size=intermediate_size,
        local_expert_offset=local_expert_offset,
        local_num_experts=local_num_experts,
        routed_scaling_factor=None,  # vLLM's router already applied it
        routing_method_type=ROUTING_RENORMALIZE,
        do_finalize=True,
        output=output,
    )
    if not missing_parameters(fn, MOE_OPTIONAL_PARAMETERS):
        kwargs["hidden_states_scale_layout"] = SF_LAYOUT_LINEAR
    return kwargs


@torch.library.custom_op("w4a8_backend::sm100_mxfp4_moe", mutates_args=())
def sm100_mxfp4_moe(
    hidden_states: torch.Tensor,
    hidden_states_scale: torch.Tensor | None,
    packed_topk: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    output1_scale: torch.Tensor | None,
    output1_gate_scale: torch.Tensor | None,
    output2_scale: torch.Tensor | None,
    num_experts: int,
    top_k: int,
    intermediate_size: int,
    local_expert_offset: int,
    local_num_experts: int,
) -> torch.Tensor:
    """FlashInfer's routed MXFP4 MoE; bfloat16 ``[T, H]``."""
    output = torch.empty(
        (hidden_states.shape[0], w2.shape[1]), dtype=torch.bfloat16, device=hidden_states.device
    )
    fn = moe_entry_point()
    fn(
        **moe_call_arguments(
            fn, hidden_states, hidden_states_scale, packed_topk, w13, w13_scale, w2, w2_scale,
            output1_scale, output1_gate_scale, output2_scale, output, num_experts, top_k,
            intermediate_size, local_expert_offset, local_num_experts,
        )
    )
    return output


@sm100_mxfp4_moe.register_fake
def _sm100_mxfp4_moe_fake(hidden_states, hidden_states_scale, packed_topk, w13, w13_scale, w2,
                          *rest):
    return hidden_states.new_empty((hidden_states.shape[0], w2.shape[1]), dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


def _per_tensor(name: str, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        raise ValueError(
            f"sm100_flashinfer_moe: act_mode=fp8_per_tensor needs a static {name} "
            "(the checkpoint has none; use act_mode=mxfp8 for dynamic activations)"
        )
    # All experts of a layer share one input scale in ModelOpt exports; take the max as vLLM's
    # FP8 MoE does when they differ.
    return scale.detach().float().reshape(-1).max().reshape(1)


class Sm100FlashInferMoEKernel:
    name = "sm100_flashinfer_moe"

    def __init__(self, config: MoEKernelConfig):
        self.config = config

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        return check_sm100_device(device, MOE_ENTRY_POINTS)

    @classmethod
    def can_implement(cls, config: MoEKernelConfig) -> Verdict:
        if config.act_dtype != ActivationDtype.FP8_E4M3:
            return False, (
                f"{config.act_dtype.name} activations: FlashInfer has no MXFP4 x INT8 MoE "
                "(see docs/sm100.md)"
            )
        if (
            config.act_mode == MoEActivationMode.FP8_PER_TENSOR
            and config.act_scheme != ActivationScheme.STATIC_PER_TENSOR
        ):
            return False, (
                f"act_mode=fp8_per_tensor needs static input scales, the layer's scheme is "
                f"{config.act_scheme.name} (use act_mode=mxfp8)"
            )
        if config.activation != "silu":
            return False, f"activation {config.activation!r}: only SwiGLU (silu) is wired"
        if config.hidden_size % MOE_HIDDEN_ALIGN:
            return False, (
                f"hidden_size={config.hidden_size} is not a multiple of {MOE_HIDDEN_ALIGN} "
                "(FlashInfer TRT-LLM MXFP4 MoE tiling)"
            )
        if config.intermediate_size % MOE_INTERMEDIATE_ALIGN:
            return False, (
                f"intermediate_size={config.intermediate_size} (per partition) is not a multiple "
                f"of {MOE_INTERMEDIATE_ALIGN} (FlashInfer TRT-LLM MXFP4 MoE tiling)"
            )
        if config.num_experts > MAX_PACKED_EXPERT_ID + 1:
            return False, f"num_experts={config.num_experts} exceeds the packed routing's int16 id"
        local = config.num_local_experts
        if not (0 < local and 0 <= config.local_expert_offset <= config.num_experts - local):
            return False, (
                f"local experts [{config.local_expert_offset}, "
                f"{config.local_expert_offset + local}) do not fit in {config.num_experts}"
            )
        if config.out_dtype not in MOE_OUT_DTYPES:
            return False, f"output dtype {config.out_dtype}: the kernel writes bfloat16"
        return True, None

    def process_weights(
        self,
        w13: torch.Tensor,
        w13_scale: torch.Tensor,
        w2: torch.Tensor,
        w2_scale: torch.Tensor,
        w13_input_scale: torch.Tensor | None = None,
        w2_input_scale: torch.Tensor | None = None,
    ) -> PreparedMoEWeights:
        cfg = self.config
        e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        _check_expert_tensor("w13", w13, (e, 2 * i, h // 2))
        _check_expert_tensor("w13_scale", w13_scale, (e, 2 * i, h // BLOCK_SIZE))
        _check_expert_tensor("w2", w2, (e, h, i // 2))
        _check_expert_tensor("w2_scale", w2_scale, (e, h, i // BLOCK_SIZE))
        g1, g1_scale = prepare_w13(w13, w13_scale)
        g2, g2_scale = prepare_w2(w2, w2_scale)
        prepared = PreparedMoEWeights(g1, g1_scale, g2, g2_scale, cfg.act_mode)
        if cfg.act_mode == MoEActivationMode.FP8_PER_TENSOR:
            s1 = _per_tensor("w13_input_scale", w13_input_scale).to(w13.device)
            s2 = _per_tensor("w2_input_scale", w2_input_scale).to(w13.device)
            prepared.fc1_input_scale = s1
            prepared.output1_gate_scale = s1.expand(e).contiguous()
            prepared.output1_scale = (s1 / s2).expand(e).contiguous()
            prepared.output2_scale = s2.expand(e).contiguous()
        return prepared

    def quantize_hidden_states(
        self, prepared: PreparedMoEWeights, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(fp8 [T, H], float8-viewed E8M0 [T, H/32] or None)`` as the kernel takes them."""
        if prepared.act_mode == MoEActivationMode.FP8_PER_TENSOR:
            return quantize_fp8(x, prepared.fc1_input_scale), None
        q, scale = quantize_mxfp8(x)
        return q, scale.view(torch.float8_e4m3fn)

    def apply(
        self,
        prepared: PreparedMoEWeights,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        hidden, hidden_scale = self.quantize_hidden_states(prepared, x)
        out = torch.ops.w4a8_backend.sm100_mxfp4_moe(
            hidden,
            hidden_scale,
            pack_topk(topk_ids, topk_weights),
            prepared.w13,
            prepared.w13_scale,
            prepared.w2,
            prepared.w2_scale,
            prepared.output1_scale,
            prepared.output1_gate_scale,
            prepared.output2_scale,
            cfg.num_experts,
            cfg.top_k,
            cfg.intermediate_size,
            cfg.local_expert_offset,
            cfg.num_local_experts,
        )
        return out.to(cfg.out_dtype).reshape(*x.shape[:-1], cfg.hidden_size)


class Sm100FlashInferMoEBackend(Mxfp4MoEKernel):
    """The MoE dispatcher's SM100 backend: :class:`Sm100FlashInferMoEKernel` in its exact mode.

    Only ``FP8_PER_TENSOR`` reproduces the format (per-tensor E4M3 activations with the
    checkpoint's static scales); the ``MXFP8`` mode re-quantizes activations per 32-block and
    would serve different numbers, so layers with dynamic scales go to the next backend.
    """

    name = "sm100_flashinfer"

    def __init__(self, config: MoELayerConfig):
        super().__init__(config)
        self.kernel = Sm100FlashInferMoEKernel(self._flashinfer_config(config))

    @staticmethod
    def _flashinfer_config(config: MoELayerConfig) -> MoEKernelConfig:
        return MoEKernelConfig(
            num_experts=config.total_experts,
            top_k=config.top_k,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            act_dtype=config.act_dtype,
            act_scheme=config.w13_scheme,
            act_mode=MoEActivationMode.FP8_PER_TENSOR,
            activation=config.activation,
            out_dtype=config.out_dtype,
        )

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        return Sm100FlashInferMoEKernel.is_supported(device)

    @classmethod
    def can_implement(cls, config: MoELayerConfig) -> Verdict:
        static = ActivationScheme.STATIC_PER_TENSOR
        if (config.w13_scheme, config.w2_scheme) != (static, static):
            return False, ("dynamic activation scales: FlashInfer's MXFP4 MoE has no exact "
                           "per-tensor dynamic FP8 mode")
        if config.num_local_experts != config.total_experts:
            return False, "expert parallelism is not wired for the SM100 MoE path"
        return Sm100FlashInferMoEKernel.can_implement(cls._flashinfer_config(config))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer.w4a8_sm100_moe = self.kernel.process_weights(
            layer.w13_weight.data, layer.w13_weight_scale.data, layer.w2_weight.data,
            layer.w2_weight_scale.data, layer.w13_input_scale, layer.w2_input_scale,
        )
        for name in ("w13_weight", "w13_weight_scale", "w2_weight", "w2_weight_scale"):
            delattr(layer, name)

    def apply(self, layer, x, topk_weights, topk_ids, expert_map, apply_router_weight_on_input):
        if apply_router_weight_on_input:
            x = x * topk_weights.to(x.dtype)
            topk_weights = torch.ones_like(topk_weights)
        return self.kernel.apply(layer.w4a8_sm100_moe, x, topk_weights, topk_ids)
