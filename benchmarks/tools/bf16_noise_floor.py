"""How far from the fp32 reference's top-1 can a *correct* bf16 computation's greedy token land?

The GPU smoke check (tests/gpu/vllm_gpu_smoke.py) compares a bf16 vLLM engine with the exact
fp32 reference. This measures, on the CPU and without vLLM or any of our kernels, what an exact
bf16 computation itself gets: the same reference model (exact MXFP4 weights, exact activation
quantization) run in bf16 generates greedily over the smoke check's FLOOR_PROMPTS, and the fp32
reference scores each token. The smoke check computes the same maximum on its own checkpoint
(``bf16_floor``) and uses it as its tolerance; this tool records the distribution.

    python benchmarks/tools/bf16_noise_floor.py --out benchmarks/results/bf16_noise_floor.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]

import tiny_models  # noqa: E402
from reference_model import bf16_greedy_gaps  # noqa: E402
from vllm_gpu_smoke import FLOOR_PROMPTS  # noqa: E402

from w4a8_backend.formats import ActivationDtype  # noqa: E402
from w4a8_backend.tools.quantize import quantize_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="w4a8_noise_"))
    makers = {"llama": tiny_models.make_tiny_llama, "qwen3_moe": tiny_models.make_tiny_qwen3_moe}
    results = []
    for arch, make in makers.items():
        ckpt = work / f"{arch}_fp8"
        quantize_checkpoint(make(work / arch), ckpt, activations="fp8", calibration="static",
                            progress=False)
        tok = AutoTokenizer.from_pretrained(ckpt)
        prompts_ids = [tok(p)["input_ids"] for p in FLOOR_PROMPTS]
        for act in ("fp8", "int8"):
            gaps = torch.tensor(bf16_greedy_gaps(ckpt, ActivationDtype.from_string(act),
                                                 prompts_ids, args.steps))
            entry = {"arch": arch, "act": act, "steps": gaps.numel(),
                     "top1_equal": int((gaps == 0).sum()),
                     "max_gap": round(float(gaps.max()), 4),
                     "p99_gap": round(float(gaps.quantile(0.99)), 4),
                     "gaps_over_0.1": int((gaps > 0.1).sum())}
            results.append(entry)
            print(json.dumps(entry), flush=True)
    args.out.write_text(json.dumps({
        "what": "exact reference run in bf16 vs the same in fp32: gap of the bf16 greedy token "
                "to the fp32 top-1 (nats)",
        "command": "python benchmarks/tools/bf16_noise_floor.py " + " ".join(sys.argv[1:]),
        "host": platform.node(), "torch": torch.__version__,
        "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "results": results},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
