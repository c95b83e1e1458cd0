"""Evaluation as a library: pass@k of a model's sampled completions on a list of tasks, scored by an environment.

    result = evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=4, k_values=(1, 4),
                            sampling_params=SamplingParams(max_new_tokens=512, temperature=0.7), rng=0)
    result["pass@1"], result["pass@4"], result["problems"][i]["num_correct"]

A pure function of its inputs (no files, no globals), so GRPO validation calls it every `val_every` steps with
the trainer's own parameter arrays and mesh. The `python -m jaxrl_llm.evaluate` CLI wraps it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaxrl_llm.data.chat import check_prompt_roles
from jaxrl_llm.environments.base import Environment, Task
from jaxrl_llm.environments.extract import normalize_answer
from jaxrl_llm.environments.split import score_across_processes
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.parallel.rules import ShardingRules
from jaxrl_llm.sampling.generate import fit_prompts, generate
from jaxrl_llm.sampling.request import SamplingParams
from jaxrl_llm.sampling.stop_strings import TokenBytes
from jaxrl_llm.sampling.text import default_stop_ids, render_prompt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials."""
    if not (isinstance(n, int | np.integer) and isinstance(c, int | np.integer) and isinstance(k, int | np.integer)):
        raise TypeError(f"pass_at_k(n={n!r}, c={c!r}, k={k!r}): expected integers")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


_SIMPLE_FRACTION = re.compile(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}|(-?\d+)\s*/\s*(-?\d+)")


def _vote_key(answer: str) -> str:
    """The answer a sample votes for: its normalised text (`normalize_answer`: "18", "18." and "$18" are one),
    or its value when that is a plain number or a simple fraction ("0.5", "1/2", "\\frac{1}{2}" are one)."""
    text = normalize_answer(str(answer))
    try:
        if (m := _SIMPLE_FRACTION.fullmatch(text.replace(" ", ""))) is not None:
            sign, num, den, num2, den2 = m.groups()
            value = Fraction(int(num or num2), int(den or den2)) * (-1 if sign else 1)
        else:
            value = Fraction(text)  # a plain decimal ("0.5", "-3", "1e3" too)
    except (ValueError, ZeroDivisionError):
        return "text:" + text
    return f"value:{value}"


def majority_correct(extracted: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer of some samples is correct. The correct samples are one answer (each equals
    the gold); the others are grouped by `_vote_key` (their normalised text, or their value when that is a number
    or a simple fraction). Samples without an answer (None, or empty once normalised: "", "$ $") are left out, a
    tie is won by the answer seen first; False when no sample has an answer."""
    votes: dict[str, list[int]] = {}
    for j, a in enumerate(extracted):
        if a is not None:
            key = "correct" if correct[j] else _vote_key(a)
            if key != "text:":  # an empty answer does not outvote a real one
                votes.setdefault(key, []).append(j)
    if not votes:
        return False
    winner = max(votes.values(), key=lambda js: (len(js), -js[0]))
    return bool(correct[winner[0]])


def _last_user_text(task: Task) -> str:
    users = [m["content"] for m in task.messages if m.get("role") == "user"]
    return users[-1] if users else ""


def task_source(task: Task) -> str:
    """The source a task came from, as `load_tasks` names it: "gsm8k", "rg:chain_sum", a file's path (or a file
    row's own metadata "source"); "" when its metadata names none."""
    m = task.metadata
    return f"rg:{m['rg_dataset']}" if "rg_dataset" in m else str(m.get("source", ""))


def _validate(tasks: Sequence[Task], n_samples: int, k_values: Sequence[int]) -> list[int]:
    if not tasks:
        raise ValueError("tasks is empty: nothing to evaluate")
    for i, t in enumerate(tasks):
        if not isinstance(t, Task):
            raise ValueError(f"tasks[{i}]: expected a Task, got {type(t).__name__}")
    if not isinstance(n_samples, int | np.integer) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: must be an integer >= 1")
    bad = [k for k in k_values
           if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"k_values={list(k_values)}: each k must be an integer in [1, n_samples={n_samples}]; "
                         f"bad: {bad}")
    return sorted({1, *(int(k) for k in k_values)})


def evaluate_tasks(
    cfg: ModelConfig,
    params: dict,
    tokenizer: Any,
    tasks: Sequence[Task],
    env: Environment,
    *,
    n_samples: int = 1,
    k_values: Sequence[int] = (1,),
    sampling_params: SamplingParams | None = None,
    rng: jax.Array | int | None = None,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    max_batch_size: int | None = None,
    max_prompt_len: int | None = None,
    truncate_prompts: bool = False,
    correct_threshold: float = 1.0,
    keep_completions: bool = True,
    token_bytes: TokenBytes | None = None,
) -> dict[str, Any]:
    """Sample `n_samples` completions per task (chat template with the generation prompt), score them with
    `env` and aggregate.

    A sample is correct when its reward >= correct_threshold. pass@k (for 1 and every k in k_values, each
    <= n_samples) is the unbiased estimator averaged over problems. When `sampling_params` names no stop
    ids, generation stops at the model's and the tokenizer's eos ids. Sample j of problem i is row
    i * n_samples + j of one `generate` call, so results do not depend on max_batch_size; greedy
    (temperature 0) samples each problem once and copies its completion to its n_samples samples. A prompt
    longer than max_prompt_len (default max_position_embeddings - max_new_tokens) raises PromptLengthError
    naming its task, or with truncate_prompts keeps its last tokens (counted per problem).
    token_bytes: `sampling.token_bytes(tokenizer)` for stop strings, when the caller keeps one (else built here).

    maj@k (for every k > 1 in k_values, when the environment reports each sample's "extracted" answer): the
    fraction of problems whose majority answer among their first k samples is correct (`majority_correct`).

    Returns the scalar metrics: "pass@<k>", "maj@<k>", "num_problems", "n_samples", "reward_mean", "mean_length"
    (completion tokens), "truncation_rate" (fraction stopped by max_new_tokens), "timeouts", "errors" (scorer
    events), "truncated_prompts", "generate_seconds", "score_seconds", "tokens_per_second"; plus "env_counts"
    (all of the environment's counts), "per_source" when the tasks come from several sources (`task_source`:
    each one's num_problems, pass@k, maj@k and reward_mean) and "problems": one record per task (index,
    source, source_index (its row there) or id, question (the last user message), answer, num_correct,
    rewards, lengths, finish_reasons, info (the environment's: e.g. the extracted answer), prompt_tokens,
    prompt_truncated, and, when keep_completions, prompt (the rendered text) and completions).
    """
    ks = _validate(tasks, n_samples, k_values)
    sp = sampling_params or SamplingParams()
    if not sp.stop_token_ids:
        sp = dataclasses.replace(sp, stop_token_ids=default_stop_ids(cfg, tokenizer))
    n = int(n_samples)
    convs = [list(t.messages) for t in tasks]
    check_prompt_roles(tokenizer, convs, None)
    prompt_texts = [render_prompt(tokenizer, c, f"task {i}") for i, c in enumerate(convs)]  # rendered once
    encoded = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], np.int64) for t in prompt_texts]
    # fitted per problem, not per sample: an error names the task, truncated_prompts counts problems
    prompt_ids, _ = fit_prompts(cfg, encoded, [sp] * len(tasks), max_prompt_len, truncate_prompts)
    prompt_truncated = [len(a) < len(b) for a, b in zip(prompt_ids, encoded, strict=True)]
    rows = [i for i in range(len(tasks)) for _ in range(n)]
    # greedy: the samples of a problem are the same, so each problem is sampled once and its completion copied
    sampled = list(range(len(tasks))) if sp.temperature == 0 else rows
    copy = list(rows) if sp.temperature == 0 else list(range(len(rows)))

    t0 = time.perf_counter()
    out = generate(cfg, params, [prompt_ids[i] for i in sampled], sp, rng, mesh=mesh, rules=rules,
                   max_batch_size=max_batch_size, max_prompt_len=max_prompt_len, keep_logprobs=False,
                   tokenizer=token_bytes or tokenizer)
    t1 = time.perf_counter()
    texts = [tokenizer.decode(toks, skip_special_tokens=True) for toks in out.tokens]
    completions = [texts[j] for j in copy]
    lengths_N = np.array([len(out.tokens[j]) for j in copy])
    finish_reasons = [out.finish_reasons[j] for j in copy]
    generated = sum(len(t) for t in out.tokens)
    del out, texts  # the token lists (about 35 bytes a token): only the text, lengths and finish reasons are used
    scored = score_across_processes(env, [prompt_texts[i] for i in rows], completions,
                                    [dict(tasks[i].metadata) for i in rows])
    t2 = time.perf_counter()
    rewards_N = np.asarray(scored.rewards, np.float64)
    if rewards_N.shape != (len(rows),):
        raise ValueError(f"environment {getattr(env, 'name', env)!r} returned rewards of shape {rewards_N.shape}; "
                         f"expected ({len(rows)},)")

    rewards_PS = rewards_N.reshape(len(tasks), n)
    correct_PS = rewards_PS >= correct_threshold
    truncated_N = np.array([r == "length" for r in finish_reasons])
    num_correct_P = correct_PS.sum(axis=1)
    counts = {k: int(v) for k, v in (scored.counts or {}).items()}
    elapsed = t1 - t0

    info = list(scored.info) if scored.info else [{} for _ in rows]
    answers = ([x.get("extracted") if isinstance(x, dict) else None for x in info]
               if any(isinstance(x, dict) and "extracted" in x for x in info) else None)  # maj@k when extracted

    def at_k(problems: Sequence[int]) -> dict[str, float]:
        """pass@k (and maj@k) averaged over these problems."""
        out = {f"pass@{k}": float(np.mean([pass_at_k(n, int(num_correct_P[i]), k) for i in problems])) for k in ks}
        for k in (k for k in ks if k > 1 and answers is not None):
            out[f"maj@{k}"] = float(np.mean([majority_correct(answers[i * n:i * n + k], correct_PS[i, :k])
                                             for i in problems]))
        return out

    result: dict[str, Any] = at_k(range(len(tasks)))
    result.update({
        "num_problems": len(tasks),
        "n_samples": n,
        "reward_mean": float(rewards_N.mean()),
        "mean_length": float(lengths_N.mean()),
        "truncation_rate": float(truncated_N.mean()),
        "timeouts": counts.get("timeouts", 0),
        "errors": counts.get("errors", 0),
        "truncated_prompts": int(sum(prompt_truncated)),
        "generate_seconds": elapsed,
        "score_seconds": t2 - t1,
        "tokens_per_second": generated / elapsed if elapsed > 0 else 0.0,
        "env_counts": counts,
    })
    sources = [task_source(t) for t in tasks]
    if len(set(sources)) > 1:  # a mixed source: each part's own metrics beside the whole's
        by_source: dict[str, list[int]] = {}
        for i, src in enumerate(sources):
            by_source.setdefault(src, []).append(i)
        result["per_source"] = {src: {"num_problems": len(ps), **at_k(ps),
                                      "reward_mean": float(rewards_PS[ps].mean())} for src, ps in by_source.items()}
    problems = []
    for i, task in enumerate(tasks):
        sl = slice(i * n, (i + 1) * n)
        rec = {"index": i, "source": sources[i], "question": _last_user_text(task),
               "answer": task.metadata.get("answer"), "num_correct": int(num_correct_P[i]),
               "rewards": rewards_PS[i].tolist(), "lengths": lengths_N[sl].tolist(),
               "finish_reasons": finish_reasons[sl], "info": info[sl], "prompt_tokens": len(prompt_ids[i]),
               "prompt_truncated": prompt_truncated[i]}
        for key, field in (("id", "id"), ("index", "source_index")):  # the row of its source
            if key in task.metadata:
                rec[field] = task.metadata[key]
        if keep_completions:
            rec["prompt"] = prompt_texts[i]  # as the model saw it (chat template, system prompt), before truncation
            rec["completions"] = completions[sl]
        problems.append(rec)
    result["problems"] = problems
    return result


# The scalar metrics evaluate_tasks always returns, besides pass@<k> (and maj@<k>, when the environment extracts
# answers; a non-finite value is left out by scalar_metrics).
SCALAR_NAMES = ("num_problems", "n_samples", "reward_mean", "mean_length", "truncation_rate", "timeouts", "errors",
                "truncated_prompts", "generate_seconds", "score_seconds", "tokens_per_second")


def metric_names(k_values: tuple[int, ...]) -> tuple[set[str], set[str]]:
    """(names evaluate_tasks returns with these k_values, names it returns when the environment extracts
    answers): for checking a metric's name before any evaluation runs."""
    return ({f"pass@{k}" for k in {1, *k_values}} | set(SCALAR_NAMES), {f"maj@{k}" for k in k_values if k > 1})


def scalar_metrics(result: dict[str, Any], prefix: str = "", per_source: bool = False) -> dict[str, float | int]:
    """The numeric entries of an evaluate_tasks result (for metric loggers), optionally prefixed; with `per_source`
    and tasks from several sources also each source's pass@k / maj@k / reward_mean as `<prefix><metric>/<source>`."""

    def numbers(d: dict[str, Any], suffix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}{suffix}": int(v) if isinstance(v, int | np.integer) else float(v) for k, v in d.items()
                if isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(float(v))}

    out = numbers(result)
    for src, m in (result.get("per_source") or {}).items() if per_source else ():
        out.update(numbers({k: v for k, v in m.items() if k != "num_problems"}, f"/{src}"))
    return out
