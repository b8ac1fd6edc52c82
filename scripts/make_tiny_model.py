"""Write a tiny random Llama (with a locally trained tokenizer) for the CPU demo; no model hub.

Usage: python scripts/make_tiny_model.py OUT_DIR [--arch llama|qwen3_moe|mixtral]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import MODEL_MAKERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(MODEL_MAKERS), default="llama")
    args = parser.parse_args()
    print(MODEL_MAKERS[args.arch](args.out_dir))


if __name__ == "__main__":
    main()
