"""One shared prompt, several continuations: the transformer over a group without repeating the prompt.

GRPO samples G completions per prompt, and DPO scores two responses per prompt. Run as G separate rows, the
transformer processes the prompt G times. Here the prompt runs once: each layer's projections and MLP see the
prompt's P tokens and the G x C continuation tokens once each. In attention the prompt attends to itself
(causal), and each continuation attends to the prompt's keys and to its own earlier tokens, never to another
continuation. That is the same set of keys, at the same positions, as in the separate rows, so the hidden states
are the same function (up to float reassociation), with about G (P + C) / (P + G C) times fewer tokens through
the projections and MLP.

Shape suffixes as in `transformer`: N groups, P prompt width, G continuations per group, C continuation width.
Prompts may be left-padded (mask 0); continuations are right-padded and start at position (valid prompt tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.params import check_params
from jaxrl_llm.models.transformer import (
    _out_and_mlp,
    _qkv,
    attention,
    attention_mask_BTS,
    checked_token_ids,
    embed_tokens,
    positions_from_mask,
    rms_norm,
    rope_tables,
)
from jaxrl_llm.parallel.rules import ShardingRules, constrain

__all__ = ["continuation_predictors", "shared_prefix_hidden_states"]


def _continuation_mask(cfg: ModelConfig, prompt_mask_NP: jax.Array, cont_mask_NGC: jax.Array,
                       prompt_pos_NP: jax.Array, cont_pos_NGC: jax.Array) -> jax.Array:
    """Boolean [N*G, C, P + C]: which keys (the prompt's, then the continuation's own) each continuation token
    sees: every valid prompt token, its own valid earlier tokens, and itself; within the sliding window."""
    N, G, C = cont_mask_NGC.shape
    P = prompt_mask_NP.shape[1]
    see_prompt = jnp.broadcast_to(prompt_mask_NP.astype(bool)[:, None, None, :], (N, G, C, P))
    j = jnp.arange(C)
    see_own = (j[None, :] <= j[:, None])[None, None] & cont_mask_NGC.astype(bool)[:, :, None, :]
    if cfg.sliding_window is not None:
        q = cont_pos_NGC[..., :, None]
        see_prompt = see_prompt & ((q - prompt_pos_NP[:, None, None, :]) < cfg.sliding_window)
        see_own = see_own & ((q - cont_pos_NGC[..., None, :]) < cfg.sliding_window)
    see_own = see_own | jnp.eye(C, dtype=bool)[None, None]
    return jnp.concatenate([see_prompt, see_own], axis=-1).reshape(N * G, C, P + C)


def shared_prefix_hidden_states(
    cfg: ModelConfig,
    params: dict,
    prompt_ids_NP: jax.Array,
    prompt_mask_NP: jax.Array,
    cont_ids_NGC: jax.Array,
    cont_mask_NGC: jax.Array,
    *,
    rules: ShardingRules | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Final-norm hidden states (prompt [N, P, D], continuations [N, G, C, D]) in the compute dtype.

    Equal to `hidden_states` of the N x G rows [prompt | continuation g] (prompt columns, then continuation
    columns), with the prompt computed once per group. Continuation token j of a group sits at position
    (valid prompt tokens of its group) + j, as in those rows.
    """
    check_params(cfg, params)
    prompt_ids_NP = checked_token_ids(cfg, prompt_ids_NP, "prompt_ids")
    cont_ids_NGC = checked_token_ids(cfg, cont_ids_NGC, "continuation_ids", ndim=3)
    N, P = prompt_ids_NP.shape
    _, G, C = cont_ids_NGC.shape
    if cont_ids_NGC.shape[0] != N:
        raise ValueError(f"shared_prefix_hidden_states: {N} prompts but {cont_ids_NGC.shape[0]} continuation groups")
    prompt_pos = positions_from_mask(prompt_mask_NP)
    n_prompt = prompt_mask_NP.astype(jnp.int32).sum(-1)
    cont_pos = n_prompt[:, None, None] + positions_from_mask(cont_mask_NGC.reshape(N * G, C)).reshape(N, G, C)
    positions = jnp.concatenate([prompt_pos, cont_pos.reshape(N, G * C)], axis=1)
    ids = jnp.concatenate([prompt_ids_NP, cont_ids_NGC.reshape(N, G * C)], axis=1)

    x = embed_tokens(params["embed"], ids, rules).astype(cfg.dtype)
    x = constrain(x, ("batch", "length", "embed"), rules)
    mask_prompt = attention_mask_BTS(cfg, prompt_mask_NP)
    mask_cont = _continuation_mask(cfg, prompt_mask_NP, cont_mask_NGC, prompt_pos, cont_pos)
    rope = rope_tables(cfg, positions)

    def body(x, p):
        w = {k: v.astype(x.dtype) for k, v in p.items()}
        q, k, v = _qkv(cfg, w, x, rope, rules)
        nh, hd = q.shape[2], q.shape[3]
        o_prompt = attention(cfg, q[:, :P], k[:, :P], v[:, :P], mask_prompt)
        # Each continuation's keys: the group's prompt keys (repeated G times; small) then its own.
        per_row = lambda a: a.reshape(N * G, C, a.shape[2], hd)
        k_cont = jnp.concatenate([jnp.repeat(k[:, :P], G, axis=0), per_row(k[:, P:])], axis=1)
        v_cont = jnp.concatenate([jnp.repeat(v[:, :P], G, axis=0), per_row(v[:, P:])], axis=1)
        k_cont = constrain(k_cont, ("batch", "length", "kv_heads", "head_dim"), rules)
        v_cont = constrain(v_cont, ("batch", "length", "kv_heads", "head_dim"), rules)
        o_cont = attention(cfg, per_row(q[:, P:]), k_cont, v_cont, mask_cont)
        o = jnp.concatenate([o_prompt, o_cont.reshape(N, G * C, nh, hd)], axis=1)
        return _out_and_mlp(cfg, w, x, o, rules), None

    if cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    h = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return h[:, :P], h[:, P:].reshape(N, G, C, h.shape[-1])


def continuation_predictors(h_prompt_NPD: jax.Array, h_cont_NGCD: jax.Array) -> jax.Array:
    """[N, G, C, D]: the hidden state that predicts each continuation token. Token 0 of every continuation is
    predicted by the prompt's last column (left-padded prompts all end there), token j by the continuation's own
    position j - 1."""
    N, G, _, D = h_cont_NGCD.shape
    first = jnp.broadcast_to(h_prompt_NPD[:, None, -1:], (N, G, 1, D))
    return jnp.concatenate([first, h_cont_NGCD[:, :, :-1]], axis=2)
