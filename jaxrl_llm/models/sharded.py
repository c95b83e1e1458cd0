"""`forward` jitted on a mesh with explicit input/output shardings from the logical-axis rules."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.params import param_shardings
from jaxrl_llm.models.transformer import forward
from jaxrl_llm.parallel.rules import ShardingRules, as_rules


def sharded_forward(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> Callable:
    """fn(params, input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V] fp32, sharded by the rules.

    One compilation per (B, T); the batch is placed by the `batch`/`length` rules, logits come out
    sharded over (batch, length, vocab). Parameters must already carry `param_shardings(cfg, mesh, rules)`
    (as `load_pretrained(..., mesh=mesh)` and `init_params(..., mesh=mesh)` produce them).
    """
    rules = as_rules(rules)
    p_sh = param_shardings(cfg, mesh, rules)

    @functools.lru_cache(maxsize=16)
    def compiled(shape: tuple[int, int]):
        B, T = shape
        ids_sh = rules.sharding(mesh, ("batch", "length"), shape)
        out_sh = rules.sharding(mesh, ("batch", "length", "vocab"), (B, T, cfg.vocab_size))
        fn = functools.partial(forward, cfg, rules=rules)
        return jax.jit(fn, in_shardings=(p_sh, ids_sh, ids_sh), out_shardings=out_sh), ids_sh

    def run(params: dict, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jax.numpy.ones(input_ids.shape, jax.numpy.int32)
        fn, ids_sh = compiled(tuple(input_ids.shape))
        with jax.set_mesh(mesh):
            return fn(params, jax.device_put(input_ids, ids_sh), jax.device_put(attention_mask, ids_sh))

    return run
