"""Supervised fine-tuning: token-level NLL on assistant tokens, microbatch accumulation with global
(sum, count) normalisation, one jitted step with donated state."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.algorithms.base import Algorithm
from jaxrl_llm.algorithms.losses import target_logprobs
from jaxrl_llm.data.buckets import bucket_width
from jaxrl_llm.data.bulk import from_source, one_dtype, tokenize_rows, tokenize_texts
from jaxrl_llm.data.cache import DataCache, cached
from jaxrl_llm.data.chat import (
    DataError,
    check_rendered,
    conversation_pieces,
    dropped_fields,
    lm_text,
    row_tools,
    run_template,
    template_kwargs,
    to_conversation,
    turn_end_token,
)
from jaxrl_llm.data.sources import describe_source, load_rows
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.transformer import hidden_states
from jaxrl_llm.optim import apply_updates
from jaxrl_llm.parallel.rules import ShardingRules, as_rules, constrain

log = logging.getLogger(__name__)


def combine_sum(name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two microbatches' values of metric `name` combined (fp32): the least for `*_min`, the most for `*_max`, else
    the sum."""
    b = b.astype(jnp.float32)
    return jnp.minimum(a, b) if name.endswith("_min") else jnp.maximum(a, b) if name.endswith("_max") else a + b


def spread_microbatches(micro: jax.Array, rules: ShardingRules | None) -> jax.Array:
    """[num_micro, rows, ...] microbatches with each microbatch's rows over the batch's mesh axes, the microbatch
    axis on none. Reshaping a batch-sharded [B, ...] into [num_micro, B / num_micro, ...] lets XLA put part of the
    batch's mesh axes on the microbatch axis and gather that axis before the scan. Every microbatch then sits on
    rows split over the remaining axes only: a loss with no layout of its own ran it replicated (on 8 devices with
    4 microbatches, 4 rows a device where 1 was its share), and the model, whose activations are constrained to the
    batch axes, resharded its rows inside every scan step (collective-permutes and all-gathers per microbatch).
    The constraint moves rows once, before the loop, instead. No-op without a mesh of several devices; the axes
    after the rows are left to XLA."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return micro
    spec = as_rules(rules).spec(("batch",), micro.shape[1:2], dict(zip(mesh.axis_names, mesh.axis_sizes,
                                                                       strict=True)))
    rows = spec[0] if len(spec) else None
    return jax.lax.with_sharding_constraint(
        micro, NamedSharding(mesh, PartitionSpec(None, rows, *[PartitionSpec.UNCONSTRAINED] * (micro.ndim - 2))))


def microbatch_sums(loss_fn: Callable, params: Any, batch: dict[str, jax.Array], num_micro: int,
                    rules: ShardingRules | None = None) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
    """Microbatch accumulation with metrics: loss_fn(params, mb) -> (loss_sum, (count, metric_sums)).

    Returns (grad sum, loss sum, count, metric sums) over `num_micro` equal microbatches (lax.scan); each
    sum divided by the count is exactly the full-batch mean, whatever the split. Metrics named `*_min` /
    `*_max` are reduced with min / max instead of summed. Each microbatch's rows are spread over the mesh's batch
    axes of `rules` (`spread_microbatches`).
    """
    big = jnp.finfo(jnp.float32).max

    def initial(sums_shape):
        return {k: jnp.full(s.shape, big if k.endswith("_min") else -big if k.endswith("_max") else 0.0, jnp.float32)
                for k, s in sums_shape.items()}

    if num_micro == 1:  # no accumulation: no zero-filled accumulators to add the one microbatch's sums into
        (l, (n, sums)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        init = initial(sums)
        return g, l.astype(jnp.float32), n.astype(jnp.float32), {k: combine_sum(k, init[k], sums[k]) for k in init}
    micro = jax.tree.map(lambda x: spread_microbatches(
        x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:]), rules), batch)
    _, (_, sums_shape) = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro))
    init = initial(sums_shape)
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), jnp.float32(0), jnp.float32(0), init)

    def body(carry, mb):
        (l, (n, sums)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        g_acc, l_acc, n_acc, s_acc = carry
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        s_acc = {k: combine_sum(k, s_acc[k], sums[k]) for k in s_acc}
        return (g_acc, l_acc + l.astype(jnp.float32), n_acc + n.astype(jnp.float32), s_acc), None

    (g, l, n, sums), _ = jax.lax.scan(body, zeros, micro)
    return g, l, n, sums


def microbatch_grads(loss_sum_fn: Callable, params: Any, batch: dict[str, jax.Array], num_micro: int,
                     rules: ShardingRules | None = None) -> tuple[Any, jax.Array, jax.Array]:
    """`microbatch_sums` for a loss_sum_fn(params, mb) -> (loss_sum, count) without extra metrics."""
    def with_sums(p, mb):
        loss, count = loss_sum_fn(p, mb)
        return loss, (count, {})

    g, l, n, _ = microbatch_sums(with_sums, params, batch, num_micro, rules)
    return g, l, n


def apply_mean_grads(optimizer: optax.GradientTransformation, state: dict, g_sum: Any, count: jax.Array
                     ) -> tuple[dict, jax.Array]:
    """Divide summed grads by the global count, update; returns (new state, grad norm). Gradients stay fp32 (the
    optimizer of `optim.make_optimizer` keeps fp32 state); `optim.apply_updates` adds the update to the
    parameters in fp32 and rounds bf16 parameters stochastically."""
    params = state["params"]
    grads = jax.tree.map(lambda g: (g / count).astype(jnp.float32), g_sum)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new = {**state, "params": apply_updates(params, updates, state["step"]), "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, global_norm(grads)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves together (what `optax.clip_by_global_norm` clips). Not `optax.global_norm`:
    deprecated (a DeprecationWarning at every trace in optax 0.2.8); its replacement `optax.tree.norm` is newer
    than the optax>=0.2.4 we allow."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def sft_loss_sum(cfg: ModelConfig, params: Any, mb: dict[str, jax.Array], rules: ShardingRules | None = None
                 ) -> tuple[jax.Array, jax.Array]:
    """(NLL sum, target count) of one (micro)batch as `collate` makes it (packed or not).

    Only the positions that predict a loss token are projected onto the vocabulary: `target_index` [B, K] lists
    them per row (`target_weight` 1 for real entries, 0 for padding), so prompt tokens, padding and the K <= T
    bound leave out of the [B, K, V] logits what the loss would multiply by zero."""
    h_BTD = hidden_states(cfg, params, mb["input_ids"], mb["attention_mask"], positions=mb["positions"],
                          segment_ids=mb["segment_ids"], rules=rules)
    idx_BK = mb["target_index"]
    h_BKD = constrain(jnp.take_along_axis(h_BTD, idx_BK[..., None], axis=1), ("batch", None, "embed"), rules)
    lp_BK = target_logprobs(cfg, params, h_BKD, jnp.take_along_axis(mb["input_ids"], idx_BK + 1, 1), rules)
    w_BK = mb["target_weight"].astype(jnp.float32)
    return -(lp_BK * w_BK).sum(), w_BK.sum()


def make_sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, num_micro: int = 1,
                  rules: ShardingRules | None = None) -> Callable:
    """step(state, batch, ref_params=None) -> (state, metrics); batch as `collate` makes it."""

    def loss_sum(params, mb):
        return sft_loss_sum(cfg, params, mb, rules)

    def step(state, batch, ref_params=None):
        del ref_params
        g_sum, l_sum, n = microbatch_grads(loss_sum, state["params"], batch, num_micro, rules)
        n = jnp.maximum(n, 1.0)
        state, gnorm = apply_mean_grads(optimizer, state, g_sum, n)
        return state, {"loss": l_sum / n, "tokens": n, "grad_norm": gnorm}

    return step


def make_sft_eval(cfg: ModelConfig, config: Any, rules: ShardingRules | None = None) -> Callable:
    """eval(params, batch, ref_params=None) -> ({"loss": NLL sum}, target count), filler rows weighted 0."""

    def evaluate(params, batch, ref_params=None):
        del ref_params
        mb = {**batch, "target_weight": batch["target_weight"] * batch["example_weight"][:, None].astype(jnp.int32)}
        l_sum, n = sft_loss_sum(cfg, params, mb, rules)
        return {"loss": l_sum}, n

    return evaluate


def prepare(config: Any, tokenizer: Any, cache: DataCache | None = None
            ) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    """Rows -> (ids, loss_mask) per example; over-long ones truncated or dropped (counted and logged).
    cache (the run's: its workdir's data_cache/; used unless data.cache is False): the tokens are kept there, and
    a later start with the same data, tokenizer and settings reads them instead of tokenizing again."""
    dc = config.data
    template = run_template(dc)
    has_template = bool(template or getattr(tokenizer, "chat_template", None))  # (none: a base model's tokenizer)
    eos_id = turn_end_token(tokenizer, template, enabled=dc.get("add_eos", True)) if has_template else None

    def tokenize() -> tuple[list, dict[str, int]]:
        rows = load_rows(dc.source, dc.num_examples)
        with from_source(describe_source(dc.source)):
            # every row's fields first (a few seconds for a million rows): a bad row anywhere in the file is said
            # before minutes of tokenizing the rows ahead of it
            texts = {i: t for i, row in enumerate(rows) if (t := lm_text(row, i)) is not None}
            parsed = {i: (*to_conversation(row, i), row_tools(row, i)) for i, row in enumerate(rows)
                      if i not in texts}
            n = len(rows)
            del rows
            if parsed and not has_template:
                raise DataError(f"row {min(parsed)} is a conversation and the tokenizer has no chat template (a base "
                                "model's?): set data.chat_template to one (rows of plain 'text' need none)")
            dropped = dropped_fields(tokenizer, template, {m["role"] for msgs, _, _ in parsed.values() for m in msgs})
            no_reasoning = sum(check_rendered(msgs, tools, dropped, i) for i, (msgs, _, tools) in parsed.items())
            order = list(parsed)
            conv = iter(tokenize_rows(tokenizer, len(order), lambda j: [conversation_pieces(
                tokenizer, parsed[order[j]][0], chat_template=template, last_assistant_only=dc.last_assistant_only,
                index=order[j], context_turns=parsed[order[j]][1], tools=parsed[order[j]][2], eos_id=eos_id)]))
            lm = iter(tokenize_texts(tokenizer, list(texts.values()), add_eos=bool(dc.get("add_eos", True))))
            return one_dtype([next(lm) if i in texts else next(conv) for i in range(n)]), {
                "rows": n, "no_reasoning": no_reasoning}

    settings = {"num_examples": dc.num_examples, "template": template, "template_kwargs": template_kwargs(dc),
                "eos_id": eos_id, "last_assistant_only": dc.last_assistant_only,
                "text_eos": bool(dc.get("add_eos", True))}
    tokenized, info = cached(cache, dc.get("cache", True), "sft", dc.source, settings, tokenizer,
                             tokenize)
    no_reasoning = info["no_reasoning"]
    out, stats = [], {"rows": info["rows"], "truncated": 0, "dropped": 0}
    for ((ids, mask),) in tokenized:
        cut = len(ids) > dc.max_len
        if cut:
            if dc.overlong == "drop":
                stats["dropped"] += 1
                continue
            ids, mask = ids[: dc.max_len], mask[: dc.max_len]
        if mask[1:].sum() == 0:
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut  # rows trained on in cut form; one dropped after the cut counts as dropped
        out.append((ids, mask))
    if no_reasoning:
        log.warning("data: %d rows hold reasoning_content, which the chat template leaves out of its text: trained "
                    "without it", no_reasoning)
    if stats["truncated"] or stats["dropped"]:
        log.warning("data: of %d rows, %d were longer than data.max_len=%d tokens and cut to it, and %d dropped "
                    "(longer than that with data.overlong=drop, or no assistant token left to learn, or an empty "
                    "text)", stats["rows"],
                    stats["truncated"], dc.max_len, stats["dropped"])
    if not out:
        raise DataError(f"data.source={describe_source(dc.source)!r}: no usable rows after tokenization")
    if dc.packing:
        packed = pack(out, dc.max_len)
        stats["packed_rows"] = len(packed)
        log.info("data: packed %d examples into %d rows of %d tokens", len(out), len(packed), dc.max_len)
        return packed, stats
    return out, stats


Example = tuple[np.ndarray, np.ndarray]


def pack(examples: list[Example], max_len: int) -> list[list[Example]]:
    """First-fit packing (in the given order) of examples into rows of at most max_len tokens: each example goes
    to the first row with room for it, or opens a new row.

    The first row with room is found in a max-tree over the rows' free room (leaf r: row r's room, -1 for rows
    not opened yet; each inner node: the larger of its two children), O(log rows) per example instead of a scan
    of every open row (quadratic: minutes for 100k examples, days for 10M)."""
    leaves = 1
    while leaves < len(examples):
        leaves *= 2
    room = [-1] * (2 * leaves)  # room[1]: the root; leaf of row r at leaves + r
    rows: list[list[Example]] = []
    for ex in examples:
        n = len(ex[0])
        if room[1] >= n:  # some open row has room: walk down to the first (leftmost) one
            node = 1
            while node < leaves:
                node = 2 * node if room[2 * node] >= n else 2 * node + 1
            rows[node - leaves].append(ex)
            room[node] -= n
        else:
            node = leaves + len(rows)
            rows.append([ex])
            room[node] = max_len - n
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


def _rows(examples: list[Example | list[Example]]) -> list[list[Example]]:
    return [[row] if isinstance(row, tuple) else row for row in examples]


def batch_widths(examples: list[Example | list[Example]], config: Any) -> dict[str, int]:
    """The padded widths of one global batch (every process computes them from the whole batch, so all build
    the same shapes): "length", columns per row, the `bucket_width` rung over the batch's longest row on the
    ladder of data.length_buckets rungs per doubling (default 4), and "targets", loss targets per row: 1/4, 2/4,
    3/4 or all of "length", whichever first holds the most any row has. So a batch shape is one of four per
    length rung (the train step compiles once per shape it meets); length_buckets 0: data.max_len for both, one
    shape."""
    rows, rungs = _rows(examples), config.data.get("length_buckets", 4)
    T = bucket_width(max(sum(len(ids) for ids, _ in row) for row in rows), config.data.max_len, rungs)
    if rungs == 0:
        return {"length": T, "targets": T}
    most_targets = max(sum(int(mask[1:].sum()) for _, mask in row) for row in rows)
    return {"length": T, "targets": next(k for k in (-(-T * q // 4) for q in (1, 2, 3, 4)) if k >= most_targets)}


def collate(examples: list[Example | list[Example]], config: Any, pad_id: int,
            widths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Rows right-padded to widths["length"] columns (default: `batch_widths` of these examples). A row is one
    example or a packed list of them: segment_ids number the examples of a row (0 = padding), positions restart
    at 0 for each, and the first token of every example is never a loss target, so attention and loss never
    cross examples. target_index [B, widths["targets"]]: the positions t whose next token t + 1 is in the loss,
    in order (target_weight 1), then zeros (weight 0)."""
    w = widths or batch_widths(examples, config)
    B, T, K = len(examples), w["length"], w["targets"]
    out = {k: np.zeros((B, T), np.int32) for k in ("attention_mask", "loss_mask", "segment_ids", "positions")}
    out["input_ids"] = np.full((B, T), pad_id, np.int32)
    out["target_index"], out["target_weight"] = np.zeros((B, K), np.int32), np.zeros((B, K), np.int32)
    for r, row in enumerate(_rows(examples)):
        t0 = 0
        for seg, (ids, mask) in enumerate(row, start=1):
            if t0 + len(ids) > T:
                raise ValueError(f"collate: row {r} holds {t0 + len(ids)} tokens; the batch width is {T}")
            sl = slice(t0, t0 + len(ids))
            out["input_ids"][r, sl], out["attention_mask"][r, sl], out["segment_ids"][r, sl] = ids, 1, seg
            out["loss_mask"][r, sl] = mask
            out["loss_mask"][r, t0] = 0
            out["positions"][r, sl] = np.arange(len(ids))
            t0 += len(ids)
        pos = np.flatnonzero(out["loss_mask"][r, 1:])
        if len(pos) > K:
            raise ValueError(f"collate: row {r} has {len(pos)} loss targets; the batch allows {K}")
        out["target_index"][r, :len(pos)], out["target_weight"][r, :len(pos)] = pos, 1
    return out


ALGORITHM = Algorithm(
    name="sft",
    prepare=prepare,
    collate=collate,
    batch_axes={**{k: ("batch", "length") for k in
                   ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")},
                "target_index": ("batch", None), "target_weight": ("batch", None)},
    widths=batch_widths,
    make_step=lambda cfg, optimizer, config, rules: make_sft_step(cfg, optimizer, config.train.microbatches, rules),
    make_eval=make_sft_eval,
)
