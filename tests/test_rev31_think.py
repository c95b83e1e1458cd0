"""Reasoning-model completions (<think>...</think>answer) in the reward environments: the answer is read from the
text after the last </think>; a completion cut off inside its think block (opened by it, or by a generation prompt
ending in "<think>\\n") has none; a completion without think tags is read whole, as before."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.environments import (
    CodeEnvironment,
    FormatEnvironment,
    MathEnvironment,
    ReasoningGymEnvironment,
    make_environment,
    reasoning_gym_tasks,
)
from jaxrl_llm.environments.extract import after_thinking

OPENS = "<|im_start|>assistant\n<think>\n"  # a generation prompt that opens the think block (DeepSeek-R1 distills)


@pytest.mark.parametrize("prompt, completion, expected", [
    ("", "<think>a \\boxed{1}</think>The answer is 2.", "The answer is 2."),
    ("", "<think>a</think>x<think>b</think> y", " y"),  # the last block closes last
    ("", "<think>still \\boxed{1} thinking", None),  # truncated mid-reasoning
    ("", "<think>a</think>x<think>again", None),  # a second block left open
    (OPENS, "reasoning \\boxed{1}", None),  # the prompt opened it and it never closed
    (OPENS, "reasoning</think>\n\\boxed{2}", "\n\\boxed{2}"),
    ("<think>\n\n</think>\n\n", "\\boxed{3}", "\\boxed{3}"),  # Qwen3 with enable_thinking=false: closed in the prompt
    ("Reason in <think> </think> tags.", "\\boxed{4}", "\\boxed{4}"),  # a prompt that only names the tags
    ("", "\\boxed{5}", "\\boxed{5}"),
])
def test_after_thinking(prompt: str, completion: str, expected: str | None) -> None:
    assert after_thinking(completion, prompt) == expected


def test_math_reads_the_answer_after_thinking() -> None:
    prompts = ["", "", OPENS, OPENS, ""]
    completions = ["<think>maybe \\boxed{907}</think>The answer is 908.",  # auto: boxed used to win from anywhere
                   "<think>so it is \\boxed{907}, wait",  # truncated: no final answer
                   "so it is \\boxed{907}, wait",  # truncated after a prompt that opened <think>
                   "hmm \\boxed{1}</think>Final answer: 907",
                   "\\boxed{907}"]
    meta = [{"answer": "907"}] * 5
    env = MathEnvironment(answer_format="auto", num_workers=0, sandbox=False)
    res = env.score(prompts, completions, meta)
    np.testing.assert_array_equal(res.rewards, [0, 0, 0, 1, 1])
    assert [i["extracted"] for i in res.info] == ["908", None, None, "907", "907"]
    assert res.counts["no_answer"] == 2
    whole = MathEnvironment(answer_format="auto", num_workers=0, sandbox=False, strip_thinking=False)
    np.testing.assert_array_equal(whole.score(prompts, completions, meta).rewards, [1, 1, 1, 0, 1])


def test_reasoning_gym_reads_the_answer_after_thinking() -> None:
    meta = [reasoning_gym_tasks("basic_arithmetic", size=1, seed=0)[0].metadata] * 3
    gold = meta[0]["answer"]
    completions = [f"<think>Is it <answer>{gold}</answer>? No.</think><answer>{gold}1</answer>",
                   f"<think><answer>{gold}</answer> then I should check",
                   f"<think>ok</think><answer>{gold}</answer>"]
    res = ReasoningGymEnvironment(num_workers=0, sandbox=False).score([""] * 3, completions, meta)
    assert res.rewards[0] < 1 and res.rewards[1] == 0 and res.rewards[2] == 1
    assert res.info[1]["extracted"] is None and res.counts["no_answer"] == 1


def test_format_matches_the_final_answer_unless_the_pattern_is_about_thinking() -> None:
    completions = ["<think>I will write <answer>5</answer></think>It is 5.",  # the tag only while thinking
                   "<think>x</think>\n<answer>5</answer>",
                   "<think>cut off <answer>5</answer>"]
    env = make_environment({"name": "format"})
    assert env.score([""] * 3, completions, [{}] * 3).info == [{"format_ok": v} for v in (False, True, False)]
    r1 = FormatEnvironment(pattern=r"<think>.*?</think>\s*<answer>.*?</answer>", full_match=True)
    assert [i["format_ok"] for i in r1.score([""] * 3, completions, [{}] * 3).info] == [False, True, False]
    assert not r1.strip_thinking
    whole = FormatEnvironment(strip_thinking=False)
    assert whole.score([""] * 3, completions, [{}] * 3).counts == {"format_miss": 0}


def test_code_from_thinking_is_not_run_as_the_answer() -> None:
    draft = "```python\ndef inc(x):\n    return x + 1\n```"
    completions = [f"<think>\n{draft}\n</think>\nUsage:\n```python\nprint(inc(1))\n```\n",  # a final block follows
                   f"<think>\n{draft}\n</think>\nI could not solve it.",  # no code after thinking
                   f"<think>\n{draft}\nand now to test",  # cut off while thinking
                   f"<think>ok</think>\n{draft}\n"]
    meta = [{"tests": "def check(f):\n    assert f(1) == 2\n", "entry_point": "inc"}] * 4
    with CodeEnvironment(num_workers=1, timeout_s=10) as env:
        res = env.score([""] * 4, completions, meta)
    np.testing.assert_array_equal(res.rewards, [0, 0, 0, 1])
    assert res.counts["no_code"] == 2 and [i["code_found"] for i in res.info] == [True, False, False, True]


@pytest.mark.parametrize("name", ["eval_gsm8k", "eval_rg", "eval_humaneval", "grpo_demo", "grpo_guess_tiny"])
def test_recipes_carry_strip_thinking_so_the_command_line_can_turn_it_off(name):
    """The eval and GRPO recipes name env.strip_thinking, so --config.env.strip_thinking=False reaches the
    environment (no recipe had the key: the override was refused as an unknown key)."""
    from recipes import recipe

    from jaxrl_llm.environments import make_environment

    for value in (True, False):
        env = make_environment(recipe(name, {"env.strip_thinking": value}).env.to_dict())
        try:
            assert env.strip_thinking is value
        finally:
            getattr(env, "close", lambda: None)()
