"""benchmarks/bench_e2e.py writes checkpoints that transformers (and so vLLM) load completely:
every tensor name and shape of the real architectures, checked on shrunken configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 48,
         "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256}


@pytest.mark.parametrize("shape", ["llama3-8b", "qwen3-30b-a3b"])
def test_tensor_list_matches_transformers(shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    bench = _bench()
    cfg = {**bench.SHAPES[shape], **{k: v for k, v in SMALL.items() if k in bench.SHAPES[shape]}}
    ours = dict(bench._tensor_shapes(cfg))
    hf_config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(hf_config)
    on_disk = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # transformers 5 fuses the experts in memory ([E, 2I, H] and [E, H, I]); checkpoints on the
    # hub, which vLLM loads, name each expert's projections.
    fused = [n for n in on_disk if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    for name in fused:
        shape3 = on_disk.pop(name)
        prefix = name.rsplit(".", 1)[0]
        for j in range(shape3[0]):
            if name.endswith("gate_up_proj"):
                half = shape3[1] // 2
                on_disk[f"{prefix}.{j}.gate_proj.weight"] = (half, shape3[2])
                on_disk[f"{prefix}.{j}.up_proj.weight"] = (half, shape3[2])
            else:
                on_disk[f"{prefix}.{j}.down_proj.weight"] = tuple(shape3[1:])
    assert ours == on_disk


def _run_json(label, quantization, step_ms, loading_gib, tn, tmp_path):
    import json

    run = {"label": label, "model": f"/ckpt/{label}", "quantization": quantization,
           "model_shape": "LlamaForCausalLM, 32 layers, hidden 4096", "device": "GPU X",
           "vllm": "0.26.0", "torch": "2.11", "tp": 1, "decode_steps": 64,
           "decode_prompt_len": 128,
           "decode": [{"batch": b, "step_ms": ms, "tokens_per_s": b / ms * 1e3,
                       "t1_s": [0.1], "tn_s": tn, "tn_spread": max(tn) / min(tn)}
                      for b, ms in step_ms],
           "prefill": {"batch": 8, "prompt_len": 2048, "tokens_per_s": 1000.0 / step_ms[0][1]}}
    path = tmp_path / f"{label}.json"
    path.write_text(json.dumps(run))
    path.with_suffix(".log").write_text(f"Model loading took {loading_gib} GiB memory\n")
    return path


def test_report_ratios_against_bf16_and_spread(tmp_path):
    bench = _bench()
    base = _run_json("bf16", None, [(1, 6.0), (8, 8.0)], 14.96, [1.0, 1.1], tmp_path)
    quant = _run_json("w4a8", "w4a8_mxfp4", [(1, 3.0), (8, 4.0)], 5.44, [0.5, 0.5], tmp_path)
    bench.report([base, quant], tmp_path / "out", "the command")
    md = (tmp_path / "out.md").read_text()
    assert md.startswith("# End-to-end vLLM: LlamaForCausalLM, 32 layers, hidden 4096, W4A8")
    row = next(line for line in md.splitlines() if line.startswith("| w4a8 |"))
    assert row == ("| w4a8 | 5.44 | 0.364 | 333 (2.00x) | 2000 (2.00x) | 333 (2.00x) |")
    assert "- bf16: b=1: 1.10, b=8: 1.10" in md and "- w4a8: b=1: 1.00, b=8: 1.00" in md
    assert (tmp_path / "out.png").stat().st_size > 0
