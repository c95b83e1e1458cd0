"""Review 31 (today's changes together): a reward-model workdir trained before pad = EOS keeps reading its scores
where it did when resumed; GSPO's sequence ratio leaves out tokens outside the old policy's top-k/top-p set too."""

from __future__ import annotations

import json
import logging
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.algorithms.pg_losses import LOGP_FLOOR, policy_gradient_loss
from jaxrl_llm.resume import score_pad

pytest.importorskip("transformers")


def _cfg() -> models.ModelConfig:
    return models.ModelConfig(family="llama", vocab_size=400, hidden_size=32, intermediate_size=48, num_layers=1,
                              num_heads=4, num_kv_heads=2, head_dim=8, num_labels=1)


def _workdir(tmp_path, pad, checkpoint: bool = True) -> str:
    wd = tmp_path / "wd"
    (wd / "checkpoints" / "3").mkdir(parents=True) if checkpoint else wd.mkdir(parents=True)
    hf = {**models.config_to_hf(_cfg()), "pad_token_id": pad}
    (wd / "model_config.json").write_text(json.dumps({"hf_config": hf}))
    return str(wd)


def test_a_reward_model_trained_without_a_pad_keeps_its_score_position_on_resume(tmp_path, caplog):
    """A reward model started before pad = EOS (model_config.json: pad_token_id null) read each row's score at its
    last token, the closing EOS included; resumed, it took pad = EOS and read it at the token before from then on
    (and exported that), silently, mid-run."""
    from test_rev30_tok import _tokenizer

    tok = _tokenizer("llama3")  # no pad token; EOS <|eot_id|>
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.train"):
        kept = score_pad(_workdir(tmp_path, None), _cfg(), tok)
    assert kept.pad_token_id is None and tok.pad_token_id is None
    assert "checkpoints were trained without one" in caplog.text
    # a fresh workdir (or one whose model_config.json recorded the pad) takes pad = EOS
    for wd in (_workdir(tmp_path / "a", None, checkpoint=False), _workdir(tmp_path / "b", tok.eos_token_id),
               str(tmp_path / "c")):
        tok = _tokenizer("llama3")
        assert score_pad(wd, _cfg(), tok).pad_token_id == tok.eos_token_id == tok.pad_token_id
    assert not os.path.exists(tmp_path / "c")


def test_gspo_ratio_leaves_out_tokens_outside_the_old_policys_set():
    """A recomputed old log-prob at the floor (the token outside the old policy's top-k/top-p set) and a current one
    inside it: the token's +20 bounded log-ratio lifted the sequence's ratio to e^5 (4 tokens), and a negative
    advantage's loss (unclipped above 1 + clip) pushed every other token of the sequence with 148 times the gradient."""
    lp = jnp.array([[-1.0, -0.5, -0.7, -2.0]])
    old = jnp.array([[-1.01, -0.5, -0.7, LOGP_FLOOR]])
    _, m = policy_gradient_loss(lp, old, None, jnp.array([-1.0]), jnp.ones((1, 4)), token_level=False,
                                sequence_level_ratio=True)
    np.testing.assert_allclose(float(m["ratio_max"]), math.exp(0.01 / 3), rtol=1e-5)
    np.testing.assert_allclose(float(m["actor_loss"]), math.exp(0.01 / 3), rtol=1e-5)


def test_sequence_importance_weights_leave_out_tokens_outside_the_trainers_set():
    """GSPO's importance weight exp(sum old - sampler) and seq-mask-tis's geometric mean took a token outside the
    trainer's top-k/top-p set (old at the -1e4 floor) into the sum: the sequence's weight was 0 (GSPO) or it was
    masked out whole (seq-mask-tis); NeMo RL masks such a token out of both."""
    lp = jnp.array([[-1.0, -0.5, -0.7, -2.0]])
    old = jnp.array([[-1.0, -0.5, -0.7, LOGP_FLOOR]])
    gen = jnp.array([[-1.1, -0.5, -0.7, -2.0]])
    adv, mask = jnp.array([1.0]), jnp.ones((1, 4))
    _, m = policy_gradient_loss(lp, old, None, adv, mask, token_level=False, sequence_level_ratio=True,
                                sampler_logprobs=gen)
    np.testing.assert_allclose(float(m["is_weight_mean"]), math.exp(0.1), rtol=1e-5)
    _, m = policy_gradient_loss(lp, old, None, adv, mask, sampler_logprobs=gen, tis_cap=1.2, tis_min=0.9,
                                tis_type="seq-mask-tis")
    # the three tokens in the set: geometric mean e^(0.1 / 3), inside [0.9, 1.2]: their raw weights kept
    np.testing.assert_allclose(float(m["is_weight_mean"]), (math.exp(0.1) + 1 + 1 + 0) / 4, rtol=1e-5)
