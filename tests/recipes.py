"""Recipe configs for tests: a `configs/<name>.py` recipe with dotted-key overrides."""

from __future__ import annotations

import os
import runpy
from typing import Any

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(name: str, over: dict[str, Any] | None = None, unlock: bool = True) -> ml_collections.ConfigDict:
    """configs/<name>.py's get_config() with `over` applied ({"grpo.kl_coef": 0.0, ...}); unlocked by default so
    tests may also set keys a recipe lacks."""
    c = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
    if unlock:
        c.unlock()
    for k, v in (over or {}).items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c
