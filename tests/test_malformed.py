"""Malformed checkpoints, generated from a valid tiny ModelOpt checkpoint: every one must stop a
real vLLM engine at start-up with a ValueError naming the tensor or setting. None may load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import generate_in_subprocess, make_llm, release

pytestmark = pytest.mark.engine

LAYER = "model.layers.0"
Q, K, V, O = (f"{LAYER}.self_attn.{p}_proj" for p in "qkvo")
GATE, UP, DOWN = (f"{LAYER}.mlp.{p}_proj" for p in ("gate", "up", "down"))


def _tensor_edit(fn):
    def mutate(directory: Path) -> None:
        (shard,) = directory.glob("*.safetensors")
        tensors = load_file(shard)
        fn(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return mutate


def _config_edit(fn, files=("config.json", "hf_quant_config.json")):
    def mutate(directory: Path) -> None:
        for name in files:
            path = directory / name
            data = json.loads(path.read_text())
            section = data["quantization_config"] if name == "config.json" else data["quantization"]
            fn(section)
            path.write_text(json.dumps(data))
    return mutate


def _set(key, value):
    def edit(tensors):
        tensors[key] = value(tensors[key]) if callable(value) else value
    return edit


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _nan_scale(tensors):
    scale = tensors[f"{O}.weight_scale"].clone()
    scale[3, 1] = 0xFF
    tensors[f"{O}.weight_scale"] = scale


def _truncate(directory: Path) -> None:
    (shard,) = directory.glob("*.safetensors")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 4096])


def _model_config(**changes):
    def mutate(directory: Path) -> None:
        path = directory / "config.json"
        data = json.loads(path.read_text())
        data.update(changes)
        path.write_text(json.dumps(data))
    return mutate


# (id, mutation, engine overrides, regex the error must match)
CASES = [
    ("weight-dtype-int8", _tensor_edit(_set(f"{Q}.weight", lambda t: t.view(torch.int8))), {},
     rf"{Q}\.weight.*dtype torch\.int8.*expected torch\.uint8"),
    ("weight-dtype-bf16", _tensor_edit(_set(f"{UP}.weight", lambda t: t.to(torch.bfloat16))), {},
     rf"{UP}\.weight.*dtype torch\.bfloat16"),
    ("weight-unpacked-width", _tensor_edit(_set(f"{O}.weight", lambda t: torch.cat([t, t], 1))),
     {}, rf"{O}\.weight.*shape \(128, 128\).*last dimension of 64"),
    ("weight-extra-rows", _tensor_edit(_set(f"{DOWN}.weight", lambda t: torch.cat([t, t[:1]]))),
     {}, rf"{DOWN}\.weight.*does not fit"),
    ("weight-1d", _tensor_edit(_set(f"{K}.weight", lambda t: t.reshape(-1))), {},
     rf"{K}\.weight.*expected 2 dimensions"),
    ("scale-dtype-float", _tensor_edit(_set(f"{V}.weight_scale", lambda t: t.float())), {},
     rf"{V}\.weight_scale.*dtype torch\.float32"),
    ("scale-wrong-blocks", _tensor_edit(_set(f"{GATE}.weight_scale", lambda t: t[:, :2].contiguous())), {},
     rf"{GATE}\.weight_scale.*last dimension of 4"),
    ("scale-missing", _tensor_edit(_drop(f"{O}.weight_scale")), {},
     rf"\['{O}\.weight_scale'\] are missing"),
    ("scale-missing-one-shard", _tensor_edit(_drop(f"{K}.weight_scale")), {},
     rf"\['{K}\.weight_scale'\] are missing"),
    ("weight-missing", _tensor_edit(_drop(f"{DOWN}.weight")), {},
     rf"\['{DOWN}\.weight'\] are missing"),
    ("scale-nan-0xff", _tensor_edit(_nan_scale), {},
     rf"{O}\.weight_scale holds 1 E8M0 NaN.*index \(3, 1\)"),
    ("input-scale-nan", _tensor_edit(_set(f"{O}.input_scale", torch.tensor(float("nan")))), {},
     rf"{O}\.input_scale is nan"),
    ("input-scale-inf", _tensor_edit(_set(f"{DOWN}.input_scale", torch.tensor(float("inf")))), {},
     rf"{DOWN}\.input_scale is inf"),
    ("input-scale-negative", _tensor_edit(_set(f"{Q}.input_scale", torch.tensor(-0.5))), {},
     rf"{Q}\.input_scale.*is -0\.5;"),
    ("input-scale-zero", _tensor_edit(_set(f"{GATE}.input_scale", torch.tensor(0.0))), {},
     rf"{GATE}\.input_scale.*is 0\.0"),
    ("input-scale-vector", _tensor_edit(_set(f"{O}.input_scale", torch.tensor([0.1, 0.2]))), {},
     rf"{O}\.input_scale must be a scalar"),
    ("input-scale-int", _tensor_edit(_set(f"{O}.input_scale", torch.tensor(3))), {},
     rf"{O}\.input_scale has dtype torch\.int64"),
    ("input-scale-one-shard-only", _tensor_edit(lambda t: [t.pop(f"{GATE}.input_scale")]), {},
     rf"has \['{UP}\.input_scale'\] but not the input_scale of every part of the fused "
     rf"layer '{LAYER}\.mlp\.gate_up_proj'"),
    ("in-features-not-32", _model_config(intermediate_size=240), {},
     r"down_proj' has 240 input features per tensor-parallel rank.*multiple of 32"),
    ("quant-algo-unknown",
     _config_edit(lambda q: q.update(quant_algo="W4A16_MXFP4")), {},
     r"quant_algo 'W4A16_MXFP4' is not served by w4a8_mxfp4"),
    ("quant-algo-missing", _config_edit(lambda q: q.pop("quant_algo")), {},
     r"'quant_algo' must be one of"),
    ("group-size-16", _config_edit(lambda q: q.update(group_size=16)), {},
     r"'group_size' must be 32"),
    ("kv-algo-int8", _config_edit(lambda q: q.update(kv_cache_quant_algo="INT8")), {},
     r"'kv_cache_quant_algo' must be null or 'FP8'"),
    ("exclude-not-list", _config_edit(lambda q: q.update(ignore="lm_head"), ("config.json",)), {},
     r"'ignore' must be a list"),
    ("contradictory-flag", lambda d: None, {"quantization": "fp8"},
     r"quant_algo is W4A8_MXFP4_FP8, served by --quantization w4a8_mxfp4, but --quantization "
     r"fp8 was given"),
    ("nvfp4-checkpoint-with-flag", _config_edit(lambda q: q.update(quant_algo="NVFP4")), {},
     r"quant_algo 'NVFP4' is not served by w4a8_mxfp4"),
    ("truncated-safetensors", _truncate, {},
     r"model\.safetensors is truncated: its tensors need \d+ bytes of data, the file holds \d+"),
    ("partial-fused-exclude",
     _config_edit(lambda q: q.update(ignore=q["ignore"] + [Q]), ("config.json",)), {},
     rf"fused layer '{LAYER}\.self_attn\.qkv_proj'.*excludes only \['{Q}'\]"),
]


@pytest.fixture
def malformed(modelopt_llama_static, tmp_path):
    def make(mutation) -> Path:
        target = tmp_path / "ckpt"
        shutil.copytree(modelopt_llama_static, target)
        mutation(target)
        return target
    return make


@pytest.mark.parametrize("case_id,mutation,overrides,pattern", CASES, ids=[c[0] for c in CASES])
def test_malformed_checkpoint_refused(malformed, case_id, mutation, overrides, pattern):
    path = malformed(mutation)
    with pytest.raises(ValueError, match=pattern):
        llm = make_llm(path, **overrides)
        release(llm)  # only reached if it loaded, which fails the test


@pytest.mark.slow
def test_in_features_misaligned_per_tp_rank(malformed):
    """96 input features are three MXFP4 blocks: split over TP=2 each rank would get 48."""
    path = malformed(_model_config(intermediate_size=96))
    with pytest.raises(RuntimeError, match=r"down_proj' has 48 input features per "
                                           r"tensor-parallel rank \(96 in total, split 2 ways\)"):
        generate_in_subprocess(path, tensor_parallel_size=2, timeout=300,
                               env={"VLLM_CPU_OMP_THREADS_BIND": "0|1",
                                    "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})


def test_valid_copy_loads(malformed):
    """The suite's base checkpoint itself loads: each failure above comes from its mutation."""
    llm = make_llm(malformed(lambda d: None))
    release(llm)
