"""BERT in ``w4a8-quantize`` and the plugin's config: ModelOpt's bytes, exclusions mapped to vLLM's
module names, refusals, and the weight statistics of ``benchmarks/accuracy.py``.

ModelOpt 0.47 on a BERT encoder (checked on the real all-MiniLM-L6-v2 weights, and here on a tiny
random one): every linear of the encoder layers and ``pooler.dense`` are quantized, the embeddings
are kept (``exclude_modules: ["embeddings*"]``).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import embedding as E
from test_quantize import assert_same_tensors
from w4a8_backend.formats import E8M0_BIAS, quantize_mxfp4
from w4a8_backend.tools import quantize as wq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BertModel (hidden 64, head_dim 32) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert") / "model"
    torch.manual_seed(5)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy2(E.minilm_dir() / name, out / name)
    return out


def _modelopt_export(src: Path, out: Path, static: bool) -> Path:
    """ModelOpt's W4A8_MXFP4_FP8 preset on a BertModel, calibrated (max) on the same paragraphs
    and forward (input ids only, 512 tokens) as w4a8-quantize."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(src, dtype="auto").eval()
    cfg = copy.deepcopy(mtq.W4A8_MXFP4_FP8_CFG)
    loop = None
    if static:
        cfg["algorithm"] = "max"
        tokenizer = AutoTokenizer.from_pretrained(src)

        def loop(m):
            with torch.no_grad():
                for text in wq.load_calibration_texts():
                    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
                    m(input_ids=ids["input_ids"])

    model = mtq.quantize(model, cfg, loop)
    with torch.no_grad():
        export_hf_checkpoint(model, export_dir=str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic"])
def test_bert_export_matches_modelopt(tiny_bert, tmp_path, static):
    ref = _modelopt_export(tiny_bert, tmp_path / "modelopt", static)
    ours = tmp_path / "ours"
    summary = wq.quantize_checkpoint(tiny_bert, ours, activations="fp8",
                                     calibration="static" if static else "dynamic", progress=False)
    tensors = assert_same_tensors(ours, ref)
    assert summary["layers_quantized"] == 2 * 6 + 1
    assert tensors["pooler.dense.weight"].dtype == torch.uint8
    assert tensors["embeddings.word_embeddings.weight"].dtype == torch.float32
    assert ("encoder.layer.1.output.dense.input_scale" in tensors) == static
    # ModelOpt rewrites config.json from transformers' config object; the quantization sections
    # are what the plugin reads, and they agree.
    ours_q = json.loads((ours / "hf_quant_config.json").read_text())["quantization"]
    ref_q = json.loads((ref / "hf_quant_config.json").read_text())["quantization"]
    assert ours_q == ref_q and ref_q["exclude_modules"] == ["embeddings*"]
    ours_flat = json.loads((ours / "config.json").read_text())["quantization_config"]
    ref_flat = json.loads((ref / "config.json").read_text())["quantization_config"]
    for flat in (ours_flat, ref_flat):
        flat.pop("producer")
    assert ours_flat == ref_flat


def _bert_dir(tmp_path: Path, architecture: str) -> Path:
    src = tmp_path / architecture
    src.mkdir()
    config = json.loads((E.minilm_dir() / "config.json").read_text())
    config["architectures"] = [architecture]
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_bert_with_a_head_is_refused(tmp_path, capsys):
    src = _bert_dir(tmp_path, "BertForMaskedLM")
    code = wq.main([str(src), str(tmp_path / "out"), "--activations", "fp8", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "unsupported architecture BertForMaskedLM" in err
    assert "only BertModel is supported" in err and not (tmp_path / "out").exists()


def test_bert_kv_cache_fp8_is_refused(tmp_path, capsys):
    src = _bert_dir(tmp_path, "BertModel")
    code = wq.main([str(src), str(tmp_path / "out"), "--activations", "fp8", "--kv-cache-fp8",
                    "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "encoder-only model; vLLM keeps no KV cache" in err


def test_bert_partial_qkv_exclusion_is_refused_by_the_plugin(tmp_path):
    """A fused qkv_proj whose query alone is excluded cannot be served: the plugin says so."""
    pytest.importorskip("vllm")
    from vllm.model_executor.models.bert import BertEmbeddingModel, BertModel

    from w4a8_backend.config.checkpoint import is_excluded
    from w4a8_backend.config.config import W4A8Mxfp4Config

    config = W4A8Mxfp4Config.from_config({
        "quant_method": "modelopt", "quant_algo": "W4A8_MXFP4_FP8",
        "ignore": ["embeddings*", "encoder.layer.5*", "encoder.layer.1.intermediate.dense",
                   "encoder.layer.0.attention.self.query"]})
    # What vLLM does when it builds BertEmbeddingModel and its inner BertModel (SupportsQuant).
    for cls in (BertEmbeddingModel, BertModel):
        config.apply_vllm_mapper(cls.hf_to_vllm_mapper.get_rename_mapper())
        config.packed_modules_mapping.update(cls.packed_modules_mapping)

    def excluded(prefix):
        return is_excluded(prefix, config.exclude_modules, config.packed_modules_mapping)

    assert excluded("model.encoder.layer.5.attention.self.qkv_proj")
    assert excluded("model.encoder.layer.5.output.dense")
    assert excluded("model.encoder.layer.1.intermediate.dense")
    assert not excluded("model.encoder.layer.1.output.dense")
    assert not excluded("model.encoder.layer.4.attention.self.qkv_proj")
    with pytest.raises(ValueError, match="excludes only .*layer.0.attention.self.query"):
        excluded("model.encoder.layer.0.attention.self.qkv_proj")


def _weight_with_exponents(exponents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 tensors whose block ``b`` of row ``n`` has E8M0 exponent ``exponents[n][b]``
    (``None``: an all-zero block)."""
    rows = []
    for row in exponents:
        blocks = [torch.zeros(32) if e is None else torch.full((32,), 6.0 * 2.0 ** e) for e in row]
        rows.append(torch.cat(blocks))
    packed, scale = quantize_mxfp4(torch.stack(rows))
    expected = [[0 if e is None else e + E8M0_BIAS for e in row] for row in exponents]
    assert scale.tolist() == expected
    return packed, scale


def test_weight_stats_exact_ranges():
    """Spread per row and the SM90 kernels' exact windows: 12 binades per row for FP8 (offsets
    -5..6), 4 binades per row and 8-block (256-wide) K tile for INT8."""
    base = [0] * 16
    rows = [
        base,                                  # spread 0, everything exact
        [0] * 15 + [11],                       # spread 11: FP8 window holds it; INT8 tile 1 does not
        [0] * 15 + [12],                       # spread 12: one block outside the FP8 window
        [0, 3, 0, 3, 0, 3, 0, 3] + [5] * 8,    # INT8: tile 0 spans 4 binades (exact), tile 1 flat
        [0, 4, 0, 0, 0, 0, 0, 0] + [None] * 8,  # INT8: 4 is a fifth binade; zero blocks ignored
    ]
    packed, scale = _weight_with_exponents(rows)
    stats = E.layer_weight_stats(packed, scale)
    assert stats["row_spread"] == [0, 11, 12, 5, 4]
    assert stats["zero_blocks"] == 8 and stats["blocks"] == 5 * 16
    assert stats["exponent_min"] == 0 and stats["exponent_max"] == 12
    assert stats["fp8_out_of_range"] == 1 + 8  # row 2's outlier; row 4's zero blocks (e = -127)
    # INT8: row 1 and row 2 one block each, row 4 the 4 and its whole zero tile (8 blocks)
    assert stats["int8_out_of_range"] == 1 + 1 + 1 + 8


def test_bert_qkv_prefix_is_mapped_to_where_the_layer_lives():
    """vLLM 0.32 announces BERT's fused q/k/v as ``attention.output.qkv_proj`` (its BertAttention
    passes ``.output`` to the self-attention); the plugin matches ``attention.self``."""
    pytest.importorskip("vllm")
    from w4a8_backend.config.compat import LinearBase, QKVParallelLinear, layer_module_path

    qkv = QKVParallelLinear.__new__(QKVParallelLinear)  # no TP group needed for isinstance
    dense = LinearBase.__new__(LinearBase)
    layer = "model.encoder.layer.3.attention"
    assert layer_module_path(qkv, f"{layer}.output.qkv_proj") == f"{layer}.self.qkv_proj"
    assert layer_module_path(dense, f"{layer}.output.dense") == f"{layer}.output.dense"
    assert layer_module_path(qkv, "model.layers.0.self_attn.qkv_proj") == \
        "model.layers.0.self_attn.qkv_proj"
