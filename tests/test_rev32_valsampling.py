"""GRPO validation samples with eval.top_p / eval.top_k when given (it always sampled unfiltered, whatever the
config said), and a bad value is named before any work."""

from __future__ import annotations

import pytest
from recipes import recipe

from jaxrl_llm import rl_train, train
from jaxrl_llm.cli import ConfigError


@pytest.mark.parametrize("key,value", [("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)])
def test_bad_validation_filters_are_named(key, value):
    c = recipe("grpo_tiny", {"val_every": 1})
    c.eval[key] = value
    with pytest.raises(ConfigError, match=f"eval.{key}="):
        train.validate(c)


def test_validation_samples_with_the_eval_filters(monkeypatch, tokenizer):
    import jaxrl_llm.evaluation as evaluation

    seen = []
    monkeypatch.setattr(evaluation, "evaluate_tasks", lambda *a, **k: seen.append(k["sampling_params"]) or {})
    monkeypatch.setattr(evaluation, "scalar_metrics", lambda res, prefix, per_source: {})
    for over, want in (({}, (1.0, 0)), ({"eval.top_p": 0.9, "eval.top_k": 20}, (0.9, 20))):
        c = recipe("grpo_tiny", {"val_every": 1, **over})
        from jaxrl_llm import models

        cfg = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=512)
        evaluate = rl_train._make_evaluator(c, cfg, tokenizer, None, None)
        evaluate(None, c.max_steps)
        if evaluate.close:
            evaluate.close()
        sp = seen[-1]
        assert (float(sp.top_p), int(sp.top_k)) == want


def test_mixed_source_validation_logs_each_source():
    from jaxrl_llm.evaluation import scalar_metrics

    res = {"pass@1": 0.5, "num_problems": 4, "problems": [], "per_source": {
        "gsm8k": {"num_problems": 2, "pass@1": 1.0, "reward_mean": 0.75},
        "rg:chain_sum": {"num_problems": 2, "pass@1": 0.0, "maj@2": float("nan"), "reward_mean": 0.25}}}
    assert scalar_metrics(res, "val_", per_source=True) == {
        "val_pass@1": 0.5, "val_num_problems": 4.0, "val_pass@1/gsm8k": 1.0, "val_reward_mean/gsm8k": 0.75,
        "val_pass@1/rg:chain_sum": 0.0, "val_reward_mean/rg:chain_sum": 0.25}
    assert scalar_metrics(res) == {"pass@1": 0.5, "num_problems": 4.0}  # the evaluate CLI keeps per_source apart
