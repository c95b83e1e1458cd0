"""GRPO's host side of a step: the rollouts of a step, rewards -> scaling and shaping -> advantages, and the
training arrays built from them (`prepare_batch`); plain numpy, no device work."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ml_collections
import numpy as np

from jaxrl_llm import multiturn
from jaxrl_llm.algorithms import advantages as adv_lib
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.algorithms.pg_losses import KL_OUTPUT_CLAMP, kl_penalty
from jaxrl_llm.metrics import reduce_steps

log = logging.getLogger("jaxrl_llm.rl_train")  # the GRPO loop's one logger


@dataclasses.dataclass
class Rollouts:
    """R = prompts x group_size samples, grouped consecutively. components: the reward components of a combined
    environment ({name: rewards [R]}, from its "reward/<name>" info), empty otherwise. Multi-turn rollouts also
    carry loss_masks (per token of `tokens`: 1 generated, 0 observation) and turns (generations per episode)."""

    task_idx: list[int]
    prompts: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str]
    rewards: np.ndarray
    accuracy: np.ndarray
    counts: dict[str, int]
    components: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    loss_masks: list[list[int]] | None = None
    turns: list[int] | None = None

    def take_groups(self, groups: np.ndarray, G: int) -> Rollouts:
        rows = [g * G + j for g in groups for j in range(G)]
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]
        return Rollouts(pick(self.task_idx), pick(self.prompts), pick(self.tokens), pick(self.logprobs),
                        pick(self.finish), self.rewards[rows], self.accuracy[rows], dict(self.counts),
                        {k: v[rows] for k, v in self.components.items()}, pick(self.loss_masks), pick(self.turns))

    @staticmethod
    def concat(parts: list[Rollouts]) -> Rollouts:
        counts: dict[str, int] = {}
        for p in parts:
            for k, v in p.counts.items():
                counts[k] = counts.get(k, 0) + v
        cat = lambda name: [x for p in parts for x in getattr(p, name)]
        opt = lambda name: None if getattr(parts[0], name) is None else cat(name)
        names = parts[0].components.keys()
        return Rollouts(cat("task_idx"), cat("prompts"), cat("tokens"), cat("logprobs"), cat("finish"),
                        np.concatenate([p.rewards for p in parts]), np.concatenate([p.accuracy for p in parts]),
                        counts, {k: np.concatenate([p.components[k] for p in parts]) for k in names},
                        opt("loss_masks"), opt("turns"))


def reward_components(info: list[dict[str, Any]], said: set[str] | None = None) -> dict[str, np.ndarray]:
    """{name: rewards [R]} from the "reward/<name>" entries of per-sample info (sorted by name); {} if none.
    A component that only some samples carry (e.g. a routed environment with a combined route) is left out, with
    a warning naming it: it is neither a per-sample metric nor a GDPO component of the whole batch. `said`: the
    names warned about already, which are not warned about again (a run's set: such a routing leaves the component
    out of every step)."""
    names = sorted({k[len("reward/"):] for inf in info for k in inf if k.startswith("reward/")})
    said = set() if said is None else said
    out = {}
    for n in names:
        missing = [i for i, inf in enumerate(info) if f"reward/{n}" not in inf]
        if missing:
            if n not in said:
                said.add(n)
                log.warning("reward component %r is missing from %d of %d samples (the first: sample %d); left out "
                            "of the metrics and advantages", n, len(missing), len(info), missing[0])
            continue
        out[n] = np.array([float(inf[f"reward/{n}"]) for inf in info], np.float32)
    return out


def sample_accuracy(info: list[dict[str, Any]], rewards: np.ndarray) -> np.ndarray:
    """Per sample: info "correct" when the environment gives it, else reward >= 1."""
    return np.array([float(inf.get("correct", r >= 1.0)) for inf, r in zip(info, rewards, strict=True)], np.float32)


def scaled_rewards(rewards: np.ndarray, config: ml_collections.ConfigDict) -> np.ndarray:
    """grpo.reward_scaling applied to rewards (unchanged when it is off): clamped and mapped affinely."""
    rs = config.grpo.reward_scaling
    if not rs.enabled:
        return rewards
    return np.asarray(adv_lib.scale_rewards(rewards, rs.source_min, rs.source_max, rs.target_min, rs.target_max),
                      np.float32)


def shaped_rewards(roll: Rollouts, config: ml_collections.ConfigDict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The rewards the advantages see, and the components likewise scaled: reward_scaling, then
    stop_properly_penalty on truncated samples or DAPO's overlong shaping."""
    g, ro = config.grpo, config.rollout
    rewards = scaled_rewards(roll.rewards, config)
    comps = {k: scaled_rewards(v, config) for k, v in roll.components.items()}
    truncated = np.array([f == "length" for f in roll.finish])
    if g.stop_properly_penalty is not None:
        return np.asarray(adv_lib.stop_properly_penalty(rewards, truncated, g.stop_properly_penalty), np.float32), comps
    lengths = np.array([len(t) for t in roll.tokens], np.float32)  # all tokens after the prompt, against the budget
    return grpo.shape_overlong(rewards, lengths, multiturn.total_token_budget(ro), g.overlong_buffer,
                               g.overlong_penalty), comps


def compute_advantages(config: ml_collections.ConfigDict, rewards: np.ndarray, components: dict[str, np.ndarray],
                       loss_mask: np.ndarray, kl_RT: np.ndarray | None = None) -> np.ndarray:
    """Advantages [R, T] by grpo.adv_estimator, clamped by grpo.advantage_clip_low/high. kl_RT: the per-token KL
    of the old policy to the reference (reinforce_plus_plus with kl_in_reward)."""
    g = config.grpo
    G = config.rollout.group_size
    if g.adv_estimator == "reinforce_plus_plus":
        adv = np.asarray(adv_lib.reinforce_pp_advantages(
            rewards, G, loss_mask, minus_baseline=g.minus_baseline, kl_RT=kl_RT if g.kl_in_reward else None,
            kl_coef=g.kl_coef), np.float32)
    else:
        if g.adv_estimator == "gdpo":
            if len(components) < 2 or (g.reward_weights and len(g.reward_weights) != len(components)):
                raise ValueError(f"grpo.adv_estimator='gdpo': the environment gave reward components "
                                 f"{sorted(components)}; GDPO needs at least 2, and grpo.reward_weights (in that "
                                 f"order) needs one weight per component (got {list(g.reward_weights)})")
            a = adv_lib.gdpo_advantages([components[k] for k in sorted(components)], G, g.reward_weights or None,
                                        leave_one_out=g.leave_one_out, normalize_std=g.normalize_std)
        else:
            a = grpo.grpo_advantages(rewards, G, g.leave_one_out, g.normalize_std)
        adv = np.broadcast_to(np.asarray(a, np.float32)[:, None], loss_mask.shape).copy()
    if g.advantage_clip_low is not None or g.advantage_clip_high is not None:
        adv = np.clip(adv, g.advantage_clip_low, g.advantage_clip_high)
    return adv


def prepare_batch(roll: Rollouts, config: ml_collections.ConfigDict, pad_id: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Host side of a step: rewards -> scaling and shaping -> advantages; the training arrays, with
    truncated samples masked out under grpo.overlong_filtering (they still count in their group's baseline).
    Returns (batch, reward/length metrics)."""
    g, ro = config.grpo, config.rollout
    G = ro.group_size
    lengths = np.array([len(t) for t in roll.tokens] if roll.loss_masks is None  # multi-turn: generated tokens only
                       else [sum(m) for m in roll.loss_masks], np.float32)
    truncated = np.array([f == "length" for f in roll.finish])
    shaped, comps = shaped_rewards(roll, config)
    batch = grpo.build_batch(roll.prompts, roll.tokens, roll.logprobs, config.data.max_prompt_len,
                             multiturn.total_token_budget(ro), pad_id, loss_masks=roll.loss_masks)
    if g.overlong_filtering:
        batch["loss_mask"] = batch["loss_mask"] * (~truncated)[:, None].astype(np.int32)
    batch["advantages"] = compute_advantages(config, shaped, comps, batch["loss_mask"])
    batch["positive"] = (shaped > 0).astype(np.int32)
    batch["shaped_rewards"] = shaped  # host only (not a training array)
    batch["components"] = comps
    valid = batch["loss_mask"] > 0
    metrics = dict(
        reward_mean=float(roll.rewards.mean()), reward_std=float(roll.rewards.std()),
        shaped_reward_mean=float(shaped.mean()), accuracy=float(roll.accuracy.mean()),
        gen_length_mean=float(lengths.mean()), gen_length_max=float(lengths.max()),
        truncation_rate=float(truncated.mean()), masked_samples=float(g.overlong_filtering * truncated.sum()),
        # as dynamic sampling and the advantages see them: rewards equal after scaling's clamp give no spread
        groups_all_equal=float((~grpo.dynamic_sampling_keep(scaled_rewards(roll.rewards, config), G)).mean()),
        advantage_abs_mean=float(np.abs(batch["advantages"][valid]).mean()) if valid.any() else 0.0,
        **{f"reward/{k}": float(v.mean()) for k, v in roll.components.items()})
    if roll.turns is not None:
        metrics.update(turns_mean=float(np.mean(roll.turns)),
                       episode_length_mean=float(np.mean([len(t) for t in roll.tokens])))
    return batch, metrics


# What an update that trained on no token says of itself: the rest of its metrics are means over nothing.
UPDATE_TOTALS = ("loss", "grad_norm", "count")


def reduce_updates(updates: list[dict[str, Any]]) -> dict[str, float]:
    """One step's metrics from its optimizer updates' (`reduce_steps`: the mean, the least of a `*_min`, the most of a
    `*_max`), plus `first_update_ratio_min`/`_max`. An update whose minibatch had no token in the loss (`count` 0:
    every sample masked out by overlong filtering or the log-prob error threshold) gives only its loss, gradient norm
    and count: its per-token means (entropy, kl, clip_fraction, ratio_mean, ...) were 0 and its ratio_min/_max the
    float32 extremes (+-3.4e38 in the row), which pulled the step's means towards 0; a step with no token at all logs
    none of them."""
    kept = [m if float(m.get("count", 1.0)) > 0 else {k: v for k, v in m.items() if k in UPDATE_TOTALS}
            for m in updates]
    out = reduce_steps(kept)
    if "ratio_min" in kept[0]:
        out.update(first_update_ratio_min=float(kept[0]["ratio_min"]),
                   first_update_ratio_max=float(kept[0]["ratio_max"]))
    return out


def logprob_error_metrics(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's recomputation (old_logprobs), over the loss's tokens:
    logprob_error_max/_mean of |sampler - old|, and logprob_outside_filter, the tokens that the trainer's top-k/top-p
    filter leaves out (rounding put a token sampled at the set's edge outside it; their old log-prob is the -1e4
    floor), left out of the max and mean, which they would swamp (a mean of 13 for one token in 770)."""
    m = batch["loss_mask"] > 0
    outside = m & (batch["old_logprobs"] <= grpo.LOGP_FLOOR)
    err = np.abs(batch["old_logprobs"] - batch["sampler_logprobs"])[m & ~outside]
    return {"logprob_error_max": float(err.max()) if err.size else 0.0,
            "logprob_error_mean": float(err.mean()) if err.size else 0.0,
            "logprob_outside_filter": float(outside.sum())}


def reward_kl(batch: dict[str, np.ndarray], kl_type: str) -> np.ndarray:
    """Per-token KL of the old policy to the reference [R, T] for REINFORCE++'s kl_in_reward: 0 where the old
    log-prob is the floor (a token outside the trainer's top-k/top-p set, or padding), whose clamped log-ratio gave
    e^20 ~ 5e8, an advantage that the batch whitening turned into the only one left. Each term is clamped to +-10 as
    NeMo RL's calculate_kl does (k3 of a log-ratio of 10 is 2e4: one token would otherwise swamp the whitening)."""
    kl = np.clip(np.asarray(kl_penalty(batch["ref_logprobs"] - batch["old_logprobs"], kl_type)), -KL_OUTPUT_CLAMP,
                 KL_OUTPUT_CLAMP)
    return np.where(batch["old_logprobs"] > grpo.LOGP_FLOOR, kl, 0.0).astype(np.float32)


def mask_logprob_errors(batch: dict[str, np.ndarray], threshold: float) -> int:
    """Masks out (loss_mask row 0) the samples whose mean over their tokens of exp|sampler - old log-prob|
    exceeds `threshold`; returns how many were masked. A token outside the trainer's top-k/top-p set (old log-prob at
    the floor: probability 0 to the trainer) makes its sample's error infinite, as NeMo RL's -inf does."""
    m = batch["loss_mask"] > 0
    # Only the loss's tokens: a padding column's old log-prob may be the floor too (the pad token outside the set),
    # and exp(1e4) x 0 was NaN, which made its row's mean NaN, never above the threshold.
    with np.errstate(over="ignore"):  # (exp(1e4): inf, kept only where it is a loss token's)
        err = np.where(m, np.exp(np.abs(batch["sampler_logprobs"] - batch["old_logprobs"])), 0.0)
    mean = err.sum(1) / np.maximum(m.sum(1), 1)
    bad = (mean > threshold) & m.any(1)
    batch["loss_mask"] = batch["loss_mask"] * (~bad)[:, None].astype(batch["loss_mask"].dtype)
    return int(bad.sum())


def shuffled_rows(rng: np.random.Generator, rows: int, group: int) -> np.ndarray:
    """A random order of `rows` rows that keeps each group of `group` consecutive rows together and in order."""
    return (rng.permutation(rows // group)[:, None] * group + np.arange(group)).reshape(-1)


def check_shared_prompts(batch: dict[str, np.ndarray], group: int, prompt_len: int) -> None:
    """The rows of each group must carry the same prompt columns for the log-prob and loss passes to share them."""
    for k in ("input_ids", "attention_mask"):
        a = batch[k][:, :prompt_len].reshape(-1, group, prompt_len)
        bad = np.flatnonzero((a != a[:, :1]).any(axis=(1, 2)))
        if bad.size:
            raise RuntimeError(f"grpo.shared_prompt: the rows of group {int(bad[0])} do not share their prompt "
                               f"({k}); set grpo.shared_prompt=False")
