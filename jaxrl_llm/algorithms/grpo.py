"""GRPO and its variants (DAPO, GSPO, REINFORCE): the device-side pieces and the host-side reward processing.

The step itself (prompts -> our sampler on the trainer's arrays -> environment -> advantages -> reference
log-probs -> optimizer updates) is driven by `jaxrl_llm.rl_train`; this module holds what it composes:

- `validate_config`: every `grpo`/`rollout` key checked before any heavy work;
- `build_batch`: prompts + completions -> full-width training arrays (`jaxrl_llm.rl_lengths` cuts each chunk to
  the columns its rows use under grpo.length_buckets);
- `make_logprobs_fn`: jitted per-token log-probs of a batch (reference, or recomputed old log-probs);
- `make_train_step`: one optimizer update on a minibatch (microbatch accumulation, global normalisation), and
  `make_microbatch_fns`, the same update in per-microbatch pieces for microbatches of different widths;
- `shape_overlong`, `dynamic_sampling_keep`: DAPO's reward shaping and group filter (numpy, host).

Sequence layout: row i is [pad..., prompt_i | completion_i, pad...]: prompts left-padded to the recipe's
data.max_prompt_len P, so every completion starts at column P (positions count from the first real token, as in
the sampler). Per-token arrays [R, T] are aligned with their targets: column t holds a value for token t. Only the
completion columns [P, T) are ever targets, so the log-prob functions project just those positions onto the
vocabulary (as TRL's logits_to_keep does): the prompt positions run through the transformer but never through
the vocabulary-sized head and log-softmax, which dominate small models at large vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from ml_collections import config_dict

from jaxrl_llm.algorithms.advantages import ADV_ESTIMATORS
from jaxrl_llm.algorithms.losses import token_logprob_stats, token_logprobs
from jaxrl_llm.algorithms.pg_losses import KL_TYPES, LOGP_FLOOR, TIS_TYPES, grpo_advantages, policy_gradient_loss_sum
from jaxrl_llm.algorithms.sft import apply_mean_grads, combine_sum, microbatch_sums, spread_microbatches
from jaxrl_llm.data.buckets import RUNGS
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.logit_chunks import fp32_head, over_positions
from jaxrl_llm.models.shared_prefix import continuation_predictors, shared_prefix_hidden_states
from jaxrl_llm.models.transformer import hidden_states, lm_logits
from jaxrl_llm.parallel.rules import SAMPLING_LAYOUTS, ShardingRules
from jaxrl_llm.sampling.stop_strings import check_stop_strings
from jaxrl_llm.sampling.strategies import filter_threshold, filter_top_k_top_p

BATCH_AXES = {
    "input_ids": ("batch", "length"), "attention_mask": ("batch", "length"), "loss_mask": ("batch", "length"),
    "advantages": ("batch", "length"), "old_logprobs": ("batch", "length"), "ref_logprobs": ("batch", "length"),
    "sampler_logprobs": ("batch", "length"), "positive": ("batch",),
}

_FILTER_THRESHOLD = "grpo_filter_threshold"  # (`checkpoint_name` of the top-k/top-p threshold, see _policy_logprobs)

__all__ = ["BATCH_AXES", "build_batch", "dynamic_sampling_keep", "grpo_advantages", "grpo_config", "make_logprobs_fn",
           "make_microbatch_fns", "make_train_step", "nll_scale", "shape_overlong", "shared_prompt_group",
           "validate_config"]


def grpo_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Every `grpo` key of a recipe with its default (NeMo RL's, where it has one); recipes pass what they change:
    `c.grpo = grpo_config(kl_coef=0.0)`. Keys that default to None are off until set.

    Advantages: adv_estimator grpo | reinforce_plus_plus | gdpo. grpo: group baseline, leave_one_out and
    normalize_std. reinforce_plus_plus: minus_baseline (group mean) and, with kl_in_reward, the per-token KL
    penalty kl_coef x k(ref - old) moved from the loss into the advantage; whitened over the batch's tokens.
    gdpo: one GRPO advantage per reward component of a combined environment ("reward/<name>", in name order,
    weighted by reward_weights; default all 1), summed and whitened. advantage_clip_low/high clamp the result.
    Rewards before that: reward_scaling (clamp to [source_min, source_max], map onto [target_min, target_max];
    also each component), then DAPO's overlong shaping (overlong_buffer > 0, overlong_penalty), or instead
    stop_properly_penalty (the reward of a truncated sample times this coefficient; ProRL v2). Shaping changes the
    total reward only, not the components that gdpo uses.
    Loss: clip_low/clip_high (clip-higher), dual_clip (c > 1; 0 = off), cispo, reinforce (no ratio),
    token_level or per-sequence means, sequence_level_ratio (GSPO), kl_coef/kl_type (k1 | k2 | k3),
    on_policy_kl (KL terms weighted towards the sampler; needs importance_correction), importance_correction (needs
    recompute_old_logprobs) with tis_cap (0 = no truncation), tis_type tis | icepop | seq-mask-tis (not under GSPO)
    and tis_min, positive_nll_weight (VAPO's NLL on samples with reward > 0).
    Samples: overlong_filtering (truncated samples masked out of the loss), logprob_error_threshold (needs
    recompute_old_logprobs: samples whose mean exp|sampler - trainer log-prob| exceeds it are masked out),
    dynamic_sampling (keep groups with reward spread; up to dynamic_sampling_max_rounds generation rounds of
    batch_multiplier x num_prompts prompts). epochs: passes over the rollouts per step (later epochs shuffle whole
    groups when the prompt is shared). ref_offload: the reference model lives in host memory between steps.
    shared_prompt: the log-prob and loss passes run each group's prompt through the transformer once for its
    group_size completions (`jaxrl_llm.models.shared_prefix`; the same values, fewer tokens), when every
    microbatch holds whole groups; off: every rollout row runs its own copy.
    length_buckets: dynamic batching of the log-prob and loss passes (`jaxrl_llm.rl_lengths`): rows sorted by
    completion length (whole groups with shared_prompt) and each microbatch, or log-prob chunk, cut to the widths
    its rows use, prompt and completion each rounded up to a ladder of this many rungs per doubling (as
    data.length_buckets; default 2: 32, 48, 64, 96, 128, 192, ..., capped at the full width; above 32 at most 50% over
    a chunk's longest row); the same values, fewer columns; each pass (reference and policy log-probs, the update)
    compiles once per width pair it meets. 0: every row at max_prompt_len + the token budget, one compiled shape.
    A setting that another one makes inert (reward_weights outside gdpo, a clip with reinforce, ...) is refused
    by `validate_config`, as an unknown key is, rather than silently ignored.
    """
    c = ml_collections.ConfigDict(dict(
        adv_estimator="grpo", leave_one_out=True, normalize_std=True, minus_baseline=True, reward_weights=(),
        advantage_clip_low=config_dict.placeholder(float), advantage_clip_high=config_dict.placeholder(float),
        reward_scaling=dict(enabled=False, source_min=0.0, source_max=1.0, target_min=0.0, target_max=1.0),
        clip_low=0.2, clip_high=0.2, dual_clip=0.0, cispo=False, reinforce=False,
        kl_coef=0.01, kl_type="k3", kl_in_reward=False, on_policy_kl=False, ref_offload=False,
        token_level=True, sequence_level_ratio=False,
        importance_correction=False, tis_cap=0.0, tis_type="tis", tis_min=config_dict.placeholder(float),
        recompute_old_logprobs=False, logprob_error_threshold=config_dict.placeholder(float),
        positive_nll_weight=0.0, epochs=1, shared_prompt=True, length_buckets=2,
        dynamic_sampling=False, dynamic_sampling_max_rounds=10, batch_multiplier=1.0,
        overlong_filtering=False, overlong_buffer=0, overlong_penalty=1.0,
        stop_properly_penalty=config_dict.placeholder(float)))
    for k, v in overrides.items():
        if k not in c:
            raise KeyError(f"grpo_config: unknown key {k!r}; valid: {sorted(c.keys())}")
        c[k] = v
    return c


def validate_config(config: Any) -> None:
    """User errors in the grpo/rollout/train blocks, each naming the key (raises ValueError)."""
    g, ro = config.grpo, config.rollout
    if ro.num_prompts < 1:
        raise ValueError(f"rollout.num_prompts={ro.num_prompts}: must be >= 1")
    if ro.group_size < 2:
        raise ValueError(f"rollout.group_size={ro.group_size}: GRPO needs >= 2 generations per prompt")
    if ro.max_new_tokens < 1:
        raise ValueError(f"rollout.max_new_tokens={ro.max_new_tokens}: must be >= 1")
    if ro.temperature <= 0:
        raise ValueError(f"rollout.temperature={ro.temperature}: GRPO samples, so it must be > 0")
    if not 0 < ro.top_p <= 1:
        raise ValueError(f"rollout.top_p={ro.top_p}: must be in (0, 1]")
    if ro.top_k < 0:
        raise ValueError(f"rollout.top_k={ro.top_k}: must be >= 0 (0 = off)")
    rows = ro.get("max_batch_size", 0)
    if not _is_int(rows) or rows < 0:
        raise ValueError(f"rollout.max_batch_size={rows!r}: must be an integer >= 0 (rows sampled at a time; 0 = all "
                         "of a generation round at once)")
    try:
        check_stop_strings(ro.get("stop_strings", ()))
    except ValueError as e:
        raise ValueError(f"rollout.{e}") from None
    stops = ro.get("stop_token_ids", ())
    if not isinstance(stops, list | tuple) or not all(_is_int(t) and t >= 0 for t in stops):
        raise ValueError(f"rollout.stop_token_ids={stops!r}: must be a tuple of token ids (integers >= 0)")
    if ro.get("sampling_layout", "") not in SAMPLING_LAYOUTS:
        raise ValueError(f"rollout.sampling_layout={ro.sampling_layout!r}: expected one of {SAMPLING_LAYOUTS} ('': "
                         "the trainer's layout; 'tensor': weights whole on every fsdp device while sampling)")
    tc = config.train
    if not _is_int(tc.batch_size) or tc.batch_size < 0:
        raise ValueError(f"train.batch_size={tc.batch_size!r}: must be an integer >= 0 (rollouts per optimizer update; "
                         "0 = all of a step's rollouts)")
    if not _is_int(tc.microbatches) or tc.microbatches < 1:
        raise ValueError(f"train.microbatches={tc.microbatches!r}: must be an integer >= 1")
    R = ro.num_prompts * ro.group_size
    B = tc.batch_size or R
    if R % B:
        raise ValueError(f"train.batch_size={B} (rollouts per optimizer update) must divide rollout.num_prompts x "
                         f"rollout.group_size = {R}")
    if B % config.train.microbatches:
        raise ValueError(f"train.batch_size={B} is not divisible by train.microbatches={config.train.microbatches}")
    if g.epochs < 1:
        raise ValueError(f"grpo.epochs={g.epochs}: must be >= 1")
    if not _is_int(g.length_buckets) or g.length_buckets not in RUNGS:
        raise ValueError(f"grpo.length_buckets={g.length_buckets!r}: expected one of {RUNGS} (widths per doubling "
                         "of the length for the log-prob and loss passes; 0 = every row at full width)")
    if g.kl_type not in KL_TYPES:
        raise ValueError(f"grpo.kl_type={g.kl_type!r}; expected one of {KL_TYPES}")
    if g.kl_coef < 0:
        raise ValueError(f"grpo.kl_coef={g.kl_coef}: must be >= 0")
    if g.clip_low < 0 or g.clip_high < 0 or g.clip_low >= 1:
        raise ValueError(f"grpo.clip_low={g.clip_low}, grpo.clip_high={g.clip_high}: need 0 <= clip_low < 1 and "
                         "clip_high >= 0")
    if g.dual_clip and g.dual_clip <= 1:
        raise ValueError(f"grpo.dual_clip={g.dual_clip}: must be > 1 (0 = off)")
    if g.sequence_level_ratio and g.token_level:
        raise ValueError("grpo.sequence_level_ratio (GSPO) needs grpo.token_level=False")
    if g.tis_cap < 0:
        raise ValueError(f"grpo.tis_cap={g.tis_cap}: must be >= 0 (0 = no truncation)")
    if g.tis_cap and not g.importance_correction:
        raise ValueError("grpo.tis_cap needs grpo.importance_correction=True")
    if g.dynamic_sampling and g.dynamic_sampling_max_rounds < 1:
        raise ValueError(f"grpo.dynamic_sampling_max_rounds={g.dynamic_sampling_max_rounds}: must be >= 1")
    _validate_turns(config)
    _validate_overlong_buffer(config)
    _validate_variants(g, config)
    _validate_eval(config)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_overlong_buffer(config: Any) -> None:
    """grpo.overlong_buffer against the length the shaping measures (`rl_batch.shaped_rewards`): every token after
    the prompt against `multiturn.total_token_budget` -- rollout.max_new_tokens for one turn; for multi-turn
    rollouts rollout.max_total_tokens, or max_new_tokens x max_turns plus the observations' allowance when 0.
    Checked after `_validate_turns`, which vets the keys that budget reads."""
    from jaxrl_llm.multiturn import total_token_budget

    buf = config.grpo.overlong_buffer
    limit = total_token_budget(config.rollout)
    if buf < 0 or (buf and buf >= limit):
        what = ("rollout.max_new_tokens" if config.rollout.get("max_turns", 1) == 1 else
                "the multi-turn token budget: rollout.max_total_tokens, or when 0 rollout.max_new_tokens x "
                "rollout.max_turns + the observations' allowance")
        raise ValueError(f"grpo.overlong_buffer={buf}: must be in [0, {limit}) ({what}, the length overlong "
                         "shaping measures completions against)")


def _validate_eval(config: Any) -> None:
    """The eval block, when val_every > 0 uses it: eval.n_samples completions per task (pass@1 and pass@n)."""
    if not config.get("val_every", 0):
        return
    if "eval" not in config:
        raise ValueError(f"val_every={config.val_every} needs an eval block (eval.source, eval.num_examples, "
                         "eval.seed, eval.n_samples, eval.temperature: the tasks validation runs), as in "
                         "configs/grpo_tiny.py")
    n = config.eval.get("n_samples", 1)
    if not _is_int(n) or n < 1:
        raise ValueError(f"eval.n_samples={n!r}: must be an integer >= 1 (completions per validation task; "
                         "val_every > 0 runs validation)")
    temperature = config.eval.get("temperature", 1.0)
    if not 0 <= temperature < float("inf"):
        raise ValueError(f"eval.temperature={temperature!r}: must be >= 0 (0 = greedy; val_every > 0 runs validation)")
    top_p, top_k = config.eval.get("top_p", 1.0), config.eval.get("top_k", 0)
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise ValueError(f"eval.top_p={top_p!r}: must be in (0, 1] (1 = off; val_every > 0 runs validation)")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"eval.top_k={top_k!r}: must be an integer >= 0 (0 = off; val_every > 0 runs validation)")


def _validate_turns(config: Any) -> None:
    """rollout.max_turns and rollout.max_total_tokens (multi-turn rollouts; absent keys mean one turn)."""
    from jaxrl_llm.environments.multiturn import multi_turn_names

    ro = config.rollout
    turns, budget = ro.get("max_turns", 1), ro.get("max_total_tokens", 0)
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise ValueError(f"rollout.max_turns={turns!r}: must be an integer >= 1 (1 = single-turn)")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"rollout.max_total_tokens={budget!r}: must be an integer >= 0 (0 = the default budget)")
    if turns == 1 and budget not in (0, ro.max_new_tokens):
        raise ValueError(f"rollout.max_total_tokens={budget} applies to multi-turn rollouts (rollout.max_turns > 1); "
                         f"a single turn generates at most rollout.max_new_tokens={ro.max_new_tokens}: leave it 0")
    if budget and budget < ro.max_new_tokens:
        raise ValueError(f"rollout.max_total_tokens={budget} must be >= rollout.max_new_tokens={ro.max_new_tokens}")
    if turns > 1:  # an unknown name is that error, not "not multi-turn"
        from jaxrl_llm.environments import environment_kind

        environment_kind(config.env.to_dict() if hasattr(config.env, "to_dict") else dict(config.env), "env")
    if turns > 1 and config.env.name not in multi_turn_names():
        raise ValueError(f"rollout.max_turns={turns} needs a multi-turn environment (one with step()): env.name="
                         f"{config.env.name!r} scores single completions; multi-turn: {list(multi_turn_names())}")


def _validate_variants(g: Any, config: Any) -> None:
    """The advantage-estimator, reward and loss-variant keys of `grpo_config`."""
    if g.adv_estimator not in ADV_ESTIMATORS:
        raise ValueError(f"grpo.adv_estimator={g.adv_estimator!r}; expected one of {ADV_ESTIMATORS}")
    if g.adv_estimator == "gdpo" and config.env.name != "combined":
        raise ValueError(f"grpo.adv_estimator='gdpo' needs several reward components: env.name='combined' (got "
                         f"env.name={config.env.name!r})")
    if g.kl_in_reward and (g.adv_estimator != "reinforce_plus_plus" or not g.kl_coef):
        raise ValueError("grpo.kl_in_reward needs grpo.adv_estimator='reinforce_plus_plus' and grpo.kl_coef > 0")
    lo, hi = g.advantage_clip_low, g.advantage_clip_high
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"grpo.advantage_clip_low={lo} > grpo.advantage_clip_high={hi}")
    rs = g.reward_scaling
    if rs.enabled and not rs.source_max > rs.source_min:
        raise ValueError(f"grpo.reward_scaling.source_max={rs.source_max} must exceed source_min={rs.source_min}")
    if g.stop_properly_penalty is not None and g.overlong_buffer:
        raise ValueError("grpo.stop_properly_penalty and grpo.overlong_buffer both shape truncated samples' "
                         "rewards: set one of them")
    if g.cispo and (not g.token_level or g.dual_clip or g.reinforce or g.sequence_level_ratio):
        raise ValueError("grpo.cispo needs grpo.token_level=True and excludes grpo.dual_clip, grpo.reinforce and "
                         "grpo.sequence_level_ratio")
    if g.tis_type not in TIS_TYPES:
        raise ValueError(f"grpo.tis_type={g.tis_type!r}; expected one of {TIS_TYPES}")
    if not g.tis_cap and (g.tis_type != "tis" or g.tis_min is not None):
        key = f"grpo.tis_type={g.tis_type!r}" if g.tis_type != "tis" else f"grpo.tis_min={g.tis_min}"
        raise ValueError(f"{key} needs grpo.tis_cap > 0 (and grpo.importance_correction=True): with tis_cap=0 no "
                         "importance weight is truncated, so it would have no effect")
    if g.tis_cap and g.tis_type != "tis" and g.tis_min is None:
        raise ValueError(f"grpo.tis_type={g.tis_type!r} needs grpo.tis_min (the lowest importance weight kept)")
    if g.tis_cap and g.tis_type == "seq-mask-tis" and g.sequence_level_ratio:
        raise ValueError("grpo.tis_type='seq-mask-tis' keeps the raw importance weights of the sequences it does not "
                         "mask: under grpo.sequence_level_ratio (GSPO) each is its sequence's exp(sum of log-weights), "
                         "untruncated (x20 for 2000 tokens 0.15% apart); use grpo.tis_type 'tis' or 'icepop' (NeMo RL "
                         "refuses the pair too)")
    if g.tis_min is not None and not 0 <= g.tis_min <= (g.tis_cap or float("inf")):
        raise ValueError(f"grpo.tis_min={g.tis_min}: must be in [0, grpo.tis_cap={g.tis_cap}]")
    if g.on_policy_kl and not (g.importance_correction and g.kl_coef):
        raise ValueError("grpo.on_policy_kl weights the KL terms with the sampler's log-probs: it needs "
                         "grpo.importance_correction=True and grpo.kl_coef > 0")
    if g.positive_nll_weight < 0:
        raise ValueError(f"grpo.positive_nll_weight={g.positive_nll_weight}: must be >= 0")
    if g.importance_correction and not g.recompute_old_logprobs:
        raise ValueError("grpo.importance_correction weights each token by exp(old - sampler log-prob), the old "
                         "log-probs being the trainer's: it needs grpo.recompute_old_logprobs=True (without it the "
                         "old log-probs are the sampler's own, and every update after a step's first gets weight 1)")
    if g.logprob_error_threshold is not None and not g.recompute_old_logprobs:
        raise ValueError("grpo.logprob_error_threshold compares the sampler's and the trainer's log-probs: it needs "
                         "grpo.recompute_old_logprobs=True")
    if g.logprob_error_threshold is not None and g.logprob_error_threshold < 1:
        raise ValueError(f"grpo.logprob_error_threshold={g.logprob_error_threshold}: a mean of exp|difference|, "
                         "so it must be >= 1")
    if g.batch_multiplier < 1 or (g.batch_multiplier > 1 and not g.dynamic_sampling):
        raise ValueError(f"grpo.batch_multiplier={g.batch_multiplier}: must be >= 1, and > 1 only with "
                         "grpo.dynamic_sampling")
    _validate_no_ops(g)


def _validate_no_ops(g: Any) -> None:
    """Settings that another one makes inert: refused, as a silently ignored key would be."""
    rpp = g.adv_estimator == "reinforce_plus_plus"
    inert = [
        (bool(g.reward_weights) and g.adv_estimator != "gdpo", f"grpo.reward_weights={tuple(g.reward_weights)}",
         "only grpo.adv_estimator='gdpo' weighs reward components"),
        (not g.minus_baseline and not rpp, "grpo.minus_baseline=False",
         "it is a setting of grpo.adv_estimator='reinforce_plus_plus'"),
        (rpp and not (g.leave_one_out and g.normalize_std),
         f"grpo.leave_one_out={g.leave_one_out}, grpo.normalize_std={g.normalize_std}",
         "grpo.adv_estimator='reinforce_plus_plus' whitens over the batch instead (grpo and gdpo read them)"),
        (g.on_policy_kl and g.kl_in_reward, "grpo.on_policy_kl",
         "with grpo.kl_in_reward the KL is part of the advantage, not a loss term it could weight"),
        (g.ref_offload and not g.kl_coef, "grpo.ref_offload", "with grpo.kl_coef=0 there is no reference model"),
        (g.reinforce and (g.dual_clip or g.clip_low != 0.2 or g.clip_high != 0.2),
         f"grpo.clip_low={g.clip_low}, grpo.clip_high={g.clip_high}, grpo.dual_clip={g.dual_clip}",
         "grpo.reinforce has no ratio to clip"),
        (g.overlong_penalty != 1.0 and not g.overlong_buffer, f"grpo.overlong_penalty={g.overlong_penalty}",
         "overlong shaping is off while grpo.overlong_buffer=0"),
    ]
    for bad, key, why in inert:
        if bad:
            raise ValueError(f"{key} would have no effect: {why}")
    if g.overlong_penalty < 0:
        raise ValueError(f"grpo.overlong_penalty={g.overlong_penalty}: must be >= 0 (a negative one rewards "
                         "completions for running into the buffer)")


def shared_prompt_group(config: Any) -> int:
    """Rows per shared prompt in the log-prob and loss passes: rollout.group_size when grpo.shared_prompt is on and
    every microbatch (train.batch_size / train.microbatches rows) holds whole groups, else 1 (each row runs its own
    prompt). The rows of a group are consecutive and share their prompt columns (`build_batch`)."""
    G = config.rollout.group_size
    rows = (config.train.batch_size or config.rollout.num_prompts * G) // config.train.microbatches
    return G if config.grpo.get("shared_prompt", False) and rows % G == 0 else 1


# ----------------------------------------------------------------------------------------------- host side


def shape_overlong(rewards_R: np.ndarray, lengths_R: np.ndarray, max_new_tokens: int, buffer: int,
                   penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment: r + min(-(len - L_exp) / buffer * penalty, 0), L_exp = max - buffer.

    Completions no longer than L_exp keep their reward; the penalty grows linearly to `penalty` at the
    maximum length. buffer 0 turns shaping off.
    """
    if buffer <= 0:
        return np.asarray(rewards_R, np.float32)
    expected = max_new_tokens - buffer
    over = (np.asarray(lengths_R, np.float32) - expected) / buffer * penalty
    return (np.asarray(rewards_R, np.float32) + np.minimum(-over, 0.0)).astype(np.float32)


def dynamic_sampling_keep(rewards_R: np.ndarray, group_size: int) -> np.ndarray:
    """DAPO dynamic sampling: which groups [N] to keep, those whose rewards are not all equal (std > 0)."""
    r_NG = np.asarray(rewards_R, np.float64).reshape(-1, group_size)
    return r_NG.std(axis=1) > 1e-6


def build_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                sampler_logprobs: Sequence[Sequence[float]], prompt_len: int, new_tokens: int, pad_id: int,
                loss_masks: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Rows [pad, prompt | completion, pad] of prompt_len + new_tokens tokens, every completion starting at column
    prompt_len; loss_mask 1 on completion tokens (or, with `loss_masks`, each completion's own 0/1 mask: a
    multi-turn episode's generated tokens, not its observation tokens); sampler log-probs aligned with their tokens.
    Raises naming the rollout when a prompt or a completion does not fit, or a mask does not match its completion."""
    R, P = len(prompts), prompt_len
    length = P + new_tokens
    ids = np.full((R, length), pad_id, np.int32)
    attn = np.zeros((R, length), np.int32)
    loss = np.zeros((R, length), np.int32)
    lp = np.zeros((R, length), np.float32)
    if loss_masks is not None and len(loss_masks) != R:
        raise ValueError(f"build_batch: {len(loss_masks)} loss masks for {R} rollouts")
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n_p, n_c = len(p), len(c)
        if n_p > P or n_c > new_tokens:
            raise ValueError(f"rollout {i}: prompt of {n_p} tokens (room {P}) or completion of {n_c} tokens "
                             f"(room {new_tokens}) does not fit the batch")
        if len(sampler_logprobs[i]) != n_c:
            raise ValueError(f"rollout {i}: {len(sampler_logprobs[i])} sampler log-probs for {n_c} completion tokens")
        ids[i, P - n_p:P], ids[i, P:P + n_c] = p, c
        attn[i, P - n_p:P + n_c] = 1
        if loss_masks is None:
            loss[i, P:P + n_c] = 1
        else:
            m = np.asarray(loss_masks[i])
            if m.shape != (n_c,) or not np.isin(m, (0, 1)).all():
                raise ValueError(f"rollout {i}: its loss mask must hold one 0/1 value per completion token ({n_c}), "
                                 f"got shape {m.shape}")
            loss[i, P:P + n_c] = m
        lp[i, P:P + n_c] = sampler_logprobs[i]
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "sampler_logprobs": lp}


# --------------------------------------------------------------------------------------------- device side


def _target_hidden(cfg: ModelConfig, params: Any, ids_BT: jax.Array, attn_BT: jax.Array,
                   rules: ShardingRules | None, first_target: int, group: int) -> jax.Array:
    """Hidden states [B, T - first_target, D] of the positions that predict columns first_target .. T - 1.

    group > 1: rows come in groups of `group` consecutive rows that share their first `first_target` columns (one
    prompt, several completions: `build_batch` rows of one GRPO group); the prompt then runs through the
    transformer once per group (`shared_prefix_hidden_states`), the same function with fewer tokens."""
    if group <= 1:
        return hidden_states(cfg, params, ids_BT, attn_BT, rules=rules)[:, first_target - 1:-1]
    B, T = ids_BT.shape
    N, P = B // group, first_target
    ids, attn = ids_BT.reshape(N, group, T), attn_BT.reshape(N, group, T)
    h_prompt, h_cont = shared_prefix_hidden_states(cfg, params, ids[:, 0, :P], attn[:, 0, :P], ids[:, :, P:],
                                                   attn[:, :, P:], rules=rules)
    return continuation_predictors(h_prompt, h_cont).reshape(B, T - P, h_prompt.shape[-1])


def _policy_logprobs(cfg: ModelConfig, params: Any, ids_BT: jax.Array, attn_BT: jax.Array, temperature: float,
                     top_k: int, top_p: float, rules: ShardingRules | None, with_entropy: bool = False,
                     first_target: int = 1, group: int = 1):
    """(log-probs of the tokens under the sampled-from distribution [B, T], the same without top-k/top-p
    filtering, entropy per position or None); temperature applied as the sampler does. Only targets from column
    `first_target` on are scored (the vocabulary projection runs on those positions alone); earlier columns are 0.
    group > 1: rows share their prompt in groups of that many (`_target_hidden`)."""
    h = _target_hidden(cfg, params, ids_BT, attn_BT, rules, first_target, group)
    head = fp32_head(params, cfg.logits_chunk)

    def per_chunk(h_BCD, targets_BC):  # `cfg.logits_chunk` positions at a time (`over_positions`)
        logits = lm_logits(cfg, head, h_BCD, rules).astype(jnp.float32) / temperature
        if with_entropy:  # (the entropy from the log-probs' own exp: log_softmax took two more passes over [B, C, V])
            lp_raw, ent = token_logprob_stats(logits, targets_BC)
        else:
            lp_raw = token_logprobs(logits, targets_BC)
        lp = lp_raw
        if top_k > 0 or top_p < 1.0:  # the sampler's filter, row by row; removed tokens get -inf
            B, C, V = logits.shape
            rows = logits.reshape(B * C, V)
            k_R, p_R = jnp.full((B * C,), top_k, jnp.int32), jnp.full((B * C,), top_p)
            # kept from the forward pass (a float per position): a chunk's backward recomputation would search again
            thr_R = checkpoint_name(jax.lax.stop_gradient(filter_threshold(rows, k_R, p_R)), _FILTER_THRESHOLD)
            filt = filter_top_k_top_p(rows, k_R, p_R, thr_R)
            lp = token_logprobs(filt.reshape(B, C, V), targets_BC)
            # Tokens outside the nucleus (padding, or a borderline token round-off put on the other side) get a
            # finite floor instead of -inf, so masked sums stay finite; their gradient is zero either way.
            lp = jnp.where(jnp.isfinite(lp), lp, LOGP_FLOOR)
        return (lp, lp_raw, ent) if with_entropy else (lp, lp_raw)

    out = over_positions(per_chunk, cfg.logits_chunk, h, ids_BT[:, first_target:], save=(_FILTER_THRESHOLD,))
    lp, lp_raw = out[0], out[1]
    ent = jnp.pad(out[2], ((0, 0), (first_target, 0))) if with_entropy else None
    pad = lambda x: jnp.pad(x, ((0, 0), (first_target, 0)))
    return pad(lp), pad(lp_raw), ent


def make_logprobs_fn(cfg: ModelConfig, temperature: float, num_micro: int, rules: ShardingRules | None = None,
                     top_k: int = 0, top_p: float = 1.0, first_target: int = 1, group: int = 1) -> Callable:
    """fn(params, input_ids [R, T], attention_mask [R, T]) -> log-probs [R, T] (target-aligned; columns before
    `first_target`, the completion start of `build_batch` rows, are zero), computed `num_micro` rows-chunks at a
    time (lax.map) to bound activation memory. top_k/top_p: the sampler's filter (0 / 1.0 for the reference
    model, whose log-probs keep only the temperature). group > 1: consecutive rows share their prompt in groups of
    that many, and each chunk holds whole groups (`shared_prompt_group`)."""

    def fn(params, ids_RT, attn_RT):
        R, T = ids_RT.shape
        chunks = tuple(spread_microbatches(x.reshape(num_micro, R // num_micro, T), rules) for x in (ids_RT, attn_RT))
        out = jax.lax.map(lambda c: _policy_logprobs(cfg, params, c[0], c[1], temperature, top_k, top_p,
                                                      rules, first_target=first_target, group=group)[0], chunks)
        return out.reshape(R, T)

    return fn


def _make_loss_fn(cfg: ModelConfig, config: Any, rules: ShardingRules | None, prompt_len: int) -> Callable:
    """loss_fn(params, mb, on_policy, nll_scale) -> (loss sum, (count, metric sums)) of one microbatch whose
    completions start at column `prompt_len`."""
    g, ro = config.grpo, config.rollout
    kw = dict(clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip or None,
              kl_coef=0.0 if g.kl_in_reward else g.kl_coef, kl_type=g.kl_type, token_level=g.token_level,
              sequence_level_ratio=g.sequence_level_ratio, tis_cap=g.tis_cap or None, reinforce=g.reinforce,
              cispo=g.cispo, tis_type=g.tis_type, tis_min=g.tis_min, on_policy_kl=g.on_policy_kl,
              positive_nll_weight=g.positive_nll_weight)
    use_is = bool(g.importance_correction)
    group = shared_prompt_group(config)

    def loss_fn(params, mb, on_policy, nll_scale):
        lp, lp_raw, ent = _policy_logprobs(cfg, params, mb["input_ids"], mb["attention_mask"], ro.temperature,
                                           ro.top_k, ro.top_p, rules, with_entropy=True,
                                           first_target=prompt_len, group=group)
        mask = mb["loss_mask"].astype(jnp.float32)
        old = jnp.where(on_policy, jax.lax.stop_gradient(lp), mb["old_logprobs"])
        filtered = ro.top_k > 0 or ro.top_p < 1.0
        s, n, sums = policy_gradient_loss_sum(
            lp, old, mb["ref_logprobs"] if g.kl_coef else None, mb["advantages"], mask,
            sampler_logprobs=mb["sampler_logprobs"] if use_is else None,
            kl_logprobs=lp_raw if filtered else None, positive_rows=mb["positive"], nll_scale=nll_scale, **kw)
        if g.token_level:
            sums["entropy"] = jax.lax.stop_gradient((ent * mask).sum())
        else:
            valid = (mask.sum(-1) > 0).astype(jnp.float32)
            sums["entropy"] = jax.lax.stop_gradient(
                ((ent * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0) * valid).sum())
        return s, (n, sums)

    return loss_fn


def nll_scale(loss_mask: Any, positive: Any, token_level: bool) -> Any:
    """The factor on the positive-example NLL's sum that makes it, divided by the minibatch's count (tokens, or
    sequences), the mean over the minibatch's positive tokens; of the whole minibatch's loss_mask [B, T] and
    positive [B]. numpy in, numpy out (the host computes it without waiting on the device), else jnp."""
    xp = np if isinstance(loss_mask, np.ndarray) else jnp
    m = xp.asarray(loss_mask, xp.float32)
    n_all = m.sum() if token_level else (m.sum(-1) > 0).sum().astype(xp.float32)
    return n_all / xp.maximum((m * xp.asarray(positive, xp.float32)[:, None]).sum(), xp.float32(1.0))


def _apply(optimizer: optax.GradientTransformation, state: dict, grads: Any, loss: jax.Array, count: jax.Array,
           sums: dict[str, jax.Array]) -> tuple[dict, dict[str, jax.Array]]:
    norm = jnp.maximum(count, 1.0)
    state, gnorm = apply_mean_grads(optimizer, state, grads, norm)
    metrics = {k: (v if k in ("ratio_min", "ratio_max") else v / norm) for k, v in sums.items()}
    # count: the tokens (or sequences) in the loss, 0 when all were masked out (`rl_batch.reduce_updates`)
    return state, {"loss": loss / norm, "grad_norm": gnorm, "count": count, **metrics}


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, config: Any,
                    rules: ShardingRules | None = None, prompt_len: int | None = None) -> Callable:
    """step(state, minibatch, on_policy) -> (state, metrics): one optimizer update on a minibatch of rollouts.

    minibatch: BATCH_AXES arrays. on_policy (a traced bool): the params still equal the sampling params (the
    first update of a step), so the old policy is the current one and old log-probs are taken as
    stop_gradient(current): the ratio is exactly 1 and the gradient is the exact on-policy gradient.
    The loss is summed over microbatches and divided by the minibatch's global count (tokens or sequences).
    prompt_len: the column where completions start (default data.max_prompt_len; less for rows cut by
    `jaxrl_llm.rl_lengths`).
    """
    loss_fn = _make_loss_fn(cfg, config, rules, config.data.max_prompt_len if prompt_len is None else prompt_len)

    def step(state, mb, on_policy):
        scale = nll_scale(mb["loss_mask"], mb["positive"], config.grpo.token_level)
        grads, loss, count, sums = microbatch_sums(lambda p, x: loss_fn(p, x, on_policy, scale),
                                                   state["params"], mb, config.train.microbatches, rules)
        return _apply(optimizer, state, grads, loss, count, sums)

    return step


def make_microbatch_fns(cfg: ModelConfig, optimizer: optax.GradientTransformation, config: Any,
                        rules: ShardingRules | None = None) -> tuple[Callable, Callable, Callable]:
    """The same optimizer update as `make_train_step`, in pieces that the host calls once per microbatch, so that
    each microbatch may have its own width (grpo.length_buckets, `jaxrl_llm.rl_lengths`):

    - grads(prompt_len) -> fn(params, microbatch, on_policy, nll_scale) -> sums: (grad sums, loss sum, count,
      metric sums) of one microbatch whose completions start at column prompt_len (`nll_scale` of the whole
      minibatch);
    - add(sums, sums) -> sums (the `*_min`/`*_max` metrics by min/max);
    - apply(state, sums) -> (state, metrics), as `make_train_step`'s step returns them.
    """
    def grads(prompt_len: int) -> Callable:
        loss_fn = _make_loss_fn(cfg, config, rules, prompt_len)

        def fn(params, mb, on_policy, scale):
            return microbatch_sums(lambda p, x: loss_fn(p, x, on_policy, scale), params, mb, 1)

        return fn

    def add(a, b):
        return (jax.tree.map(jnp.add, a[0], b[0]), a[1] + b[1], a[2] + b[2],
                {k: combine_sum(k, a[3][k], b[3][k]) for k in a[3]})

    def apply(state, sums):
        return _apply(optimizer, state, *sums)

    return grads, add, apply
