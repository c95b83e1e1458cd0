"""What DPO and reward models read off a batch of preference pairs: each side's sequence log-prob and token count,
or its score at the last token, in either batch layout of `data.preference`.

Separate rows ([P, 2, T] `input_ids` ...): each side runs through the model on its own. Shared prefix
(`prefix_*` [P, W], `suffix_*` [P, 2, C]): the tokens both sides start with run once per pair
(`models.shared_prefix`), each suffix attends to its prefix and to itself, and the values are those of the
separate rows. Shape suffixes: P pairs, W prefix columns (left-padded), C suffix columns (right-padded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.algorithms.losses import target_logprobs
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.shared_prefix import continuation_predictors, shared_prefix_hidden_states
from jaxrl_llm.models.transformer import hidden_states, score_positions, score_sequences
from jaxrl_llm.parallel.rules import ShardingRules, constrain

_F32 = jnp.float32


def _shared_hidden(cfg: ModelConfig, params: dict, mb: dict, rules: ShardingRules | None
                   ) -> tuple[jax.Array, jax.Array]:
    """Final-norm hidden states: prefixes [P, W, D], suffixes [P, 2, C, D]."""
    return shared_prefix_hidden_states(cfg, params, mb["prefix_ids"], mb["prefix_mask"], mb["suffix_ids"],
                                       mb["suffix_mask"], rules=rules)


def _listed_logprob_sums(cfg: ModelConfig, params: dict, h_RSD: jax.Array, ids_RS: jax.Array, index_RK: jax.Array,
                         weight_RK: jax.Array, shift: int, rules: ShardingRules | None) -> jax.Array:
    """Sum over j of log p(ids[r, index[r, j] + shift] | h[r, index[r, j]]) x weight[r, j], [R] fp32: only the listed
    positions are projected onto the vocabulary (`data.preference.pair_targets`)."""
    if index_RK.shape[-1] == 0:  # (prompt-only prefixes: nothing to project)
        return jnp.zeros(index_RK.shape[:1], _F32)
    h_RKD = constrain(jnp.take_along_axis(h_RSD, index_RK[..., None], axis=1), ("batch", None, "embed"), rules)
    lp_RK = target_logprobs(cfg, params, h_RKD, jnp.take_along_axis(ids_RS, index_RK + shift, axis=1), rules)
    return (lp_RK * weight_RK.astype(_F32)).sum(-1)


def pair_logprobs(cfg: ModelConfig, params: dict, mb: dict, rules: ShardingRules | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """(log p of each side's loss-masked tokens summed [P, 2], their number [P, 2]), fp32; index 0 chosen.

    In the shared layout a prefix token's log-prob is computed once and counts on both sides; a suffix's first
    token is predicted by the prefix's last column (every prefix ends there). With the target lists of
    `data.preference.pair_targets` in the batch (DPO's collate makes them) only the positions that predict a loss
    token are projected onto the vocabulary; without them, every position (prompt and padding included)."""
    if "prefix_ids" not in mb:
        P, _, T = mb["input_ids"].shape
        ids, attn, mask = (mb[k].reshape(2 * P, T) for k in ("input_ids", "attention_mask", "loss_mask"))
        h_RTD = hidden_states(cfg, params, ids, attn, rules=rules)
        m = mask[:, 1:].astype(_F32)
        if "target_index" in mb:
            K = mb["target_index"].shape[-1]
            lp_R = _listed_logprob_sums(cfg, params, h_RTD, ids, mb["target_index"].reshape(2 * P, K),
                                        mb["target_weight"].reshape(2 * P, K), 1, rules)
        else:
            lp_R = (target_logprobs(cfg, params, h_RTD[:, :-1], ids[:, 1:], rules) * m).sum(-1)
        return lp_R.reshape(P, 2), m.sum(-1).reshape(P, 2)
    h_PWD, h_P2CD = _shared_hidden(cfg, params, mb, rules)
    P, _, C, D = h_P2CD.shape
    # Prefix column j is a target when j and j - 1 are tokens (the first token of a sequence never is).
    pre_m = (mb["prefix_loss"][:, 1:] * mb["prefix_mask"][:, :-1]).astype(_F32)
    h_src = continuation_predictors(h_PWD, h_P2CD).reshape(P, 2 * C, D)
    suf_m = mb["suffix_loss"].astype(_F32)
    if "suffix_target_index" in mb:
        pre_lp = _listed_logprob_sums(cfg, params, h_PWD, mb["prefix_ids"], mb["prefix_target_index"],
                                      mb["prefix_target_weight"], 1, rules)
        K = mb["suffix_target_index"].shape[-1]
        suf_lp = _listed_logprob_sums(cfg, params, h_src.reshape(2 * P, C, D), mb["suffix_ids"].reshape(2 * P, C),
                                      mb["suffix_target_index"].reshape(2 * P, K),
                                      mb["suffix_target_weight"].reshape(2 * P, K), 0, rules).reshape(P, 2)
    else:
        pre_lp = (target_logprobs(cfg, params, h_PWD[:, :-1], mb["prefix_ids"][:, 1:], rules) * pre_m).sum(-1)
        suf_lp = (target_logprobs(cfg, params, h_src, mb["suffix_ids"].reshape(P, 2 * C), rules).reshape(P, 2, C)
                  * suf_m).sum(-1)
    return pre_lp[:, None] + suf_lp, pre_m.sum(-1)[:, None] + suf_m.sum(-1)


def pair_scores(cfg: ModelConfig, params: dict, mb: dict, rules: ShardingRules | None = None) -> jax.Array:
    """Score-head output at the last token of each side [P, 2], fp32 (num_labels = 1)."""
    if "prefix_ids" not in mb:
        P, _, T = mb["input_ids"].shape
        ids, attn = mb["input_ids"].reshape(2 * P, T), mb["attention_mask"].reshape(2 * P, T)
        return score_sequences(cfg, params, ids, attn, rules=rules)[:, 0].reshape(P, 2)
    if "score" not in params:
        raise ValueError("these params have no score head (build the config with num_labels > 0)")
    h_PWD, h_P2CD = _shared_hidden(cfg, params, mb, rules)
    # read where the separate rows are read (`score_positions`): in the suffix, or in the prefix when every suffix
    # token is the pad token (pad = eos and the side ends in eos)
    suf_P2 = score_positions(cfg, mb["suffix_ids"], mb["suffix_mask"])
    in_suffix_P2 = (mb["suffix_mask"].astype(bool) & (mb["suffix_ids"] != cfg.pad_token_id)).any(-1) \
        if cfg.pad_token_id is not None else jnp.ones(suf_P2.shape, bool)
    pre_P = score_positions(cfg, mb["prefix_ids"], mb["prefix_mask"])
    h_suf = jnp.take_along_axis(h_P2CD, suf_P2[:, :, None, None], axis=2)[:, :, 0]
    h_pre = jnp.take_along_axis(h_PWD, pre_P[:, None, None], axis=1)  # [P, 1, D]
    h_P2D = jnp.where(in_suffix_P2[:, :, None], h_suf, h_pre)
    return jnp.einsum("psd,dc->psc", h_P2D, params["score"].astype(h_P2D.dtype), preferred_element_type=_F32)[..., 0]
