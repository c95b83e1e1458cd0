"""Mutation-testing guards for the code changed in review 31: each test pins a behaviour that a hand-made mutant of
that code kept passing the suite (answer extraction after thinking, the emphasis and thousands-separator reading,
the environments' strip_thinking switches, ...)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from jaxrl_llm.environments import (
    CodeEnvironment,
    FormatEnvironment,
    MathEnvironment,
    ReasoningGymEnvironment,
    reasoning_gym_tasks,
)
from jaxrl_llm.environments.extract import after_thinking, extract_answer, normalize_number
from jaxrl_llm.rl_batch import reward_kl

OPENS = "<|im_start|>assistant\n<think>\n"  # a generation prompt that opens the think block


def test_a_completion_that_closes_the_prompts_think_block_at_once_has_its_answer():
    """"</think>" as the completion's first token (an empty reasoning after a prompt that opened it) is a closed
    block, not a completion cut off mid-reasoning."""
    assert after_thinking("</think>\n\nThe answer is 5.", OPENS) == "\n\nThe answer is 5."
    env = MathEnvironment(answer_format="auto", num_workers=0, sandbox=False)
    assert env.score([OPENS], ["</think>\\boxed{5}"], [{"answer": "5"}]).rewards[0] == 1.0


def test_answer_is_takes_the_last_statement_inside_an_answer_line():
    """Overlapping matches: in "Answer: I think the answer is 18." the answer is 18 (reasoning_gym and evaluate use
    the extractor as is, without math's second reading)."""
    assert extract_answer("Answer: I think the answer is 18.", "answer_is") == "18"


@pytest.mark.parametrize("text, expected", [
    ("The answer is z^*.", "z^*"),  # a starred power keeps its star
    ("The answer is \\sum _{i=1}^n i.", "\\sum _{i=1}^n i"),  # a LaTeX subscript after a space is not emphasis
    ("The answer is (**B**).", "(B)"),  # bold inside parentheses
])
def test_emphasis_reading_edge_cases(text, expected):
    assert extract_answer(text, "answer_is") == expected


def test_tilde_as_thousands_separator():
    """LaTeX's tie ("1~000") is a thousands separator as "1\\,000" is."""
    assert normalize_number("1~000") == "1000" and normalize_number("12~345~678") == "12345678"
    assert normalize_number("1~00") is None


def test_reasoning_gym_strip_thinking_off_reads_the_whole_completion():
    meta = [reasoning_gym_tasks("basic_arithmetic", size=1, seed=0)[0].metadata]
    done = f"<think>so <answer>{meta[0]['answer']}</answer> then I should check"
    env = ReasoningGymEnvironment(num_workers=0, sandbox=False, strip_thinking=False)
    assert env.score([""], [done], meta).rewards[0] == 1.0


def test_format_reads_a_think_block_the_prompt_opened():
    """A completion after a prompt ending in "<think>\\n" that never closes it was cut off mid-reasoning."""
    env = FormatEnvironment()
    assert env.score([OPENS, OPENS], ["<answer>5</answer>", "x</think><answer>5</answer>"],
                     [{}, {}]).info == [{"format_ok": False}, {"format_ok": True}]
    assert not FormatEnvironment(pattern=r"<THINK>.*?</THINK>").strip_thinking  # a pattern about thinking, any case


def test_code_environment_after_thinking_keeps_its_other_rules():
    """The code after </think>: the block that defines the entry point (not a later usage example); raw
    continuations after thinking; strip_thinking=False reads the whole completion."""
    defines = "```python\ndef inc(x):\n    return x + 1\n```\nUsage:\n```python\nprint(inc(1))\n```\n"
    meta = [{"tests": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}]
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:
        assert env.score([""], [f"<think>ok</think>\n{defines}"], meta).rewards[0] == 1.0
    with CodeEnvironment(num_workers=1, timeout_s=10, strip_thinking=False) as env:
        assert env.score([OPENS], [f"drafting\n{defines}"], meta).rewards[0] == 1.0
    with CodeEnvironment(answer_format="raw", num_workers=1, timeout_s=10) as env:
        raw = [{**meta[0], "prelude": "def inc(x):\n"}]
        assert env.score(["def inc(x):\n"], ["<think>easy</think>    return x + 1\n"], raw).rewards[0] == 1.0


def test_reward_kl_k1_is_clamped_on_both_sides():
    """k1 (log pi - log ref) is negative where the reference likes a token more: kept, and bounded at -10 as at +10."""
    old = np.array([[-16.0, -1.0, -4.0]], np.float32)
    ref = np.array([[-1.0, -4.0, -1.0]], np.float32)
    np.testing.assert_allclose(reward_kl({"old_logprobs": old, "ref_logprobs": ref}, "k1")[0], [-10.0, 3.0, -3.0])


def test_console_numbers_negative_and_at_the_bounds(tmp_path, capsys):
    """Whole numbers from 10^4 (included) to 10^9, negative ones too (a summed reward, a log-prob sum)."""
    from jaxrl_llm.metrics import MetricsWriter

    MetricsWriter(str(tmp_path), 2, tensorboard=False).write(1, {"a": 10000.0, "b": -27662.4, "c": 9999.4,
                                                                 "d": -1.5e9})
    assert "a=10000 b=-27662 c=9999 d=-1.5e+09 " in capsys.readouterr().err


def test_portable_tokenizer_class_renames_only_the_generic_backend(tmp_path):
    import json

    from jaxrl_llm.models.hf_io import portable_tokenizer_class

    portable_tokenizer_class(str(tmp_path))  # no tokenizer_config.json: nothing to do
    path = tmp_path / "tokenizer_config.json"
    for cls, want in (("Qwen2Tokenizer", "Qwen2Tokenizer"), ("TokenizersBackend", "PreTrainedTokenizerFast")):
        path.write_text(json.dumps({"tokenizer_class": cls, "eos_token": "<|im_end|>"}))
        portable_tokenizer_class(str(tmp_path))
        assert json.loads(path.read_text()) == {"tokenizer_class": want, "eos_token": "<|im_end|>"}


def test_a_workdir_with_an_unfinished_hf_folder_has_no_export_yet(tmp_path):
    from jaxrl_llm import models

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "hf").mkdir()  # no config.json in it
    with pytest.raises(models.CheckpointError, match=r"training workdir.*no hf/ export yet"):
        models.load_pretrained(str(tmp_path))


def test_a_numpy_formatted_dataset_reads_as_python_rows():
    """ds.with_format("numpy") would give arrays of messages and numpy scalars: the rows are plain Python."""
    import datasets

    from jaxrl_llm.data.sources import load_rows

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ds = datasets.Dataset.from_list([{"messages": msgs, "n": 1}]).with_format("numpy")
    (row,) = load_rows(ds)
    assert row == {"messages": msgs, "n": 1} and type(row["messages"]) is list and type(row["n"]) is int


def test_text_rows_cached_with_eos_are_not_read_back_without(tmp_path):
    """A base model's tokenizer (no chat template, so no turn EOS in the key): the token cache written by a start
    with data.add_eos=True is not what a start with add_eos=False reads (and back)."""
    import json

    from recipes import recipe
    from test_rev30_tok import _tokenizer

    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.data.cache import DataCache
    from jaxrl_llm.run_tokenizer import load_run_tokenizer

    tok = _tokenizer("llama3", chat_template="x")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"text": "What is 2+2? It is 4."}) + "\n")
    for add_eos in (True, False, True):
        c = recipe("sft_tiny", {"tokenizer": str(tmp_path / "tok"), "data.source": str(src), "data.num_examples": -1,
                                "data.max_len": 32, "data.add_eos": add_eos})
        cache = DataCache(str(tmp_path / "cache"))
        ((ids, _),), _ = sft.prepare(c, load_run_tokenizer(c, needs_template=False), cache)
        cache.flush()
        assert (int(ids[-1]) == tok.eos_token_id) == add_eos


def test_earlier_best_reads_the_newest_earlier_config_that_named_a_metric(tmp_path):
    """The last start had best_metric off and saved nothing (run_config.json names none); the newest earlier copy
    that names one decides, by its own best_mode (run_config.json.2.old is newer than .1.old)."""
    import json

    from jaxrl_llm.resume import earlier_best

    for step, loss, acc in ((1, 0.5, 0.2), (2, 0.9, 0.7), (3, 0.7, 0.4)):
        os.makedirs(tmp_path / "checkpoints" / str(step) / "metrics")
        (tmp_path / "checkpoints" / str(step) / "metrics" / "metrics").write_text(
            json.dumps({"val_loss": loss, "val_acc": acc}))
    for name, cc in (("run_config.json.1.old", {"best_metric": "val_loss", "best_mode": "min"}),
                     ("run_config.json.2.old", {"best_metric": "val_acc", "best_mode": "max"}),
                     ("run_config.json", {"best_metric": ""})):
        (tmp_path / name).write_text(json.dumps({"checkpoint": cc}))
    assert earlier_best(str(tmp_path), "min") == (2,)
    (tmp_path / "run_config.json.2.old").write_text(json.dumps({"checkpoint": {"best_metric": "val_acc"}}))
    assert earlier_best(str(tmp_path), "min") == (1,)  # no best_mode recorded: the program's default
    assert earlier_best(str(tmp_path), "max") == (2,)


def test_logged_metrics_is_the_row_of_the_step_asked(tmp_path):
    """The row of the checkpoint's step, not the last one (a run killed after logging past its last checkpoint,
    then given that step as max_steps), its latest copy, past a torn line; without "step"."""
    from jaxrl_llm.workdir import logged_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 2, "lo\n'
                                            '{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n')
    assert logged_metrics(str(tmp_path), 2) == {"loss": 2.0}
    assert logged_metrics(str(tmp_path), 4) == {} and logged_metrics(str(tmp_path / "none"), 1) == {}


def test_edits_since_last_start_name_the_data_tokenizer_and_model_keys_only(tmp_path):
    import json

    import ml_collections

    from jaxrl_llm.resume import edits_since_last_start

    before = {"tokenizer": "a", "data": {"packing": False}, "model": {"path": "m"}, "optimizer": {"lr": 1.0}}
    (tmp_path / "run_config.json").write_text(json.dumps(before))
    now = ml_collections.ConfigDict({"tokenizer": "b", "data": {"packing": True}, "model": {"path": "m"},
                                     "optimizer": {"lr": 2.0}})
    assert edits_since_last_start(str(tmp_path), now) == ['data.packing: false -> true', 'tokenizer: "a" -> "b"']


def test_a_start_with_best_metric_on_does_not_look_for_an_earlier_best(monkeypatch, tmp_path):
    """(it would keep another checkpoint and warn that best_metric is off)"""
    import ml_collections
    from test_rev31_mp import _FakeCheckpointer

    from jaxrl_llm import resume

    monkeypatch.setattr(resume, "earlier_best", lambda *a: pytest.fail("earlier_best read with best_metric on"))
    monkeypatch.setattr(resume, "Checkpointer", _FakeCheckpointer)
    monkeypatch.setattr(resume.jax, "process_index", lambda: 0)
    monkeypatch.setattr(resume.distributed, "allgather_json", lambda obj: [obj])
    monkeypatch.setattr(resume.models, "config_to_hf", lambda cfg: {})
    monkeypatch.setattr(resume, "source_generation_config", lambda config: None)
    config = ml_collections.ConfigDict(dict(export_hf=False, max_steps=4, model=dict(dtype="float32"), checkpoint=dict(
        every_steps=1, keep=1, best_metric="val_loss", best_mode="min")))
    cfg = SimpleNamespace(compute_dtype="float32", attention_impl="xla")
    tokenizer = SimpleNamespace(save_pretrained=lambda path: os.makedirs(path))
    ckpt = resume.prepare_workdir(str(tmp_path), cfg, config, tokenizer, default_best_mode="min", run_meta={})
    assert ckpt.kept_steps == ()
