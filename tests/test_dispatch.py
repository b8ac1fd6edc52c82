"""Dispatcher choices under faked device capabilities, with real, missing and old FlashInfer.

The only fake is the hardware: ``DeviceInfo`` carries a made-up capability and the SM100 backend's
view of torch's CUDA build is patched (this torch is a CPU build). FlashInfer itself is the real
installed package unless a test removes it or rewrites its version on purpose.

These tests do not depend on whether the SM90 backend (written elsewhere) is present: they assert
the SM100 verdicts and that *some* non-SM100 backend is chosen when SM100 cannot run.
"""

from __future__ import annotations

import sys

import pytest
import torch

from w4a8_backend.formats import ActivationDtype, ActivationScheme
from w4a8_backend.kernels import dispatch
from w4a8_backend.kernels import sm100_flashinfer as sm100
from w4a8_backend.kernels.base import DeviceInfo, LinearKernelConfig
from w4a8_backend.kernels.dispatch import (
    FORCE_ENV,
    backend_names,
    choose_linear_kernel,
    evaluate_backends,
)

flashinfer = pytest.importorskip(
    "flashinfer", reason="the sm100 extra (flashinfer-python) is required"
)

SM100 = "sm100_flashinfer"


def fp8_config(n=256, k=512, out_dtype=torch.bfloat16, act=ActivationDtype.FP8_E4M3,
               scheme=ActivationScheme.DYNAMIC_PER_TENSOR) -> LinearKernelConfig:
    return LinearKernelConfig(act, scheme, n, k, out_dtype)


def blackwell(cap=100) -> DeviceInfo:
    return DeviceInfo("cuda", cap, "NVIDIA B200" if cap == 100 else "NVIDIA B300")


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(FORCE_ENV, raising=False)


@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend torch is a CUDA 12.9 build (part of faking the Blackwell machine)."""
    monkeypatch.setattr(sm100, "_torch_cuda_version", lambda: "12.9")


def sm100_verdict(config, device):
    verdicts = {name: (cls, reason) for name, cls, reason in evaluate_backends(config, device)}
    return verdicts[SM100]


def test_sm100_is_first_in_the_order():
    assert backend_names()[0] == SM100
    assert backend_names()[-1] == "fallback"


@pytest.mark.parametrize("cap", [100, 103])
def test_blackwell_with_flashinfer_chooses_sm100(cap, cuda_torch):
    cls = choose_linear_kernel(fp8_config(), blackwell(cap))
    assert cls.name == SM100
    assert cls is sm100.Sm100FlashInferLinearKernel


@pytest.mark.parametrize("scheme", list(ActivationScheme))
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_sm100_accepts_every_fp8_scheme_and_16bit_output(scheme, out_dtype, cuda_torch):
    cls = choose_linear_kernel(fp8_config(out_dtype=out_dtype, scheme=scheme), blackwell())
    assert cls.name == SM100


@pytest.mark.parametrize(
    "device, expected",
    [
        (DeviceInfo("cuda", 90, "NVIDIA H100"), "sm_90 has no tcgen05"),
        (DeviceInfo("cuda", 89, "NVIDIA L40S"), "sm_89 has no tcgen05"),
        (DeviceInfo("cuda", 80, "NVIDIA A100"), "sm_80 has no tcgen05"),
        (DeviceInfo("cuda", 120, "RTX PRO 6000"), "sm_120 has no tcgen05"),
        (DeviceInfo("cpu", None, "cpu"), "needs a Blackwell GPU"),
        (DeviceInfo("cuda", None, "cuda"), "needs a Blackwell GPU"),
    ],
)
def test_non_blackwell_passes_sm100_over(device, expected, cuda_torch):
    cls, reason = sm100_verdict(fp8_config(), device)
    assert cls is None and expected in reason
    chosen = choose_linear_kernel(fp8_config(), device)
    assert chosen.name != SM100 and chosen.name in backend_names()


def test_cpu_chooses_the_fallback():
    assert choose_linear_kernel(fp8_config(), DeviceInfo.of("cpu")).name == "fallback"


def test_missing_flashinfer_falls_through_with_reason(monkeypatch, cuda_torch):
    # `import flashinfer` raises ImportError when sys.modules holds None for it.
    for name in [m for m in sys.modules if m == "flashinfer" or m.startswith("flashinfer.")]:
        monkeypatch.setitem(sys.modules, name, None)
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None
    assert "flashinfer is not importable" in reason and "w4a8-backend[sm100]" in reason
    chosen = choose_linear_kernel(fp8_config(), blackwell())
    assert chosen.name != SM100


@pytest.mark.parametrize("version", ["0.5.3", "0.2.14.post1", "0.0.0+unknown", "garbage"])
def test_old_flashinfer_falls_through_with_reason(version, monkeypatch, cuda_torch):
    monkeypatch.setattr(flashinfer, "__version__", version)
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None
    assert f"flashinfer {version} is older than {sm100.FLASHINFER_MIN_VERSION}" in reason
    assert choose_linear_kernel(fp8_config(), blackwell()).name != SM100


def test_flashinfer_without_the_gemm_falls_through(monkeypatch, cuda_torch):
    import flashinfer.gemm as fg

    monkeypatch.delattr(fg, "group_gemm_mxfp8_mxfp4_nt_groupwise")
    monkeypatch.delattr(fg, "group_gemm_mxfp4_nt_groupwise")
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None and "group_gemm_mxfp8_mxfp4_nt_groupwise" in reason


def test_flashinfer_gemm_with_other_signature_falls_through(monkeypatch, cuda_torch):
    import flashinfer.gemm as fg

    def group_gemm_mxfp8_mxfp4_nt_groupwise(a, b, a_scale, b_scale, seg_indptr):  # renamed arg
        raise AssertionError("must not be called")

    monkeypatch.setattr(
        fg, "group_gemm_mxfp8_mxfp4_nt_groupwise", group_gemm_mxfp8_mxfp4_nt_groupwise
    )
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None and "does not accept ['m_indptr', 'out_dtype']" in reason


def test_old_name_of_the_gemm_is_enough(monkeypatch, cuda_torch):
    # FlashInfer 0.6.x exports the GEMM only as group_gemm_mxfp4_nt_groupwise.
    import flashinfer.gemm as fg

    monkeypatch.delattr(fg, "group_gemm_mxfp8_mxfp4_nt_groupwise")
    assert choose_linear_kernel(fp8_config(), blackwell()).name == SM100


def test_cpu_torch_build_is_refused_on_faked_blackwell():
    # Without the CUDA-build fake, this CPU torch is (rightly) refused.
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None and "torch.version.cuda is None" in reason


def test_old_cuda_torch_is_refused(monkeypatch):
    monkeypatch.setattr(sm100, "_torch_cuda_version", lambda: "12.6")
    cls, reason = sm100_verdict(fp8_config(), blackwell())
    assert cls is None and "CUDA 12.6" in reason and "12.8" in reason


@pytest.mark.parametrize(
    "config, expected",
    [
        (fp8_config(act=ActivationDtype.INT8, scheme=ActivationScheme.DYNAMIC_PER_TOKEN),
         "INT8 activations"),
        (fp8_config(k=480), "in_features=480 is not a multiple of 128"),
        (fp8_config(n=250), "out_features=250 is not a multiple of 8"),
        (fp8_config(out_dtype=torch.float32), "bfloat16/float16 only"),
    ],
)
def test_layers_sm100_cannot_run_go_to_the_next_backend(config, expected, cuda_torch):
    cls, reason = sm100_verdict(config, blackwell())
    assert cls is None and expected in reason
    chosen = choose_linear_kernel(config, blackwell())
    assert chosen.name != SM100 and chosen.name in backend_names()


def test_forcing_sm100_where_it_cannot_run_names_the_reason(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, SM100)
    with pytest.raises(ValueError, match=r"sm100_flashinfer.*cannot run.*needs a Blackwell GPU"):
        choose_linear_kernel(fp8_config(), DeviceInfo.of("cpu"))


def test_forcing_sm100_on_faked_blackwell(monkeypatch, cuda_torch):
    assert choose_linear_kernel(fp8_config(), blackwell(), forced=SM100).name == SM100


def test_forcing_an_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="names no kernel backend"):
        choose_linear_kernel(fp8_config(), DeviceInfo.of("cpu"), forced="sm99_magic")


def test_choice_is_logged_with_passed_over_reasons(monkeypatch):
    import logging

    monkeypatch.setattr(dispatch, "_logged", set())
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.INFO)
    log = dispatch.logger
    old_level = log.level
    monkeypatch.setattr(log, "disabled", False)
    log.setLevel(logging.INFO)  # setLevel, not the attribute: it clears the level cache
    log.addHandler(handler)
    try:
        choose_linear_kernel(fp8_config(n=264), DeviceInfo("cuda", 90, "NVIDIA H100"))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert any("sm100_flashinfer: sm_90 has no tcgen05" in r for r in records), records


def test_kernel_logs_go_where_vllm_shows_them():
    """vLLM configures handlers for its ``vllm`` logger only: the backends' records (which kernel
    variant runs, corrected blocks, why a fast path is off) must come from a child of it, as the
    dispatcher's do, or a vLLM process drops the INFO ones."""
    from w4a8_backend.kernels import _cuda_ext, dispatch, sm90_triton, sm90_triton_moe

    for module in (dispatch, sm90_triton, sm90_triton_moe, _cuda_ext):
        assert module.logger.name.startswith("vllm."), module.__name__


def test_sm90_fraction_settings_name_the_variable(monkeypatch):
    """A malformed fraction setting (correction limits of the SM90 backend) is an error that
    names the variable, not a bare float() traceback; unset means the default."""
    from w4a8_backend.kernels import sm90_triton

    name = sm90_triton.INT8_PREFILL_ROWS_ENV
    monkeypatch.delenv(name, raising=False)
    assert sm90_triton._env_fraction(name, 0.25) == 0.25
    monkeypatch.setenv(name, "0.001")
    assert sm90_triton._env_fraction(name, 0.25) == 0.001
    monkeypatch.setenv(name, "one percent")
    with pytest.raises(ValueError, match=name):
        sm90_triton._env_fraction(name, 0.25)


def test_int8_split_setting(monkeypatch):
    """W4A8_MXFP4_INT8_SPLIT: on by default but only on sm_90 CUDA devices (never on the CPU),
    off with 0, and a malformed value is an error that names the variable."""
    from w4a8_backend.kernels import sm90_triton

    name = sm90_triton.INT8_SPLIT_ENV
    monkeypatch.delenv(name, raising=False)
    assert sm90_triton.int8_split_enabled(torch.device("cpu")) is False
    monkeypatch.setenv(name, "0")
    assert sm90_triton.int8_split_enabled(torch.device("cpu")) is False
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=name):
        sm90_triton.int8_split_enabled(torch.device("cpu"))


@pytest.mark.parametrize("n_pad, sms, expected_warps", [
    (4096, 132, 8),    # 256 CTAs x 4 warps = 7.8 warps per SM: the small-grid config
    (6144, 132, 4),    # 384 CTAs: 11.6 warps per SM at 4 warps per CTA
    (8192, 132, 4),
    (28672, 132, 4),
    (4096, 100, 4),    # the same weight fills a GPU of fewer SMs
    (2048, 132, 8),
])
def test_cuda_decode_config_fills_small_grids(n_pad, sms, expected_warps):
    """The CUDA decode GEMM has one CTA per 16 weight rows: a weight with too few rows to give
    every SM CUDA_DECODE_MIN_WARPS_PER_SM warps at 4 warps per CTA gets 8 per CTA."""
    from w4a8_backend.kernels import sm90_triton

    warps, stages = sm90_triton.cuda_decode_config(n_pad, sms)
    assert (warps, stages) == ((8, 2) if expected_warps == 8 else sm90_triton.CUDA_DECODE_CONFIG)
    assert warps == expected_warps
