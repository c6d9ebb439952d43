"""The benchmarks' JSON output: one writer for every script."""
from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (indented), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
