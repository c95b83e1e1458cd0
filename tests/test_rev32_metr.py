"""Logged metrics recomputed from first principles (review 32, metrics audit): what a step logs when some of its
optimizer updates trained on no token."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import recipe, text_sft_recipe
from test_loss_mutants import C, G, N, P, _batch, _cfg

from jaxrl_llm import metrics, models, train
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.rl_batch import reduce_updates


@pytest.fixture(scope="module")
def params():
    return models.init_params(_cfg(), jax.random.key(0), std=0.3)


def test_an_update_with_every_sample_masked_out_logs_count_0_and_no_per_token_means(params):
    """A minibatch whose samples were all masked out (overlong filtering of truncated samples, the log-prob error
    threshold) has no token in the loss. Its update logged count=1, entropy=kl=ratio_mean=is_weight_mean=0 and
    ratio_min=3.4e38, ratio_max=-3.4e38; the step's row then held those extremes (first_update_ratio_min too) and
    means pulled towards 0 (the entropy halved when one of two updates was empty)."""
    full = _batch()
    empty = {**full, "loss_mask": np.zeros_like(full["loss_mask"])}
    config = recipe("grpo_tiny", {"rollout.num_prompts": N, "rollout.group_size": G, "rollout.max_new_tokens": C,
                                  "data.max_prompt_len": P, "train.batch_size": N * G, "train.microbatches": 1,
                                  "grpo.shared_prompt": False, "grpo.kl_coef": 0.02})
    opt = optax.sgd(0.0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    step = jax.jit(grpo.make_train_step(_cfg(), opt, config))
    m_full, m_empty = ({k: float(v) for k, v in step(state, mb, jnp.bool_(True))[1].items()} for mb in (full, empty))
    assert m_empty["count"] == 0 and m_empty["loss"] == 0 and m_empty["grad_norm"] == 0
    assert m_full["count"] == full["loss_mask"].sum()
    # the mean, least and most of the updates that trained on tokens; the loss and norm of every update
    for updates in ([m_empty, m_full], [m_full, m_empty]):
        row = reduce_updates(updates)
        for k in ("entropy", "kl", "clip_fraction", "ratio_mean", "is_weight_mean", "approx_entropy", "ratio_min",
                  "ratio_max"):
            assert row[k] == pytest.approx(m_full[k], rel=1e-6), k
        assert row["loss"] == pytest.approx(m_full["loss"] / 2) and row["count"] == m_full["count"] / 2
    assert reduce_updates([m_full, m_empty])["first_update_ratio_min"] == pytest.approx(m_full["ratio_min"])
    assert "first_update_ratio_min" not in reduce_updates([m_empty, m_full])
    # a step with no token at all: no per-token metric (nothing to average), not 0 and not +-3.4e38
    row = reduce_updates([m_empty, m_empty])
    assert row == {"loss": 0.0, "grad_norm": 0.0, "count": 0.0}


def test_a_run_resumed_after_a_crash_logs_the_rows_of_the_uninterrupted_run(tmp_path, monkeypatch):
    """log_every=2, a checkpoint at step 3, killed during step 4: the resume from step 3 logged row 4 as step 4 alone,
    and step 3 was in no row of metrics.jsonl; the checkpoint keeps the steps since the last row (its meta's
    log_window) and the resumed run's row 4 is steps 3-4, as the uninterrupted run's."""
    def make_step(cfg, optimizer, config, rules):  # step k (from 0) logs loss k
        return lambda state, batch, ref: ({**state, "step": state["step"] + 1},
                                          {"loss": state["step"].astype(jnp.float32), "grad_norm": jnp.float32(1.0)})

    monkeypatch.setitem(train.REGISTRY, "sft", dataclasses.replace(train.REGISTRY["sft"], make_step=make_step))
    c = text_sft_recipe(tmp_path, {"max_steps": 4, "log_every": 2, "checkpoint.every_steps": 3,
                                   "checkpoint.keep": 1, "model.init.hidden_size": 16, "model.init.head_dim": 8,
                                   "model.init.intermediate_size": 16})
    run = str(tmp_path / "run")
    done = metrics.MetricsWriter.step_done

    def crash_in_step_4(self, step):
        if step == 4:
            raise KeyboardInterrupt
        done(self, step)

    monkeypatch.setattr(metrics.MetricsWriter, "step_done", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.run(c, run)
    monkeypatch.setattr(metrics.MetricsWriter, "step_done", done)
    train.run(c, run)  # resumed from the checkpoint of step 3
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 0.5), (4, 2.5)]
