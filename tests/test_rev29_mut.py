"""Mutation tests of review 29's changes: what the session's tests let through (a lone surrogate inside messages or
written as an uppercase escape, a role left out anywhere but first, the role probes after a tool call and with
tools, the data cache's format, the console's ETA at the last step, W&B's step of an old disabled mode, a
single process's log, the GRPO runner's once-per-run warning)."""

from __future__ import annotations

import json
import logging
import types

import numpy as np
import pytest

from jaxrl_llm.data import DataError, load_rows


def _surrogate_rows() -> list[str]:
    """Messages rows as other JSON writers give a lone surrogate: an uppercase escape (Java, .NET) in a message's
    content, a lowercase one in a tool call's argument name."""
    user = '{"role": "user", "content": "Hi"}'
    return ['{"messages": [' + user + ', {"role": "assistant", "content": "cut \\uD83D here"}]}',
            '{"messages": [' + user + ', {"role": "assistant", "content": null, "tool_calls": [{"type": "function", '
            '"function": {"name": "f", "arguments": {"x\\udc00": 1}}}]}]}']


def test_a_lone_surrogate_inside_messages_is_named_whatever_its_case(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]})
    for bad in _surrogate_rows():
        (tmp_path / "r.jsonl").write_text(good + "\n" + bad + "\n")
        with pytest.raises(DataError, match=r"r.jsonl: line 2 holds a lone UTF-16 surrogate"):
            load_rows(str(tmp_path / "r.jsonl"))
        (tmp_path / "r.json").write_text(f"[{good}, {bad}]")
        with pytest.raises(DataError, match=r"r.json: row 1 holds a lone UTF-16 surrogate"):
            load_rows(str(tmp_path / "r.json"))


def test_a_cache_of_the_format_before_weight_0_is_not_read(tmp_path, monkeypatch):
    """A data cache written before weight 0 took messages out of the loss holds them learned: tokenized again."""
    from jaxrl_llm.data import cache as cache_lib

    rows = [[(np.array([1, 2], np.uint16), np.array([0, 1], np.uint8))]]
    with monkeypatch.context() as m:
        m.setattr(cache_lib, "FORMAT", 2)
        cache_lib.save(str(tmp_path), "sft", "k" * 64, rows, {})
    assert cache_lib.load(str(tmp_path), "sft", "k" * 64) is None


# renders a tool reply only after the assistant's tool call / only when the row gives tools (as a tokenizer's
# "tool_use" template, picked for rows with tools, does)
AFTER_CALL = ("{%- for m in messages %}{%- if m.role != 'tool' or (loop.index0 > 0 and "
              "messages[loop.index0 - 1].tool_calls) %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
              "{%- endif %}{%- endfor %}")
WITH_TOOLS = ("{%- for m in messages %}{%- if m.role != 'tool' or tools %}<|im_start|>{{ m.role }}\n{{ m.content }}"
              "<|im_end|>\n{%- endif %}{%- endfor %}")


def test_a_tool_role_rendered_only_after_a_call_or_with_tools_is_not_refused(tokenizer):
    from test_rev29_shapes import QWEN25_TEMPLATE

    from jaxrl_llm.data.chat import dropped_fields

    for template in (AFTER_CALL, WITH_TOOLS):
        assert "role:tool" not in dropped_fields(tokenizer, template, {"tool", "user"})
    dropped = dropped_fields(tokenizer, QWEN25_TEMPLATE, {"developer", "tool"})  # its tool replies: rendered
    assert "role:developer" in dropped and "role:tool" not in dropped


def test_a_dropped_role_after_the_first_message_is_refused(tokenizer):
    from test_rev29_shapes import QWEN25_TEMPLATE

    from jaxrl_llm.data.chat import check_prompt_roles, check_rendered

    sys_ = {"role": "system", "content": "S"}
    dev, user = {"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}
    with pytest.raises(DataError, match="row 5: has a 'developer' message"):
        check_rendered([sys_, dev, user, {"role": "assistant", "content": "Salut"}], None, {"role:developer"}, 5)
    ok = [sys_, user]
    with pytest.raises(DataError, match="^task 2: has a 'developer' message"):
        check_prompt_roles(tokenizer, [ok, ok, [sys_, dev, user]], QWEN25_TEMPLATE)


def test_eta_of_a_start_whose_first_row_is_the_last_step(tmp_path, capsys):
    from jaxrl_llm.metrics import MetricsWriter

    w = MetricsWriter(str(tmp_path), 11, start_step=10, tensorboard=False)
    w.write(11, {"loss": 1.0})
    w.close()
    assert capsys.readouterr().err.rstrip().endswith("eta 0s")


def test_a_wandb_run_whose_step_is_no_number_gets_every_step(tmp_path, monkeypatch):
    """Old wandb's disabled mode gives no number for run.step."""
    import sys

    from jaxrl_llm.metrics import MetricsWriter

    logged: list[int] = []
    run = types.SimpleNamespace(id="r1", step=types.SimpleNamespace(), finish=lambda: None,
                                log=lambda data, step=None: logged.append(step))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    (tmp_path / "wandb_run_id").write_text("r1")
    w = MetricsWriter(str(tmp_path), 5, start_step=3, tensorboard=False, wandb_project="p")
    w.write(4, {"loss": 1.0})
    w.close()
    assert logged == [4]


def test_a_single_process_says_nothing_of_other_processes(caplog):
    from jaxrl_llm import distributed

    with caplog.at_level(logging.INFO, "jaxrl_llm"):
        distributed.quiet_other_processes(distributed.DistributedInfo(0, 1, None, "explicit"))
    assert "processes 1-" not in caplog.text


def test_the_grpo_runner_warns_of_a_missing_reward_component_once(monkeypatch, caplog):
    from recipes import recipe

    from jaxrl_llm import rl_train
    from jaxrl_llm.rl_train import GRPORunner

    r = object.__new__(GRPORunner)
    r.config = recipe("grpo_tiny", {"rollout.num_prompts": 1, "rollout.group_size": 2})
    r.G, r.P, r.max_turns, r.position = 2, 1, 1, 0
    r.kept, r.tasks, r.prompt_ids = [0], [types.SimpleNamespace(metadata={})], [[7]]
    r.cfg = r.mesh = r.rules = r.sampling_rules = r.sp = r.tok_bytes = None
    r.missing_said = set()
    r.tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=False: "x")

    def generate(cfg, params, prompts, sp, key, **kw):
        return types.SimpleNamespace(tokens=[[1] for _ in prompts], logprobs=[[-1.0] for _ in prompts],
                                     finish_reasons=["stop"] * len(prompts),
                                     stats={"reshard_seconds": 0.0, "generated_tokens": len(prompts), "compiles": 0})

    monkeypatch.setattr(rl_train.sampling, "generate", generate)
    r.env = types.SimpleNamespace(score=lambda prompts, completions, metadata: types.SimpleNamespace(
        rewards=[1.0, 0.0], info=[{"reward/a": 1.0, "reward/b": 1.0}, {"reward/a": 0.0}], counts={}))
    with caplog.at_level(logging.WARNING, "jaxrl_llm"):
        for step in range(2):
            r.generate_round(None, step=step, round_=0)
    assert sum("'b' is missing" in rec.getMessage() for rec in caplog.records) == 1


def test_steps_orbax_ranked_are_left_as_they_are(tmp_path, caplog):
    """Only an earlier version's steps are ranked: rewriting Orbax's own metrics folder fails (a folder renamed
    onto a folder), a warning at every resume, and the steps after it left unranked."""
    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer, rank_earlier_steps

    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, every_steps=1, keep=3, async_save=False, best_metric="val_loss")
    ck.maybe_save(1, {"params": {"w": jnp.ones(2)}}, {"step": 1, "val_loss": 1.0}, metrics={"val_loss": 1.0})
    ck.close()
    with caplog.at_level(logging.WARNING, "jaxrl_llm"):
        assert rank_earlier_steps(d, "val_loss") == []
    assert "unranked" not in caplog.text


def test_a_resume_refused_for_another_reference_checksum_says_another_version_may_have_made_it():
    from jaxrl_llm.cli import ConfigError
    from jaxrl_llm.resume import check_resume

    with pytest.raises(ConfigError, match=r"the same settings give another reference checksum where another version"):
        check_resume("wd", {"reference": "ab12", "batch_size": 4}, {"reference": "cd34", "batch_size": 4})
