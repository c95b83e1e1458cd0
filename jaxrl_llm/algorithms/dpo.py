"""Direct preference optimisation: policy vs frozen reference on (prompt, chosen, rejected) pairs.

One jitted step: for each microbatch of pairs, one policy forward and one reference forward (under
stop_gradient, same mesh) over the chosen and rejected sequences (side by side, or their shared prefix once
and both suffixes: `algorithms.pairs`), sequence log-probs over the response tokens, `losses.dpo_loss_sum`
plus an optional SFT term on the chosen response; gradients and metrics are summed over microbatches and
divided by the global number of pairs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrl_llm.algorithms.base import Algorithm
from jaxrl_llm.algorithms.losses import DPO_LOSS_TYPES, dpo_loss_sum
from jaxrl_llm.algorithms.pairs import pair_logprobs
from jaxrl_llm.algorithms.sft import apply_mean_grads, microbatch_sums
from jaxrl_llm.data import preference
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.parallel.rules import ShardingRules


def validate_config(dpo: Any) -> None:
    """The `dpo` block's user errors, each naming the key."""
    if dpo.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo.loss_type={dpo.loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if dpo.beta <= 0:
        raise ValueError(f"dpo.beta={dpo.beta}: must be > 0")
    if not 0.0 <= dpo.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={dpo.label_smoothing}: must be in [0, 0.5)")
    if dpo.loss_type == "ipo" and dpo.label_smoothing:
        raise ValueError("dpo.label_smoothing applies to dpo.loss_type='sigmoid' only")
    if dpo.preference_weight < 0 or dpo.sft_weight < 0 or not (dpo.preference_weight or dpo.sft_weight):
        raise ValueError(f"dpo.preference_weight={dpo.preference_weight}, dpo.sft_weight={dpo.sft_weight}: each must "
                         "be >= 0 and one > 0 (a negative weight ascends its loss; both 0 leave nothing to learn)")
    if dpo.sft_average_log_probs and not dpo.sft_weight:
        raise ValueError("dpo.sft_average_log_probs=True would have no effect: dpo.sft_weight=0 (no SFT term)")


def make_dpo_loss(cfg: ModelConfig, dpo: Any, rules: ShardingRules | None = None) -> Callable:
    """loss_fn(params, ref_params, mb) -> (loss_sum, (pairs, metric_sums)); mb as `data.preference.collate`
    makes it: [P, 2, T] arrays (0 chosen, 1 rejected) or the shared-prefix layout.

    Sequence log-probs are sums over the response tokens, or means when `dpo.average_log_probs`. The loss is
    preference_weight * dpo_loss + sft_weight * mean over pairs of the chosen response's NLL (summed over
    its tokens, or averaged when `dpo.sft_average_log_probs`), as NeMo RL's DPOLossFn.
    """
    validate_config(dpo)
    beta, smoothing, loss_type = float(dpo.beta), float(dpo.label_smoothing), str(dpo.loss_type)
    average, sft_average = bool(dpo.average_log_probs), bool(dpo.sft_average_log_probs)
    pref_w, sft_w = float(dpo.preference_weight), float(dpo.sft_weight)

    def loss_fn(params, ref_params, mb):
        lp_sum, n_tok = pair_logprobs(cfg, params, mb, rules)  # [P, 2]: chosen, rejected
        ref_sum, _ = pair_logprobs(cfg, jax.lax.stop_gradient(ref_params), mb, rules)
        n_tok = jnp.maximum(n_tok, 1.0)
        lp_P2 = lp_sum / n_tok if average else lp_sum
        ref_P2 = jax.lax.stop_gradient(ref_sum / n_tok if average else ref_sum)
        w_P = mb.get("example_weight", jnp.ones(lp_P2.shape[:1], jnp.float32)).astype(jnp.float32)  # validation
        pref_sum, pairs, sums = dpo_loss_sum(lp_P2[:, 0], lp_P2[:, 1], ref_P2[:, 0], ref_P2[:, 1], beta,
                                             smoothing, loss_type, w_P)
        chosen_lp, chosen_tok = lp_sum[:, 0], n_tok[:, 0]
        sft_sum = -((chosen_lp / chosen_tok if sft_average else chosen_lp) * w_P).sum()
        total = pref_w * pref_sum + (sft_w * sft_sum if sft_w else 0.0)
        sums = {**sums, "preference_loss": pref_sum, "sft_loss": sft_sum, "logps_chosen": (lp_P2[:, 0] * w_P).sum(),
                "logps_rejected": (lp_P2[:, 1] * w_P).sum()}
        return total, (pairs, jax.lax.stop_gradient(sums))

    return loss_fn


def make_dpo_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, config: Any,
                  rules: ShardingRules | None = None) -> Callable:
    """step(state, batch, ref_params) -> (state, metrics); batch from `data.preference.collate`."""
    loss_fn = make_dpo_loss(cfg, config.dpo, rules)
    num_micro = config.train.microbatches

    def step(state, batch, ref_params):
        g, l, n, sums = microbatch_sums(lambda p, mb: loss_fn(p, ref_params, mb), state["params"], batch,
                                        num_micro, rules)
        state, gnorm = apply_mean_grads(optimizer, state, g, n)
        return state, {"loss": l / n, **{k: v / n for k, v in sums.items()}, "pairs": n, "grad_norm": gnorm}

    return step


def make_dpo_eval(cfg: ModelConfig, config: Any, rules: ShardingRules | None = None) -> Callable:
    """eval(params, batch, ref_params) -> ({"loss", "accuracy", "margin", ...: sums over pairs}, pairs), the
    batch's filler pairs (example_weight 0) left out: val_loss, val_accuracy (reward accuracy), val_margin."""
    loss_fn = make_dpo_loss(cfg, config.dpo, rules)

    def evaluate(params, batch, ref_params):
        total, (pairs, sums) = loss_fn(params, ref_params, batch)
        return {"loss": total, **sums}, pairs

    return evaluate


ALGORITHM = Algorithm(
    name="dpo",
    prepare=preference.prepare,
    widths=functools.partial(preference.batch_widths, targets=True),  # and the loss-target lists (`pair_targets`)
    collate=functools.partial(preference.collate, targets=True),
    batch_axes=preference.BATCH_AXES,
    make_step=make_dpo_step,
    needs_reference=lambda config: True,
    make_eval=make_dpo_eval,
    validate=lambda config: validate_config(config.dpo),
)
