"""Files written so that a kill at any moment leaves the previous complete file: each is
written to a temporary name beside its target, then renamed over it (atomic on POSIX)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx


def atomic_save_safetensors(path: Path, arrays: dict, metadata: Optional[dict] = None) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=4, sort_keys=True) + "\n")
