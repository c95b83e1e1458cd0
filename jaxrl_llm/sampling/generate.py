"""`generate`: token-id prompts in, completions and their log-probs out, on the trainer's own parameters.

Host side only: validation, bucketing, chunking, placing the small per-row arrays on the mesh, and turning
the device buffers into Python lists once per chunk. All per-token work is in `loop.py` (one prefill call
and one decode call per chunk; no host round trip per token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxrl_llm.data.bulk import Progress
from jaxrl_llm.distributed import put_global, to_host
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.params import as_prng_key, check_params, param_shardings
from jaxrl_llm.parallel.rules import ShardingRules, as_rules
from jaxrl_llm.sampling import loop
from jaxrl_llm.sampling.budget import auto_batch_size, cast_copy_bytes, layout_copy_bytes, row_bytes
from jaxrl_llm.sampling.request import (
    SamplingParams,
    as_param_list,
    bucket_batch,
    bucket_length,
    bucket_new_tokens,
    bucket_stop_width,
    round_up,
    validate_prompts,
    validate_stop_ids,
)
from jaxrl_llm.sampling.stop_strings import StopTable, stop_width, token_bytes
from jaxrl_llm.sampling.strategies import RowSampler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenerateOutput:
    """Completions in prompt order. tokens[i] excludes the prompt and includes the stop token when one was hit;
    logprobs[i][j] is the log-prob of tokens[i][j]; finish_reasons[i] is 'stop' or 'length'; prompt_lengths[i]
    is the number of prompt tokens row i was generated from (its last ones, when truncate_prompts cut it).

    stats: compiles (XLA compilations of the sampler's functions during this call), prefill_seconds,
    decode_seconds, decode_steps (loop iterations run, summed over chunks), generated_tokens, tokens_per_second,
    chunks, shapes (the (batch, prompt, new-token) bucket of each chunk), truncated_prompts, reshard_seconds,
    decode_layout_seconds (building the unrolled decode loop's output-major weights, once per call; both 0 for
    `PreparedParams` that already hold them).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    stats: dict[str, Any]
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)


def _check_placement(params: dict, mesh: Mesh) -> None:
    """A ValueError naming the fix when a parameter is committed to devices other than the mesh's (jit would
    refuse it with 'incompatible devices')."""
    mesh_devices = set(mesh.devices.flat)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if isinstance(leaf, jax.Array) and leaf.committed and leaf.sharding.device_set != mesh_devices:
            ids = sorted(d.id for d in leaf.sharding.device_set)
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} lives on devices {ids}, not on the mesh's "
                f"{sorted(d.id for d in mesh_devices)}: load the model with models.load_pretrained(path, mesh=mesh), "
                f"or place the params with jax.device_put(params, models.param_shardings(cfg, mesh, rules))")


@dataclasses.dataclass(eq=False)
class PreparedParams:
    """Parameters made ready for `generate` once, for several calls on the same arrays (`prepare_params`)."""

    cfg: ModelConfig
    params: dict  # in the sampling layout (the caller's own arrays when that is the trainer's)
    mesh: Mesh | None
    rules: ShardingRules | None  # the table the sampler runs with: sampling_rules, else the trainer's
    reshard_seconds: float = 0.0
    decode_weights: dict | None = None  # the unrolled decode loop's, built by the first call that decodes with them


def _prepare(cfg: ModelConfig, params: dict, mesh: Mesh | None, rules: ShardingRules | None,
             sampling_rules: ShardingRules | None) -> PreparedParams:
    if mesh is None:
        return PreparedParams(cfg, params, None, None)
    rules = as_rules(rules)
    if sampling_rules is None:
        _check_placement(params, mesh)
        return PreparedParams(cfg, params, mesh, rules)
    sampling_rules = as_rules(sampling_rules, "sampling_rules")
    t0 = time.perf_counter()
    params = jax.block_until_ready(jax.device_put(params, param_shardings(cfg, mesh, sampling_rules)))
    return PreparedParams(cfg, params, mesh, sampling_rules, time.perf_counter() - t0)


def prepare_params(cfg: ModelConfig, params: dict, *, mesh: Mesh | None = None, rules: ShardingRules | None = None,
                   sampling_rules: ShardingRules | None = None) -> PreparedParams:
    """`params` made ready once for several `generate` calls on the same arrays (GRPO's turns and dynamic-sampling
    rounds within a step): resharded to `sampling_rules` here (timed: .reshard_seconds), and the unrolled decode
    loop's output-major weights kept from the first call that builds them. Pass it to generate(cfg, prepared, ...)
    in place of params, with the same mesh, rules and sampling_rules. It holds those copies (each a second copy of
    the weights) as long as it lives: drop it when the parameters change or their memory is needed elsewhere."""
    check_params(cfg, params)
    return _prepare(cfg, params, mesh, rules, sampling_rules)


def _check_prepared(prep: PreparedParams, cfg: ModelConfig, mesh: Mesh | None, rules: ShardingRules | None,
                    sampling_rules: ShardingRules | None) -> None:
    want = None if mesh is None else sampling_rules or as_rules(rules)
    if prep.cfg != cfg or prep.mesh != mesh or prep.rules != want:
        raise ValueError("params: prepared (sampling.prepare_params) for another cfg, mesh or rules than this "
                         "generate call's; prepare them with the call's cfg, mesh, rules and sampling_rules")


class PromptLengthError(ValueError):
    """A prompt does not fit (max_prompt_len, or max_position_embeddings less max_new_tokens): a caller may name
    its own settings in the message it shows."""


def _prompt_limits(cfg: ModelConfig, sps: list[SamplingParams], max_prompt_len: int | None) -> np.ndarray:
    if max_prompt_len is not None:
        if max_prompt_len < 1:
            raise ValueError(f"max_prompt_len={max_prompt_len}: must be >= 1")
        return np.full(len(sps), max_prompt_len)
    limits = np.array([cfg.max_position_embeddings - p.max_new_tokens for p in sps])
    if limits.min() < 1:
        i = int(limits.argmin())
        raise PromptLengthError(f"prompt {i}: max_new_tokens={sps[i].max_new_tokens} leaves no room for a prompt "
                                f"within max_position_embeddings={cfg.max_position_embeddings}")
    return limits


def _fit_prompts(arrs: list[np.ndarray], limits: np.ndarray, truncate: bool) -> tuple[list[np.ndarray], int]:
    """Left-truncate prompts longer than their limit (when allowed), else raise naming the first one."""
    too_long = [i for i, a in enumerate(arrs) if len(a) > limits[i]]
    if not too_long:
        return arrs, 0
    if not truncate:
        i = too_long[0]
        raise PromptLengthError(f"prompt {i} has {len(arrs[i])} tokens, more than the {int(limits[i])} that fit "
                         "(max_prompt_len or max_position_embeddings - max_new_tokens); "
                         f"{len(too_long)} prompt(s) are too long. "
                         "Pass truncate_prompts=True to keep their last tokens")
    log.warning("truncated %d prompt(s) on the left to fit max_prompt_len (default: max_position_embeddings - "
                "max_new_tokens); the longest was %d tokens", len(too_long), max(len(arrs[i]) for i in too_long))
    out = list(arrs)
    for i in too_long:
        out[i] = arrs[i][len(arrs[i]) - int(limits[i]):]
    return out, len(too_long)


def fit_prompts(cfg: ModelConfig, prompts: list[np.ndarray], sps: list[SamplingParams], max_prompt_len: int | None,
                truncate: bool) -> tuple[list[np.ndarray], int]:
    """The prompts as `generate` will run them: each within its limit (max_prompt_len, or max_position_embeddings
    less its max_new_tokens), left-truncated when `truncate` (with the count) or a PromptLengthError naming the
    first that does not fit."""
    return _fit_prompts(prompts, _prompt_limits(cfg, sps, max_prompt_len), truncate)


def _batch_shards(mesh: Mesh | None, rules: ShardingRules | None) -> int:
    if mesh is None or rules is None:
        return 1
    return math.prod(mesh.shape[a] for a in rules.mesh_axes("batch") if a in mesh.shape)


def _chunk_arrays(idx: list[int], arrs: list[np.ndarray], sps: list[SamplingParams], B: int,
                  strings: tuple[str, ...] = (), row_ids: np.ndarray | None = None
                  ) -> tuple[np.ndarray, loop.DecodeInputs, int]:
    """Host arrays for one chunk of prompts (rows beyond len(idx) are inert padding: max_new 0)."""
    P = bucket_length(max(len(arrs[i]) for i in idx))
    W = bucket_stop_width(max(len(sps[i].stop_token_ids) for i in idx))
    ids_BP = np.zeros((B, P), np.int32)
    start_B = np.full(B, P - 1, np.int32)
    temp_B, top_p_B = np.zeros(B, np.float32), np.ones(B, np.float32)
    top_k_B, max_new_B, row_ids_B = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
    raw_B = np.zeros(B, bool)
    stop_BK = np.full((B, W), -1, np.int32)
    for r, i in enumerate(idx):
        a, sp = arrs[i], sps[i]
        ids_BP[r, P - len(a):] = a
        start_B[r] = P - len(a)
        temp_B[r], top_p_B[r], top_k_B[r] = sp.temperature, sp.top_p, sp.top_k
        max_new_B[r], raw_B[r] = sp.max_new_tokens, sp.return_raw_logprobs
        row_ids_B[r] = i if row_ids is None else row_ids[i]
        stop_BK[r, :len(sp.stop_token_ids)] = sp.stop_token_ids
    use_BS = None
    if strings:
        use_BS = np.zeros((B, stop_width(len(strings))), bool)
        for r, i in enumerate(idx):
            use_BS[r, [strings.index(t) for t in sps[i].stop_strings]] = True
    inp = loop.DecodeInputs(
        start_B=start_B, sampler=RowSampler(temperature_B=temp_B, top_k_B=top_k_B, top_p_B=top_p_B),
        raw_logprobs_B=raw_B, stop_ids_BK=stop_BK, max_new_B=max_new_B, row_ids_B=row_ids_B, rng=None,
        stop_use_BS=use_BS)
    return ids_BP, inp, P


def _stop_table(cfg: ModelConfig, sps: list[SamplingParams], tokenizer: Any
                ) -> tuple[tuple[str, ...], StopTable | None]:
    """The distinct stop strings of the request (first-seen order) and their (numpy) table."""
    strings = tuple(dict.fromkeys(t for p in sps for t in p.stop_strings))
    if not strings:
        return strings, None
    if tokenizer is None:
        raise ValueError(f"stop_strings {list(strings)[:3]}: matching them needs the tokenizer; pass "
                         "generate(..., tokenizer=tok) (or sampling.token_bytes(tok), built once)")
    return strings, token_bytes(tokenizer).table(strings, cfg.vocab_size)


def _distinct_prompts(ids_BP: np.ndarray, start_B: np.ndarray, n_rows: int, shards: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(prompt ids [U, P], starts [U], row -> prompt index [B]) of a chunk's distinct prompts, U a batch bucket
    smaller than B, or None when prefilling the distinct prompts alone would not save rows. Rows from n_rows on
    are inert padding and map to prompt 0."""
    B = len(ids_BP)
    first: dict[bytes, int] = {}
    src = np.zeros(B, np.int32)
    for r in range(n_rows):
        src[r] = first.setdefault(ids_BP[r, start_B[r]:].tobytes(), len(first))
    U = bucket_batch(len(first), shards)
    if U >= B:
        return None
    rows = np.zeros(U, np.int64)
    for r in range(n_rows - 1, -1, -1):
        rows[src[r]] = r
    return ids_BP[rows], start_B[rows], src


def generate(
    cfg: ModelConfig,
    params: dict | PreparedParams,
    prompts: Sequence[Sequence[int]],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    rng: jax.Array | int | None = None,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    sampling_rules: ShardingRules | None = None,
    max_batch_size: int | None = None,
    max_prompt_len: int | None = None,
    truncate_prompts: bool = False,
    unroll_layers: bool | None = None,
    share_prefill: bool = True,
    keep_logprobs: bool = True,
    tokenizer: Any = None,
    row_ids: Sequence[int] | None = None,
) -> GenerateOutput:
    """Sample completions of token-id prompts with the model's own (trainer's) parameter arrays.

    sampling_params: one SamplingParams for all prompts, or one per prompt. rng: a PRNG key (or an int seed; None
    is seed 0, so two calls without one sample alike); prompt i samples from the stream fold_in(rng, i) (or
    row_ids[i]), so results
    do not depend on batching or chunking (one exception, as in transformers: dynamic-NTK RoPE past
    max_position_embeddings takes its base from the batch's longest position; GRPO keeps rows within
    max_position_embeddings, where it does not apply).
    mesh/rules: the trainer's mesh and rules table; params are used where they are, with no copy. In a
    multi-process job every process calls this with the same prompts: each places the rows its devices own and
    every process gets every completion back.
    sampling_rules: a different table for sampling (e.g. tensor-parallel decode); params are then resharded
    once per call with `jax.device_put` and the cost is reported as stats['reshard_seconds'].
    params may be `prepare_params(cfg, params, mesh=, rules=, sampling_rules=)` (the same as this call's): the
    reshard and the unrolled decode weights are then made once for all the calls that share it.
    max_batch_size: prompts are processed in chunks of at most this many rows (sorted by length); an integer
    >= 1, or None: as many rows as fit a share of the memory free on a device now (`sampling/budget.py`: KV
    cache, logits and prefill per row; one chunk when all fit; logged when it splits; stats['auto_batch_size']).
    The free memory changes between calls, so the chunk (a compiled shape) may too: set it for steady shapes.
    max_prompt_len: longest prompt allowed (default: max_position_embeddings - max_new_tokens); longer prompts
    raise, or are left-truncated with truncate_prompts=True (counted in stats['truncated_prompts']).
    unroll_layers: decode with per-layer weight and cache arrays and a Python loop over the layers instead of
    a layer scan (default: on a CPU backend only). On XLA:CPU each step of the scan copies every layer's
    weights and cache out of the stacked arrays. The unrolled loop instead copies the weights once per call,
    into an output-major layout (`models.decode_layout`) whose thin decode products XLA:CPU runs about twice
    as fast (memory: a second copy of the layer weights while decoding). It is several times faster per step
    at small batch, but compiles several times slower (about 4x for a 30-layer model), so it pays off from a
    handful of calls on. Not by default in bf16 compute: XLA keeps some bf16 results of the unrolled program
    in fp32 where the trainer's layer scan rounds them (`xla_allow_excess_precision`), and the sampler's
    log-probs would differ from the trainer's by up to ~0.1 (the scan's agree exactly). Off a CPU, the layer scan
    reads weights stored in a wider float dtype than the compute dtype (fp32 with bf16 compute) from a copy cast
    once per chunk (`loop.decode(cast_weights=True)`; memory: that copy while decoding, budgeted), not cast in
    every step.
    share_prefill: a prompt that occurs several times in a chunk (GRPO's group, pass@k's samples) is prefilled
    once and its cache copied to its rows, whenever that makes the prefill batch smaller (stats['prefill_rows']
    counts the rows prefilled).
    keep_logprobs: False leaves every `logprobs[i]` empty (a caller that scores text, as evaluation does, keeps
    no Python float per generated token: about 32 bytes each).
    tokenizer: the model's tokenizer (or `sampling.token_bytes(tokenizer)`, computed once), needed only when a
    SamplingParams has stop_strings.
    row_ids: prompt i's stream is fold_in(rng, row_ids[i]) instead (integers in [0, 2**31)): a caller that splits
    one request into several calls (evaluation's chunks) passes each prompt's index in the whole request and gets
    the samples of one call.
    """
    prepared = isinstance(params, PreparedParams)
    if not prepared:
        check_params(cfg, params)
    arrs = validate_prompts(prompts, cfg.vocab_size)
    sps = as_param_list(sampling_params, len(arrs))
    validate_stop_ids(sps, cfg.vocab_size)
    strings, table = _stop_table(cfg, sps, tokenizer)
    if max_batch_size is not None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int | np.integer) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r}: must be an integer >= 1 (or None: one chunk)")
        max_batch_size = int(max_batch_size)
    if row_ids is not None:
        row_ids = np.asarray(row_ids)
        if row_ids.shape != (len(arrs),) or (row_ids.size and (row_ids.dtype.kind not in "iu" or row_ids.min() < 0
                                                                or row_ids.max() >= 2**31)):
            raise ValueError(f"row_ids: expected {len(arrs)} integers in [0, 2**31) (one per prompt), got "
                             f"{row_ids.tolist() if row_ids.size <= 8 else row_ids.shape}")
    arrs, n_truncated = fit_prompts(cfg, arrs, sps, max_prompt_len, truncate_prompts)
    key = as_prng_key(rng)
    compiles_before = loop.compile_count()
    stats: dict[str, Any] = {"truncated_prompts": n_truncated, "reshard_seconds": 0.0, "prefill_seconds": 0.0,
                             "decode_seconds": 0.0, "decode_layout_seconds": 0.0, "chunks": 0, "decode_steps": 0,
                             "shapes": [], "prefill_rows": 0}

    if prepared:
        _check_prepared(params, cfg, mesh, rules, sampling_rules)
        prep = params
    else:  # this call's own, dropped when it returns
        prep = _prepare(cfg, params, mesh, rules, sampling_rules)
        stats["reshard_seconds"] = prep.reshard_seconds
    params, model_rules = prep.params, prep.rules
    shards = _batch_shards(mesh, model_rules)
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    if unroll_layers is None:
        unroll_layers = platform == "cpu" and cfg.dtype == np.float32
    cast_weights = platform != "cpu" and not unroll_layers  # (a no-op when the weights are in the compute dtype)
    stats["auto_batch_size"] = None
    if max_batch_size is None:
        P_max = bucket_length(max(len(a) for a in arrs))
        N_max = bucket_new_tokens(max(p.max_new_tokens for p in sps))
        copy = unroll_layers and not cfg.num_labels and prep.decode_weights is None  # (built: in the memory used)
        reserve = layout_copy_bytes(params) if copy else cast_copy_bytes(cfg, params) if cast_weights else 0
        rows = stats["auto_batch_size"] = auto_batch_size(cfg, mesh, shards, P_max, N_max, reserve)
        if rows is not None and rows < len(arrs):
            log.info("sampling %d prompts in chunks of %d rows: the KV cache, logits and prefill of all of them "
                     "(about %.2f GiB a device) would not fit the memory free (max_batch_size sets the chunk)",
                     len(arrs), rows, len(arrs) / shards * row_bytes(cfg, P_max, N_max) / 2**30)
            max_batch_size = rows
    if table is not None:  # replicated: every row looks up every token id
        table = jax.tree.map(jax.numpy.asarray, table) if mesh is None else jax.tree.map(
            lambda x: put_global(x, model_rules.sharding(mesh, (None,) * x.ndim, x.shape)), table)
    decode_weights: dict | None = None  # the params decode reads; built at the first chunk

    n = len(arrs)
    chunk = n if max_batch_size is None else max_batch_size
    order = list(range(n)) if chunk >= n else sorted(range(n), key=lambda i: len(arrs[i]))
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons = [""] * n
    ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    progress = Progress(n, "prompts", verb="sampling: generated for")  # a line every 30 s when chunks take that long
    with ctx, loop.counting_compiles():
        for c0 in range(0, n, chunk):
            idx = order[c0:c0 + chunk]
            B = bucket_batch(min(n, chunk), shards)  # the last, smaller chunk reuses the same shape
            if max_batch_size is not None:
                B = min(B, round_up(max_batch_size, shards))
            N = bucket_new_tokens(max(sps[i].max_new_tokens for i in idx))
            ids_BP, inp, P = _chunk_arrays(idx, arrs, sps, B, strings, row_ids)
            distinct = _distinct_prompts(ids_BP, inp.start_B, len(idx), shards) if share_prefill else None
            pre_ids, pre_start, rows = (ids_BP, inp.start_B, None) if distinct is None else distinct
            if mesh is not None:
                put = lambda x: put_global(x, model_rules.sharding(mesh, ("batch",) + (None,) * (x.ndim - 1),
                                                                   x.shape))
                pre_ids, pre_start = put(pre_ids), put(pre_start)
                rows = None if rows is None else put_global(rows, model_rules.sharding(mesh, (None,), rows.shape))
                inp = jax.tree.map(put, dataclasses.replace(inp, rng=None))
            inp = dataclasses.replace(inp, rng=key, stop_table=table)
            t0 = time.perf_counter()
            cache, logits_BV = loop.prefill(cfg, params, pre_ids, pre_start, cache_len=P + N, rules=model_rules,
                                            rows_R=rows, cache_bits=platform == "cpu")
            stats["prefill_rows"] += len(pre_ids)
            jax.block_until_ready(logits_BV)
            t1 = time.perf_counter()
            stats["prefill_seconds"] += t1 - t0
            if decode_weights is None:  # once per call (or per PreparedParams), for all chunks
                decode_weights = params
                if unroll_layers and prep.decode_weights is None:
                    prep.decode_weights = jax.block_until_ready(loop.prepare_decode_params(cfg, params, model_rules))
                    stats["decode_layout_seconds"] = time.perf_counter() - t1
                    t1 = time.perf_counter()
                if unroll_layers:
                    decode_weights = prep.decode_weights
            *out, cache = loop.decode(cfg, decode_weights, cache, logits_BV, inp, max_new_bucket=N,
                                      rules=model_rules, cast_weights=cast_weights, cache_bits=platform == "cpu")
            del cache
            tok_BN, lp_BN, num_B, stopped_B, steps = (to_host(x) for x in out)  # gathered across processes
            t2 = time.perf_counter()
            stats["decode_seconds"] += t2 - t1
            stats["chunks"] += 1
            stats["decode_steps"] += int(steps)
            stats["shapes"].append((B, P, N))
            for r, i in enumerate(idx):
                k = int(num_B[r])
                tokens[i] = tok_BN[r, :k].tolist()
                if keep_logprobs:
                    logprobs[i] = lp_BN[r, :k].tolist()
                reasons[i] = "stop" if stopped_B[r] else "length"
            progress.tick(c0 + len(idx))
    progress.finish()
    n_gen = sum(len(t) for t in tokens)
    stats["compiles"] = loop.compile_count() - compiles_before
    stats["generated_tokens"] = n_gen
    elapsed = stats["prefill_seconds"] + stats["decode_layout_seconds"] + stats["decode_seconds"]
    stats["tokens_per_second"] = n_gen / elapsed if elapsed > 0 else 0.0
    return GenerateOutput(tokens=tokens, logprobs=logprobs, finish_reasons=reasons, stats=stats,
                          prompt_lengths=[len(a) for a in arrs])
