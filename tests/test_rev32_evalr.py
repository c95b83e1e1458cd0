"""Evaluation as a researcher reads its results: truncated prompts counted per problem (not per sample) and flagged
in their records, greedy samples generated once per problem, integer k, per-source metrics of a mixed source, and
records that carry the rendered prompt and the task's source row."""

from __future__ import annotations

import math
import os
import runpy

import numpy as np
import pytest
from test_evaluation import _boxed_bigram_model

from jaxrl_llm import evaluation, sampling
from jaxrl_llm.environments.base import EnvResult, Task
from jaxrl_llm.evaluation import evaluate_tasks
from jaxrl_llm.sampling.generate import PromptLengthError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SP = dict(max_new_tokens=8)  # '\boxed{7}' + eos is 7 tokens: every test compiles the same decode length


class BoxedEnv:
    """In-process scorer: reward 1 when the completion is exactly \\boxed{<gold>}; reports the extracted answer."""

    name = "boxed"

    def score(self, prompts, completions, metadata):
        got = [c[len("\\boxed{"):-1] if c.startswith("\\boxed{") and c.endswith("}") else None for c in completions]
        return EnvResult(rewards=np.array([float(g == m["answer"]) for g, m in zip(got, metadata, strict=True)]),
                         info=[{"extracted": g} for g in got])


def _tasks(golds, sources=None, words=None):
    return [Task(messages=({"role": "user", "content": f"Problem {i}:" + " word" * (words[i] if words else 0)},),
                 metadata={"answer": g, "index": 10 + i, **({"source": sources[i]} if sources else {})})
            for i, g in enumerate(golds)]


@pytest.fixture(scope="module")
def model(tokenizer):
    return _boxed_bigram_model(tokenizer)


def test_truncated_prompts_are_counted_per_problem_and_flagged_in_its_record(model, tokenizer):
    """truncate_prompts counted every sample of a long prompt (n_samples=3: 2 long problems reported as 6), and the
    records did not say which problems lost their start; without truncation the error named a row, not the task."""
    cfg, params = model
    tasks = _tasks(["7", "8", "7", "7"], words=[0, 30, 0, 30])
    lengths = [len(tokenizer(evaluation.render_prompt(tokenizer, list(t.messages), "t"),
                             add_special_tokens=False)["input_ids"]) for t in tasks]
    limit = min(lengths) + 5
    assert sorted(lengths)[2] > limit
    res = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), n_samples=3, k_values=(3,), rng=0,
                         sampling_params=sampling.SamplingParams(temperature=1.0, **SP), max_batch_size=8,
                         max_prompt_len=limit, truncate_prompts=True)
    assert res["truncated_prompts"] == 2
    recs = res["problems"]
    assert [r["prompt_truncated"] for r in recs] == [False, True, False, True]
    assert [r["prompt_tokens"] for r in recs] == [lengths[0], limit, lengths[2], limit]
    assert all(len(r["completions"]) == 3 and r["prompt"].endswith("assistant\n") for r in recs)
    with pytest.raises(PromptLengthError, match=r"prompt 1 has .* 2 prompt\(s\) are too long"):
        evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), n_samples=3, k_values=(3,),
                       sampling_params=sampling.SamplingParams(**SP), max_prompt_len=limit)


def test_greedy_samples_each_problem_once_and_copies_it(model, tokenizer, monkeypatch):
    """temperature 0 with n_samples > 1 decoded every (identical) sample: n_samples times the work for pass@1."""
    cfg, params = model
    rows = []
    real = evaluation.generate

    def spy(cfg, params, prompts, *a, **kw):
        rows.append(len(prompts))
        return real(cfg, params, prompts, *a, **kw)

    monkeypatch.setattr(evaluation, "generate", spy)
    tasks = _tasks(["7", "8", "7", "9"] * 2)  # 8 rows: the other tests' compiled batch
    greedy = sampling.SamplingParams(temperature=0.0, **SP)
    res = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), n_samples=3, k_values=(2, 3),
                         sampling_params=greedy, max_batch_size=8)
    one = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), n_samples=1, sampling_params=greedy,
                         max_batch_size=8)
    assert rows == [8, 8]
    assert [r["completions"] for r in res["problems"]] == [r["completions"] * 3 for r in one["problems"]]
    assert [r["lengths"] for r in res["problems"]] == [r["lengths"] * 3 for r in one["problems"]]
    assert res["pass@1"] == res["pass@2"] == res["pass@3"] == res["maj@3"] == one["pass@1"] == 0.5
    assert res["mean_length"] == one["mean_length"]


def test_k_values_must_be_integers():
    """eval.k_values=(1, 1.5) ran and reported pass@1 only (int(1.5) is 1), with no word about the 1.5."""
    from jaxrl_llm import evaluate

    with pytest.raises(ValueError, match=r"each k must be an integer .* bad: \[1.5\]"):
        evaluate_tasks(None, None, None, _tasks(["7"]), None, n_samples=2, k_values=(1, 1.5))
    with pytest.raises(ValueError, match=r"bad: \[True\]"):
        evaluate_tasks(None, None, None, _tasks(["7"]), None, n_samples=2, k_values=(True,))
    config = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
    config.eval.k_values = (1, 1.5)
    with pytest.raises(evaluate.ConfigError, match=r"eval.k_values=\(1, 1.5\): each k must be an integer"):
        evaluate.validate(config)


def test_a_mixed_source_reports_each_sources_metrics(model, tokenizer):
    """data.source='a+b' gave one pass@k over both and records without their source: a researcher mixing
    GSM8K with reasoning-gym could not tell which part moved."""
    from jaxrl_llm import evaluate

    cfg, params = model
    golds, sources = ["7", "8", "7", "8", "7", "9"], ["a", "b", "a", "b", "b", "a"]
    tasks = _tasks(golds, sources)
    n = 6
    res = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), n_samples=n, k_values=(2, 6), rng=3,
                         sampling_params=sampling.SamplingParams(temperature=1.0, **SP), max_batch_size=8)
    recs = res["problems"]
    assert [r["source"] for r in recs] == sources and [r["source_index"] for r in recs] == list(range(10, 16))
    assert len({r["num_correct"] for r in recs}) > 1
    assert set(res["per_source"]) == {"a", "b"}
    for src, m in res["per_source"].items():
        mine = [r for r in recs if r["source"] == src]
        assert m["num_problems"] == len(mine) == 3
        for k in (1, 2, 6):
            want = np.mean([1 - math.comb(n - r["num_correct"], k) / math.comb(n, k) for r in mine])
            assert m[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
        assert m["reward_mean"] == pytest.approx(np.mean([r["rewards"] for r in mine]))
        assert {"maj@2", "maj@6"} <= set(m)
    # the whole is the mean over all problems, so the two parts (3 problems each) average to it
    assert res["pass@2"] == pytest.approx(np.mean([m["pass@2"] for m in res["per_source"].values()]))
    assert "a (3 problems): pass@1" in evaluate.format_table("mix", res)
    assert "per_source" not in evaluation.scalar_metrics(res)
    single = evaluate_tasks(cfg, params, tokenizer, _tasks(golds[:4], ["a"] * 4), BoxedEnv(), n_samples=2, rng=0,
                            sampling_params=sampling.SamplingParams(temperature=1.0, **SP), max_batch_size=8)
    assert "per_source" not in single and "(" not in evaluate.format_table("one", single).split("\n", 2)[2]


def test_task_source_names_reasoning_gym_datasets():
    from jaxrl_llm.evaluation import task_source

    rg = Task(messages=(), metadata={"rg_dataset": "chain_sum", "env": "reasoning_gym"})
    assert task_source(rg) == "rg:chain_sum"
    assert task_source(Task(messages=(), metadata={"source": "gsm8k"})) == "gsm8k"
    assert task_source(Task(messages=(), metadata={})) == ""


def test_grpo_validation_tasks_the_environment_cannot_score_are_refused_before_any_step(tokenizer, tmp_path,
                                                                                        monkeypatch):
    """GRPO on number_guess with eval.source='gsm8k': the run trained val_every steps, then the first validation
    died with a traceback (that step's checkpoint not yet saved)."""
    from recipes import recipe

    from jaxrl_llm import rl_train, train

    def no_step(*a, **kw):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(rl_train.GRPORunner, "step", no_step)
    config = recipe("grpo_guess_tiny", {"max_steps": 2, "val_every": 2, "eval.source": "gsm8k",
                                        "eval.num_examples": 2})
    with pytest.raises(train.ConfigError, match=r"env.name='number_guess' cannot score the validation tasks of "
                                                r"eval.source='gsm8k': number_guess: metadata\[0\] needs"):
        train.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
