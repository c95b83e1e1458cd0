"""Reasoning models in multi-turn episodes: number_guess reads the guess after the reply's last </think> (a number
tried while thinking is not the guess; a reply cut off inside its think block, opened by it or by the generation
prompt, has none), and the rollout gives the environment the end of the row each reply continues."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.environments import NumberGuessEnvironment, make_environment
from jaxrl_llm.multiturn import Generation, multi_turn_rollout, observation_delta

META = {"secret": 37, "lo": 1, "hi": 100}


def _conv(reply: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": "Guess my number."}, {"role": "assistant", "content": reply}]


def test_number_guess_reads_the_guess_after_thinking() -> None:
    env = NumberGuessEnvironment()
    replies = ["<think>Maybe 37? The middle is 50, try that.</think>\n50",  # drafted 37, guessed 50
               "<think>1 to 100, so 37 could be it",  # cut off mid-reasoning: no guess
               "</think>\n37",  # the generation prompt opened the block
               "37"]  # no think tags: read whole
    res = env.step([_conv(r) for r in replies], [META] * 4, [1] * 4)
    assert [i["guess"] for i in res.info] == [50, None, 37, 37]
    assert res.rewards.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert res.counts["no_number"] == 1 and res.observations[1].startswith("Please reply")
    # a generation prompt that opens <think>: a reply without tags was cut off inside it
    opened = env.step([_conv("so 37")], [META], [1], prompts=["<|im_start|>assistant\n<think>\n"])
    assert opened.info[0]["guess"] is None and not opened.done[0]
    single = env.score(["<|im_start|>assistant\n<think>\n", ""], ["so 37", "<think>37?</think>50"], [META] * 2)
    assert single.rewards.tolist() == [0.0, 0.0]
    whole = make_environment({"name": "number_guess", "strip_thinking": False})
    assert whole.step([_conv(replies[1])], [META], [1]).info[0]["guess"] == 37


class _CharTok:
    """One token per character; a template whose assistant turns open with "<think>\\n" (an R1-style generation
    prompt, kept when the reply is rendered, as multi-turn rollouts need)."""

    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, chat_template=None):
        opens = {"assistant": "<think>\n"}
        text = "".join(f"<{m['role']}>{opens.get(m['role'], '')}{m['content']}</s>" for m in messages)
        return text + ("<assistant><think>\n" if add_generation_prompt else "")


def test_rollout_passes_the_prompt_that_opened_thinking() -> None:
    tok = _CharTok()
    messages = [{"role": "user", "content": "Guess."}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    script = ["I would say 37 but", "25</think>37"]  # turn 1 cut inside the opened block; turn 2 answers

    def generate(prompts, caps, turn):
        toks = [tok.encode(script[turn])[:caps[0]] for _ in prompts]
        return Generation(toks, [[-1.0] * len(t) for t in toks], ["length" if turn == 0 else "stop"])

    out = multi_turn_rollout(generate, tok, NumberGuessEnvironment(), [prompt], [messages], [META], max_turns=2,
                             max_new_tokens=40, max_total_tokens=200)
    assert out.turns == [2] and out.info[0]["guess"] == 37 and out.info[0]["episode_end"] == "done"
    assert np.allclose(out.rewards, [1.0])  # turn 1 (no guess: 0) + turn 2 (right: 1)


class _Qwen3LikeTok(_CharTok):
    """Qwen3's way with replies: earlier ones lose their reasoning, the last one after the user's gets a think
    block (an empty one when it has none)."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, chat_template=None):
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        out = ""
        for i, m in enumerate(messages):
            content = m["content"]
            if m["role"] == "assistant":
                reasoning, _, answer = content.rpartition("</think>")
                reasoning = reasoning.split("<think>")[-1].strip("\n")
                content = f"<think>\n{reasoning}\n</think>\n\n{answer.lstrip()}" if i > last_user else answer
            out += f"<{m['role']}>{content}</s>"
        return out + ("<assistant>" if add_generation_prompt else "")


@pytest.mark.parametrize("reply", ["<think>\nlow\n</think>\n\n50", "50"])
def test_a_template_that_rewrites_reasoning_is_refused_saying_so(reply) -> None:
    tok = _Qwen3LikeTok()
    conv = _conv(reply)
    with pytest.raises(ValueError, match="rewrites the reply's <think> block, as Qwen3's"):
        observation_delta(tok, conv, tok.encode(reply), "Too high.")
