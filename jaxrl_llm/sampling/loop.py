"""The jitted sampler: one prefill call per batch, then the whole decode loop in one `lax.while_loop`.

Static (a change recompiles): cfg, rules, the batch/prompt/new-token buckets, the stop-id width, and with a
shared prefill the batch bucket of the distinct prompts (`generate`: repeated prompts are prefilled once).
Dynamic (arrays; a change never recompiles): the prompts' tokens, temperature/top-k/top-p per row, stop ids per
row, stop strings (within a bucket of their count), max_new_tokens per row, the RNG key.

Compile counter: jax's own compile event (one per XLA compilation, as `jax_log_compiles` logs them) for these
functions, counted while `generate` runs (`counting_compiles`). Not their traces: jax also compiles a function
again without tracing it when only the placement of its arguments changes (parameters committed to a device, or
sharded otherwise, with the same shapes). `compile_count()` reads it (tests and GRPO's sampler_compiles).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.decode_layout import decode_params, output_major_head, output_major_layers
from jaxrl_llm.models.transformer import forward_with_cache, rope_tables
from jaxrl_llm.parallel.rules import ShardingRules, constrain
from jaxrl_llm.sampling import stop_strings
from jaxrl_llm.sampling.cache import (
    CACHE_AXES,
    as_bits,
    cache_length,
    decode_mask_B1S,
    from_bits,
    init_cache,
    prefill_mask_BTS,
    prompt_positions_BT,
    stack_cache,
    unstack_cache,
)
from jaxrl_llm.sampling.stop_strings import StopTable
from jaxrl_llm.sampling.strategies import RowSampler

_COMPILES: collections.Counter[str] = collections.Counter()
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # (also a load from the persistent compile cache)
_NAMES = {"prefill": "prefill", "decode": "decode", "_output_major": "decode_params"}
_counting = threading.local()
PAD_TOKEN = -1  # in returned token buffers, after a row has finished


def _on_compile(event: str, duration: float, **kw: Any) -> None:
    if event != _COMPILE_EVENT or not getattr(_counting, "depth", 0):
        return
    name = str(kw.get("fun_name", ""))
    name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name
    if name in _NAMES:
        _COMPILES[_NAMES[name]] += 1


jax.monitoring.register_event_duration_secs_listener(_on_compile)


@contextlib.contextmanager
def counting_compiles() -> Iterator[None]:
    """Count the compilations of the sampler's functions that this thread makes inside the block."""
    _counting.depth = getattr(_counting, "depth", 0) + 1
    try:
        yield
    finally:
        _counting.depth -= 1


def compile_count() -> int:
    """How many times `generate` has compiled the sampler's jitted functions in this process."""
    return sum(_COMPILES.values())


def compile_counts() -> dict[str, int]:
    return dict(_COMPILES)


@partial(jax.jit, static_argnames=("cfg", "cache_len", "rules", "cache_bits"))
def prefill(cfg: ModelConfig, params: dict, ids_BT: jax.Array, start_B: jax.Array, *, cache_len: int,
            rules: ShardingRules | None = None, rows_R: jax.Array | None = None, cache_bits: bool = False
            ) -> tuple[dict, jax.Array]:
    """Left-padded prompts [B, P] (row b valid from slot start_b) -> (cache, logits [B, V] of slot P - 1).

    Every row's last prompt token sits in slot P - 1 (left padding), so only that slot is projected onto the
    vocabulary (`last_only`), and attention reads only the P prompt slots, not the empty cache (`empty_cache`).
    rows_R: the B prompts are the distinct ones of a batch of R rows, and row r is prompt
    rows_R[r]: the cache and logits come back with R rows (each prompt prefilled once, then copied).
    cache_bits: write a 16-bit float cache as its bits (`cache.as_bits`; the same values), as `generate` does on a
    CPU, where XLA would convert the whole cache to fp32 and back at every layer's update."""
    B, P = ids_BT.shape
    # With rows_R the distinct prompts' cache holds only their P slots: it is copied to the R rows and only then
    # given its empty generation slots (a full-length cache of the distinct prompts beside the rows' one doubled
    # the prefill's peak).
    length = cache_len if rows_R is None else P
    cache = init_cache(cfg, B, length, rules)
    mask_BTS = prefill_mask_BTS(cfg, start_B, P, length)
    logits_B1V, cache = forward_with_cache(cfg, params, ids_BT, prompt_positions_BT(start_B, P), mask_BTS,
                                           as_bits(cache) if cache_bits else cache, jnp.int32(0), rules=rules,
                                           last_only=True, empty_cache=True)
    cache = from_bits(cache, cfg.dtype)
    logits_BV = logits_B1V[:, 0]
    if rows_R is not None:
        pad = [(0, 0)] * len(CACHE_AXES)
        pad[CACHE_AXES.index("length")] = (0, cache_len - P)
        cache = {n: jnp.pad(jnp.take(c, rows_R, axis=CACHE_AXES.index("batch")), pad) for n, c in cache.items()}
        logits_BV = jnp.take(logits_BV, rows_R, axis=0)
    cache = {n: constrain(c, CACHE_AXES, rules) for n, c in cache.items()}
    return cache, logits_BV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """The while-loop carry. `step` = tokens produced so far; row b is done after a stop id or its limit.

    tokens_BN / logprobs_BN hold token i of each row at column i (PAD_TOKEN / 0 after the row finished).
    """

    step: jax.Array  # int32 []
    cache: dict
    last_token_B: jax.Array  # int32, the token to feed next
    done_B: jax.Array  # bool
    stopped_B: jax.Array  # bool: finished on a stop id
    num_tokens_B: jax.Array  # int32
    tokens_BN: jax.Array  # int32
    logprobs_BN: jax.Array  # fp32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
    """Per-row request arrays (a pytree; all dynamic)."""

    start_B: jax.Array  # int32: first prompt slot (P - prompt length)
    sampler: RowSampler
    raw_logprobs_B: jax.Array  # bool: return temperature-1 unfiltered log-probs instead
    stop_ids_BK: jax.Array  # int32, padded with -1
    max_new_B: jax.Array  # int32 >= 1 (0 for batch-padding rows)
    row_ids_B: jax.Array  # int32: index of the prompt in the whole request (its RNG stream)
    rng: jax.Array  # one PRNG key for the request
    stop_use_BS: jax.Array | None = None  # bool: the stop strings of each row (None: no row has any)
    stop_table: StopTable | None = None  # replicated


def _record(state: DecodeState, logits_BV: jax.Array, inp: DecodeInputs) -> DecodeState:
    """Sample token `state.step` of every unfinished row and update the finish flags."""
    row_keys_B = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(inp.rng, inp.row_ids_B)
    keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys_B, state.step)
    res = inp.sampler.get_next_tokens(logits_BV, keys_B, need_raw=jnp.any(inp.raw_logprobs_B & ~state.done_B))
    active_B = ~state.done_B
    lp_B = jnp.where(inp.raw_logprobs_B, res.raw_logprobs_B, res.logprobs_B)
    tok_B = jnp.where(active_B, res.tokens_B, PAD_TOKEN)
    tokens_BN = jax.lax.dynamic_update_index_in_dim(state.tokens_BN, tok_B, state.step, axis=1)
    logprobs_BN = jax.lax.dynamic_update_index_in_dim(state.logprobs_BN, jnp.where(active_B, lp_B, 0.0),
                                                      state.step, axis=1)
    hit_B = active_B & jnp.any(tok_B[:, None] == inp.stop_ids_BK, axis=-1)
    if inp.stop_table is not None:
        hit_B = hit_B | (active_B & stop_strings.hits(inp.stop_table, inp.stop_use_BS, tokens_BN, state.step))
    num_B = state.num_tokens_B + active_B.astype(jnp.int32)
    return dataclasses.replace(
        state, step=state.step + 1, last_token_B=jnp.where(active_B, res.tokens_B, 0),
        done_B=state.done_B | hit_B | (num_B >= inp.max_new_B), stopped_B=state.stopped_B | hit_B,
        num_tokens_B=num_B, tokens_BN=tokens_BN, logprobs_BN=logprobs_BN)


@partial(jax.jit, static_argnames=("cfg", "rules"))
def _output_major(cfg: ModelConfig, layers: dict, lm_head: jax.Array | None, rules: ShardingRules | None
                  ) -> tuple[list[dict], jax.Array | None]:
    head = None if lm_head is None else output_major_head(cfg, {"lm_head": lm_head}, rules)
    return output_major_layers(cfg, layers, rules), head


def prepare_decode_params(cfg: ModelConfig, params: dict, rules: ShardingRules | None = None) -> dict:
    """`decode_layout.decode_params`, with the arrays it creates (per-layer output-major weights, an untied
    head's transpose) computed in a jitted call of their own, so that they are materialised when `decode`
    reads them (memory: a second copy of the layer weights). The leaves it keeps (embedding, final norm, a
    tied head) are the caller's arrays, not copies."""
    if cfg.num_labels:
        return decode_params(cfg, params, rules)  # raises: no vocabulary head
    layers, head = _output_major(cfg, params["layers"], params.get("lm_head"), rules)
    out = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
    return {**out, "layers": layers, "lm_head_t": params["embed"] if head is None else head}


def narrows(stored: Any, compute: Any) -> bool:
    """Whether casting a weight stored in `stored` to the compute dtype `compute` makes it smaller (a float dtype
    of more bytes than the compute dtype)."""
    return bool(jnp.issubdtype(stored, jnp.floating)) and jnp.dtype(stored).itemsize > jnp.dtype(compute).itemsize


def step_weights_in_compute_dtype(cfg: ModelConfig, params: dict) -> dict:
    """`params` with the arrays every decode step reads in full (all but an untied embedding table, of which a step
    looks up B rows) cast to the compute dtype where they are stored in a wider float dtype (fp32 weights, bf16
    compute). Exact: the layers, the final norm and the head cast their weights to the compute dtype anyway, as the
    trainer does. Narrower weights (bf16 weights, fp32 compute) stay as they are: a widened copy would double the
    bytes each step reads and the memory held."""
    cast = lambda a: a.astype(cfg.dtype) if narrows(a.dtype, cfg.dtype) else a
    return {**params, **jax.tree.map(cast, read_in_full(cfg, params))}


def read_in_full(cfg: ModelConfig, params: dict) -> dict:
    """The entries of `params` every decode step reads whole: all but an untied embedding table (of which a step
    looks up B rows; a tied one is also the head)."""
    keep = () if cfg.tie_word_embeddings and "lm_head_t" not in params else ("embed",)
    return {k: v for k, v in params.items() if k not in keep}


@partial(jax.jit, static_argnames=("cfg", "max_new_bucket", "rules", "cast_weights", "cache_bits"),
         donate_argnames=("cache",))
def decode(cfg: ModelConfig, params: dict, cache: dict, logits_BV: jax.Array, inp: DecodeInputs, *,
           max_new_bucket: int, rules: ShardingRules | None = None, cast_weights: bool = False,
           cache_bits: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, dict]:
    """Sample up to `max_new_bucket` tokens per row after `prefill`, stopping as soon as every row is done.

    Returns (tokens [B, N] int32, logprobs [B, N] fp32, num_tokens [B] int32, stopped [B] bool, steps [] int32,
    cache). The cache is donated and returned so that the loop updates it in place (callers may drop it).
    params: the model's (stacked layers: a layer scan inside each step), or with `layers` a list of per-layer
    dicts, such as `prepare_decode_params(cfg, params, rules)` gives (per-layer output-major weights): the layers
    then run as a Python loop over per-layer weight and cache arrays (see `generate(unroll_layers=...)`).
    cast_weights: cast the layer weights and the head to the compute dtype once, before the loop
    (`step_weights_in_compute_dtype`; memory: that copy while decoding), instead of in every step. With fp32
    parameters and bf16 compute each step then reads 2 bytes a weight instead of 4 (inside the layer scan the
    cast applies to each layer's slice, which XLA cannot move out of the loop). `generate` sets it off a CPU: XLA:CPU
    computes bf16 products in fp32 and would keep an fp32 copy of the bf16 weights besides, for no fewer bytes a
    step. cache_bits: the loop carries a 16-bit float cache as its bits (see `prefill`; `generate` sets it on a CPU).
    """
    if cast_weights:
        params = step_weights_in_compute_dtype(cfg, params)
    if cache_bits:  # (before unstacking: one conversion, free, per call)
        cache = as_bits(cache)
    B = logits_BV.shape[0]
    S = cache_length(cache)
    P = S - max_new_bucket  # first generated slot
    lengths_B = P - inp.start_B
    unroll = isinstance(params["layers"], list | tuple)
    if unroll:  # the cache sliced once here instead of inside every step (slices are copies on XLA:CPU)
        cache = unstack_cache(cache, rules)
    state = DecodeState(
        step=jnp.int32(0), cache=cache, last_token_B=jnp.zeros((B,), jnp.int32),
        done_B=inp.max_new_B <= 0, stopped_B=jnp.zeros((B,), bool), num_tokens_B=jnp.zeros((B,), jnp.int32),
        tokens_BN=jnp.full((B, max_new_bucket), PAD_TOKEN, jnp.int32),
        logprobs_BN=jnp.zeros((B, max_new_bucket), jnp.float32))
    state = _record(state, logits_BV, inp)
    # Rotary cos/sin of every cache slot's position, computed once ([1, S, H/2]; each step gathers its rows'):
    # inside the step XLA would evaluate the cosines and sines again in each layer's fused rotation (see
    # `rope_tables`). Dynamic NTK scaling depends on each step's longest position: computed per step instead.
    per_step_rope = cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "dynamic"
    tables_1Sh = None if per_step_rope else rope_tables(cfg, jnp.arange(S)[None])

    def cond(s: DecodeState) -> jax.Array:
        return (s.step < max_new_bucket) & ~jnp.all(s.done_B)

    def body(s: DecodeState) -> DecodeState:
        slot = P + s.step - 1  # where the previous token goes
        pos_B1 = (lengths_B + s.step - 1)[:, None]
        mask_B1S = decode_mask_B1S(cfg, inp.start_B, slot, S)
        rope = None if tables_1Sh is None else tuple(t[0][pos_B1] for t in tables_1Sh)
        logits_B1V, new_cache = forward_with_cache(cfg, params, s.last_token_B[:, None], pos_B1, mask_B1S,
                                                   s.cache, slot, rules=rules, rope=rope)
        return _record(dataclasses.replace(s, cache=new_cache), logits_B1V[:, 0], inp)

    state = jax.lax.while_loop(cond, body, state)
    cache = from_bits(stack_cache(state.cache, rules) if unroll else state.cache, cfg.dtype)
    return state.tokens_BN, state.logprobs_BN, state.num_tokens_B, state.stopped_B, state.step, cache
