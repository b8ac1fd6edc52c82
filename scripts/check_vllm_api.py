"""Check that an unpacked vLLM source tree has everything ``w4a8_backend/config/compat.py``
imports, without installing it (vLLM's GPU wheel does not import on a CPU machine).

    pip download --no-deps --only-binary=:all: vllm==0.33.0 -d v033 && unzip -q v033/*.whl "vllm/*" -d v033
    python scripts/check_vllm_api.py v033

Reads compat.py's ``from vllm... import`` statements and its ``_first(...)`` candidate lists
(where one of the candidates must exist) and looks each name up in the tree's source.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

COMPAT = Path(__file__).resolve().parents[1] / "w4a8_backend" / "config" / "compat.py"


def defined_names(root: Path, module: str) -> set[str] | None:
    base = root / module.replace(".", "/")
    path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    if not path.exists():
        return None
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
    return names


def requirements() -> list[list[tuple[str, str]]]:
    """Each entry: alternatives ``(module, name)``, at least one of which must exist."""
    needs = []
    for node in ast.walk(ast.parse(COMPAT.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm."):
            needs.extend([[(node.module, a.name)] for a in node.names])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_first":
            needs.append([tuple(ast.literal_eval(arg)) for arg in node.args])
    return needs


def main() -> int:
    root = Path(sys.argv[1])
    missing = []
    for alternatives in requirements():
        if not any(name in (defined_names(root, mod) or set()) for mod, name in alternatives):
            missing.append(" or ".join(f"{mod}.{name}" for mod, name in alternatives))
    print(f"vLLM tree {root}: ", end="")
    print("missing: " + "; ".join(missing) if missing else f"all {len(requirements())} needs found")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
