"""Review 30 of the day's features. With log_every = k a row's rate is what its k steps did over the time they
took: SFT's tokens_per_s was that, but its row (metrics.jsonl, TensorBoard, W&B, the console and the dict
`train.run` returns) also carried the window's `batch_tokens`, a helper of the rate; GRPO's gen_tokens_per_s was
the mean of the steps' rates (a slow step counted as much as a fast one)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from recipes import text_sft_recipe

from jaxrl_llm import metrics


def test_a_windows_rate_is_its_amount_over_its_time():
    w = metrics.StepWindow(rates={"gen_tokens_per_s": "time_generate_s"})
    w.add({"loss": 1.0, "gen_tokens_per_s": 100.0, "time_generate_s": 10.0})  # 1000 tokens in 10 s
    w.add({"loss": 3.0, "gen_tokens_per_s": 1000.0, "time_generate_s": 1.0})  # 1000 tokens in 1 s
    row = w.take()
    assert row == {"loss": 2.0, "gen_tokens_per_s": pytest.approx(2000 / 11), "time_generate_s": 5.5}
    w.add({"loss": 7.0, "gen_tokens_per_s": 50.0, "time_generate_s": 2.0})
    assert w.take() == {"loss": 7.0, "gen_tokens_per_s": 50.0, "time_generate_s": 2.0}  # one step: its own rate
    w.add({"loss": 1.0})  # a row without them
    assert w.take() == {"loss": 1.0}


def test_sft_rows_hold_tokens_per_s_over_their_window_and_no_helper_key(tmp_path, monkeypatch):
    """The driver itself (its step faked: only its bookkeeping is under test)."""
    import jax.numpy as jnp

    from jaxrl_llm import train

    def make_step(cfg, optimizer, config, rules):
        return lambda state, batch, ref_params: (
            state, {"loss": jnp.sum(batch["loss_mask"]).astype(jnp.float32), "grad_norm": jnp.float32(1.0)})

    monkeypatch.setitem(train.REGISTRY, "sft", dataclasses.replace(train.REGISTRY["sft"], make_step=make_step))
    c = text_sft_recipe(tmp_path, {"max_steps": 3, "log_every": 2})
    seen = []
    real_tokens = train.batch_tokens
    monkeypatch.setattr(train, "batch_tokens", lambda b: seen.append(float(real_tokens(b))) or seen[-1])
    out = train.run(c, str(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3] and len(seen) == 3
    for r, steps in zip(rows, ([0, 1], [2]), strict=True):
        assert "batch_tokens" not in r
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(sum(seen[i] for i in steps) / len(steps))
    assert "batch_tokens" not in out and out["tokens_per_s"] == rows[-1]["tokens_per_s"]
