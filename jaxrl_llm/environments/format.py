"""A format reward: `reward` when the completion matches a regex (e.g. a required <answer> tag), else 0.

    env = FormatEnvironment(pattern=r"<answer>.*?</answer>", reward=1.0, full_match=False)

The pattern is compiled with re.DOTALL; full_match=True requires the whole completion (stripped of surrounding
whitespace) to match, otherwise a match anywhere counts. Runs in this process (a regex is cheap; the pattern
is the recipe author's, so catastrophic backtracking is their responsibility).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch


class FormatEnvironment:
    """info[i]: {"format_ok": bool}; counts: {"format_miss": samples that did not match}."""

    def __init__(self, pattern: str = r"<answer>.*?</answer>", reward: float = 1.0, full_match: bool = False,
                 name: str = "format"):
        try:
            self._rx = re.compile(pattern, re.DOTALL)
        except (re.error, TypeError) as e:
            raise ValueError(f"format: pattern {pattern!r} is not a valid regex ({e})") from e
        self.name = name
        self.pattern = pattern
        self.reward = float(reward)
        self.full_match = bool(full_match)

    def matches(self, completion: str) -> bool:
        if self.full_match:
            return self._rx.fullmatch(completion.strip()) is not None
        return self._rx.search(completion) is not None

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        ok_N = np.array([self.matches(c) for c in completions], bool)
        return EnvResult(rewards=np.where(ok_N, self.reward, 0.0).astype(np.float32),
                         info=[{"format_ok": bool(ok)} for ok in ok_N],
                         counts={"format_miss": int((~ok_N).sum())})

    def close(self) -> None:
        pass
