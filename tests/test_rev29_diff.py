"""Review of this session's changes: one dtype for a tokenized data set whether tokenized or read from the data
cache, Arrow's filled-in nulls named "content" inside tool calls and schemas, and the ranking of an earlier
version's checkpoints by every validation metric."""

from __future__ import annotations

import json
import logging
import os

import jax.numpy as jnp
import numpy as np

from jaxrl_llm.checkpoint import Checkpointer, rank_earlier_steps
from jaxrl_llm.data import bulk
from jaxrl_llm.data import cache as cache_lib
from jaxrl_llm.distributed import digest


def _tokenized(monkeypatch, sides: list[list[int]]) -> list:
    """tokenize_rows over rows of one side each, the tokenizer replaced by these ids."""
    monkeypatch.setattr(bulk, "pieces_tokenize_alone", lambda tok: False)
    monkeypatch.setattr(bulk, "tokenize_pieces", lambda tok, pieces, alone: [
        (np.array(sides[i], np.int32), np.ones(len(sides[i]), np.int32)) for i in pieces])
    return bulk.tokenize_rows(None, len(sides), lambda i: [i])


def test_a_tokenized_data_set_is_the_same_arrays_as_the_cache_gives_back(monkeypatch, tmp_path):
    """A vocabulary over 65,536 tokens (Qwen, Llama 3, Gemma): rows of small ids were uint16, the others int32,
    while the data cache wrote one int32 buffer and read every row back as int32. A job whose processes got
    their rows both ways (one read the cache, another tokenized) was refused as holding different data
    (`check_same_everywhere` hashes the dtype)."""
    fresh = _tokenized(monkeypatch, [[5, 6, 7], [5, 100_000], []])
    assert {ids.dtype for (ids, _), in fresh} == {np.dtype(np.int32)}
    cache_lib.save(str(tmp_path), "sft", "k" * 64, fresh, {})
    read, _ = cache_lib.load(str(tmp_path), "sft", "k" * 64)
    assert digest(read) == digest(fresh)
    small = _tokenized(monkeypatch, [[5, 6, 7], [65_535], []])  # all fit: all uint16, as the cache keeps them
    assert {ids.dtype for (ids, _), in small} == {np.dtype(np.uint16)}
    cache_lib.save(str(tmp_path), "sft", "k" * 64, small, {})
    assert digest(cache_lib.load(str(tmp_path), "sft", "k" * 64)[0]) == digest(small)


def test_a_tool_argument_named_content_is_not_kept_as_another_rows_null():
    """An Arrow table gives every tool call's arguments every argument name of the column: a write_file call's
    `content` reached the other calls as "content": null (kept as if it were a message's content) and the chat
    template rendered it into their arguments; a tool schema's parameter `content` likewise. A message's own
    null content beside tool_calls stays."""
    import datasets

    from jaxrl_llm.data.sources import load_rows

    def row(args: dict, params: dict) -> dict:
        return {"messages": [{"role": "user", "content": "x"},
                             {"role": "assistant", "content": None, "tool_calls": [
                                 {"type": "function", "function": {"name": "f", "arguments": args}}]},
                             {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "done"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                    "type": "object", "properties": params}}}]}

    rows = load_rows(datasets.Dataset.from_list([
        row({"path": "a.txt", "content": "hi"}, {"path": {"type": "string"}, "content": {"type": "string"}}),
        row({"city": "Paris"}, {"city": {"type": "string"}})]))
    call = rows[1]["messages"][1]
    assert call["content"] is None and call["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert rows[1]["tools"][0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert rows[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"path": "a.txt", "content": "hi"}


def _old_version_steps(d: str) -> None:
    """Checkpoints as versions before 2026-12-04 saved them: validation metrics in the meta only."""
    old = Checkpointer(d, every_steps=1, keep=3, async_save=False)
    for step, loss in ((1, 1.0), (2, 3.0)):
        old.maybe_save(step, {"params": {"w": jnp.full((2,), float(step))}},
                       {"step": step, "val_loss": loss, "val_accuracy": 1 / loss, "data_rows": 8})
    old.close()


def test_steps_ranked_for_one_metric_rank_for_another(tmp_path):
    """rank_earlier_steps wrote the best metric alone where Orbax writes all of a step's validation metrics: a
    later resume with another checkpoint.best_metric (val_accuracy) stopped at its first save with Orbax's
    KeyError: 'val_accuracy'."""
    d = str(tmp_path / "checkpoints")
    _old_version_steps(d)
    Checkpointer(d, every_steps=1, keep=1, async_save=False, best_metric="val_loss").close()
    with open(os.path.join(d, "1", "metrics", "metrics")) as f:
        assert json.load(f) == {"val_loss": 1.0, "val_accuracy": 1.0}
    ck = Checkpointer(d, every_steps=1, keep=1, async_save=False, best_metric="val_accuracy", best_mode="max")
    ck.maybe_save(3, {"params": {"w": jnp.full((2,), 3.0)}}, {"step": 3, "val_loss": 2.0, "val_accuracy": 0.5},
                  metrics={"val_loss": 2.0, "val_accuracy": 0.5})
    assert ck.all_steps() == [1, 3] and ck.best_step() == 1
    ck.close()


def test_a_folder_that_cannot_be_written_is_left_unranked_with_a_warning(tmp_path, monkeypatch, caplog):
    """A training command over checkpoints it cannot write into (a read-only copy of a finished run) stopped with
    a PermissionError traceback from the ranking before anything else."""
    d = str(tmp_path / "checkpoints")
    _old_version_steps(d)

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)
    with caplog.at_level(logging.WARNING, "jaxrl_llm"):
        assert rank_earlier_steps(d, "val_loss") == []
    assert "from step 1 on left unranked by val_loss" in caplog.text
