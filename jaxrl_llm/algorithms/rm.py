"""Reward-model training: a scalar score head (num_labels = 1) read at the last valid token, Bradley–Terry
loss -log σ(r_chosen - r_rejected) on preference pairs, as NeMo RL's PreferenceLossFn. The trained model
exports as an HF `*ForSequenceClassification` folder."""

from __future__ import annotations

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


def make_rm_loss(cfg: ModelConfig, rules: ShardingRules | None = None) -> Callable:
    """loss_fn(params, mb) -> (loss_sum, (pairs, metric_sums)); mb as `data.preference.collate` makes it ([P, 2, T]
    arrays, 0 chosen, 1 rejected, or the shared-prefix layout)."""

    def loss_fn(params, mb):
        scores_P2 = pair_scores(cfg, params, mb, rules)
        loss_sum, pairs, sums = bradley_terry_loss_sum(scores_P2[:, 0], scores_P2[:, 1], mb.get("example_weight"))
        return loss_sum, (pairs, sums)

    return loss_fn


def make_rm_eval(cfg: ModelConfig, config: Any, rules: ShardingRules | None = None) -> Callable:
    """eval(params, batch, ref_params=None) -> ({"loss", "accuracy", "margin", ...: sums over pairs}, pairs), the
    batch's filler pairs (example_weight 0) left out."""
    loss_fn = make_rm_loss(cfg, rules)

    def evaluate(params, batch, ref_params=None):
        del ref_params
        loss_sum, (pairs, sums) = loss_fn(params, batch)
        return {"loss": loss_sum, **sums}, pairs

    return evaluate


def make_rm_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, config: Any,
                 rules: ShardingRules | None = None) -> Callable:
    """step(state, batch, ref_params=None) -> (state, metrics); batch from `data.preference.collate`."""
    loss_fn = make_rm_loss(cfg, rules)
    num_micro = config.train.microbatches

    def step(state, batch, ref_params=None):
        del ref_params
        g, l, n, sums = microbatch_sums(loss_fn, state["params"], batch, num_micro)
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
)
