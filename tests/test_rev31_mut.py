"""Mutation-testing guards for the code changed in review 31: each test pins a behaviour that a hand-made mutant of
that code kept passing the suite (answer extraction after thinking, the emphasis and thousands-separator reading,
the environments' strip_thinking switches, ...)."""

from __future__ import annotations

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
