"""Shared fixtures: tiny local models, their ModelOpt and w4a8-quantize exports, vLLM engines.

The environment is set before anything imports vLLM: CPU platform, a small KV cache, the
in-process engine (one engine starts in ~3 s, DESIGN.md §4) and no network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

for key, value in {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def modelopt_llama_static(tiny_llama, tmp_path_factory) -> Path:
    """ModelOpt 0.47 W4A8_MXFP4_FP8 with max calibration: per-layer input_scale present."""
    return tiny_models.export_with_modelopt(
        tiny_llama, tmp_path_factory.mktemp("mo_llama_static"), static=True
    )


@pytest.fixture(scope="session")
def modelopt_llama_dynamic(tiny_llama, tmp_path_factory) -> Path:
    """ModelOpt 0.47's shipped W4A8_MXFP4_FP8 preset: no input_scale (dynamic activations)."""
    return tiny_models.export_with_modelopt(
        tiny_llama, tmp_path_factory.mktemp("mo_llama_dynamic"), static=False
    )


def _export(src, factory, name, **kwargs) -> Path:
    from w4a8_backend.tools.quantize import quantize_checkpoint

    out = factory.mktemp(name) / "ckpt"
    quantize_checkpoint(src, out, progress=False, **kwargs)
    return out


@pytest.fixture(scope="session")
def exported_llama_int8_static(tiny_llama, tmp_path_factory) -> Path:
    """w4a8-quantize's own W4A8_MXFP4_INT8 format with calibrated input_scale = amax/127."""
    return _export(tiny_llama, tmp_path_factory, "ex_llama_int8", activations="int8",
                   calibration="static")


@pytest.fixture(scope="session")
def exported_llama_int8_dynamic(tiny_llama, tmp_path_factory) -> Path:
    return _export(tiny_llama, tmp_path_factory, "ex_llama_int8_dyn", activations="int8",
                   calibration="dynamic")


@pytest.fixture(scope="session")
def exported_llama_fp8_static(tiny_llama, tmp_path_factory) -> Path:
    return _export(tiny_llama, tmp_path_factory, "ex_llama_fp8", activations="fp8",
                   calibration="static")


@pytest.fixture(scope="session")
def exported_llama_vocab_fp8_static(tiny_llama, tmp_path_factory) -> Path:
    """FP8 static, with lm_head and embed_tokens stored as MXFP4 (--quantize-vocab)."""
    return _export(tiny_llama, tmp_path_factory, "ex_llama_vocab_fp8", activations="fp8",
                   calibration="static", quantize_vocab=("lm_head", "embed_tokens"))


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def modelopt_qwen3_moe_static(tiny_qwen3_moe, tmp_path_factory) -> Path:
    return tiny_models.export_with_modelopt(
        tiny_qwen3_moe, tmp_path_factory.mktemp("mo_qwen3_moe_static"), static=True
    )


@pytest.fixture(scope="session")
def modelopt_mixtral_dynamic(tiny_mixtral, tmp_path_factory) -> Path:
    return tiny_models.export_with_modelopt(
        tiny_mixtral, tmp_path_factory.mktemp("mo_mixtral_dynamic"), static=False
    )


@pytest.fixture(scope="session")
def exported_qwen3_moe_int8_static(tiny_qwen3_moe, tmp_path_factory) -> Path:
    return _export(tiny_qwen3_moe, tmp_path_factory, "ex_qwen3_moe_int8", activations="int8",
                   calibration="static")


@pytest.fixture(scope="session")
def exported_mixtral_fp8_static(tiny_mixtral, tmp_path_factory) -> Path:
    return _export(tiny_mixtral, tmp_path_factory, "ex_mixtral_fp8", activations="fp8",
                   calibration="static")


@pytest.fixture(scope="session")
def exported_llama_fp8_kv(tiny_llama, tmp_path_factory) -> Path:
    """FP8 static activations plus FP8 KV-cache scales (k_scale/v_scale, kv_cache_quant_algo)."""
    return _export(tiny_llama, tmp_path_factory, "ex_llama_fp8_kv", activations="fp8",
                   calibration="static", kv_cache_fp8=True)
