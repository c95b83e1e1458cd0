"""Math answers checked with math-verify: reward 1 when the completion's final answer equals metadata["answer"].

    env = MathEnvironment(answer_format="boxed", timeout_s=5.0, num_workers=2)
    result = env.score(prompts, completions, [{"answer": "72"}, ...])
    result.rewards      # [N] float32 in {0, 1}
    result.info[i]      # {"extracted": "72" | None, "correct": bool[, "error": reason]}
    result.counts       # {"timeouts", "errors", "no_answer"}

As in NeMo RL's `hf_math_verify`, the gold answer is wrapped as `\\boxed{gold}` and both sides go through
math-verify's parse() (gold first, then `verify(gold, pred)`). Unlike it, the prediction is the answer that
`answer_format` extracts (see extract.py), not whatever math-verify finds anywhere in the text: a completion
without an answer in the requested format scores 0 and counts as "no_answer". Extraction and verification run
in the worker pool; a sample whose check times out or fails scores 0 (counted as "timeouts" / "errors").

Reasoning models (`strip_thinking`, default on): the answer is extracted from the text after the completion's last
</think> (extract.after_thinking), so a \\boxed{} written while thinking does not count when a final answer
follows, and a completion still inside its <think> block (opened by it, or by a generation prompt that ends in
"<think>\\n") was cut off mid-reasoning: it has no answer. A completion without think tags is read whole.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch
from jaxrl_llm.environments.extract import (
    check_answer_format,
    extract_answer,
    extract_answer_is,
    final_texts,
    normalize_answer,
    normalize_number,
    number_before_words,
)
from jaxrl_llm.environments.pool import ScoringPool, outcome_counts


def _wrap(answer: str) -> str:
    return answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"


_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def _is_words(s: str) -> bool:
    return _WORDS.fullmatch(s.strip()) is not None


def _plain(s: str) -> str:
    return " ".join(s.split()).lower()


def answers_match(gold: str, pred: str, timeout_s: int | None = None) -> bool:
    """Whether `pred` equals `gold`: the same normalised string, or equal for math-verify.

    timeout_s: math-verify's own (signal-based) limit per parse/compare; works only on a main thread. None
    disables it: the caller enforces a limit (the worker pool does).
    """
    from math_verify import parse, verify

    if timeout_s is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout is disabled" warning
    gold_n, pred_n = normalize_answer(str(gold)), normalize_answer(pred)
    if gold_n and _plain(gold_n) == _plain(pred_n):
        return True
    if _is_words(gold_n) and _is_words(pred_n):
        # math-verify reads a bare word as a product of one-letter variables, in which the order of the letters
        # does not count ("listen" = "silent", "no" = "on"): words of three letters or more are text, and differ.
        if max(len(w) for w in (gold_n + " " + pred_n).split()) >= 3:
            return False
    # A number with a unit math-verify lacks is that number, on either side: "18 cookies" against a gold of 18,
    # 98 against a gold of "98 values" (CHAMP writes some golds so).
    gold_number = normalize_number(gold_n) or number_before_words(gold_n)
    if gold_number is not None:
        pred_number = normalize_number(pred_n) or number_before_words(pred_n)
        if pred_number == gold_number:
            return True
        gold_n, pred_n = gold_number, pred_number or pred_n  # math-verify reads "98 values" as no expression
    gold_p = parse(_wrap(gold_n), parsing_timeout=timeout_s)
    pred_p = parse(_wrap(pred_n), parsing_timeout=timeout_s)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=timeout_s))


# \text{words} (\textbf, \textit, \textrm, \mathrm, \mbox): the words, "\ " a space
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mbox)\s*\{([^{}]*)\}")


def score_math(completion: str, gold: str, answer_format: str, timeout_s: int | None) -> tuple[float, str | None]:
    """(reward, extracted answer) of one completion; the function the pool runs."""
    extracted = extract_answer(completion, answer_format)
    if extracted is None:
        return 0.0, None
    # An answer that is itself a statement of the answer ("<answer>The answer is 72</answer>", a last line "Final
    # answer: 72", a box holding "\\text{The answer is } 72"): the value it states.
    extracted = extract_answer_is(_TEXT_COMMAND.sub(r"\1", extracted).replace("\\ ", " ")) or extracted
    return (1.0 if answers_match(gold, extracted, timeout_s) else 0.0), extracted


# Warm-up calls for each scoring worker (fixed, trusted inputs): math-verify builds its parsers, and its ANTLR
# parser its prediction tables, on first use. An isolated sample's process starts from the worker's state, so
# constructs seen here are not rebuilt for every sample (measured: 68 -> 38 ms a sample on a mixed set).
_WARMUP = tuple((answers_match, (gold, pred, None)) for gold, pred in (
    ("\\frac{1}{2}", "0.5"), ("x^2+1", "1+x**2"), ("\\sqrt{2}", "2^{1/2}"), ("-3.5", "-7/2"),
    ("2\\pi", "\\pi \\cdot 2"), ("(1, 2]", "(1,2]"), ("\\{1, 2\\}", "\\{2,1\\}"), ("\\text{yes}", "yes"),
    ("10^{3}", "1000"), ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"), ("3x+y", "y+3x"), ("45^\\circ", "45")))


class MathEnvironment:
    """Verifiable math reward (see the module doc). metadata[i]["answer"]: the gold answer (str or number).

    answer_format: "boxed" | "hash" | "answer_tag" | "answer_is" | "last_line" | "auto" | a regex (group 1).
    timeout_s: per-sample limit. num_workers: scoring processes (0: in this process; then only math-verify's
    own signal-based timeouts apply, rounded up to whole seconds, and only on the main thread). sandbox: confine
    the scoring processes (math-verify evaluates answers with sympy's parse_expr; see environments/pool.py);
    num_workers=0 needs sandbox=False. isolate: score each sample in a process of its own (pool.py), so that no
    sample's evaluated text can change how another is scored. strip_thinking: extract from the text after the
    last </think>; a completion cut off inside its think block has no answer (False: the whole completion).
    """

    def __init__(self, answer_format: str = "boxed", timeout_s: float = 5.0, num_workers: int = 2,
                 name: str = "math", sandbox: bool = True, isolate: bool = True, strip_thinking: bool = True):
        check_answer_format(answer_format)
        self.name = name
        self.answer_format = answer_format
        self.strip_thinking = bool(strip_thinking)
        self.timeout_s = float(timeout_s)
        self._pool = ScoringPool(num_workers, self.timeout_s, preload=("math_verify",), sandbox=sandbox,
                                 isolate=isolate, warmup=_WARMUP)

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """ValueError naming the first task whose metadata this environment cannot score (no gold 'answer')."""
        for i, m in enumerate(metadata):
            if not isinstance(m, dict) or m.get("answer") is None:
                raise ValueError(f"{self.name}: metadata[{i}] has no 'answer' (the gold answer to check against)")

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        self.check_metadata(metadata)
        golds = [str(m["answer"]) for m in metadata]
        in_process = self._pool.num_workers == 0 and threading.current_thread() is threading.main_thread()
        mv_timeout = max(1, math.ceil(self.timeout_s)) if in_process else None
        texts = final_texts(prompts, completions, self.strip_thinking)
        outcomes = self._pool.map(score_math, [(c, g, self.answer_format, mv_timeout)
                                               for c, g in zip(texts, golds, strict=True)])
        rewards_N = np.zeros(len(outcomes), np.float32)
        info: list[dict[str, Any]] = []
        no_answer = 0
        for i, o in enumerate(outcomes):
            if o.status == "ok":
                rewards_N[i], extracted = o.value
                no_answer += extracted is None
                info.append({"extracted": extracted, "correct": bool(rewards_N[i] > 0)})
            else:
                info.append({"extracted": None, "correct": False, "error": o.error})
        return EnvResult(rewards=rewards_N, info=info, counts={**outcome_counts(outcomes), "no_answer": no_answer})

    def close(self) -> None:
        """Stops the scoring workers."""
        self._pool.close()

    def __enter__(self) -> MathEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
