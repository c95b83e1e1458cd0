"""Parameter layout: one spec per parameter gives its shape, logical axes, initialiser and sharding.

`params` is a plain nested dict of arrays. Transformer layers are stacked on a leading `layers` axis so
the forward pass is one `lax.scan` (compile time independent of depth):

    embed        [V, D]            (vocab, embed)
    layers/
      attn_norm  [L, D]            mlp_norm [L, D]
      wq [L, D, N, H]  wk/wv [L, D, K, H]  wo [L, N, H, D]
      bq [L, N, H]  bk/bv [L, K, H]  bo [L, D]            (qkv_bias / o_bias)
      q_norm/k_norm [L, H]                                 (qk_norm, Qwen3)
      w_gate/w_up [L, D, F]  w_down [L, F, D]  b_gate/b_up [L, F]  b_down [L, D]   (mlp_bias)
    final_norm   [D]
    lm_head      [D, V]            (absent when embeddings are tied, and in score-head models)
    score        [D, C]            (num_labels > 0: reward/value/classification head)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrl_llm.models.config import ModelConfig, resolve_dtype
from jaxrl_llm.parallel.rules import ShardingRules, as_rules

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Flat {'layers/wq': ParamSpec, ...} for this config: the single source of the parameter layout."""
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    N, K, H, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    s: dict[str, ParamSpec] = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers/attn_norm": ParamSpec((L, D), ("layers", None), "ones"),
        "layers/wq": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
        "layers/wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/wo": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "layers/mlp_norm": ParamSpec((L, D), ("layers", None), "ones"),
        "layers/w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "layers/w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "layers/w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
        "final_norm": ParamSpec((D,), (None,), "ones"),
    }
    if cfg.qkv_bias:
        s["layers/bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        s["layers/bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        s["layers/bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        s["layers/bo"] = ParamSpec((L, D), ("layers", None), "zeros")
    if cfg.qk_norm:
        s["layers/q_norm"] = ParamSpec((L, H), ("layers", None), "ones")
        s["layers/k_norm"] = ParamSpec((L, H), ("layers", None), "ones")
    if cfg.mlp_bias:
        s["layers/b_gate"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
        s["layers/b_up"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
        s["layers/b_down"] = ParamSpec((L, D), ("layers", None), "zeros")
    if not cfg.tie_word_embeddings and not cfg.num_labels:
        s["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    if cfg.num_labels:
        s["score"] = ParamSpec((D, cfg.num_labels), ("embed", "labels"), "normal")
    return s


def num_params(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Parameter count from the spec table (tied embeddings counted once)."""
    return sum(math.prod(s.shape) for k, s in param_specs(cfg).items() if include_embeddings or k != "embed")


def unflatten(flat: dict[str, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def check_params(cfg: ModelConfig, params: dict) -> None:
    """ValueError unless `params` holds every parameter `cfg` needs, each of the shape it needs (extra entries are
    allowed): params built for another config would otherwise run as whatever model their arrays make, and the
    sampler, which sizes its cache from cfg, would compute yet another one."""
    if not isinstance(params, dict):
        raise ValueError(f"params: expected the nested dict of arrays of models.init_params / load_pretrained, got "
                         f"{type(params).__name__}")
    flat = flatten(params)
    specs = param_specs(cfg)
    missing = [k for k in specs if k not in flat]
    if missing:
        raise ValueError(f"params lack {missing} required by the config (params of another model family or "
                         f"config?)")
    for path, spec in specs.items():
        shape = tuple(getattr(flat[path], "shape", ()))
        if shape != spec.shape:
            raise ValueError(f"param {path!r} has shape {shape}, the config needs {spec.shape} (params from "
                             f"another config? num_layers={cfg.num_layers}, hidden_size={cfg.hidden_size}, "
                             f"num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, "
                             f"vocab_size={cfg.vocab_size})")


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> dict:
    """NamedSharding per parameter (same nesting as params), from the rules table."""
    rules = as_rules(rules)
    return unflatten({k: rules.sharding(mesh, s.axes, s.shape) for k, s in param_specs(cfg).items()})


# The config field behind each logical axis of a parameter (for messages).
_AXIS_FIELDS = {"vocab": "vocab_size", "embed": "hidden_size", "heads": "num_heads", "kv_heads": "num_kv_heads",
                "mlp": "intermediate_size", "head_dim": "head_dim", "labels": "num_labels", "layers": "num_layers"}


def replication_warning(cfg: ModelConfig, mesh_shape: dict[str, int], rules: ShardingRules | None = None
                        ) -> str | None:
    """A warning when a model dimension does not divide a mesh axis its rule names, else None.

    `rules.spec` drops such an axis for that dimension, so those parameters (and their optimizer moments) are
    whole on every device along it: more memory per device than the mesh suggests (and, along tensor, their matmuls
    are not split either).
    """
    rules = as_rules(rules)
    lost: dict[str, dict[tuple[str, int], list[str]]] = {}
    actual = even = 0.0
    for name, s in param_specs(cfg).items():
        spec = rules.spec(s.axes, s.shape, mesh_shape)
        got = {a for e in spec if e for a in ((e,) if isinstance(e, str) else e)}
        wanted: dict[str, tuple[str, int]] = {}  # mesh axis -> the first (logical axis, size) asking for it
        for logical, n in zip(s.axes, s.shape, strict=True):
            for ax in rules.mesh_axes(logical):
                if mesh_shape.get(ax, 1) > 1:
                    wanted.setdefault(ax, (logical, n))
        size = math.prod(s.shape)
        actual += size / math.prod(mesh_shape[a] for a in got)
        even += size / math.prod(mesh_shape[a] for a in wanted)
        for ax, dim in wanted.items():
            if ax not in got:
                lost.setdefault(ax, {}).setdefault(dim, []).append(name)
    if not lost:
        return None
    parts = [f"mesh.{ax}={mesh_shape[ax]} does not divide " + " or ".join(
        f"{_AXIS_FIELDS.get(logical, logical)}={n} ({', '.join(names)})" for (logical, n), names in dims.items())
        for ax, dims in lost.items()]
    return (f"{'; '.join(parts)}: those parameters are replicated along {', '.join(lost)} (each device there holds "
            f"them whole): about {actual / even:.2f}x the parameter and optimizer memory "
            "a device would hold with an even split; choose mesh sizes that divide these dimensions")


def warn_replicated(cfg: ModelConfig, mesh: Mesh, rules: ShardingRules | None = None) -> None:
    """Log `replication_warning` for parameters about to be placed on `mesh`."""
    warning = replication_warning(cfg, dict(mesh.shape), rules)
    if warning:
        log.warning(warning)


def abstract_params(cfg: ModelConfig, dtype=jnp.float32) -> dict:
    dt = resolve_dtype(dtype)
    return unflatten({k: jax.ShapeDtypeStruct(s.shape, dt) for k, s in param_specs(cfg).items()})


def as_prng_key(rng, name: str = "rng") -> jax.Array:
    """A PRNG key from `rng`: a key (jax.random.key, or a raw uint32 PRNGKey) as it is, an integer seed (a
    Python, numpy or concrete 0-d JAX integer) as jax.random.key(seed), None as seed 0; a ValueError otherwise."""
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
            if rng.ndim:  # a batch of keys (jax.random.split(key, n)) is not one key
                raise ValueError(f"{name}: expected one PRNG key, got a batch of shape {tuple(rng.shape)} "
                                 "(pick one: keys[0])")
            return rng
        if rng.ndim == 0 and jnp.issubdtype(rng.dtype, jnp.integer) and not isinstance(rng, jax.core.Tracer):
            return jax.random.key(int(rng))
        if rng.ndim == 1 and rng.dtype == jnp.uint32:  # jax.random.PRNGKey(seed): uint32[2] threefry, [4] rbg
            return rng
    desc = f"{type(rng).__name__} of shape {tuple(rng.shape)} and dtype {rng.dtype}" if hasattr(rng, "dtype") \
        else type(rng).__name__
    raise ValueError(f"{name}: expected a PRNG key (jax.random.key(seed)) or an integer seed, got {desc}")


def init_params(cfg: ModelConfig, rng: jax.Array | int, dtype=jnp.float32, mesh: Mesh | None = None,
                rules: ShardingRules | None = None, std: float = 0.02) -> dict:
    """Random parameters (normal(0, std) matrices, unit norms, zero biases), created directly sharded."""
    if mesh is not None:
        warn_replicated(cfg, mesh, rules)
    return _initializer(cfg, resolve_dtype(dtype), mesh, rules)(as_prng_key(rng), np.float32(std))


@functools.lru_cache(maxsize=8)
def _initializer(cfg: ModelConfig, dt: Any, mesh: Mesh | None, rules: ShardingRules | None) -> Callable:
    """`init_params`' jitted function for these settings, kept: XLA:CPU takes about 3 s to compile the random
    normals of any model, which another call with the same settings (a resumed or second run in one process, a
    test) would otherwise pay again."""
    specs = param_specs(cfg)

    def make(key, std):
        keys = jax.random.split(key, len(specs))
        out = {}
        for k_i, (name, s) in zip(keys, sorted(specs.items()), strict=True):
            if s.init == "ones":
                out[name] = jnp.ones(s.shape, dt)
            elif s.init == "zeros":
                out[name] = jnp.zeros(s.shape, dt)
            else:
                out[name] = (std * jax.random.normal(k_i, s.shape, jnp.float32)).astype(dt)
        return unflatten(out)

    return jax.jit(make) if mesh is None else jax.jit(make, out_shardings=param_shardings(cfg, mesh, rules))


def with_score_head(cfg: ModelConfig, params: dict, num_labels: int, rng: jax.Array, mesh: Mesh | None = None,
                    rules: ShardingRules | None = None) -> tuple[ModelConfig, dict]:
    """Turn a causal LM into a score-head model (reward model / critic): drop the LM head, add a fresh
    `score` [D, num_labels] ~ normal(0, 1/sqrt(D)) (as HF initialises *ForSequenceClassification heads)."""
    new_cfg = dataclasses.replace(cfg, num_labels=num_labels)
    spec = param_specs(new_cfg)["score"]
    dt = params["embed"].dtype

    def make(key):
        return (jax.random.normal(key, spec.shape, jnp.float32) / math.sqrt(cfg.hidden_size)).astype(dt)

    if mesh is None:
        score = jax.jit(make)(rng)
    else:
        score = jax.jit(make, out_shardings=as_rules(rules).sharding(mesh, spec.axes, spec.shape))(rng)
    out = {k: v for k, v in params.items() if k != "lm_head"}
    out["score"] = score
    return new_cfg, out
