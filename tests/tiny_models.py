"""Tiny local Hugging Face models for tests (no model hub needed).

Plain functions, shared by the exporter tests and the vLLM engine tests:

- :func:`build_tokenizer` trains a small byte-level BPE tokenizer on the package's calibration text
  and saves it with a chat template.
- :func:`make_tiny_llama`, :func:`make_tiny_qwen3_moe`, :func:`make_tiny_mixtral` write a random
  bf16 model (2 layers, hidden 128, head_dim 32 so vLLM's CPU attention accepts it, every linear
  in-features a multiple of 32) plus the tokenizer into a directory and return that directory.
- :func:`export_with_modelopt` quantizes such a model with ModelOpt 0.47's ``W4A8_MXFP4_FP8_CFG``
  on CPU and writes its HF checkpoint.

Everything is deterministic for a given ``seed`` and takes a second or two per model.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

CALIBRATION_TEXT = Path(__file__).resolve().parents[1] / "w4a8_backend" / "data" / "calibration.txt"

VOCAB_SIZE = 512
HIDDEN = 128
NUM_HEADS = 4  # head_dim 32 (vLLM CPU attention supports 32, 64, 80, ...)
NUM_KV_HEADS = 2
NUM_LAYERS = 2
MAX_POSITIONS = 1024

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def calibration_texts() -> list[str]:
    """The package's built-in calibration text, split into paragraphs exactly as w4a8-quantize does."""
    from w4a8_backend.tools.quantize import load_calibration_texts

    return load_calibration_texts(CALIBRATION_TEXT)


def build_tokenizer(directory: str | os.PathLike, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE tokenizer on the calibration text and save it into ``directory``.

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``) and
    ``special_tokens_map.json``. Returns the loaded ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(calibration_texts() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    # Keep the template inside tokenizer_config.json too (older loaders only look there).
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return fast


def _token_ids(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    return {
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[PAD],
    }


def _init_weights(model: torch.nn.Module, seed: int) -> None:
    """Deterministic, non-degenerate random init (independent of transformers' init code)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:  # norms
                param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=gen))
            else:
                fan_in = param.shape[-1]
                std = 0.5 if "embed" in name else 1.0 / fan_in**0.5
                param.copy_(std * torch.randn(param.shape, generator=gen))


def _save(model, tokenizer, directory: Path) -> Path:
    model.generation_config.do_sample = False
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return directory


def _common_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        **_token_ids(tokenizer),
    )


def make_tiny_llama(directory: str | os.PathLike, seed: int = 0,
                    vocab_size: int = VOCAB_SIZE) -> Path:
    """Random 2-layer Llama (hidden 128, intermediate 256, GQA 4/2 heads) in bf16 safetensors.
    ``vocab_size``: the tokenizer's (and so the model's) vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory, vocab_size)
    config = LlamaConfig(intermediate_size=256, **_common_config(tokenizer))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _init_weights(model, seed)
    return _save(model.to(torch.bfloat16), tokenizer, directory)


def make_tiny_qwen3_moe(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random 2-layer Qwen3-MoE (4 experts, top-2, expert intermediate 64) in bf16 safetensors."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    config = Qwen3MoeConfig(
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        **_common_config(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    _init_weights(model, seed)
    return _save(model.to(torch.bfloat16), tokenizer, directory)


def make_tiny_mixtral(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Random 2-layer Mixtral (4 experts, top-2, intermediate 64) in bf16 safetensors."""
    from transformers import MixtralConfig, MixtralForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer(directory)
    common = _common_config(tokenizer)
    config = MixtralConfig(
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        **common,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    _init_weights(model, seed)
    return _save(model.to(torch.bfloat16), tokenizer, directory)


def save_experts_fused(directory: str | os.PathLike) -> Path:
    """Rewrite an MoE model directory so that its experts are stored fused on disk.

    Loads the model with transformers and saves its in-memory state dict as is: 3-D
    ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj`` ``[E, H, I]`` (and,
    for Mixtral, the in-memory ``mlp`` block name instead of ``block_sparse_moe``).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for old in directory.glob("*.safetensors"):
        old.unlink()
    index = directory / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def make_tiny_qwen3_moe_fused(directory: str | os.PathLike, seed: int = 0) -> Path:
    """:func:`make_tiny_qwen3_moe` with the experts stored as fused 3-D tensors on disk."""
    return save_experts_fused(make_tiny_qwen3_moe(directory, seed))


MODEL_MAKERS = {
    "llama": make_tiny_llama,
    "qwen3_moe": make_tiny_qwen3_moe,
    "mixtral": make_tiny_mixtral,
}


def export_with_modelopt(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    static: bool,
    calib_texts: Iterable[str] | None = None,
    kv_cache_fp8: bool = False,
    max_length: int = 512,
    disable: Iterable[str] = (),
) -> Path:
    """Quantize ``src_dir`` with ModelOpt's ``W4A8_MXFP4_FP8_CFG`` on CPU and export it to ``out_dir``.

    ``static=True`` sets ``algorithm="max"`` and runs ``calib_texts`` (default: the package's
    calibration text, one paragraph per forward) so that ``input_scale`` is written;
    ``static=False`` is ModelOpt's shipped preset (no calibration, no ``input_scale``).
    ``kv_cache_fp8=True`` adds ModelOpt's FP8 KV-cache quantizers (static only).
    ``disable``: extra quantizer-name patterns to switch off (e.g. ``"*layers.1.*"``), the way
    one excludes layers in ModelOpt. ``max_length`` truncates each text (same default as
    w4a8-quantize's ``--calib-max-length``).
    """
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16)
    model.eval()
    cfg = copy.deepcopy(mtq.W4A8_MXFP4_FP8_CFG)
    if kv_cache_fp8:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(mtq.FP8_KV_CFG["quant_cfg"])
    for pattern in disable:
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [{"quantizer_name": pattern, "enable": False}]
    texts = list(calib_texts) if calib_texts is not None else calibration_texts()
    if static:
        cfg["algorithm"] = "max"
        tokenizer = AutoTokenizer.from_pretrained(src_dir)

        def forward_loop(m):
            with torch.no_grad():
                for text in texts:
                    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                    m(input_ids=ids["input_ids"])

        model = mtq.quantize(model, cfg, forward_loop)
    else:
        model = mtq.quantize(model, cfg, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "generation_config.json"):
        if (src_dir / name).exists() and not (out_dir / name).exists():
            shutil.copy2(src_dir / name, out_dir / name)
    return out_dir


def greedy_generate(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation with transformers (for sanity checks of the random models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()
