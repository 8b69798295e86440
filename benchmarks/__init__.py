"""Benchmarks: each module writes its numbers to benchmarks/results/<name>.json (see run.py)."""

from __future__ import annotations

import json
from pathlib import Path


def save_result(path: Path, result: dict) -> None:
    """Write a benchmark's result as indented JSON and print it."""
    text = json.dumps(result, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(text)
