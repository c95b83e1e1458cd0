"""Reward models as TRL's RewardTrainer trains them: rows with a `margin` field (Llama 2's margin loss,
-log σ(r_c - r_r - margin)) and `rm.center_rewards_coefficient` (+ coef x mean (r_c + r_r)^2). The loss and its
gradients are checked against TRL's two lines written out in torch; the margins travel from the rows through the
data cache, both batch layouts and the jitted step."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import models, train
from jaxrl_llm.algorithms.losses import bradley_terry_loss_sum
from jaxrl_llm.algorithms.pairs import pair_scores
from jaxrl_llm.algorithms.rm import make_rm_loss
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data import preference as pref
from jaxrl_llm.data.chat import DataError


def _trl_loss(c: np.ndarray, r: np.ndarray, margin: np.ndarray | None, coef: float | None):
    """TRL 1.16 RewardTrainer.compute_loss, its lines written out in torch: (loss, d loss/d c, d loss/d r)."""
    import torch
    from torch import nn

    tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
    if margin is not None:
        loss = -nn.functional.logsigmoid(tc - tr - torch.tensor(margin, dtype=torch.float64)).mean()
    else:
        loss = -nn.functional.logsigmoid(tc - tr).mean()
    if coef is not None:
        loss = loss + coef * torch.mean((tc + tr) ** 2)
    loss.backward()
    return loss.item(), tc.grad.numpy(), tr.grad.numpy()


@pytest.mark.parametrize("with_margin,coef", [(True, None), (False, 0.01), (True, 0.5), (False, None)])
def test_loss_and_gradients_equal_trl_reward_trainer(with_margin, coef):
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=6).astype(np.float32) * 2, rng.normal(size=6).astype(np.float32) * 2
    margin = rng.uniform(0, 3, size=6).astype(np.float32) if with_margin else None

    def ours(c, r):
        s, n, _ = bradley_terry_loss_sum(c, r, None, None if margin is None else jnp.asarray(margin), coef or 0.0)
        return s / n

    loss, (gc, gr) = jax.value_and_grad(ours, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    want, wc, wr = _trl_loss(c, r, margin, coef)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gc), wc, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gr), wr, rtol=1e-5, atol=1e-7)


def test_filler_pairs_weigh_nothing_and_metrics_are_score_gaps():
    c, r, m = jnp.array([1.0, 0.5, 9.0]), jnp.array([0.0, 1.0, -9.0]), jnp.array([2.0, 0.0, 5.0])
    s, n, sums = bradley_terry_loss_sum(c, r, jnp.array([1.0, 1.0, 0.0]), m, 0.1)
    want, _, _ = _trl_loss(np.array([1.0, 0.5]), np.array([0.0, 1.0]), np.array([2.0, 0.0]), 0.1)
    np.testing.assert_allclose(float(s / n), want, rtol=1e-6)
    assert float(n) == 2
    # accuracy and margin are the scores' (TRL's too), not shifted by the rows' margins
    assert float(sums["accuracy"]) == 1 and float(sums["margin"]) == pytest.approx(1.0 - 0.5)
    assert float(sums["center_loss"]) == pytest.approx(1.0 + 1.5 ** 2)


def test_a_margin_of_another_length_is_named():
    with pytest.raises(ValueError, match="margin_P"):
        bradley_terry_loss_sum(jnp.zeros(3), jnp.zeros(3), None, jnp.zeros(4))


def _rows(margins):
    rows = []
    for i, m in enumerate(margins):
        row = {"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}. " * (1 + i % 3), "rejected": f"It is {i}."}
        if m is not ...:
            row["margin"] = m
        rows.append(row)
    return rows


def _config(path, **data):
    return ml_collections.ConfigDict(dict(algorithm="rm", data=dict(
        source=str(path), num_examples=-1, max_len=64, overlong="truncate", chat_template="", **data)))


@pytest.mark.parametrize("shared", [False, True])
def test_margins_reach_the_batch_in_both_layouts_and_through_the_cache(tokenizer, tmp_path, shared):
    from jaxrl_llm.data.cache import DataCache

    path = tmp_path / "pairs.jsonl"
    margins = [0.5, 1, 2.25, 0.0, 3]
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(margins)))
    config = _config(path, shared_prefix=shared)
    cache = DataCache(str(tmp_path / "cache"))
    pairs, stats = pref.prepare(config, tokenizer, cache=cache)
    cache.flush()
    again, _ = pref.prepare(config, tokenizer, cache=DataCache(str(tmp_path / "cache")))
    assert stats["shared_prefix"] == int(shared)
    for got in (pairs, again):
        assert [p.margin for p in got] == margins
        batch = pref.collate([got[3], got[1], got[2]], config, 0)
        assert batch["margin"].dtype == np.float32 and batch["margin"].tolist() == [0.0, 1.0, 2.25]
        assert set(batch) <= set(pref.BATCH_AXES)


def test_pairs_without_margins_have_no_margin_column(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows([..., ...])))
    pairs, _ = pref.prepare(_config(path, cache=False), tokenizer)
    assert all(p.margin is None for p in pairs) and "margin" not in pref.collate(pairs, _config(path), 0)


def test_a_cut_pair_keeps_its_margin(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = _rows([1.5])
    rows[0]["chosen"] = "word " * 100
    path.write_text(json.dumps(rows[0]) + "\n")
    (pair,), stats = pref.prepare(_config(path, shared_prefix=False, cache=False), tokenizer)
    assert stats["truncated"] == 1 and len(pair.chosen_ids) == 64 and pair.margin == 1.5


@pytest.mark.parametrize("margins,match", [
    ([1.0, ..., 2.0], r"row 1: no field 'margin', which other rows have \(row 0\)"),
    ([..., 1.0], r"row 0: no field 'margin', which other rows have \(row 1\)"),
    ([1.0, "big"], r"row 1: field 'margin' must be a finite number, got 'big'"),
    ([True, 1.0], r"row 0: field 'margin' must be a finite number, got True"),
    ([1.0, float("nan")], r"row 1: field 'margin' must be a finite number, got nan"),
])
def test_bad_margins_name_the_row(tokenizer, tmp_path, margins, match):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(margins)))
    with pytest.raises(DataError, match=match):
        pref.prepare(_config(path, cache=False), tokenizer)


def test_dpo_says_it_leaves_margins_aside(tokenizer, tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows([1.0, 2.0])))
    config = _config(path, cache=False)
    config.algorithm = "dpo"
    with caplog.at_level(logging.WARNING):
        pref.prepare(config, tokenizer)
    assert "used by reward models (algorithm='rm') only; dpo leaves it aside" in caplog.text


def test_the_rm_loss_reads_the_batch_margin_and_the_config_coefficient():
    cfg = models.ModelConfig(family="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
    cfg, params = models.with_score_head(cfg, models.init_params(cfg, jax.random.key(0), std=0.5), 1,
                                         jax.random.key(1))
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 32, size=(3, 2, 10)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
             "margin": np.array([0.0, 1.0, -2.0], np.float32)}
    scores = np.asarray(pair_scores(cfg, params, batch))
    config = ml_collections.ConfigDict(dict(rm=dict(center_rewards_coefficient=0.25)))
    loss_sum, (n, sums) = make_rm_loss(cfg, None, config)(params, batch)
    want, _, _ = _trl_loss(scores[:, 0], scores[:, 1], batch["margin"], 0.25)
    np.testing.assert_allclose(float(loss_sum / n), want, rtol=1e-5)
    plain, _ = make_rm_loss(cfg)(params, {k: v for k, v in batch.items() if k != "margin"})
    np.testing.assert_allclose(float(plain / n), _trl_loss(scores[:, 0], scores[:, 1], None, None)[0], rtol=1e-5)
    assert abs(float(plain) - float(loss_sum)) > 1e-3


@pytest.mark.parametrize("value", [-0.1, float("inf"), float("nan")])
def test_a_bad_center_coefficient_is_named(value):
    with pytest.raises(ConfigError, match="rm.center_rewards_coefficient="):
        train.validate(recipe("rm_tiny", {"rm.center_rewards_coefficient": value}))


def test_an_rm_config_without_the_rm_block_still_runs_as_before():
    c = recipe("rm_tiny")
    del c["rm"]
    train.validate(c)  # no error: the coefficient is 0
    train.validate(recipe("rm_tiny", {"rm.center_rewards_coefficient": None}))  # TRL's "off"


def test_an_rm_run_with_margins_and_centering_logs_both(tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows([float(i % 3) for i in range(8)])))
    c = recipe("rm_tiny", {"data.source": str(path), "data.num_examples": -1, "max_steps": 2, "train.batch_size": 4,
                           "export_hf": False, "metrics.tensorboard": False, "data.cache": False,
                           "rm.center_rewards_coefficient": 0.01, "model.init.num_layers": 1})
    train.run(c, str(tmp_path / "w"))
    rows = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    steps = [r for r in rows if "center_loss" in r]
    assert len(steps) == 2 and all(np.isfinite(r["center_loss"]) and r["center_loss"] >= 0 for r in steps)
