"""Evaluation as a library: pass@k of a model's sampled completions on a list of tasks, scored by an environment.

    result = evaluate_tasks(cfg, params, tokenizer, tasks, env, n_samples=4, k_values=(1, 4),
                            sampling_params=SamplingParams(max_new_tokens=512, temperature=0.7), rng=0)
    result["pass@1"], result["pass@4"], result["problems"][i]["num_correct"]

A pure function of its inputs (no files, no globals), so GRPO validation calls it every `val_every` steps with
the trainer's own parameter arrays and mesh. The `python -m jaxrl_llm.evaluate` CLI wraps it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
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
from jaxrl_llm.sampling.generate import PreparedParams, fit_prompts, generate, prepare_params
from jaxrl_llm.sampling.request import SamplingParams
from jaxrl_llm.sampling.stop_strings import TokenBytes
from jaxrl_llm.sampling.text import default_stop_ids, render_prompt

log = logging.getLogger(__name__)


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
    chunk_size: int | None = None,
    done: Sequence[Chunk] = (),
    on_chunk: Callable[[Chunk], None] | None = None,
) -> dict[str, Any]:
    """Sample `n_samples` completions per task (chat template with the generation prompt), score them with
    `env` and aggregate.

    A sample is correct when its reward >= correct_threshold. pass@k (for 1 and every k in k_values, each
    <= n_samples) is the unbiased estimator averaged over problems. When `sampling_params` names no stop
    ids, generation stops at the model's and the tokenizer's eos ids. Sample j of problem i samples from the
    stream of row i * n_samples + j of one `generate` call, so results do not depend on max_batch_size or
    chunk_size; greedy (temperature 0) samples each problem once and copies its completion to its n_samples
    samples. A prompt longer than max_prompt_len (default max_position_embeddings - max_new_tokens) raises
    PromptLengthError naming its task (before anything is sampled), or with truncate_prompts keeps its last
    tokens (counted per problem, logged, and flagged in its record).
    token_bytes: `sampling.token_bytes(tokenizer)` for stop strings, when the caller keeps one (else built here).

    chunk_size: problems generated and scored per chunk (None: all at once); each chunk (a `Chunk`: its problems'
    records and the scorer's counts) goes to `on_chunk` as soon as it is scored (a caller writes it down), and a
    line per chunk is logged. done: the Chunks of an earlier, interrupted evaluation with the same settings: their
    problems are not sampled again, and the metrics cover them (generate_seconds, score_seconds and
    tokens_per_second: this call's work only).

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
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}: must be an integer >= 1 (or None: all at once)")
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
    sources = [task_source(t) for t in tasks]

    records: list[dict[str, Any] | None] = [None] * len(tasks)
    counts: dict[str, int] = {}
    for c in done:
        for rec in c.problems:
            i = rec.get("index")
            if (not isinstance(i, int) or not 0 <= i < len(tasks) or records[i] is not None
                    or len(rec.get("rewards", ())) != n):
                raise ValueError(f"done: a record with index {i!r} and {len(rec.get('rewards', ()))} rewards does not "
                                 f"fit {len(tasks)} tasks x {n} samples (or repeats an index)")
            records[i] = rec
        _add_counts(counts, c.counts)
    todo = [i for i, r in enumerate(records) if r is None]
    size = chunk_size or max(len(todo), 1)
    if len(todo) > size and not isinstance(params, PreparedParams):
        params = prepare_params(cfg, params, mesh=mesh, rules=rules)  # decode weights built once for every chunk
    if done:
        log.info("evaluation: %d of %d problems done before (resumed), %d to go", len(tasks) - len(todo), len(tasks),
                 len(todo))
    t_start = time.perf_counter()
    gen_s = score_s = 0.0
    generated = 0
    for c0 in range(0, len(todo), size):
        part = todo[c0:c0 + size]
        t0 = time.perf_counter()
        out = _sample(cfg, params, prompt_ids, part, n, sp, rng, mesh=mesh, rules=rules, max_batch_size=max_batch_size,
                      max_prompt_len=max_prompt_len, tokenizer=token_bytes or tokenizer)
        t1 = time.perf_counter()
        texts = [tokenizer.decode(toks, skip_special_tokens=True) for toks in out.tokens]
        copy = [j // n for j in range(len(part) * n)] if sp.temperature == 0 else list(range(len(part) * n))
        completions = [texts[j] for j in copy]
        lengths = [len(out.tokens[j]) for j in copy]
        finish_reasons = [out.finish_reasons[j] for j in copy]
        generated += sum(len(t) for t in out.tokens)
        del out, texts  # the token lists (about 35 bytes a token): only the text, lengths and finish reasons are used
        rows = [i for i in part for _ in range(n)]
        scored = score_across_processes(env, [prompt_texts[i] for i in rows], completions,
                                        [dict(tasks[i].metadata) for i in rows])
        t2 = time.perf_counter()
        gen_s, score_s = gen_s + t1 - t0, score_s + t2 - t1
        rewards = np.asarray(scored.rewards, np.float64)
        if rewards.shape != (len(rows),):
            raise ValueError(f"environment {getattr(env, 'name', env)!r} returned rewards of shape {rewards.shape}; "
                             f"expected ({len(rows)},)")
        info = list(scored.info) if scored.info else [{} for _ in rows]
        chunk = Chunk([], {k: int(v) for k, v in (scored.counts or {}).items()})
        for p, i in enumerate(part):
            sl = slice(p * n, (p + 1) * n)
            rec = {"index": i, "source": sources[i], "question": _last_user_text(tasks[i]),
                   "answer": tasks[i].metadata.get("answer"),
                   "num_correct": int((rewards[sl] >= correct_threshold).sum()), "rewards": rewards[sl].tolist(),
                   "lengths": lengths[sl], "finish_reasons": finish_reasons[sl], "info": info[sl],
                   "prompt_tokens": len(prompt_ids[i]), "prompt_truncated": prompt_truncated[i]}
            for key, field in (("id", "id"), ("index", "source_index")):  # the row of its source
                if key in tasks[i].metadata:
                    rec[field] = tasks[i].metadata[key]
            if keep_completions:
                rec["prompt"] = prompt_texts[i]  # as the model saw it (chat template, system prompt), before truncation
                rec["completions"] = completions[sl]
            records[i] = rec
            chunk.problems.append(rec)
        _add_counts(counts, chunk.counts)
        if on_chunk is not None:
            on_chunk(chunk)
        if len(todo) > size:
            done_now = min(c0 + size, len(todo))
            took = time.perf_counter() - t_start
            so_far = np.mean([r["num_correct"] / n for r in records if r is not None])
            log.info("evaluation: %d of %d problems sampled and scored (pass@1 so far %.4f; %.0f s, about %.0f s left)",
                     len(tasks) - len(todo) + done_now, len(tasks), so_far, took,
                     took / done_now * (len(todo) - done_now))

    timing = {"generate_seconds": gen_s, "score_seconds": score_s,
              "tokens_per_second": generated / gen_s if gen_s > 0 else 0.0}
    result = _aggregate(records, n, ks, correct_threshold, counts, timing)  # type: ignore[arg-type]  (all filled)
    result["problems"] = records
    return result


@dataclasses.dataclass
class Chunk:
    """One chunk of `evaluate_tasks(chunk_size=...)`: its problems' records (as result["problems"] holds them) and
    the scorer's counts for their samples (e.g. {"timeouts": 1})."""

    problems: list[dict[str, Any]]
    counts: dict[str, int]


def _add_counts(total: dict[str, int], more: dict[str, Any]) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + int(v)


def _sample(cfg: ModelConfig, params: Any, prompt_ids: list[np.ndarray], problems: list[int], n: int,
            sp: SamplingParams, rng: Any, **kw: Any) -> Any:
    """`generate` for these problems, n samples each: sample j of problem i draws from stream i * n + j (its row in
    one call over every problem); greedy samples each problem once (its samples are the same)."""
    if sp.temperature == 0:
        return generate(cfg, params, [prompt_ids[i] for i in problems], sp, rng, keep_logprobs=False,
                        row_ids=problems, **kw)
    return generate(cfg, params, [prompt_ids[i] for i in problems for _ in range(n)], sp, rng, keep_logprobs=False,
                    row_ids=[i * n + j for i in problems for j in range(n)], **kw)


def _aggregate(records: Sequence[dict[str, Any]], n: int, ks: list[int], correct_threshold: float,
               counts: dict[str, int], timing: dict[str, float]) -> dict[str, Any]:
    """The metrics of every problem's record (made now or read back from an interrupted run's)."""
    rewards_PS = np.asarray([r["rewards"] for r in records], np.float64).reshape(len(records), n)
    correct_PS = rewards_PS >= correct_threshold
    num_correct_P = correct_PS.sum(axis=1)
    lengths_N = np.asarray([x for r in records for x in r["lengths"]])
    truncated_N = np.asarray([x == "length" for r in records for x in r["finish_reasons"]])
    info = [x for r in records for x in r["info"]]
    answers = ([x.get("extracted") if isinstance(x, dict) else None for x in info]
               if any(isinstance(x, dict) and "extracted" in x for x in info) else None)  # maj@k when extracted

    def at_k(problems: Sequence[int]) -> dict[str, float]:
        """pass@k (and maj@k) averaged over these problems."""
        out = {f"pass@{k}": float(np.mean([pass_at_k(n, int(num_correct_P[i]), k) for i in problems])) for k in ks}
        for k in (k for k in ks if k > 1 and answers is not None):
            out[f"maj@{k}"] = float(np.mean([majority_correct(answers[i * n:i * n + k], correct_PS[i, :k])
                                             for i in problems]))
        return out

    result: dict[str, Any] = at_k(range(len(records)))
    result.update({
        "num_problems": len(records),
        "n_samples": n,
        "reward_mean": float(rewards_PS.mean()),
        "mean_length": float(lengths_N.mean()),
        "truncation_rate": float(truncated_N.mean()),
        "timeouts": counts.get("timeouts", 0),
        "errors": counts.get("errors", 0),
        "truncated_prompts": int(sum(bool(r["prompt_truncated"]) for r in records)),
        **timing,
        "env_counts": counts,
    })
    sources = [r["source"] for r in records]
    if len(set(sources)) > 1:  # a mixed source: each part's own metrics beside the whole's
        by_source: dict[str, list[int]] = {}
        for i, src in enumerate(sources):
            by_source.setdefault(src, []).append(i)
        result["per_source"] = {src: {"num_problems": len(ps), **at_k(ps),
                                      "reward_mean": float(rewards_PS[ps].mean())} for src, ps in by_source.items()}
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
