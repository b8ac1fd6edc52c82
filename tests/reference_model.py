"""An independent reference forward for W4A8 MXFP4 checkpoints, built on transformers.

The model is instantiated from the checkpoint's ``config.json`` (its quantization_config removed),
unquantized tensors are loaded as they are, every quantized linear (and an MXFP4 lm_head or input
embedding) gets its exactly dequantized MXFP4 weight, and a forward pre-hook on each linear
quantizes and dequantizes its input exactly as the W4A8 format defines (static ``input_scale`` or
dynamic scales). Nothing from vLLM or from the plugin's kernels
is used: only ``w4a8_backend.formats``.
"""

from __future__ import annotations

import json
import re
import types
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


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


EXPERT_KEY = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)"
    r"\.(?P<tensor>weight|weight_scale|input_scale)$"
)
GATE_UP_DOWN = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
                "down_proj": "down", "w2": "down"}


def _transformers_block(block: str) -> str:
    # Mixtral checkpoints say block_sparse_moe; transformers 5 names the module mlp.
    return block.replace(".block_sparse_moe", ".mlp")


def _collect_experts(tensors: dict) -> dict[str, dict]:
    """``{experts module path: {(expert, gate|up|down): {tensor name: tensor}}}``."""
    experts: dict[str, dict] = {}
    for key in list(tensors):
        match = EXPERT_KEY.match(key)
        if match:
            block = _transformers_block(match["block"]) + ".experts"
            slot = (int(match["expert"]), GATE_UP_DOWN[match["proj"]])
            experts.setdefault(block, {}).setdefault(slot, {})[match["tensor"]] = tensors.pop(key)
    return experts


def exact_experts_forward(weights: dict, act, schemes, scales):
    """The W4A8 MoE semantics (kernels/moe_base.py), written independently: one quantization of
    the layer input for all experts, one of all routed (token, expert) intermediate rows."""
    (scheme1, scheme2), (s1, s2) = schemes, scales

    def forward(self, hidden_states, top_k_index, top_k_weights):
        xq = fake_quantize_activation(hidden_states.float(), act, scheme1, s1)
        rows, pairs = [], []
        for token in range(hidden_states.shape[0]):
            for slot in range(top_k_index.shape[1]):
                expert = int(top_k_index[token, slot])
                gate = xq[token] @ weights[(expert, "gate")].t()
                up = xq[token] @ weights[(expert, "up")].t()
                rows.append(torch.nn.functional.silu(gate) * up)
                pairs.append((token, slot, expert))
        hq = fake_quantize_activation(torch.stack(rows), act, scheme2, s2)
        out = torch.zeros(hidden_states.shape, dtype=torch.float32)
        for row, (token, slot, expert) in zip(hq, pairs):
            out[token] += float(top_k_weights[token, slot]) * (row @ weights[(expert, "down")].t())
        return out.to(hidden_states.dtype)

    return forward


def build_reference_model(
    checkpoint: str | Path,
    act_dtype: ActivationDtype | None = None,
    dynamic_scheme: ActivationScheme | None = None,
    dtype: torch.dtype = torch.float32,
    auto_class: str = "AutoModelForCausalLM",
) -> torch.nn.Module:
    """A transformers model computing the exact W4A8 semantics of ``checkpoint``.

    ``act_dtype`` overrides the checkpoint's activation dtype the same way the plugin's
    ``W4A8_MXFP4_ACTIVATIONS`` does (static scales are converted through amax). ``auto_class``:
    the transformers class that builds the model (``"AutoModel"`` for a BERT encoder).
    """
    import transformers
    from transformers import AutoConfig

    checkpoint = Path(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text())
    quant = raw.pop("quantization_config")
    ckpt_act = ActivationDtype.INT8 if quant["quant_algo"].endswith("INT8") else ActivationDtype.FP8_E4M3
    act = act_dtype or ckpt_act
    scheme_dynamic = dynamic_scheme or DEFAULT_DYNAMIC_SCHEME[act]

    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    config.architectures = raw.get("architectures")
    model = getattr(transformers, auto_class).from_config(config, dtype=dtype)
    model.eval()
    tensors = load_tensors(checkpoint)
    experts = _collect_experts(tensors)

    quantized = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    state = {}
    for key, value in tensors.items():
        if key.endswith((".weight_scale", ".input_scale", ".k_scale", ".v_scale")):
            continue
        prefix = key[: -len(".weight")] if key.endswith(".weight") else None
        key = _transformers_block(key)
        if prefix in quantized:
            value = dequantize_mxfp4(value, tensors[f"{prefix}.weight_scale"], torch.float32)
        state[key] = value.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    fused_expert_params = tuple(f"{path}." for path in experts)
    missing = [m for m in missing if not m.startswith(fused_expert_params) and "rotary" not in m]
    if unexpected or missing:
        raise ValueError(f"reference model: missing {missing}, unexpected {unexpected}")

    modules = dict(model.named_modules())
    for prefix in quantized:
        module = modules[prefix]
        if isinstance(module, torch.nn.Embedding):
            continue  # an MXFP4 embedding (quantized_vocab_layers) has no input activation
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

    def served_scale(stored: torch.Tensor | None, scheme_if_dynamic):
        if stored is None:
            return scheme_if_dynamic, None
        return ActivationScheme.STATIC_PER_TENSOR, stored * QMAX[ckpt_act] / QMAX[act]

    for path, slots in experts.items():
        weights = {slot: dequantize_mxfp4(t["weight"], t["weight_scale"], torch.float32)
                   for slot, t in slots.items()}

        def layer_scale(kinds):
            found = [t["input_scale"].float() for (e, kind), t in slots.items()
                     if kind in kinds and "input_scale" in t]
            return torch.stack(found).max().reshape(1) if found else None

        (scheme1, s1) = served_scale(layer_scale(("gate", "up")), scheme_dynamic)
        (scheme2, s2) = served_scale(layer_scale(("down",)), scheme_dynamic)
        module = modules[path]
        module.forward = types.MethodType(
            exact_experts_forward(weights, act, (scheme1, scheme2), (s1, s2)), module)
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


@torch.no_grad()
def bf16_greedy_gaps(checkpoint: str | Path, act_dtype: ActivationDtype,
                     prompts_ids: list[list[int]], steps: int) -> list[float]:
    """How far an exact bf16 computation's greedy tokens land from the fp32 reference's top-1.

    The same reference model in bf16 generates greedily; the fp32 one scores each token. The
    gaps ``max(logprob) - logprob[token]`` are the floor a bf16 engine's tokens can be held to.
    """
    exact = build_reference_model(checkpoint, act_dtype=act_dtype)
    half = build_reference_model(checkpoint, act_dtype=act_dtype, dtype=torch.bfloat16)
    gaps = []
    for ids in prompts_ids:
        tokens, inputs, past = [], torch.tensor([ids]), None
        for _ in range(steps):
            result = half(input_ids=inputs, past_key_values=past, use_cache=True)
            past = result.past_key_values
            tokens.append(int(result.logits[0, -1].float().argmax()))
            inputs = torch.tensor([[tokens[-1]]])
        gaps += [float(r.max() - r[t]) for t, r in zip(tokens, reference_logprobs(exact, ids, tokens))]
    return gaps
