"""A format reward: `reward` when the completion matches a regex (e.g. a required <answer> tag), else 0.

    env = FormatEnvironment(pattern=r"<answer>.*?</answer>", reward=1.0, full_match=False)

The pattern is compiled with re.DOTALL; full_match=True requires the whole completion (stripped of surrounding
whitespace) to match, otherwise a match anywhere counts. Runs in this process (a regex is cheap; the pattern
is the recipe author's, so catastrophic backtracking is their responsibility).

Reasoning models (`strip_thinking`): by default (None) the pattern is matched against the text after the
completion's last </think>, as the math, reasoning_gym and code environments read their answers (an <answer> tag
written while thinking does not count, and a completion cut off inside its think block does not match), unless the
pattern itself mentions "think" (an R1-style `<think>.*?</think>\\s*<answer>.*?</answer>` checks the whole
completion). True / False: always the text after thinking / always the whole completion.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch
from jaxrl_llm.environments.extract import after_thinking


class FormatEnvironment:
    """info[i]: {"format_ok": bool}; counts: {"format_miss": samples that did not match}."""

    def __init__(self, pattern: str = r"<answer>.*?</answer>", reward: float = 1.0, full_match: bool = False,
                 name: str = "format", strip_thinking: bool | None = None):
        try:
            self._rx = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as e:
            raise ValueError(f"format: pattern {pattern!r} is not a valid regex ({e})") from e
        self.name = name
        self.pattern = pattern
        self.reward = float(reward)
        self.full_match = bool(full_match)
        self.strip_thinking = "think" not in pattern.lower() if strip_thinking is None else bool(strip_thinking)

    def matches(self, completion: str, prompt: str = "") -> bool:
        if self.strip_thinking:
            completion = after_thinking(completion, prompt)
            if completion is None:
                return False
        if self.full_match:
            return self._rx.fullmatch(completion.strip()) is not None
        return self._rx.search(completion) is not None

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        ok_N = np.array([self.matches(c, p) for p, c in zip(prompts, completions, strict=True)], bool)
        return EnvResult(rewards=np.where(ok_N, self.reward, 0.0).astype(np.float32),
                         info=[{"format_ok": bool(ok)} for ok in ok_N],
                         counts={"format_miss": int((~ok_N).sum())})

    def close(self) -> None:
        pass
