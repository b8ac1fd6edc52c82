"""csrc/quant_modes.h must mirror the Python enums in w4a8_backend/formats/modes.py (CPU test)."""

from __future__ import annotations

import enum
import re
from pathlib import Path

import pytest

from w4a8_backend.formats import mxfp4
from w4a8_backend.formats.modes import ActivationDtype, ActivationScheme, QuantAlgo

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "quant_modes.h"

_ENUM_RE = re.compile(r"enum\s+class\s+(\w+)\s*(?::\s*[\w:]+)?\s*\{(.*?)\}\s*;", re.S)
_ITEM_RE = re.compile(r"^\s*(\w+)\s*=\s*(-?\w+)\s*$")
_CONST_RE = re.compile(r"constexpr\s+int\s+(\w+)\s*=\s*(-?\w+)\s*;")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def parse_enums(text: str) -> dict[str, dict[str, int]]:
    """``{enum name: {enumerator: value}}`` for every ``enum class`` in a C++ header.

    Every enumerator must carry an explicit value: an implicit one is a drift waiting to happen.
    """
    enums: dict[str, dict[str, int]] = {}
    for name, body in _ENUM_RE.findall(_strip_comments(text)):
        items: dict[str, int] = {}
        for entry in filter(None, (e.strip() for e in body.split(","))):
            match = _ITEM_RE.match(entry)
            if match is None:
                raise ValueError(f"enum {name}: enumerator {entry!r} has no explicit value")
            items[match.group(1)] = int(match.group(2), 0)
        if name in enums:
            raise ValueError(f"enum {name} is defined twice")
        enums[name] = items
    return enums


def parse_constants(text: str) -> dict[str, int]:
    return {k: int(v, 0) for k, v in _CONST_RE.findall(_strip_comments(text))}


PY_ENUMS: tuple[type[enum.IntEnum], ...] = (QuantAlgo, ActivationDtype, ActivationScheme)


@pytest.fixture(scope="module")
def header_text() -> str:
    assert HEADER.is_file(), f"missing {HEADER}"
    return HEADER.read_text()


@pytest.mark.parametrize("py_enum", PY_ENUMS, ids=lambda e: e.__name__)
def test_header_matches_python_enum(header_text: str, py_enum: type[enum.IntEnum]) -> None:
    enums = parse_enums(header_text)
    assert py_enum.__name__ in enums, f"{HEADER.name} lacks enum class {py_enum.__name__}"
    expected = {member.name: int(member.value) for member in py_enum}
    assert enums[py_enum.__name__] == expected, (
        f"{py_enum.__name__} drifted: header {enums[py_enum.__name__]} vs Python {expected}"
    )


def test_header_has_no_extra_enums(header_text: str) -> None:
    assert set(parse_enums(header_text)) == {e.__name__ for e in PY_ENUMS}


def test_header_constants_match_format(header_text: str) -> None:
    consts = parse_constants(header_text)
    assert consts == {
        "kMxfp4BlockSize": mxfp4.BLOCK_SIZE,
        "kE8M0Bias": mxfp4.E8M0_BIAS,
        "kE8M0Nan": mxfp4.E8M0_NAN,
    }


def test_parser_detects_drift() -> None:
    """The parser itself must notice a changed value, a missing value and a renamed member."""
    good = "enum class QuantAlgo : int32_t { W4A8_MXFP4_FP8 = 1, W4A8_MXFP4_INT8 = 2, };"
    assert parse_enums(good)["QuantAlgo"] == {m.name: int(m.value) for m in QuantAlgo}
    changed = good.replace("= 2", "= 3")
    assert parse_enums(changed)["QuantAlgo"] != {m.name: int(m.value) for m in QuantAlgo}
    renamed = good.replace("W4A8_MXFP4_INT8", "W4A8_MXFP4_I8")
    assert parse_enums(renamed)["QuantAlgo"] != {m.name: int(m.value) for m in QuantAlgo}
    with pytest.raises(ValueError, match="no explicit value"):
        parse_enums("enum class X { A = 1, B };")
    # Values written in hex or behind comments still parse.
    assert parse_enums("enum class Y { A = 0x10, // c\n B = 2 /* d */ };")["Y"] == {"A": 16, "B": 2}
