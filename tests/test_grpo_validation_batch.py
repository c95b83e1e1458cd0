"""GRPO validation samples at most a rollout's rows at a time: with rollout.max_batch_size=0 (the recipes' default,
one rollout batch) it used one batch of every eval task x sample, many times the KV cache the rollouts need."""

from __future__ import annotations

import types

import pytest
from recipes import recipe

from jaxrl_llm import evaluation, rl_train


@pytest.mark.parametrize("max_batch_size,expected", [(0, 2 * 4), (3, 3)])
def test_validation_generates_a_rollout_s_rows_at_a_time(monkeypatch, max_batch_size, expected):
    config = recipe("grpo_tiny", {"val_every": 1, "rollout.num_prompts": 2, "rollout.group_size": 4,
                                  "rollout.max_batch_size": max_batch_size, "eval.num_examples": 6,
                                  "eval.n_samples": 2})
    seen = {}

    def fake_evaluate_tasks(cfg, params, tokenizer, tasks, env, **kw):
        seen.update(kw, tasks=len(tasks))
        return {"pass@1": 0.0}

    monkeypatch.setattr(evaluation, "evaluate_tasks", fake_evaluate_tasks)
    monkeypatch.setattr(evaluation, "scalar_metrics",
                        lambda res, prefix="", per_source=False: {f"{prefix}{k}": v for k, v in res.items()})
    tokenizer = types.SimpleNamespace(eos_token_id=2)
    cfg = types.SimpleNamespace(eos_token_ids=(2,))
    monkeypatch.setattr(rl_train.sampling, "default_stop_ids", lambda cfg, tok: (2,))
    evaluate = rl_train._make_evaluator(config, cfg, tokenizer, None, None)
    assert evaluate(None, 1) == {"val_pass@1": 0.0}
    assert seen["max_batch_size"] == expected and seen["tasks"] == 6  # 12 rows: more than a rollout batch
    if evaluate.close:
        evaluate.close()
