"""Reward-model training: a scalar score head (num_labels = 1) read at the last valid token, Bradley–Terry
loss -log σ(r_chosen - r_rejected) on preference pairs, as NeMo RL's PreferenceLossFn. The trained model
exports as an HF `*ForSequenceClassification` folder.

As TRL's RewardTrainer, two options: rows with a numeric `margin` field train on -log σ(r_c - r_r - margin) (Llama
2's margin loss: a clearer preference asks for a wider gap), and `rm.center_rewards_coefficient` > 0 adds that
times the mean of (r_c + r_r)^2, which keeps the scores centred on 0."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optax

from jaxrl_llm.algorithms.base import Algorithm
from jaxrl_llm.algorithms.losses import bradley_terry_loss_sum
from jaxrl_llm.algorithms.pairs import pair_scores
from jaxrl_llm.algorithms.sft import apply_mean_grads, microbatch_sums
from jaxrl_llm.data import preference
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.parallel.rules import ShardingRules


def center_coefficient(config: Any) -> float:
    """rm.center_rewards_coefficient (0 when the config has no `rm` block); a ValueError naming the key unless it is
    a finite number >= 0."""
    rm = config.get("rm") if config is not None else None
    coef = rm.get("center_rewards_coefficient", 0.0) if rm is not None else 0.0
    coef = 0.0 if coef is None else coef  # TRL's default (None: off)
    if isinstance(coef, bool) or not isinstance(coef, int | float) or not math.isfinite(coef) or coef < 0:
        raise ValueError(f"rm.center_rewards_coefficient={coef!r}: must be a number >= 0 (0: off; TRL suggests 0.01)")
    return float(coef)


def make_rm_loss(cfg: ModelConfig, rules: ShardingRules | None = None, config: Any = None) -> Callable:
    """loss_fn(params, mb) -> (loss_sum, (pairs, metric_sums)); mb as `data.preference.collate` makes it ([P, 2, T]
    arrays, 0 chosen, 1 rejected, or the shared-prefix layout; "margin" [P] when the rows have margins). config:
    the run's (rm.center_rewards_coefficient; None: off)."""
    coef = center_coefficient(config)

    def loss_fn(params, mb):
        scores_P2 = pair_scores(cfg, params, mb, rules)
        loss_sum, pairs, sums = bradley_terry_loss_sum(scores_P2[:, 0], scores_P2[:, 1], mb.get("example_weight"),
                                                       mb.get("margin"), coef)
        return loss_sum, (pairs, sums)

    return loss_fn


def make_rm_eval(cfg: ModelConfig, config: Any, rules: ShardingRules | None = None) -> Callable:
    """eval(params, batch, ref_params=None) -> ({"loss", "accuracy", "margin", ...: sums over pairs}, pairs), the
    batch's filler pairs (example_weight 0) left out."""
    loss_fn = make_rm_loss(cfg, rules, config)

    def evaluate(params, batch, ref_params=None):
        del ref_params
        loss_sum, (pairs, sums) = loss_fn(params, batch)
        return {"loss": loss_sum, **sums}, pairs

    return evaluate


def make_rm_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, config: Any,
                 rules: ShardingRules | None = None) -> Callable:
    """step(state, batch, ref_params=None) -> (state, metrics); batch from `data.preference.collate`."""
    loss_fn = make_rm_loss(cfg, rules, config)
    num_micro = config.train.microbatches

    def step(state, batch, ref_params=None):
        del ref_params
        g, l, n, sums = microbatch_sums(loss_fn, state["params"], batch, num_micro, rules)
        state, gnorm = apply_mean_grads(optimizer, state, g, n)
        return state, {"loss": l / n, **{k: v / n for k, v in sums.items()}, "pairs": n, "grad_norm": gnorm}

    return step


ALGORITHM = Algorithm(
    name="rm",
    prepare=preference.prepare,
    widths=preference.batch_widths,
    collate=preference.collate,
    batch_axes=preference.BATCH_AXES,
    make_step=make_rm_step,
    num_labels=1,
    make_eval=make_rm_eval,
    validate=center_coefficient,
)
