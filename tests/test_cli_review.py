"""The command line as a user types it (review of `jaxrl_llm.cli.parse_flags` and the entry points' user errors),
in-process and fast: parse_flags runs on a FlagValues of its own (monkeypatched for the module's FLAGS), so no
interpreter is started and no global flag is defined.
"""

from __future__ import annotations

import os
import runpy
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from jaxrl_llm import cli, evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft_tiny.py")
GRPO = os.path.join(ROOT, "configs", "grpo_tiny.py")


@pytest.fixture
def parse(monkeypatch):
    """parse(*args) -> the parsed config, as `python -m jaxrl_llm.train ARGS` parses it; a user error is SystemExit.
    (ml_collections finds the --config.a.b overrides in the argv given when the flag is defined.)"""

    def run(*args: str):
        argv = ["train", *args]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "recipe", lock_config=True, flag_values=fv, sys_argv=argv)
        flags.DEFINE_string("workdir", None, "run folder", flag_values=fv)
        monkeypatch.setattr(cli, "FLAGS", fv)
        rest = cli.parse_flags(argv)
        return fv.config, rest

    return run


@pytest.mark.parametrize(("value", "expected"), [("1e-5", 1e-5), ("3e-4", 3e-4), ("1", 1.0), (".5", 0.5)])
def test_float_overrides(parse, value, expected):
    config, _ = parse("--config", SFT, f"--config.optimizer.lr={value}")
    assert config.optimizer.lr == expected and isinstance(config.optimizer.lr, float)


@pytest.mark.parametrize(("value", "expected"), [("True", True), ("true", True), ("1", True), ("False", False),
                                                 ("false", False), ("0", False)])
def test_bool_overrides(parse, value, expected):
    config, _ = parse("--config", SFT, f"--config.data.packing={value}")
    assert config.data.packing is expected


def test_tuple_overrides_and_space_form(parse):
    for value in ("2,3", "(2, 3)", "[2,3]"):
        config, _ = parse("--config", GRPO, f"--config.rollout.stop_token_ids={value}")
        assert tuple(config.rollout.stop_token_ids) == (2, 3)
    config, _ = parse("--config", SFT, "--config.optimizer.lr", "1e-4", "--config.optimizer.lr=2e-4")
    assert config.optimizer.lr == 2e-4  # the space form works; the last of a key given twice wins, as absl's flags


@pytest.mark.parametrize(("args", "needle"), [
    (["--config.optimizer.lrr=1"], "unknown config key 'optimizer.lrr': did you mean lr?"),
    (["--config.max_steps=2.0"], "--config.max_steps=2.0"),
    (["--config.data.packing=yes"], "--config.data.packing=yes"),
])
def test_user_errors_are_one_line(parse, args, needle):
    with pytest.raises(SystemExit) as e:
        parse("--config", SFT, *args)
    assert needle in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("args", [["--config.export_hf", "False"], ["config.max_steps=5"]])
def test_a_stray_argument_is_an_error(parse, args):
    with pytest.raises(SystemExit) as e:
        parse("--config", SFT, *args)
    assert args[-1] in str(e.value.code)


@pytest.mark.parametrize(("text", "needle"), [
    ("import ml_collections\ndef get_config(:\n    pass\n", "the recipe does not parse: invalid syntax (line 2)"),
    ("import no_such_module_here\n", "the recipe does not load: No module named 'no_such_module_here'"),
    ("def get_config():\n    raise ValueError('lr must be set')\n", "get_config() failed: ValueError: lr must be set"),
    ("def get_config():\n    return {'algorithm': 'sft'}\n", "get_config() returned a dict, not an ml_collections"),
    ("X = 1\n", "the recipe defines no get_config()"),
], ids=["syntax", "import", "raises", "dict", "missing"])
def test_a_recipe_that_does_not_load_is_one_line_naming_it(parse, tmp_path, monkeypatch, text, needle):
    monkeypatch.delitem(sys.modules, "config_config", raising=False)  # (ml_collections' module of the last recipe)
    recipe = tmp_path / f"broken_{abs(hash(text))}.py"
    recipe.write_text(text)
    with pytest.raises(SystemExit) as e:
        parse("--config", str(recipe))
    msg = str(e.value.code)
    assert f"--config={recipe}: " in msg and needle in msg and "\n" not in msg and "Traceback" not in msg


def test_a_tilde_after_the_equals_sign_is_the_home_folder(parse, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "r.py").write_text(open(SFT).read())
    config, _ = parse("--config=~/r.py", "--workdir=~/runs/x", "--config.data.source=~/d.jsonl")
    assert config.data.source == str(tmp_path / "d.jsonl") and cli.FLAGS.workdir == str(tmp_path / "runs" / "x")
    assert cli.expand_home("--config.data.chat_template=x~y") == "--config.data.chat_template=x~y"


def test_a_negative_seed_is_a_config_error():
    config = runpy.run_path(SFT)["get_config"]()
    config.seed = -1
    with pytest.raises(train.ConfigError, match="seed"):
        train.validate(config)


def test_eval_out_that_cannot_be_written_fails_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(evaluate.ConfigError, match=r"--out '.*afile/results.json' cannot be written"):
        evaluate.check_out(str(tmp_path / "afile" / "results.json"))
    with pytest.raises(evaluate.ConfigError, match=r"the results folder '.*afile/eval' \(--out names another place\) "
                                                   r"cannot be written"):
        evaluate.check_out(None, str(tmp_path / "afile" / "eval"))
    evaluate.check_out(None, str(tmp_path / "w" / "eval"))  # created, and left without the probe file
    assert os.listdir(tmp_path / "w" / "eval") == []


def test_a_seed_beyond_numpy_s_range_is_a_config_error():
    config = runpy.run_path(SFT)["get_config"]()
    config.seed = 2**32
    with pytest.raises(train.ConfigError, match=r"seed=4294967296: must be an integer in \[0, 2\*\*32\)"):
        train.validate(config)


def test_none_for_a_placeholder_field_is_none_not_the_text(parse):
    tiny = os.path.join(ROOT, "configs", "eval_tiny.py")
    config, _ = parse("--config", tiny, "--config.data.instruction=None")
    assert config.data.instruction is None  # the source's default instruction, as the recipe's comment says
    config, _ = parse("--config", tiny, "--config.data.instruction=Answer briefly.")
    assert config.data.instruction == "Answer briefly."
    config, _ = parse("--config", SFT, "--config.data.chat_template=None")
    assert config.data.chat_template == "None"  # a plain string field keeps what was typed


def test_help_exits_0_and_an_open_dict_key_says_how_to_set_it(monkeypatch, capsys):
    from absl import app

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "recipe", lock_config=True, flag_values=fv,
                                    sys_argv=["train", "--help"])
    flags.DEFINE_flag(app.HelpFlag(), fv)  # (absl's own --help, which prints the usage and exits 1)
    monkeypatch.setattr(cli, "FLAGS", fv)
    with pytest.raises(SystemExit) as e:
        cli.parse_flags(["train", "--help"])
    assert e.value.code == 0 and "--helpfull" in capsys.readouterr().out  # (the usage was printed)


def test_an_open_dict_key_says_how_to_set_it(parse):
    with pytest.raises(SystemExit) as e:
        parse("--config", os.path.join(ROOT, "configs", "eval_tiny.py"), "--config.data.options.min_terms=2")
    assert "set it whole, e.g. --config.data.options='{\"min_terms\": ...}'" in str(e.value.code)


def test_a_model_inside_this_run_s_export_folder_is_refused(tmp_path):
    """A next stage (DPO after SFT) started in the first stage's workdir with model.path=WORKDIR/hf: its start set
    that folder aside and its export replaced it. Refused before any work, naming the key."""
    config = runpy.run_path(SFT)["get_config"]()
    config.model.path = str(tmp_path / "hf")
    with pytest.raises(train.ConfigError, match=r"model.path='.*hf' is inside this run's export folder"):
        train.check_model_outside_export(config, str(tmp_path))
    config.model.path = str(tmp_path / "other" / "hf")
    train.check_model_outside_export(config, str(tmp_path))  # another run's export is fine
    config.model.path, config.tokenizer = "", str(tmp_path / "hf" / "")
    with pytest.raises(train.ConfigError, match=r"tokenizer="):
        train.check_model_outside_export(config, str(tmp_path))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(train.ConfigError, match=r"tokenizer=.* is inside this run's export folder"):
        train.run(config, str(tmp_path))  # checked by run, before the workdir is touched
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_none_for_a_placeholder_in_the_space_form(parse):
    assert parse("--config", GRPO, "--config.data.instruction", "None")[0].data.instruction is None


def test_none_for_a_float_placeholder(parse):
    assert parse("--config", GRPO, "--config.grpo.tis_min=None")[0].grpo.tis_min is None


def test_tilde_in_a_text_value_is_kept(parse):
    assert parse("--config", GRPO, "--config.data.system_prompt=~")[0].data.system_prompt == "~"
    assert parse("--config", GRPO, "--config.data.system_prompt=~/x")[0].data.system_prompt == "~/x"


def test_none_given_twice_the_last_wins(parse):
    assert parse("--config", GRPO, "--config.grpo.tis_min=0.5", "--config.grpo.tis_min=None")[0].grpo.tis_min is None
    assert parse("--config", GRPO, "--config.grpo.tis_min=None", "--config.grpo.tis_min=0.5")[0].grpo.tis_min == 0.5
