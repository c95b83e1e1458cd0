"""The KV cache: one pytree per batch, sharded by the same logical-axis rules as the model.

    cache = {"k": array, "v": array}, axes CACHE_AXES: (layers, batch, kv_heads, length, head_dim), i.e.
    [L, B, K, S, H], the layout `models.forward_with_cache` reads and writes (the model owns it). Inside the
    decode loop it may be held per layer instead (`unstack_cache`): lists of L arrays, keys [B, K, H, S]
    (transposed: see `transformer.attention_kt`) and values [B, K, S, H].

Slot layout (left padding): prompts are right-aligned in slots [0, P), so every row's first new token lands
in slot P and decode step i writes slot P + i for all rows at once. Row b's prompt occupies
[start_b, P) with start_b = P - len_b; its token at slot s has position s - start_b.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import CACHE_AXES, KEYS_T_AXES
from jaxrl_llm.parallel.rules import ShardingRules, constrain


def cache_shape(cfg: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    sizes = {"layers": cfg.num_layers, "batch": batch, "length": length, "kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim}
    return tuple(sizes[a] for a in CACHE_AXES)


def cache_length(cache: dict) -> int:
    """S, the number of slots."""
    return cache["k"].shape[CACHE_AXES.index("length")]


def cache_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    """Bytes of k + v in the compute dtype."""
    return 2 * math.prod(cache_shape(cfg, batch, length)) * jnp.dtype(cfg.dtype).itemsize


def cache_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules, batch: int, length: int
                    ) -> dict[str, NamedSharding]:
    s = rules.sharding(mesh, CACHE_AXES, cache_shape(cfg, batch, length))
    return {"k": s, "v": s}


def init_cache(cfg: ModelConfig, batch: int, length: int, rules: ShardingRules | None = None) -> dict:
    """Zeros in the compute dtype, constrained to the rules' layout (call inside jit under `jax.set_mesh`)."""
    shape = cache_shape(cfg, batch, length)
    return {n: constrain(jnp.zeros(shape, cfg.dtype), CACHE_AXES, rules) for n in ("k", "v")}


def as_bits(cache: dict) -> dict:
    """The cache with each 16-bit float array as uint16 holding the same bits (other arrays as they are), the form
    `forward_with_cache` also reads and writes: XLA:CPU updates a bf16 array through fp32, converting all of it (a
    layer scan's step converted every layer's cache once per layer: SmolLM2-sized widths, 16 layers, batch 32, 81
    instead of 17 ms a step), and updates an integer array in place."""
    def bits(c):
        floating16 = jnp.issubdtype(c.dtype, jnp.floating) and jnp.dtype(c.dtype).itemsize == 2
        return jax.lax.bitcast_convert_type(c, jnp.uint16) if floating16 else c
    return jax.tree.map(bits, cache)


def from_bits(cache: dict, dtype) -> dict:
    """Inverse of `as_bits` (dtype: the compute dtype)."""
    return jax.tree.map(lambda c: jax.lax.bitcast_convert_type(c, dtype) if c.dtype == jnp.uint16 else c, cache)


def unstack_cache(cache: dict, rules: ShardingRules | None = None) -> dict:
    """{"k": [L, B, K, S, H], "v": [L, B, K, S, H]} -> {"k": L arrays [B, K, H, S] (transposed), "v": L arrays
    [B, K, S, H]} (copies)."""
    return {"k": [constrain(a.transpose(0, 1, 3, 2), KEYS_T_AXES, rules) for a in cache["k"]],
            "v": [constrain(a, CACHE_AXES[1:], rules) for a in cache["v"]]}


def stack_cache(cache: dict, rules: ShardingRules | None = None) -> dict:
    """Inverse of `unstack_cache`."""
    return {"k": constrain(jnp.stack([a.transpose(0, 1, 3, 2) for a in cache["k"]]), CACHE_AXES, rules),
            "v": constrain(jnp.stack(cache["v"]), CACHE_AXES, rules)}


def _window(cfg: ModelConfig, q_slot: jax.Array, k_slot: jax.Array) -> jax.Array:
    if cfg.sliding_window is None:
        return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_slot), jnp.shape(k_slot)), bool)
    return (q_slot - k_slot) < cfg.sliding_window


def prefill_mask_BTS(cfg: ModelConfig, start_B: jax.Array, T: int, S: int) -> jax.Array:
    """[B, T, S] bool for the prompt slots [0, T): causal, key inside the row's prompt, inside the window.

    A query always sees itself, so the all-padding queries of short rows never produce NaN (unused)."""
    q_T1 = jnp.arange(T)[:, None]
    k_1S = jnp.arange(S)[None, :]
    allowed_BTS = ((k_1S <= q_T1) & _window(cfg, q_T1, k_1S))[None] & (k_1S >= start_B[:, None])[:, None, :]
    return allowed_BTS | (k_1S == q_T1)[None]


def decode_mask_B1S(cfg: ModelConfig, start_B: jax.Array, slot: jax.Array, S: int) -> jax.Array:
    """[B, 1, S] bool for one new token at `slot`: every written slot of the row, inside the window."""
    k_S = jnp.arange(S)
    allowed_BS = (k_S[None] >= start_B[:, None]) & (k_S <= slot)[None] & _window(cfg, slot, k_S)[None]
    return allowed_BS[:, None, :]


def prompt_positions_BT(start_B: jax.Array, T: int) -> jax.Array:
    """Position of each prompt slot: slot - start (padding slots get 0)."""
    return jnp.maximum(jnp.arange(T)[None] - start_B[:, None], 0).astype(jnp.int32)
