"""Multi-turn environments: the policy answers, the environment replies with a new user message (an observation)
or ends the episode, the policy answers again (`jaxrl_llm.multiturn.multi_turn_rollout` drives the loop).

    env = NumberGuessEnvironment()
    res = env.step(conversations, metadata, turns)   # each conversation ends with the assistant message just
                                                     # generated; turns[i]: which answer of its episode it is (1..)
    res.rewards [N], res.done [N], res.observations[i] (the next user message, None when done), res.info, res.counts

`step` sees only the samples still playing. Like `Environment.score`, it never raises for a bad completion
(no reward or a penalty, a count, and an observation saying what was expected); it raises only for misuse (a
conversation that does not end with an assistant message, metadata without what the task needs).

"number_guess": the task's metadata holds a secret integer ("secret") in ["lo", "hi"]; the model replies with a
number (the last integer of its reply counts). Right: reward turn_discount ** (turn - 1) (turn 1 = the first
answer; the default discount 1.0 gives 1 whenever it is found) and the episode ends. Wrong: reward 0 and the
observation "Too low. Guess again." / "Too high. Guess again.". No integer: reward -invalid_penalty (default 0)
and an observation asking for one (counted as "no_number"). The rollout loop sums the turns' rewards and ends
episodes that reach rollout.max_turns. The environment also scores single-turn completions (`score`: the first
answer is right), so it works with rollout.max_turns=1 and in evaluation.

Reasoning models (`strip_thinking`, default on, as the single-turn environments): the guess is read from the reply's
text after its last </think> (extract.after_thinking), so a number tried while thinking is not the guess, and a
reply cut off inside its think block (opened by it, or by a generation prompt ending in "<think>\\n": `step`'s
`prompts`, which the rollout passes) has no guess ("no_number").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch
from jaxrl_llm.environments.extract import after_thinking

_INT = re.compile(r"-?\d+")
_MAX_DIGITS = 18  # longer integers are clamped (int() of thousands of digits raises in Python 3.11)


@dataclasses.dataclass
class TurnResult:
    """One environment step over the active samples. rewards [N] float32: this turn's reward; done [N] bool: the
    episode ended; observations[i]: the next user message (a str when not done, None when done); info[i]:
    per-sample details; counts: events worth a logged count, summed over the batch."""

    rewards: np.ndarray
    done: np.ndarray
    observations: list[str | None]
    info: list[dict[str, Any]]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


class MultiTurnEnvironment(Protocol):
    """Answers each active conversation (ending with the assistant message just generated) with a reward and
    either an observation or the end of the episode. Never raises for a bad completion."""

    name: str

    def step(self, conversations: list[list[dict[str, str]]], metadata: list[dict[str, Any]],
             turns: list[int] | None = None) -> TurnResult:
        """turns[i]: the 1-based turn of conversation i's last message (its episode's count of generated replies;
        the task's own messages, few-shot examples included, do not count). The rollout always passes it, and
        passes `prompts` (the decoded end of the row each reply continues) to a step that takes that keyword."""
        ...


def is_multi_turn(env: Any) -> bool:
    """Whether `env` can play episodes of several turns (has a `step` method)."""
    return callable(getattr(env, "step", None))


def check_turn_result(res: TurnResult, n: int, env_name: str) -> None:
    """ValueError naming the environment and the sample unless `res` answers n samples consistently."""
    rewards, done = np.asarray(res.rewards), np.asarray(res.done)
    if rewards.shape != (n,) or done.shape != (n,):
        raise ValueError(f"environment {env_name!r}: step() returned rewards of shape {rewards.shape} and done of "
                         f"shape {done.shape} for {n} samples")
    if len(res.observations) != n or len(res.info) != n:
        raise ValueError(f"environment {env_name!r}: step() returned {len(res.observations)} observations and "
                         f"{len(res.info)} info entries for {n} samples")
    for i in range(n):
        if not done[i] and not isinstance(res.observations[i], str):
            raise ValueError(f"environment {env_name!r}: sample {i} is not done but its observation is "
                             f"{res.observations[i]!r}; an episode that goes on needs the next user message")


def last_integer(text: str) -> int | None:
    """The last integer written in `text` (None if there is none); integers over 18 digits are clamped."""
    found = _INT.findall(text)
    if not found:
        return None
    s = found[-1]
    sign = -1 if s.startswith("-") else 1
    digits = s.lstrip("-").lstrip("0") or "0"
    return sign * (10 ** _MAX_DIGITS if len(digits) > _MAX_DIGITS else int(digits))


class NumberGuessEnvironment:
    """Guess the task's secret integer. metadata[i]: {"secret": int, "lo": int, "hi": int} ("lo"/"hi" default to
    the constructor's). turn_discount in (0, 1]: the reward of a right answer at turn t is turn_discount ** (t-1).
    invalid_penalty >= 0: a reply without an integer gets reward -invalid_penalty. strip_thinking: read the guess
    from the text after the reply's last </think>; one cut off inside its think block has none (False: the whole
    reply).
    info[i]: {"guess": int | None, "correct": bool, "turn": t}; counts: correct, too_low, too_high, no_number."""

    def __init__(self, lo: int = 1, hi: int = 100, turn_discount: float = 1.0, invalid_penalty: float = 0.0,
                 name: str = "number_guess", strip_thinking: bool = True):
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int) \
                or lo > hi:
            raise ValueError(f"number_guess: 'lo' and 'hi' must be integers with lo <= hi, got lo={lo!r}, hi={hi!r}")
        if isinstance(turn_discount, bool) or not isinstance(turn_discount, int | float) \
                or not 0 < turn_discount <= 1:
            raise ValueError(f"number_guess: 'turn_discount' must be in (0, 1], got {turn_discount!r}")
        if isinstance(invalid_penalty, bool) or not isinstance(invalid_penalty, int | float) or invalid_penalty < 0:
            raise ValueError(f"number_guess: 'invalid_penalty' must be a number >= 0, got {invalid_penalty!r}")
        self.invalid_penalty = float(invalid_penalty)
        self.name = name
        self.lo, self.hi = lo, hi
        self.turn_discount = float(turn_discount)
        self.strip_thinking = bool(strip_thinking)

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """ValueError naming the first task without a secret to guess."""
        for i, m in enumerate(metadata):
            self._task(i, m)

    def _task(self, i: int, meta: Any) -> tuple[int, int, int]:
        if not isinstance(meta, dict):
            raise ValueError(f"{self.name}: metadata[{i}] must be a mapping with an integer 'secret', got "
                             f"{type(meta).__name__}")
        vals = (meta.get("secret"), meta.get("lo", self.lo), meta.get("hi", self.hi))
        if any(isinstance(v, bool) or not isinstance(v, int) for v in vals):
            raise ValueError(f"{self.name}: metadata[{i}] needs an integer 'secret' (and integer 'lo'/'hi' if "
                             f"given), got secret={vals[0]!r}, lo={vals[1]!r}, hi={vals[2]!r}")
        return vals

    def _judge(self, text: str, prompt: str, secret: int, lo: int, hi: int, turn: int, counts: dict[str, int]
               ) -> tuple[float, bool, str | None, dict[str, Any]]:
        if self.strip_thinking:
            text = after_thinking(text, prompt) or ""
        guess = last_integer(text)
        info = {"guess": guess, "correct": guess == secret, "turn": turn}
        if guess is None:
            counts["no_number"] += 1
            return -self.invalid_penalty, False, f"Please reply with only a whole number between {lo} and {hi}.", info
        if guess == secret:
            counts["correct"] += 1
            return self.turn_discount ** (turn - 1), True, None, info
        low = guess < secret
        counts["too_low" if low else "too_high"] += 1
        return 0.0, False, f"Too {'low' if low else 'high'}. Guess again.", info

    def step(self, conversations: list[list[dict[str, str]]], metadata: list[dict[str, Any]],
             turns: list[int] | None = None, prompts: list[str] | None = None) -> TurnResult:
        """turns: see MultiTurnEnvironment.step; None counts the conversation's assistant messages (right when the
        task's prompt has none). prompts[i]: the text reply i continues (at least its generation prompt's end),
        which may open its think block; None: no prompt opens one."""
        if len(conversations) != len(metadata) or (turns is not None and len(turns) != len(conversations)) \
                or (prompts is not None and len(prompts) != len(conversations)):
            raise ValueError(f"{self.name}: step() got {len(conversations)} conversations, {len(metadata)} "
                             f"metadata entries, {'no' if turns is None else len(turns)} turns and "
                             f"{'no' if prompts is None else len(prompts)} prompts")
        counts = {"correct": 0, "too_low": 0, "too_high": 0, "no_number": 0}
        rewards, done, obs, info = [], [], [], []
        for i, (conv, meta) in enumerate(zip(conversations, metadata, strict=True)):
            if not conv or conv[-1].get("role") != "assistant" or not isinstance(conv[-1].get("content"), str):
                raise ValueError(f"{self.name}: conversation {i} must end with the assistant message to answer")
            secret, lo, hi = self._task(i, meta)
            turn = sum(m.get("role") == "assistant" for m in conv) if turns is None else int(turns[i])
            prompt = "" if prompts is None else prompts[i]
            r, d, o, inf = self._judge(conv[-1]["content"], prompt, secret, lo, hi, turn, counts)
            rewards.append(r)
            done.append(d)
            obs.append(o)
            info.append(inf)
        return TurnResult(np.asarray(rewards, np.float32), np.asarray(done, bool), obs, info, counts)

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        """Single-turn scoring: reward 1 when the completion's last integer (after its thinking) is the secret."""
        check_batch(prompts, completions, metadata)
        counts = {"correct": 0, "too_low": 0, "too_high": 0, "no_number": 0}
        rewards, info = [], []
        for i, (p, c, meta) in enumerate(zip(prompts, completions, metadata, strict=True)):
            r, _, _, inf = self._judge(c, p, *self._task(i, meta), 1, counts)
            rewards.append(r)
            info.append(inf)
        return EnvResult(np.asarray(rewards, np.float32), info, counts)

    def close(self) -> None:
        pass


MULTI_TURN_ENVIRONMENTS: dict[str, type] = {"number_guess": NumberGuessEnvironment}


def multi_turn_names() -> Sequence[str]:
    """Names of the environments (`env.name`) that can play episodes of several turns."""
    return sorted(MULTI_TURN_ENVIRONMENTS)
