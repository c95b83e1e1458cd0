"""Evaluation in chunks: one generate call over the whole eval set lost every result to a Ctrl-C, a preemption or a
crash in scoring, and said nothing for hours on a large set. Now each chunk of problems is sampled, scored and
written to <results>.rows.jsonl before the next; the same command resumes an interrupted run; the results are those
of one call (seeded sampling too: each sample keeps its row's random stream). Plus maj@k and empty answers."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from recipes import recipe
from test_evaluation import _boxed_bigram_model
from test_rev32_evalr import SP, BoxedEnv, _tasks

from jaxrl_llm import evaluate, evaluation, models, sampling
from jaxrl_llm.evaluation import evaluate_tasks, majority_correct

TIMING = ("generate_seconds", "score_seconds", "tokens_per_second")


def _same(a, b):
    return {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}


@pytest.fixture(scope="module")
def model(tokenizer):
    return _boxed_bigram_model(tokenizer)


def test_chunks_give_the_samples_of_one_call_and_are_handed_out_as_scored(model, tokenizer):
    """Seeded sampling: each chunk's generate call restarted the rows' random streams at 0 (problem 2's samples would
    be problem 0's); now sample j of problem i draws from row i * n + j whatever the chunking."""
    cfg, params = model
    tasks = _tasks(["7", "8", "7", "8", "7", "9"])
    kw = dict(n_samples=4, k_values=(2, 4), rng=5, max_batch_size=8,
              sampling_params=sampling.SamplingParams(temperature=1.0, **SP))
    one = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), **kw)
    got = []
    chunked = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), chunk_size=2, on_chunk=got.append, **kw)
    assert len({tuple(r["completions"]) for r in one["problems"]}) > 1  # the draws differ between problems
    assert _same(one, chunked)
    assert [[r["index"] for r in c.problems] for c in got] == [[0, 1], [2, 3], [4, 5]]
    # resumed from the first chunk: the rest is sampled, the result is the same
    resumed = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), chunk_size=2, done=got[:1], **kw)
    assert _same(one, resumed)
    with pytest.raises(ValueError, match="index 0 .* repeats an index"):
        evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), done=got[:1] * 2, **kw)
    with pytest.raises(ValueError, match=r"chunk_size=0: must be an integer >= 1"):
        evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), chunk_size=0, **kw)
    with pytest.raises(ValueError, match=r"row_ids: expected 2 integers in \[0, 2\*\*31\) \(one per prompt\), got"):
        sampling.generate(cfg, params, [[1], [2]], row_ids=[0])


def test_greedy_chunks_equal_one_call_on_prompts_of_different_lengths(model, tokenizer):
    """A random model (decisive logits) on prompts of two length buckets: one call sorts them into a short and a long
    chunk, chunk_size=8 takes them in order (each chunk padded to the long bucket); the completions are the same."""
    cfg, _ = model
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(0.0, 0.3, a.shape), np.float32),
                          models.abstract_params(cfg, "float32"))
    tasks = _tasks(["7"] * 16, words=[0, 40] * 8)
    kw = dict(n_samples=2, rng=0, max_batch_size=8, sampling_params=sampling.SamplingParams(temperature=0.0, **SP))
    one = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), **kw)
    chunked = evaluate_tasks(cfg, params, tokenizer, tasks, BoxedEnv(), chunk_size=8, **kw)
    assert len({r["completions"][0] for r in one["problems"]}) > 2
    assert _same(one, chunked)


def test_an_empty_answer_does_not_outvote_a_real_one():
    """maj@3 of ("", "", "7") with 7 right was False: two empty extractions (a scorer's "" or \\boxed{$ $}) won."""
    assert majority_correct(["", "", "7"], [False, False, True])
    assert majority_correct(["$ $", " ", "7"], [False, False, True])
    assert not majority_correct(["", "8", "8", "7"], [False, False, False, True])
    assert not majority_correct(["", " "], [False, False])


def fake_generate(cfg, params, prompts, sp, rng, *, row_ids=None, **kw):
    """generate without a compile: row r's tokens follow from its prompt and its random stream (row_ids[r])."""
    rows = range(len(prompts)) if row_ids is None else row_ids
    toks = [[int(30 + (sum(p) + 7 * int(r)) % 50)] * 3 for p, r in zip(prompts, rows, strict=True)]
    return sampling.GenerateOutput(tokens=toks, logprobs=[[] for _ in toks], finish_reasons=["length"] * len(toks),
                                   stats={})


@pytest.fixture
def fast(monkeypatch, tokenizer):
    """evaluate.run with the module's tokenizer and `fake_generate`; returns the list of prompts each call got."""
    from jaxrl_llm import train

    monkeypatch.setattr(train, "load_run_tokenizer", lambda config, own: tokenizer)
    sampled = []
    monkeypatch.setattr(evaluation, "generate", lambda c, p, prompts, *a, **k: sampled.append(len(prompts))
                        or fake_generate(c, p, prompts, *a, **k))
    return sampled


def _config(tmp_path, **over):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]
    src = tmp_path / "tasks.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return recipe("eval_tiny", {"data.source": str(src), "data.num": -1, "env.num_workers": 0, "env.sandbox": False,
                                "env.isolate": False, "eval.chunk_size": 2, "eval.n_samples": 2,
                                "model.init.num_layers": 1, **over})


def test_an_interrupted_evaluation_keeps_its_chunks_and_the_same_command_resumes(tmp_path, monkeypatch, fast,
                                                                                 caplog):
    """Ctrl-C in the second chunk's scoring: the first chunk's rows are on disk; the rerun samples only the rest and
    writes the results of an uninterrupted run; the rows file goes once the results are written."""
    out = str(tmp_path / "r.json")
    rows_file = str(tmp_path / "r.rows.jsonl")
    ref = evaluate.run(_config(tmp_path), str(tmp_path / "ref.json"))
    assert fast == [4, 4, 4] and not os.path.exists(tmp_path / "ref.rows.jsonl")
    assert len({r["completions"][0] for r in ref["problems"]}) == 6

    real, calls = evaluation.score_across_processes, []

    def interrupted(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(evaluation, "score_across_processes", interrupted)
    with pytest.raises(KeyboardInterrupt), caplog.at_level("INFO"):
        evaluate.run(_config(tmp_path), out)
    assert not os.path.exists(out)
    assert "evaluation: 2 of 6 problems sampled and scored" in caplog.text
    assert "the 2 problems done are kept in " + rows_file + "; the same command resumes" in caplog.text
    lines = [json.loads(x) for x in open(rows_file)]
    assert [r.get("index") for r in lines[1:]] == [0, 1, None] and lines[-1]["chunk_end"] == 2
    with open(rows_file, "a") as f:  # the process killed as it wrote: a cut line
        f.write('{"index": 2, "rewa')

    monkeypatch.setattr(evaluation, "score_across_processes", real)
    fast.clear()
    # k_values, max_batch_size and chunk_size may change: they do not change the rows
    with caplog.at_level("INFO"):
        res = evaluate.run(_config(tmp_path, **{"eval.k_values": (2,), "eval.max_batch_size": 4,
                                                "eval.chunk_size": 3}), out)
    assert fast == [6, 2]  # problems 2..5, two samples each
    assert _same(ref, res)
    assert "resuming the unfinished evaluation in " + rows_file in caplog.text
    assert "evaluation: 6 of 6 problems sampled and scored" in caplog.text
    assert json.load(open(out))["problems"] == json.load(open(tmp_path / "ref.json"))["problems"]
    assert not os.path.exists(rows_file)


def test_rows_written_with_other_settings_are_refused_naming_them(tmp_path, monkeypatch, fast):
    out = str(tmp_path / "r.json")

    def stop_after_first(*a):
        monkeypatch.setattr(evaluation, "score_across_processes", lambda *a: (_ for _ in ()).throw(RuntimeError))
        return real(*a)

    real = evaluation.score_across_processes
    monkeypatch.setattr(evaluation, "score_across_processes", stop_after_first)
    with pytest.raises(RuntimeError):
        evaluate.run(_config(tmp_path), out)
    monkeypatch.setattr(evaluation, "score_across_processes", real)
    with pytest.raises(evaluate.ConfigError, match=r"r.rows.jsonl holds the rows of an unfinished evaluation with "
                                                   r"other settings \(sampling.temperature: 1.0 there, 0.5 now\)"):
        evaluate.run(_config(tmp_path, **{"sampling.temperature": 0.5}), out)
    res = evaluate.run(_config(tmp_path, **{"sampling.temperature": 0.5, "eval.resume": False}), out)
    assert res["num_problems"] == 6 and os.path.exists(str(tmp_path / "r.rows.jsonl.1.old"))


def test_chunk_size_knob():
    ec = recipe("eval_tiny").eval
    greedy, sampled = sampling.SamplingParams(temperature=0.0), sampling.SamplingParams(temperature=1.0)
    assert evaluate.chunk_problems(ec, greedy) == 256 and evaluate.chunk_problems(ec, sampled) == 128  # n=2, 8 rows
    ec.max_batch_size, ec.n_samples = 0, 3
    assert evaluate.chunk_problems(ec, sampled) == 341
    ec.max_batch_size = 300
    assert evaluate.chunk_problems(ec, sampled) == 100
    ec.chunk_size = 7
    assert evaluate.chunk_problems(ec, sampled) == 7
    for bad in (-1, True):
        with pytest.raises(evaluate.ConfigError, match="eval.chunk_size"):
            evaluate.validate(recipe("eval_tiny", {"eval.chunk_size": bad}))
    c = recipe("eval_tiny")
    del c.eval["resume"]
    c.eval.resume = "yes"
    with pytest.raises(evaluate.ConfigError, match="eval.resume='yes': must be True or False"):
        evaluate.validate(c)
