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
