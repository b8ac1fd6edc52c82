"""An independent reference forward for W4A8 MXFP4 checkpoints, built on transformers.

The model is instantiated from the checkpoint's ``config.json`` (its quantization_config removed),
unquantized tensors are loaded as they are, every quantized linear gets its exactly dequantized
MXFP4 weight, and a forward pre-hook quantizes and dequantizes its input exactly as the W4A8 format
defines (static ``input_scale`` or dynamic scales). Nothing from vLLM or from the plugin's kernels
is used: only ``w4a8_backend.formats``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from w4a8_backend.formats import (
    DEFAULT_DYNAMIC_SCHEME,
    ActivationDtype,
    ActivationScheme,
    dequantize_mxfp4,
    fake_quantize_activation,
)
from w4a8_backend.formats.activations import QMAX


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def build_reference_model(
    checkpoint: str | Path,
    act_dtype: ActivationDtype | None = None,
    dynamic_scheme: ActivationScheme | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A transformers model computing the exact W4A8 semantics of ``checkpoint``.

    ``act_dtype`` overrides the checkpoint's activation dtype the same way the plugin's
    ``W4A8_MXFP4_ACTIVATIONS`` does (static scales are converted through amax).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    quant = raw.pop("quantization_config")
    ckpt_act = ActivationDtype.INT8 if quant["quant_algo"].endswith("INT8") else ActivationDtype.FP8_E4M3
    act = act_dtype or ckpt_act
    scheme_dynamic = dynamic_scheme or DEFAULT_DYNAMIC_SCHEME[act]

    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    config.architectures = raw.get("architectures")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    tensors = _load_tensors(checkpoint)

    quantized = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    state = {}
    for key, value in tensors.items():
        if key.endswith((".weight_scale", ".input_scale", ".k_scale", ".v_scale")):
            continue
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        if prefix in quantized:
            value = dequantize_mxfp4(value, tensors[f"{prefix}.weight_scale"], torch.float32)
        state[key] = value.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ValueError(f"reference model: missing {missing}, unexpected {unexpected}")

    modules = dict(model.named_modules())
    for prefix in quantized:
        module = modules[prefix]
        stored = tensors.get(f"{prefix}.input_scale")
        if stored is not None:
            static = stored.float().reshape(1) * QMAX[ckpt_act] / QMAX[act]
            scheme = ActivationScheme.STATIC_PER_TENSOR
        else:
            static, scheme = None, scheme_dynamic

        def hook(mod, args, static=static, scheme=scheme):
            (x,) = args
            return (fake_quantize_activation(x, act, scheme, static).to(x.dtype),)

        module.register_forward_pre_hook(hook)
    return model


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module, prompt_ids: list[int], generated: list[int]
) -> list[torch.Tensor]:
    """Teacher-forced log-softmax of each generation step, fed the engine's own tokens."""
    logprobs = []
    inputs = torch.tensor([prompt_ids])
    past = None
    for token in generated:
        result = model(input_ids=inputs, past_key_values=past, use_cache=True)
        past = result.past_key_values
        logprobs.append(torch.log_softmax(result.logits[0, -1].float(), dim=-1))
        inputs = torch.tensor([[token]])
    return logprobs
