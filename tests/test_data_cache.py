"""The tokenized rows kept in the workdir (jaxrl_llm.data.cache): a later start with the same data, tokenizer and
settings reads them (without reading the data file) and gets exactly the examples and counts a fresh
tokenization gives; any change to what the tokens depend on tokenizes again; a damaged file is tokenized and
written again; nothing is written before the run owns its workdir."""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from jaxrl_llm.algorithms import sft
from jaxrl_llm.data import preference as pref
from jaxrl_llm.data.cache import DataCache, cache_key

CONV = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6, since 3+3=6."}]


def _rows(n: int) -> list[dict]:
    return [{"messages": [{**m, "content": f"{m['content']} (#{i})" * (1 + i % 5)} for m in CONV]} for i in range(n)]


def _config(path, **data) -> ml_collections.ConfigDict:
    d = dict(source=str(path), num_examples=-1, max_len=160, overlong="truncate", chat_template="",
             chat_template_kwargs="", add_eos=True, last_assistant_only=False, packing=False, shared_prefix=False,
             cache=True)
    d.update(data)
    return ml_collections.ConfigDict({"data": d})


def _same(a, b) -> bool:
    flat = lambda xs: [np.asarray(x).tolist() for ex in xs for x in (ex if isinstance(ex, tuple) else  # noqa: E731
                                                                     [y for e in ex for y in e])]
    return flat(a) == flat(b)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(30)))
    return path


def test_a_later_start_reads_the_tokens_and_gets_the_same_examples(tmp_path, data_file, tokenizer, monkeypatch,
                                                                    caplog):
    fresh, fresh_stats = sft.prepare(_config(data_file), tokenizer)  # no cache: as before
    want, want_stats = sft.prepare(_config(data_file, max_len=300, packing=True), tokenizer)
    cache = DataCache(str(tmp_path / "run" / "data_cache"))
    first, stats = sft.prepare(_config(data_file), tokenizer, cache=cache)
    assert not os.path.exists(cache.folder)  # written by flush(), once the run owns its workdir
    cache.flush()
    (name,) = os.listdir(cache.folder)
    assert name.startswith("sft-") and name.endswith(".npz")
    assert _same(first, fresh) and stats == fresh_stats and stats["truncated"] > 0  # cut after the cache: counted

    read = []
    monkeypatch.setattr(sft, "load_rows", lambda *a: read.append(a) or [])  # a hit reads no data file
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.cache"):
        again, again_stats = sft.prepare(_config(data_file), tokenizer, cache=DataCache(cache.folder))
    assert read == [] and "30 rows as tokenized by an earlier start" in caplog.text
    assert _same(again, fresh) and again_stats == fresh_stats
    # held as tokenized (`bulk.compact`): 3 bytes a token for this vocabulary, not int32's 8
    assert all(ids.dtype == np.uint16 and mask.dtype == np.uint8 for ex in (fresh, again) for ids, mask in ex)
    # settings applied after tokenization are redone from the cached tokens
    packed, packed_stats = sft.prepare(_config(data_file, max_len=300, packing=True), tokenizer,
                                       cache=DataCache(cache.folder))
    assert read == [] and _same(packed, want) and packed_stats == want_stats and len(packed) < 30


def test_what_the_tokens_depend_on_tokenizes_again(tmp_path, data_file, tokenizer):
    folder = str(tmp_path / "data_cache")
    cache = DataCache(folder)
    sft.prepare(_config(data_file), tokenizer, cache=cache)
    cache.flush()
    base = cache_key("sft", str(data_file), {"a": 1}, tokenizer)
    assert cache_key("sft", str(data_file), {"a": 2}, tokenizer) != base
    assert cache_key("pairs", str(data_file), {"a": 1}, tokenizer) != base
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text().replace("(#3)", "(#33)"))  # one row changed
    assert cache_key("sft", str(other), {"a": 1}, tokenizer) != base
    import copy

    tok2 = copy.deepcopy(tokenizer)
    tok2.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert cache_key("sft", str(data_file), {"a": 1}, tok2) != base
    tok3 = copy.deepcopy(tokenizer)
    tok3.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert cache_key("sft", str(data_file), {"a": 1}, tok3) != base
    assert cache_key("sft", "gsm8k", {"a": 1}, tokenizer) is None  # builtins are not cached

    for change in ({"num_examples": 12}, {"last_assistant_only": True}, {"add_eos": False},
                   {"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}assistant: {% endif %}"}):
        got, stats = sft.prepare(_config(data_file, **change), tokenizer, cache=DataCache(folder))
        want, want_stats = sft.prepare(_config(data_file, **change), tokenizer)
        assert _same(got, want) and stats == want_stats, change
    off = DataCache(folder)
    sft.prepare(_config(data_file, cache=False), tokenizer, cache=off)
    assert off._pending == []  # data.cache=False: neither read nor written


def test_a_damaged_cache_file_is_tokenized_and_written_again(tmp_path, data_file, tokenizer, caplog):
    folder = str(tmp_path / "data_cache")
    cache = DataCache(folder)
    want, _ = sft.prepare(_config(data_file), tokenizer, cache=cache)
    cache.flush()
    (name,) = os.listdir(folder)
    path = os.path.join(folder, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # a truncated file (a disk that filled as it was written)
    again = DataCache(folder)
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.data.cache"):
        got, _ = sft.prepare(_config(data_file), tokenizer, cache=again)
    assert "does not read" in caplog.text and _same(got, want) and len(again._pending) == 1
    again.flush()
    assert os.listdir(folder) == [name] and os.path.getsize(path) == len(data)
    reader = DataCache(folder, writer=False)  # another process of the job: reads, never writes
    got, _ = sft.prepare(_config(data_file, num_examples=5), tokenizer, cache=reader)
    assert reader._pending == [] and len(got) == 5


def test_preference_pairs_are_cached_too(tmp_path, tokenizer):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": f"{2 * i}.",
                                        "rejected": f"{2 * i + 1}, I think."}) + "\n" for i in range(12)))
    config = _config(path, max_len=64, shared_prefix=True)
    cache = DataCache(str(tmp_path / "data_cache"))
    first, stats = pref.prepare(config, tokenizer, cache=cache)
    cache.flush()
    assert [n[:6] for n in os.listdir(cache.folder)] == ["pairs-"]
    again, again_stats = pref.prepare(config, tokenizer, cache=DataCache(cache.folder))
    want, want_stats = pref.prepare(config, tokenizer)
    assert again_stats == want_stats == stats and len(again) == len(want) == 12
    for a, w in zip(again, want, strict=True):
        assert type(a) is type(w) and all(np.array_equal(x, y) for x, y in zip(a, w, strict=True))


def test_a_data_file_is_hashed_once_per_start_and_again_when_it_changes(tmp_path, monkeypatch):
    """The cache key and the checkpoint's data digest both hash the file: once per start (a file of many GB), again
    after it changed on disk."""
    from jaxrl_llm.data import cache as cache_mod

    calls = []
    real = cache_mod._file_digest
    monkeypatch.setattr(cache_mod, "_file_digest", lambda p: calls.append(p) or real(p))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    c = DataCache(str(tmp_path / "cache"))
    first = c.source_digest(str(data))
    assert c.source_digest(os.fspath(data)) == first and c.source_digest(data) == first and len(calls) == 1
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    os.utime(data, ns=(1, 10**18))
    assert c.source_digest(str(data)) != first and len(calls) == 2
    assert c.source_digest("gsm8k") is None
