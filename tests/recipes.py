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


def text_sft_recipe(tmp_path: Any, over: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """sft_tiny on 8 plain-text rows with a small tokenizer built in `tmp_path` (no SmolLM2 package, no chat
    template needed): one layer, batches of 2, no export, TensorBoard or data cache; `over` as `recipe` takes it."""
    import json

    from test_rev30_tok import _tokenizer

    _tokenizer("qwen2.5").save_pretrained(os.path.join(tmp_path, "tok"))
    src = os.path.join(tmp_path, "data.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps({"text": f"Hello! See you. {i}"}) + "\n" for i in range(8))
    return recipe("sft_tiny", {"tokenizer": os.path.join(tmp_path, "tok"), "data.source": src,
                               "data.num_examples": -1, "data.max_len": 32, "export_hf": False,
                               "metrics.tensorboard": False, "train.batch_size": 2, "data.cache": False,
                               "model.init.num_layers": 1, **(over or {})})
