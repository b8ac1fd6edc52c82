"""The tuning configs Humming's heuristics pick for the MoE baseline of bench_moe.py
(benchmarks/humming_moe.py): one JSON line per (model, variant, GEMM, tokens), to read where its
kernels differ from ours (docs/moe_kernels.md).

    source scripts/gpu_kit_env.sh && python benchmarks/tools/humming_moe_configs.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_linear import print_tool_header  # noqa: E402
from bench_moe import MODELS, TOKENS, make_moe_weights  # noqa: E402
from humming_moe import VARIANTS, HummingMoE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    print_tool_header()
    for name, m in MODELS.items():
        weights = make_moe_weights(m, seed=len(name))
        for variant, input_config in VARIANTS.items():
            layer = HummingMoE(*weights, input_config)
            for gemm, experts in (("gate-up", layer.w13), ("down", layer.w2)):
                for t in (int(v) for v in args.tokens.split(",")):
                    tc = layer._tuning(experts, t * m["top_k"])
                    print(json.dumps({"model": name, "variant": variant, "gemm": gemm, "T": t,
                                      "config": tc}), flush=True)


if __name__ == "__main__":
    main()
