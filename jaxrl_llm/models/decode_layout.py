"""Output-major weights for decoding a few rows at a time (the CPU sampler's layout).

The trainer stores every projection input-major (`wq [D, N, H]`, `w_gate [D, F]`, ...: x @ W). A decode step
multiplies only B rows (B = batch, one token each) by every matrix of the model. For such thin products
XLA:CPU's dot kernels run about twice as fast when the weight is stored output-major (`[out..., in...]`, each
output's weights contiguous, as a torch Linear stores them) and the product is formed as W · xᵀ, giving
[out..., rows]: measured on a 2-core AVX2 CPU, a SmolLM2-135M decode step at batch 8 went from about 100 to
about 65 ms. The result is transposed back to [rows, out...] behind an optimization barrier, because XLA's
simplifier would otherwise fold that transpose into the dot and restore the slow form.

`decode_params` builds the per-layer, output-major copy once per `sampling.generate` call, as its own jitted
function: its outputs are materialised arrays, which the decode loop then reads as parameters in their
row-major layout (a transpose inside the decode computation would be turned into a layout change and undone).
The copy costs one pass over the layer weights and a second copy of them in memory while decoding, which the
unrolled decode loop needed before (per-layer slices of the stacked arrays are copies on XLA:CPU).

Keys: a projection `name` becomes `name + "_t"` with its input axes moved to the end (`wq_t [N, H, D]`,
`wo_t [D, N, H]`, `w_down_t [D, F]`); `lm_head_t [V, D]` is the tied embedding itself (no copy) or the
transposed `lm_head`. Every other leaf is unchanged. The logical sharding axes move with the array axes.

Fused products: products that read the same input are concatenated along their output axis, so that a step
makes one wider product instead of several thin ones: `wqkv_t [N + 2K, H, D]` (q, k and v heads in that
order) replaces `wq_t`, `wk_t` and `wv_t`, and `w_gate_up_t [2F, D]` (gate rows, then up rows) replaces
`w_gate_t` and `w_up_t`. On the 2-core AVX-512 CPU of benchmarks/README.md, SmolLM2-135M's q/k/v products at
32 rows took 219 instead of 275 µs a layer and the gate/up ones 544 instead of 583 (at 8 rows: 83 against 137,
238 against 280), measured in isolation with the weights in cache; a whole batch-32 decode step gained 0-4%
(105.0-109.0 to 105.0-105.8 ms), batch 1 and 8 within their noise. They are fused only when the concatenated
output axes are not split across devices under the current mesh (a tensor-parallel split of the heads or the MLP
width would not survive concatenation).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.params import param_specs
from jaxrl_llm.parallel.rules import ShardingRules, constrain

# Per-layer projection -> how many of its leading axes are input axes.
INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
SUFFIX = "_t"
# Fused output-major weights: key -> (the projections concatenated along the output axis, in order).
FUSED = MappingProxyType({"wqkv_t": ("wq", "wk", "wv"), "w_gate_up_t": ("w_gate", "w_up")})
# key -> (the logical axes that must not be split for it to be fused, its own logical axes).
_FUSED_AXES = MappingProxyType({"wqkv_t": (("heads", "kv_heads"), (None, "head_dim", "embed")),
                                "w_gate_up_t": (("mlp",), (None, "embed"))})


def _unsplit(rules: ShardingRules | None, logical: tuple[str, ...]) -> bool:
    """Whether none of these logical axes is split across devices under the current mesh."""
    if rules is None:
        return True
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    return all(math.prod(sizes.get(a, 1) for a in rules.mesh_axes(name)) == 1 for name in logical)


def _to_output_major(w: jax.Array, n_in: int) -> tuple[jax.Array, tuple[int, ...]]:
    perm = tuple(range(n_in, w.ndim)) + tuple(range(n_in))
    return jnp.transpose(w, perm), perm


def output_major_layers(cfg: ModelConfig, layers: dict, rules: ShardingRules | None = None) -> list[dict]:
    """Stacked layers (leaves [L, ...]) -> L per-layer dicts, each projection `name` as `name + "_t"`."""
    specs = param_specs(cfg)
    out = []
    for i in range(cfg.num_layers):
        layer = {}
        for name, a in layers.items():
            axes = specs[f"layers/{name}"].axes[1:]
            if name in INPUT_AXES:
                w, perm = _to_output_major(a[i], INPUT_AXES[name])
                layer[name + SUFFIX] = constrain(w, tuple(axes[j] for j in perm), rules)
            else:
                layer[name] = constrain(a[i], axes, rules)
        for key, names in FUSED.items():
            unsplit, axes = _FUSED_AXES[key]
            if all(n in layers for n in names) and _unsplit(rules, unsplit):
                parts = [layer.pop(n + SUFFIX) for n in names]
                layer[key] = constrain(jnp.concatenate(parts, axis=0), axes, rules)
        out.append(layer)
    return out


def output_major_head(cfg: ModelConfig, params: dict, rules: ShardingRules | None = None) -> jax.Array:
    """The vocabulary head as [V, D]: the tied embedding itself, or the transposed `lm_head`."""
    if cfg.tie_word_embeddings:
        return params["embed"]
    return constrain(params["lm_head"].T, ("vocab", "embed"), rules)


def decode_params(cfg: ModelConfig, params: dict, rules: ShardingRules | None = None) -> dict:
    """Model params -> the decode loop's params: `layers` as L per-layer dicts with output-major projections,
    plus `lm_head_t`. Pure. The new arrays must be materialised before the decode computation reads them:
    `sampling.loop.prepare_decode_params` computes them in a jitted call of their own."""
    if cfg.num_labels:
        raise ValueError("decode_params: a score-head model (num_labels > 0) has no vocabulary head to decode with")
    out = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
    return {**out, "layers": output_major_layers(cfg, params["layers"], rules),
            "lm_head_t": output_major_head(cfg, params, rules)}


def is_decode_params(params: dict) -> bool:
    """Whether `params` came from `decode_params` (its vocabulary head is output-major)."""
    return "lm_head_t" in params


def project(x: jax.Array, w_t: jax.Array, n_in: int, preferred_element_type=None) -> jax.Array:
    """x [rows..., in...] times an output-major weight w_t [out..., in...] -> [rows..., out...].

    Formed as w_t · xᵀ ([out..., rows], the fast form for few rows on XLA:CPU) and transposed back behind an
    optimization barrier (see the module docstring)."""
    n_rows, n_out = x.ndim - n_in, w_t.ndim - n_in
    dims = ((tuple(range(n_out, w_t.ndim)), tuple(range(n_rows, x.ndim))), ((), ()))
    y = jax.lax.dot_general(w_t, x, dims, preferred_element_type=preferred_element_type)  # [out..., rows...]
    y = jax.lax.optimization_barrier(y)
    return jnp.transpose(y, tuple(range(n_out, y.ndim)) + tuple(range(n_out)))
