"""SM90 / SM89 / SM80 W4A8 MXFP4 linear backend (Triton), with a torch custom op per call.

- FP8 activations: E4M3 tensor cores (SM89+). Per-row reference exponent folded into an exact
  E2M1 -> E4M3 decode in registers; ``2**r`` and the activation scale in the epilogue.
- INT8 activations: INT8 tensor cores (SM80+). Per (row, 256-wide K tile) reference exponent,
  exact int8 weights ``(2 * E2M1) << d``, exact int32 tile sums rescaled in float32.
- Blocks outside the exact range (or with a NaN scale) are never clamped: they are counted and
  logged at load and added back exactly by a correction kernel; above
  ``W4A8_MXFP4_MAX_CORRECTION`` (fraction of blocks, default 0.01) the layer uses the dequantize
  fallback instead, with the reason logged.
- Small M (decode, M <= 16): the CUDA kernel of ``csrc/w4a8_decode_gemm.cu`` (mma.sync, weight
  as the wide MMA operand, split-K inside the CTA), built just in time with nvcc
  (``_cuda_ext``); where it cannot be built the Triton kernel below takes its place (logged).
- Medium M: the Triton kernel, weight as the wide MMA operand, split-K with an in-kernel
  reduction.
  Large M (prefill): the weight is decoded once per call into a dense E4M3/int8 matrix that the
  same Triton GEMM then reads (no per-tile decode). INT8 decodes it against one reference per
  row where few blocks fall outside the row's window (``INT8_PREFILL_ROWS_MAX``), so that GEMM
  sums in int32 over the whole K instead of rescaling every 256.

The module imports without triton (CPU machines): ``is_supported`` then says why it cannot run.
Design and measurements: docs/kernels.md, docs/int8_kernel.md.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

from ..formats import ActivationDtype, ActivationScheme
from ._sm90_repack import decode_lut, int8_prefill_rows, repack_mxfp4, row_offsets
from .base import DeviceInfo, LinearKernelConfig, Mxfp4LinearKernel, Verdict

logger = logging.getLogger("vllm.w4a8_mxfp4")  # reaches vLLM's handlers (see dispatch.py)

try:  # triton is optional: CPU installs have none
    import triton  # noqa: F401

    _TRITON_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    _TRITON_ERROR = f"triton is not importable ({exc})"

SUPPORTED_CAPABILITIES = (80, 86, 87, 89, 90)
FP8_MIN_CAPABILITY = 89
MAX_CORRECTION_ENV = "W4A8_MXFP4_MAX_CORRECTION"
DEFAULT_MAX_CORRECTION = 0.01
# M from which the prefill path (decode the weight once, then a dense GEMM) is used.
PREFILL_M_ENV = "W4A8_SM90_PREFILL_M"
DEFAULT_PREFILL_M = {False: 384, True: 384}  # keyed by act_int8; from benchmarks/results
# The INT8 prefill GEMM uses one reference per row while its side table has at most this
# fraction of the weight's blocks more than the per-tile table. H100, N = K = 8192, M = 4096
# (benchmarks/results/sweep_int8_prefill_rows_h100_20261123.jsonl): the per-row GEMM takes 445
# vs 639 us, and the correction kernel ~0.2 us per listed block, so the per-row path pays while
# it adds fewer than ~970 blocks of 2.1M (0.046 %); both sides scale with M and with N * K.
INT8_PREFILL_ROWS_ENV = "W4A8_MXFP4_INT8_PREFILL_ROWS_MAX"
# INT8 layers on sm_90 also keep the FP8 repacking's per-block codes (one byte per 32 weights,
# +5.9 % over the 4.25-bit weight; the nibbles are shared) and row scales: between decode and
# prefill their activations then run as two exact E4M3 planes on FP8 tensor cores
# (triton_w4a8.split_config, docs/int8_kernel.md). Off with W4A8_MXFP4_INT8_SPLIT=0. Measured
# on H100 only, so not on sm_89. (Deriving the FP8 codes in the kernel from the INT8 ones
# instead, to store nothing more, made the split GEMM slower than the INT8 one: ~190 more
# instructions per K step; int8_split_derived_h100_20261125_1029.jsonl.)
INT8_SPLIT_ENV = "W4A8_MXFP4_INT8_SPLIT"
DEFAULT_INT8_PREFILL_ROWS_MAX = 0.0004
# Which kernel runs M <= CUDA_DECODE_MAX_M: "auto" (the CUDA kernel when it builds, else Triton,
# logged), "cuda" (an error when it cannot be built), "triton".
DECODE_KERNEL_ENV = "W4A8_SM90_DECODE"
DECODE_KERNEL_CHOICES = ("auto", "cuda", "triton")
# Largest M the CUDA decode kernel takes (keyed by act_int8): H100 sweep (bench_linear
# --sweep-cuda, 2026-11-22): FP8 at M = 16 is up to 8% slower than the Triton kernel, INT8 faster
# at every M <= 16.
CUDA_DECODE_MAX_M = {False: 8, True: 16}
# (warps per CTA, cp.async stages per warp) of the CUDA decode kernel; one CTA per 16 rows, its
# warps split K. The kernel is bound by latency at low occupancy, so more warps beat deeper copy
# rings (H100, bench_linear --sweep-cuda; 3 stages measured no better again after the L2
# evict_first copies, benchmarks/results/sweep_cuda_ring_depth_h100_20261125_0344.jsonl).
# CUDA_DECODE_CONFIG serves grids of at least CUDA_DECODE_MIN_WARPS_PER_SM warps per SM; smaller
# grids (N <= 4096 on 132 SMs) take CUDA_DECODE_SMALL_GRID_CONFIG, whose twice as many warps
# per CTA fill the SMs (see cuda_decode_config).
CUDA_DECODE_CONFIG = (4, 2)
CUDA_DECODE_SMALL_GRID_CONFIG = (8, 2)
CUDA_DECODE_MIN_WARPS_PER_SM = 8
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}


def _env_fraction(name: str, default: float) -> float:
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a number (a fraction of the blocks)") from None


def _decode_kernel_choice() -> str:
    v = os.environ.get(DECODE_KERNEL_ENV, "auto").strip().lower()
    if v not in DECODE_KERNEL_CHOICES:
        raise ValueError(f"{DECODE_KERNEL_ENV}={v!r} is not one of {DECODE_KERNEL_CHOICES}")
    return v


_LOGGED_ONCE: set = set()


def _use_cuda_decode(device: torch.device) -> bool:
    """Whether this process runs M <= 16 on the CUDA decode kernel (builds it on first use)."""
    choice = _decode_kernel_choice()
    if choice == "triton":
        return False
    from . import _cuda_ext

    major, minor = torch.cuda.get_device_capability(device)
    try:
        lib = _cuda_ext.load(major * 10 + minor)
    except _cuda_ext.CudaExtUnavailable as exc:
        if choice == "cuda":
            raise RuntimeError(f"{DECODE_KERNEL_ENV}=cuda but {exc}") from exc
        if "unavailable" not in _LOGGED_ONCE:
            _LOGGED_ONCE.add("unavailable")
            logger.warning("w4a8_mxfp4 sm90_triton: the CUDA decode kernel is not used (%s); "
                           "small M runs on the Triton kernel", exc)
        return False
    if "loaded" not in _LOGGED_ONCE:
        _LOGGED_ONCE.add("loaded")
        logger.info("w4a8_mxfp4 sm90_triton: M <= %d (FP8) / %d (INT8) runs on the CUDA decode "
                    "kernel (%s)", CUDA_DECODE_MAX_M[False], CUDA_DECODE_MAX_M[True],
                    lib.path.name)
    return True


def _cuda_decode_loaded(device: torch.device) -> bool:
    """Whether the library is loaded in this process (``decode_cuda`` is baked into a compiled
    graph, which a later process may replay where the library cannot be built: then Triton)."""
    from . import _cuda_ext

    return _cuda_ext.is_loaded(_capability(device.index or 0))


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def int8_split_enabled(device: torch.device) -> bool:
    """Whether INT8 layers loaded on ``device`` keep the split path's FP8 codes
    (``INT8_SPLIT_ENV``, default on; sm_90 only)."""
    v = os.environ.get(INT8_SPLIT_ENV, "1").strip()
    if v not in ("0", "1"):
        raise ValueError(f"{INT8_SPLIT_ENV}={v!r} must be 0 or 1")
    return v == "1" and device.type == "cuda" and _capability(device.index or 0) == 90


def split_bytes(split: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in split)


def cuda_decode_max_m(act_int8: bool) -> int:
    return CUDA_DECODE_MAX_M[act_int8]


def cuda_decode_config(n_pad: int, sms: int) -> tuple[int, int]:
    """(warps, stages) of the CUDA decode GEMM for a weight of ``n_pad`` (padded) rows on a GPU
    of ``sms`` SMs: one CTA per 16 rows, so a grid that would hold fewer than
    CUDA_DECODE_MIN_WARPS_PER_SM warps per SM at CUDA_DECODE_CONFIG's warps takes the
    small-grid config instead."""
    warps = CUDA_DECODE_CONFIG[0]
    if (n_pad // 16) * warps < CUDA_DECODE_MIN_WARPS_PER_SM * sms:
        return CUDA_DECODE_SMALL_GRID_CONFIG
    return CUDA_DECODE_CONFIG


# A dynamic per-tensor amax of at most this many elements is taken by one CTA of the quantization
# kernel; larger inputs are quantized by the grid kernel (every SM takes part of the amax, then a
# grid sync), also one launch. The grid kernel releases the GEMM (PDL) once the amax is known
# from GRID_RELEASE_LATE_MIN_M rows up, at its start below. Both from the whole op on an H100
# (benchmarks/results/quant_pdl_release_h100_20261123.jsonl).
ONE_CTA_AMAX_MAX = 1 << 13
GRID_RELEASE_LATE_MIN_M = 8


def cuda_quantize(lib, x2: torch.Tensor, act_int8: bool, scheme: int,
                  input_scale: torch.Tensor | None, poison: bool = False):
    """``x2`` [M, K] -> (q, scale) with the CUDA library's bit-exact quantization kernels (which
    release a following PDL launch at their start); a dynamic per-tensor amax is taken in the
    same launch, by one CTA for small inputs, by a grid of CTAs otherwise. Rows must start
    16-byte aligned (callers copy otherwise)."""
    from .triton_w4a8 import num_sms

    dev = x2.device
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8 if act_int8 else torch.float8_e4m3fn, device=dev)
    if scheme == int(ActivationScheme.STATIC_PER_TENSOR):
        s_in = input_scale if input_scale.dtype == torch.float32 else input_scale.float()
        s_out = s_in
    elif scheme == int(ActivationScheme.DYNAMIC_PER_TENSOR):
        s_in = None
        s_out = torch.empty(1, dtype=torch.float32, device=dev)
    else:
        s_out = torch.empty(m, dtype=torch.float32, device=dev)
        s_in = s_out
    if poison:
        q.view(torch.uint8).fill_(0x80 if act_int8 else 0x7F)
        if scheme != int(ActivationScheme.STATIC_PER_TENSOR):
            s_out.fill_(float("nan"))
    if scheme == int(ActivationScheme.DYNAMIC_PER_TENSOR) and m * k > ONE_CTA_AMAX_MAX:
        vectors = m * k * x2.element_size() // 16
        ctas = min(num_sms(dev.index or 0), -(-vectors // 256))
        partials = torch.empty(ctas, dtype=torch.float32, device=dev)
        lib.quant_act_grid(x2, q, partials, s_out, act_int8, m >= GRID_RELEASE_LATE_MIN_M)
    else:
        lib.quant_act(x2, q, s_in, s_out, act_int8, scheme)
    return q, s_out


def aligned_rows(x2: torch.Tensor) -> torch.Tensor:
    """``x2`` itself when its rows start 16-byte aligned (the CUDA kernels' row loads), else a
    contiguous copy."""
    if x2.data_ptr() % 16 or (x2.stride(0) * x2.element_size()) % 16 or x2.stride(-1) != 1:
        return x2.contiguous() if not x2.is_contiguous() else x2.clone()
    return x2


def cuda_decode(x2: torch.Tensor, packed: torch.Tensor, codes: torch.Tensor,
                row_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None, n: int, act_int8: bool, scheme: int,
                out_dtype: torch.dtype, corr: tuple | None = None,
                config: tuple[int, int] | None = None):
    """Quantize ``x2`` [M <= 16, K] and run the CUDA decode GEMM; returns (y, q, x_scale).
    ``corr``: the weight's out-of-range blocks as (row_ptr [N_pad + 1] over every row, blocks,
    values), added in the GEMM's epilogue; None when it has none.
    (Callers pick M <= cuda_decode_max_m; the kernel itself takes any M <= 16.)"""
    from . import _cuda_ext
    from . import triton_w4a8 as tk

    dev = x2.device
    capability = _capability(dev.index or 0)
    lib = _cuda_ext.load(capability)
    x2 = aligned_rows(x2)
    m = x2.shape[0]
    q, s_out = cuda_quantize(lib, x2, act_int8, scheme, input_scale, tk.POISON_OUTPUTS)
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    if tk.POISON_OUTPUTS:
        y.fill_(float("nan"))
    warps, stages = config or cuda_decode_config(packed.shape[0], tk.num_sms(dev.index or 0))
    per_token = scheme == int(ActivationScheme.DYNAMIC_PER_TOKEN)
    lib.gemm(q, s_out, packed, codes, row_scale, bias, y, act_int8, per_token, warps, stages,
             pdl=capability >= 90, corr=corr)
    return y, q, s_out


def _prefill_m(act_int8: bool) -> int:
    env = os.environ.get(PREFILL_M_ENV)
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"{PREFILL_M_ENV}={env!r} is not an integer") from None
    return DEFAULT_PREFILL_M[act_int8]


# --------------------------------------------------------------------------------------------
# custom op (registered on import; CPU-safe: the real implementation imports triton lazily)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("w4a8_backend::mxfp4_w4a8_linear", mutates_args=())
def mxfp4_w4a8_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    codes: torch.Tensor,
    row_scale: torch.Tensor,
    counters: torch.Tensor,
    lut: torch.Tensor,
    corr_rows: torch.Tensor,
    corr_ptr: torch.Tensor,
    corr_blocks: torch.Tensor,
    corr_values: torch.Tensor,
    corr_row_ptr: torch.Tensor,
    prefill_row_scale: Optional[torch.Tensor],
    prefill_corr: list[torch.Tensor],
    split: list[torch.Tensor],
    input_scale: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    n: int,
    act_int8: bool,
    scheme: int,
    out_dtype_code: int,
    prefill_m: int,
    decode_cuda: bool,
) -> torch.Tensor:
    """``y [M, N] = W4A8(x [M, K]) (+ bias)``. ``counters`` is split-K scratch that every launch
    leaves all-zero again (so it is not declared mutated). ``corr_rows/ptr/blocks/values``: the
    out-of-range blocks (rows that have any + CSR over them, for the Triton correction kernel);
    ``corr_row_ptr``: a CSR over every row into the same blocks, for the CUDA decode GEMM's
    epilogue. ``prefill_row_scale`` and
    ``prefill_corr`` (rows, ptr, blocks, values): the INT8 prefill path's per-row reference and
    side table (``int8_prefill_rows``), or None and []. ``split``: an INT8 layer's FP8 repacking
    of the same weight for the split path (codes, row_scale, corr_rows, corr_ptr, corr_blocks,
    corr_values; its nibbles are ``packed``), or []."""
    from . import triton_w4a8 as tk

    out_dtype = _CODE_DTYPE[out_dtype_code]
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    per_token = scheme == int(ActivationScheme.DYNAMIC_PER_TOKEN)
    if (decode_cuda and 0 < m <= CUDA_DECODE_MAX_M[act_int8]
            and (bias is None or (bias.dtype == out_dtype and bias.is_contiguous()))
            and _cuda_decode_loaded(x.device)):
        # the out-of-range blocks are added in the CUDA GEMM's epilogue (no correction launch)
        corr = (corr_row_ptr, corr_blocks, corr_values) if corr_blocks.numel() else None
        y, _, _ = cuda_decode(x, packed, codes, row_scale, input_scale, bias, n, act_int8,
                              scheme, out_dtype, corr)
        return y
    sms = tk.num_sms(x.device.index or 0)
    n_pad, kp = packed.shape[0], packed.shape[1] * 2
    split_cfg = tk.split_config(m, n_pad, kp, sms) if split and m < prefill_m else None
    if split_cfg is not None:
        # int8 activations as two exact E4M3 planes on the FP8 repacking (docs/int8_kernel.md)
        s_codes, s_row_scale, *s_corr = split
        q, xs = tk.quantize_activation_gpu(x, True, scheme, input_scale, split=True)
        pdl = s_corr[0].numel() > 0 and tk.correction_pdl(x.device, split_cfg[1])
        y = tk.w4a8_gemm(q, xs, packed, s_codes, s_row_scale, counters, lut, n, False,
                         per_token, bias, out_dtype, config=split_cfg, release=pdl, x_split=True)
        tk.correction(y, q, xs, per_token, *s_corr, pdl)
        return y
    if m >= prefill_m:
        # activations and weight in one launch, then the dense GEMM (the Triton dense GEMM
        # beats torch._scaled_mm row-wise on H100: 373 vs 448 us at M=4096, N=K=8192;
        # benchmarks/results/dense_prefill_gemm_h100_20261124_2327.jsonl)
        q, xs, dense = tk.prepare_prefill(x, act_int8, scheme, input_scale, packed, codes,
                                          row_scale, prefill_row_scale)
        y = tk.w4a8_gemm(q, xs, packed, codes, row_scale, counters, lut, n, act_int8, per_token,
                         bias, out_dtype, dense=dense, prefill_row_scale=prefill_row_scale)
        if prefill_row_scale is not None:
            tk.correction(y, q, xs, per_token, *prefill_corr)
            return y
        tk.correction(y, q, xs, per_token, corr_rows, corr_ptr, corr_blocks, corr_values)
    else:
        q, xs = tk.quantize_activation_gpu(x, act_int8, scheme, input_scale)
        cfg = tk.pick_config(m, n_pad, kp, act_int8, sms)
        pdl = corr_rows.numel() > 0 and tk.correction_pdl(x.device, cfg[1])
        y = tk.w4a8_gemm(q, xs, packed, codes, row_scale, counters, lut, n, act_int8, per_token,
                         bias, out_dtype, config=cfg, release=pdl)
        tk.correction(y, q, xs, per_token, corr_rows, corr_ptr, corr_blocks, corr_values, pdl)
    return y


@mxfp4_w4a8_linear.register_fake
def _(x, packed, codes, row_scale, counters, lut, corr_rows, corr_ptr, corr_blocks, corr_values,
      corr_row_ptr, prefill_row_scale, prefill_corr, split, input_scale, bias, n, act_int8,
      scheme, out_dtype_code, prefill_m, decode_cuda):
    return x.new_empty((x.shape[0], n), dtype=_CODE_DTYPE[out_dtype_code])


# --------------------------------------------------------------------------------------------
# backend class
# --------------------------------------------------------------------------------------------
class Sm90TritonLinearKernel(Mxfp4LinearKernel):
    name = "sm90_triton"

    @classmethod
    def is_supported(cls, device: DeviceInfo) -> Verdict:
        if device.type != "cuda":
            return False, f"needs a CUDA GPU (device is {device.type})"
        if _TRITON_ERROR is not None:
            return False, _TRITON_ERROR
        if device.capability not in SUPPORTED_CAPABILITIES:
            return False, (
                f"built for sm_{SUPPORTED_CAPABILITIES} (device is sm_{device.capability}); "
                "sm_100+ has its own native backend"
            )
        return True, None

    @classmethod
    def can_implement(cls, config: LinearKernelConfig) -> Verdict:
        if config.act_dtype == ActivationDtype.FP8_E4M3 and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            if major * 10 + minor < FP8_MIN_CAPABILITY:
                return False, (
                    f"FP8 activations need E4M3 tensor cores (sm_{FP8_MIN_CAPABILITY}+); the "
                    f"current device is sm_{major * 10 + minor}"
                )
        if config.in_features % 32 or config.in_features <= 0:
            return False, f"in_features={config.in_features} is not a positive multiple of 32"
        if config.out_features <= 0:
            return False, f"out_features={config.out_features} must be positive"
        if config.out_dtype not in OUT_DTYPES:
            return False, f"out_dtype {config.out_dtype} is not one of {OUT_DTYPES}"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        cfg = self.config
        act_int8 = cfg.act_dtype == ActivationDtype.INT8
        weight, weight_scale = layer.weight.data, layer.weight_scale.data
        if weight.shape[0] != cfg.out_features or weight.shape[1] * 2 != cfg.in_features:
            raise ValueError(
                f"layer.weight {tuple(weight.shape)} does not match N={cfg.out_features}, "
                f"K={cfg.in_features} (expected [N, K/2])"
            )
        rp = repack_mxfp4(weight, weight_scale, act_int8)
        frac = rp.num_out_of_range / max(rp.num_blocks, 1)
        limit = _env_fraction(MAX_CORRECTION_ENV, DEFAULT_MAX_CORRECTION)
        window = "4 binades per 256-wide K tile" if act_int8 else "12 binades per row"
        msg = (
            f"w4a8_mxfp4 sm90_triton: {cfg.describe()}: {rp.num_out_of_range} of {rp.num_blocks} "
            f"MXFP4 blocks ({100 * frac:.3f}%) lie outside the exact {window} "
            f"({rp.nan_blocks} NaN scales) in {rp.corr_rows.numel()} rows"
        )
        self.num_out_of_range = rp.num_out_of_range
        self.delegate: Mxfp4LinearKernel | None = None
        if frac > limit:
            from .fallback import DequantFallbackLinearKernel

            logger.warning(
                "%s; above %s=%g, so this layer uses the dequantize fallback", msg,
                MAX_CORRECTION_ENV, limit,
            )
            self.delegate = DequantFallbackLinearKernel(cfg)
            self.delegate.process_weights_after_loading(layer)
            return
        if rp.num_out_of_range:
            logger.info("%s; they are added back exactly by the correction kernel", msg)
        else:
            logger.debug("%s", msg)

        dev = weight.device
        n_pad = rp.packed.shape[0]
        layer.weight = torch.nn.Parameter(rp.packed, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(rp.codes, requires_grad=False)
        layer.w4a8_row_scale = rp.row_scale
        # split-K tile counters: up to 8 M tiles of (N_pad / 64) N tiles
        layer.w4a8_counters = torch.zeros(8 * n_pad // 64, dtype=torch.int32, device=dev)
        layer.w4a8_lut = decode_lut(act_int8).to(dev)
        layer.w4a8_corr_rows = rp.corr_rows
        layer.w4a8_corr_ptr = rp.corr_ptr
        layer.w4a8_corr_blocks = rp.corr_blocks
        layer.w4a8_corr_values = rp.corr_values
        layer.w4a8_corr_row_ptr = row_offsets(rp.corr_rows, rp.corr_ptr, n_pad)
        layer.w4a8_prefill_row_scale = None
        layer.w4a8_prefill_corr = []
        if act_int8:
            pf = int8_prefill_rows(weight, weight_scale, rp)
            pf_frac = (pf.num_out_of_range - rp.num_out_of_range) / max(rp.num_blocks, 1)
            pf_limit = _env_fraction(INT8_PREFILL_ROWS_ENV, DEFAULT_INT8_PREFILL_ROWS_MAX)
            if pf_frac <= pf_limit:
                layer.w4a8_prefill_row_scale = pf.row_scale
                layer.w4a8_prefill_corr = [pf.corr_rows, pf.corr_ptr, pf.corr_blocks,
                                           pf.corr_values]
            logger.log(
                logging.DEBUG if pf_frac <= pf_limit else logging.INFO,
                "w4a8_mxfp4 sm90_triton: %s: one 4-binade window per row would leave %.3f%% more "
                "of the blocks to the correction kernel; the INT8 prefill GEMM uses %s (%s=%g)",
                cfg.describe(), 100 * pf_frac,
                "one reference per row" if pf_frac <= pf_limit else "per-tile references",
                INT8_PREFILL_ROWS_ENV, pf_limit)
        layer.w4a8_split = []
        if act_int8 and int8_split_enabled(dev):
            fp = repack_mxfp4(weight, weight_scale, act_int8=False, packed=rp.packed)
            layer.w4a8_split = [fp.codes, fp.row_scale, fp.corr_rows, fp.corr_ptr,
                                fp.corr_blocks, fp.corr_values]
            if "split" not in _LOGGED_ONCE:
                _LOGGED_ONCE.add("split")
                logger.info("w4a8_mxfp4 sm90_triton: INT8 layers also keep their FP8 codes (one "
                            "byte per 32 weights) for the split path between decode and prefill "
                            "(%s=0 turns it off)", INT8_SPLIT_ENV)
            logger.debug("w4a8_mxfp4 sm90_triton: %s: the INT8 split path's FP8 codes take %d "
                         "bytes (%d blocks outside their row's 12 binades)", cfg.describe(),
                         split_bytes(layer.w4a8_split), fp.num_out_of_range)
        self.prefill_rows = layer.w4a8_prefill_row_scale is not None
        self.prefill_m = _prefill_m(act_int8)
        self.decode_cuda = _use_cuda_decode(dev)

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.delegate is not None:
            return self.delegate.apply(layer, x, bias)
        cfg = self.config
        k = cfg.in_features
        if x.shape[-1] != k:
            raise ValueError(f"input x has last dimension {x.shape[-1]}, layer expects K={k}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"input x must be bf16/fp16/fp32, got {x.dtype}")
        input_scale = layer.input_scale
        if cfg.act_scheme == ActivationScheme.STATIC_PER_TENSOR and input_scale is None:
            raise ValueError("static activation scheme but layer.input_scale is None")
        y = torch.ops.w4a8_backend.mxfp4_w4a8_linear(
            x.reshape(-1, k),
            layer.weight,
            layer.weight_scale,
            layer.w4a8_row_scale,
            layer.w4a8_counters,
            layer.w4a8_lut,
            layer.w4a8_corr_rows,
            layer.w4a8_corr_ptr,
            layer.w4a8_corr_blocks,
            layer.w4a8_corr_values,
            layer.w4a8_corr_row_ptr,
            layer.w4a8_prefill_row_scale,
            layer.w4a8_prefill_corr,
            layer.w4a8_split,
            input_scale if cfg.act_scheme == ActivationScheme.STATIC_PER_TENSOR else None,
            bias,
            cfg.out_features,
            cfg.act_dtype == ActivationDtype.INT8,
            int(cfg.act_scheme),
            _DTYPE_CODE[cfg.out_dtype],
            self.prefill_m,
            self.decode_cuda,
        )
        return y.reshape(*x.shape[:-1], cfg.out_features)
