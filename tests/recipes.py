"""Recipe configs for tests: a `configs/<name>.py` recipe with dotted-key overrides."""

from __future__ import annotations

import os
import runpy
from typing import Any

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One-step runs of the tiny SFT and GRPO recipes that checkpoint every step (no export, no TensorBoard).
SFT_ONE_STEP = {"data.num_examples": 16, "train.batch_size": 4, "data.max_len": 96, "export_hf": False,
                "metrics.tensorboard": False, "checkpoint.every_steps": 1, "max_steps": 1, "optimizer.warmup_steps": 0}
GRPO_ONE_STEP = {"data.num_examples": 16, "rollout.num_prompts": 2, "rollout.group_size": 2, "train.batch_size": 0,
                 "export_hf": False, "metrics.tensorboard": False, "checkpoint.every_steps": 1, "max_steps": 1}


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
