"""Cheap integrity check of a local checkpoint's safetensors files, before vLLM reads them.

A truncated download otherwise surfaces as a deserialisation error deep inside the loader; here
it is a ``ValueError`` naming the file and what is missing. Only headers are read.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def check_safetensors_files(model_dir: str | Path) -> None:
    directory = Path(model_dir)
    if not directory.is_dir():
        return  # a hub id: vLLM downloads and checks it itself
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"w4a8_mxfp4: checkpoint file {path.name} is truncated "
                                 f"({size} bytes, not even a safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if 8 + header_len > size:
                raise ValueError(f"w4a8_mxfp4: checkpoint file {path.name} is truncated: its "
                                 f"header needs {header_len} bytes, the file holds {size - 8}")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as exc:
                raise ValueError(f"w4a8_mxfp4: checkpoint file {path.name} has a corrupt "
                                 f"safetensors header: {exc}") from None
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                       default=0)
        available = size - 8 - header_len
        if data_end > available:
            raise ValueError(
                f"w4a8_mxfp4: checkpoint file {path.name} is truncated: its tensors need "
                f"{data_end} bytes of data, the file holds {available}"
            )
