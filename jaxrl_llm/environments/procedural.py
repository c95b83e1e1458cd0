"""Procedural reasoning tasks from reasoning-gym, scored by each dataset's own `score_answer`.

    tasks = reasoning_gym_tasks("basic_arithmetic", size=100, seed=0)
    env = ReasoningGymEnvironment(answer_format="answer_tag", timeout_s=10.0)
    result = env.score(prompts, completions, [t.metadata for t in tasks])   # rewards in [0, 1]

A task's metadata holds "rg_dataset" (the dataset name) and "rg_entry" (the generated entry, encoded by
`encode_entry` so that it survives JSON exactly: tuples, sets and non-string dict keys are tagged, which some
scorers need, e.g. arc_agi compares tuple grids). Plain JSON entries (as reasoning-gym writes them) are accepted
too. reasoning_gym is imported lazily (about 4 s): by the scoring workers at start-up and by
reasoning_gym_tasks, never by `import jaxrl_llm.environments`.

Three datasets' scorers (reasoning-gym 0.1.25) pay one answer for every task: puzzle24 ("1*2*3*4"), coin_flip ("0")
and game_of_life_halting (anything); they are scored with the check their scorer lacks (`_SCORER_FIXES`).

Scorers are built once per dataset and worker (the first use of a dataset may take a second, e.g. arc_agi, and
counts against that sample's timeout). Datasets whose entries have no single gold answer (e.g. boxnet,
rubiks_cube: "answer" is None) are scored by their own checker all the same. An unknown "rg_dataset" is that
sample's error (counted in "errors"; the trainer process never imports reasoning_gym to check names).

Some generators (word_ladder, knight_swap, ransom_note, ...) draw from sets of strings, whose order Python's hash
randomisation changes from run to run, and a few draw from the global `random` module: unless this process runs
with PYTHONHASHSEED=0, reasoning_gym_tasks generates the entries in a child process that does, with `random` seeded
from the dataset and seed, so that the same (dataset, size, seed, options) give the same tasks in every run and on
every process of a job.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import operator
import os
import pickle
import random
import re
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import EnvResult, Task, check_batch
from jaxrl_llm.environments.extract import check_answer_format, extract_answer, final_texts, last_answer_tag_is_empty
from jaxrl_llm.environments.pool import ScoringPool, outcome_counts

RG_INSTRUCTION = "Give your final answer inside <answer></answer> tags, e.g. <answer>42</answer>."
_TAGS = ("__tuple__", "__set__", "__frozenset__", "__items__")


def encode_entry(x: Any, where: str = "entry") -> Any:
    """A JSON-able form of a reasoning-gym entry that `decode_entry` turns back into an equal object.
    Tuples, sets and dicts with non-string keys become {"__tuple__"|"__set__"|"__frozenset__"|"__items__": [...]};
    numpy arrays and scalars become lists and Python numbers. Anything else: TypeError naming its path."""
    if isinstance(x, str | bool | int | float) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return encode_entry(x.tolist(), where)
    if isinstance(x, list):
        return [encode_entry(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {"__tuple__": [encode_entry(v, f"{where}[{i}]") for i, v in enumerate(x)]}
    if isinstance(x, set | frozenset):
        items = [encode_entry(v, f"{where}{{}}") for v in x]
        try:
            items.sort()
        except TypeError:
            items.sort(key=repr)
        return {"__frozenset__" if isinstance(x, frozenset) else "__set__": items}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and not (len(x) == 1 and next(iter(x)) in _TAGS):
            return {k: encode_entry(v, f"{where}[{k!r}]") for k, v in x.items()}
        return {"__items__": [[encode_entry(k, f"{where} key"), encode_entry(v, f"{where}[{k!r}]")]
                              for k, v in x.items()]}
    raise TypeError(f"{where}: a {type(x).__name__} cannot be stored as JSON")


def decode_entry(x: Any) -> Any:
    """The inverse of encode_entry (plain JSON values pass through)."""
    if isinstance(x, list):
        return [decode_entry(v) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) == 1:
        (key, value), = x.items()
        if key == "__tuple__":
            return tuple(decode_entry(v) for v in value)
        if key == "__set__":
            return {decode_entry(v) for v in value}
        if key == "__frozenset__":
            return frozenset(decode_entry(v) for v in value)
        if key == "__items__":
            return {decode_entry(k): decode_entry(v) for k, v in value}
    return {k: decode_entry(v) for k, v in x.items()}


def _reasoning_gym():
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    return reasoning_gym, DATASETS


def reasoning_gym_datasets() -> list[str]:
    """The dataset names the installed reasoning-gym registers."""
    return sorted(_reasoning_gym()[1])


def _check_dataset(name: str) -> None:
    names = reasoning_gym_datasets()
    if name not in names:
        raise ValueError(f"unknown reasoning-gym dataset {name!r}; valid: {names}")


@functools.cache
def _scorer(dataset: str) -> Callable[[str | None, dict[str, Any]], float]:
    rg, _ = _reasoning_gym()
    score = rg.get_score_answer_fn(dataset)
    fix = _SCORER_FIXES.get(dataset)
    return score if fix is None else functools.partial(fix, score)


# Datasets whose reasoning-gym scorer (0.1.25) gives full reward to one answer for every task, which a policy finds in
# a few steps; each is scored by the dataset's own scorer with the check it lacks.

def _arithmetic(text: str) -> Fraction | None:
    """The exact value of integers joined by + - * / and parentheses; None for anything else (or a division by 0)."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def value(node: ast.expr) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None


def _puzzle24(score: Callable[..., float], answer: str | None, entry: dict[str, Any]) -> float:
    """puzzle24's scorer takes any four numbers in range that make 24 ("1*2*3*4" solves every puzzle) and any value
    that truncates to 24: full reward only for the puzzle's own numbers, each once, with + - * / and parentheses,
    making 24 exactly (else the scorer's 0.01 for an answer)."""
    reward = float(score(answer, entry))
    if reward < 1.0 or answer is None:
        return reward
    numbers = sorted(int(n) for n in re.findall(r"\d+", answer))
    ok = numbers == sorted(entry["metadata"]["numbers"]) and _arithmetic(answer) == 24
    return 1.0 if ok else 0.01


def _coin_flip(score: Callable[..., float], answer: str | None, entry: dict[str, Any]) -> float:
    """coin_flip's scorer gives the share of the gold's leading digits that the answer matches, out of the shorter of
    the two ("0" gets 1.0 for every probability below 1), and 1.0 within 1e-4 (0 for any probability under 1e-4):
    full reward within 1e-4 and 1% of the gold, the matched share out of the longer of the two otherwise."""
    reward = float(score(answer, entry))
    try:
        a = float(Fraction(str(answer).replace(",", "").strip()))
        gold = float(Fraction(str(entry["answer"]).replace(",", "").strip()))
    except (ValueError, ZeroDivisionError, TypeError):
        return reward
    if abs(a - gold) <= min(1e-4, 1e-2 * abs(gold)):
        return 1.0
    a_text, gold_text = f"{a:.10g}", f"{gold:.10g}"
    matched = next((i for i, (x, y) in enumerate(zip(a_text, gold_text, strict=False)) if x != y),
                   min(len(a_text), len(gold_text)))
    return min(reward, matched / max(len(a_text), len(gold_text)))


def _halting(score: Callable[..., float], answer: str | None, entry: dict[str, Any]) -> float:
    """game_of_life_halting's scorer compares bool(answer) with bool(gold), both non-empty strings: any answer got
    1.0. The answer must be the gold, 'True' or 'False' (any case)."""
    return float(answer is not None and answer.strip().lower() == str(entry["answer"]).strip().lower())


_SCORER_FIXES: dict[str, Callable[..., float]] = {"puzzle24": _puzzle24, "coin_flip": _coin_flip,
                                                   "game_of_life_halting": _halting}


def score_reasoning_gym(completion: str, dataset: str, entry: Any, answer_format: str) -> tuple[float, str | None]:
    """(reward in [0, 1], extracted answer) of one completion; the function the pool runs."""
    answer = extract_answer(completion, answer_format)
    if answer is None and answer_format in ("answer_tag", "auto") and last_answer_tag_is_empty(completion):
        answer = ""  # an empty <answer></answer>: the gold of some tasks ("ab" programs that cancel out)
    if answer is None:
        return 0.0, None
    reward = float(_scorer(dataset)(answer, decode_entry(entry)))
    return (min(max(reward, 0.0), 1.0) if math.isfinite(reward) else 0.0), answer


def reasoning_gym_tasks(dataset: str, size: int, seed: int, system_prompt: str | None = None, *,
                        answer_instruction: str | None = RG_INSTRUCTION, **dataset_kwargs: Any) -> list[Task]:
    """`size` tasks of a reasoning-gym dataset (deterministic in seed and kwargs). The user message is the
    question, a blank line and `answer_instruction` (None/"": the bare question); a system message comes first
    when `system_prompt` is given. metadata: {"rg_dataset", "rg_entry" (encode_entry), "answer" (the entry's
    gold answer, may be None), "env": "reasoning_gym"}. dataset_kwargs: fields of the dataset's config."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"reasoning_gym_tasks: size must be an int >= 1, got {size!r}")
    _check_dataset(dataset)
    _, registry = _reasoning_gym()
    config_cls = registry[dataset][1]
    fields = sorted(f.name for f in dataclasses.fields(config_cls))
    unknown = sorted(set(dataset_kwargs) - set(fields))
    if unknown:
        raise ValueError(f"reasoning-gym dataset {dataset!r}: unknown option(s) {unknown}; valid: "
                         f"{[f for f in fields if f not in ('size', 'seed')]}")
    tasks = []
    for question, entry, answer in _entries(dataset, size, seed, dataset_kwargs):
        user = f"{question}\n\n{answer_instruction}" if answer_instruction else question
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": user}]
        meta = {"rg_dataset": dataset, "rg_entry": entry, "answer": answer, "env": "reasoning_gym"}
        tasks.append(Task(messages=tuple(messages), metadata=meta))
    return tasks


def _entries(dataset: str, size: int, seed: int, dataset_kwargs: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(question, encoded entry, encoded answer) of each generated entry, generated under PYTHONHASHSEED=0 (in a
    child process unless this one runs with it). The child gets the arguments pickled (this process's own values:
    numpy numbers, reasoning-gym's DatasetSpec) and answers in JSON; its TypeError, ValueError or KeyError is
    raised here as the same type, as in-process generation would raise it."""
    if os.environ.get("PYTHONHASHSEED") == "0":
        return generate_entries(dataset, size, seed, dataset_kwargs)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    r = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps((dataset, size, seed, dataset_kwargs)),
                       env=env, capture_output=True)
    out = r.stdout.decode("utf-8", "replace").rpartition(_MARK)
    if r.returncode or not out[1]:
        last = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"reasoning-gym dataset {dataset!r}: generating {size} entries failed: {last}")
    answer = json.loads(out[2])  # after anything a generator printed
    if "error" in answer:
        kind = {"TypeError": TypeError, "ValueError": ValueError, "KeyError": KeyError}.get(answer["error"])
        if kind is None:
            raise RuntimeError(f"reasoning-gym dataset {dataset!r}: generating {size} entries failed: "
                               f"{answer['error']}: {answer['message']}")
        raise kind(answer["message"])
    return [tuple(x) for x in answer["entries"]]


_MARK = "--reasoning-gym entries--"
_CHILD = f"""
import json, pickle, sys
from jaxrl_llm.environments.procedural import generate_entries
try:
    answer = {{"entries": generate_entries(*pickle.load(sys.stdin.buffer))}}
except Exception as e:
    answer = {{"error": type(e).__name__, "message": str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)}}
sys.stdout.write("\\n" + {_MARK!r} + json.dumps(answer))
"""


def generate_entries(dataset: str, size: int, seed: int, dataset_kwargs: dict[str, Any]) -> list[list[Any]]:
    """[question, encode_entry(entry), encode_entry(answer)] of `size` entries of a reasoning-gym dataset. A few
    generators also draw from the global `random` module (list_functions): it is seeded from (dataset, seed) for
    the call, and its state restored after."""
    rg, _ = _reasoning_gym()
    state = random.getstate()
    random.seed(f"{dataset}:{seed}")
    try:
        try:
            data = rg.create_dataset(dataset, size=size, seed=seed, **dataset_kwargs)
        except AssertionError as e:  # reasoning-gym configs validate with assert
            raise ValueError(f"reasoning-gym dataset {dataset!r}: invalid options {dataset_kwargs}: {e}") from e
        out = []
        for i in range(size):
            entry = data[i]
            out.append([entry["question"], encode_entry(entry, f"{dataset}[{i}]"),
                        encode_entry(entry.get("answer"))])
        return out
    finally:
        random.setstate(state)


class ReasoningGymEnvironment:
    """Scores completions with reasoning-gym's checker of each task's dataset (see the module doc).

    answer_format: how to find the answer in the completion (default the <answer> tag reasoning-gym prompts
    ask for; see extract.py, e.g. "last_line" as a lenient fallback). timeout_s: per-sample limit.
    num_workers: scoring processes (0: in this process, timeouts reported but not enforced). sandbox: confine the
    scoring processes (several checkers `eval` the answer; see environments/pool.py); num_workers=0 needs
    sandbox=False. isolate: score each sample in a process of its own (pool.py), so that no sample's evaluated
    text can change how another is scored. strip_thinking: extract from the text after the last </think>; a
    completion cut off inside its think block has no answer (extract.after_thinking; False: the whole completion).
    """

    def __init__(self, answer_format: str = "answer_tag", timeout_s: float = 10.0, num_workers: int = 2,
                 name: str = "reasoning_gym", sandbox: bool = True, isolate: bool = True, strip_thinking: bool = True):
        check_answer_format(answer_format)
        self.name = name
        self.answer_format = answer_format
        self.strip_thinking = bool(strip_thinking)
        self._pool = ScoringPool(num_workers, timeout_s, preload=("reasoning_gym",), sandbox=sandbox,
                                 isolate=isolate)

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """ValueError naming the first task that is not a reasoning-gym entry."""
        for i, m in enumerate(metadata):
            missing = [k for k in ("rg_dataset", "rg_entry") if not isinstance(m, dict) or k not in m]
            if missing:
                raise ValueError(f"{self.name}: metadata[{i}] lacks {missing} (make tasks with reasoning_gym_tasks)")

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        self.check_metadata(metadata)
        texts = final_texts(prompts, completions, self.strip_thinking)
        outcomes = self._pool.map(score_reasoning_gym, [(c, m["rg_dataset"], m["rg_entry"], self.answer_format)
                                                        for c, m in zip(texts, metadata, strict=True)])
        rewards_N = np.zeros(len(outcomes), np.float32)
        info: list[dict[str, Any]] = []
        no_answer = 0
        for i, o in enumerate(outcomes):
            if o.status == "ok":
                rewards_N[i], extracted = o.value
                no_answer += extracted is None
                info.append({"extracted": extracted})
            else:
                info.append({"extracted": None, "error": o.error})
        return EnvResult(rewards=rewards_N, info=info, counts={**outcome_counts(outcomes), "no_answer": no_answer})

    def close(self) -> None:
        """Stops the scoring workers."""
        self._pool.close()

    def __enter__(self) -> ReasoningGymEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
