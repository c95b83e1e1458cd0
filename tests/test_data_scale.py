"""Data preparation at scale: what a user with a large local file meets before the first step. A bad row deep in
the file is said before any tokenizing, naming the file; a bad byte names the file and line; data.num_examples
reads no further than the rows it takes; packing is an exact first fit without a scan of every open row; rows
are tokenized a chunk per tokenizer call with the same tokens as one by one; a long preparation says how far it
is. (Speed itself is measured by benchmarks/data_prep.py.)"""

from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np
import pytest
from test_chat_templates import LLAMA2_TEMPLATE, _sentencepiece_tokenizer

from jaxrl_llm.algorithms import sft
from jaxrl_llm.data import DataError, load_rows
from jaxrl_llm.data import preference as pref
from jaxrl_llm.data.bulk import Progress, tokenize_rows
from jaxrl_llm.data.chat import conversation_pieces, tokenize_conversation

ROW = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _config(source: str, **data) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": dict(
        source=source, num_examples=-1, max_len=64, overlong="truncate", chat_template="", chat_template_kwargs="",
        add_eos=True, last_assistant_only=False, packing=False, shared_prefix=False, **data)})


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    good = json.dumps(ROW).encode()
    path = _write(tmp_path / "rows.jsonl", [good, b"", good, good[:10] + b"\xff" + good[10:], good])
    with pytest.raises(DataError, match=r"rows\.jsonl: line 4 is not UTF-8 text \(byte 0xff at column 11\)"):
        load_rows(path)
    whole = tmp_path / "rows.json"  # a JSON document: the line of the byte
    whole.write_bytes(b'[\n' + good + b',\n' + good.replace(b"Hi", b"H\xc3") + b',\n' + good[:5] + b'\xfe' + good[5:]
                      + b'\n]\n')
    with pytest.raises(DataError, match=r"rows\.json: line 4 is not UTF-8 text \(byte 0xfe\)"):
        load_rows(str(whole))


def test_num_examples_reads_no_further_than_the_rows_it_takes(tmp_path, caplog):
    good = json.dumps(ROW).encode()
    path = _write(tmp_path / "rows.jsonl", [good] * 10 + [b"", b"{not json"])
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.sources"):
        assert len(load_rows(path, 5)) == 5  # the bad line 12 is not reached
    assert "the first 5 rows of" in caplog.text and "not read" in caplog.text
    with pytest.raises(DataError, match="line 12 is not valid JSON"):
        load_rows(path, 11)
    ok = _write(tmp_path / "ok.jsonl", [good] * 3 + [b"", b"  "])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.sources"):
        assert len(load_rows(ok, 3)) == 3  # blank lines after the rows taken are not rows left out
    assert "first" not in caplog.text


def test_a_dataset_passed_in_is_cut_before_its_rows_are_read(caplog):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": [f"q{i}" for i in range(50)], "completion": ["a"] * 50})
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.sources"):
        rows = load_rows(ds, 4)
    assert rows == [{"prompt": f"q{i}", "completion": "a"} for i in range(4)]
    assert "the first 4 of the 50 rows of <datasets.Dataset of 50 rows>" in caplog.text


@pytest.fixture
def tokenizing(monkeypatch):
    """Records the row counts handed to tokenization by sft.prepare and preference.prepare."""
    calls: list[int] = []

    def record(tokenizer, n, pieces_of, what="rows", chunk=256):
        calls.append(n)
        raise AssertionError("tokenized before the bad row was found")

    monkeypatch.setattr(sft, "tokenize_rows", record)
    monkeypatch.setattr(pref, "tokenize_rows", record)
    for mod in (sft, pref):
        monkeypatch.setattr(mod, "turn_end_token", lambda *a, **k: None)
        monkeypatch.setattr(mod, "dropped_fields", lambda *a, **k: set())
    return calls


def test_a_bad_row_deep_in_the_file_is_said_before_any_tokenizing(tmp_path, tokenizing):
    good = json.dumps(ROW).encode()
    path = _write(tmp_path / "big.jsonl", [good] * 300 + [json.dumps({"msgs": ROW["messages"]}).encode()])
    with pytest.raises(DataError, match=r"^data\.source='[^']*big\.jsonl': row 300: missing field 'messages'"):
        sft.prepare(_config(path), tokenizer=None)
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path / "pairs.jsonl", [json.dumps(pair).encode()] * 300 + [json.dumps({"prompt": "q"}).encode()])
    with pytest.raises(DataError, match=r"^data\.source='[^']*pairs\.jsonl': row 300: "):
        pref.prepare(_config(path), tokenizer=None)
    assert tokenizing == []


def _first_fit(examples, max_len):
    """First fit written out: each example into the first row with room for it, else a new row."""
    rows, room = [], []
    for ex in examples:
        n = len(ex[0])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([ex])
            room.append(max_len - n)
        else:
            rows[r].append(ex)
            room[r] -= n
    return rows


def test_packing_is_the_first_fit_written_out():
    rng = np.random.default_rng(0)
    for case in range(200):
        max_len = int(rng.integers(1, 40))
        examples = [(np.zeros(int(rng.integers(1, max_len + 1)), np.int32), case) for _ in range(rng.integers(0, 70))]
        got, want = sft.pack(examples, max_len), _first_fit(examples, max_len)
        assert [[id(e) for e in row] for row in got] == [[id(e) for e in row] for row in want], case
    examples = [(np.zeros(int(k), np.int32), None) for k in rng.integers(50, 400, 3000)]
    rows = sft.pack(examples, 2048)
    assert [[id(e) for e in row] for row in rows] == [[id(e) for e in row] for row in _first_fit(examples, 2048)]


MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
         {"role": "assistant", "content": "6."}]


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece"])
def test_rows_tokenized_in_chunks_are_the_tokens_of_each_render(which, request):
    """One tokenizer call per chunk of rows (chunks of 3 over 10 rows, so rows straddle chunk edges): each row's
    ids are those of its whole render, for a byte-level BPE (pieces encoded alone) and a legacy SentencePiece
    tokenizer (each piece after the one before), and the masks are those of the row tokenized alone."""
    if which == "smollm2":
        tok, template = request.getfixturevalue("tokenizer"), None
    else:
        tok, template = _sentencepiece_tokenizer(legacy=True), LLAMA2_TEMPLATE
    convs = [MULTI[1:3], MULTI[1:], MULTI[1:3] + [{"role": "user", "content": "Hello world"},
                                                  {"role": "assistant", "content": "how are you today?"}],
             MULTI[3:], MULTI[1:3]] * 2
    if which == "smollm2":
        convs[2] = MULTI  # (the Llama 2 template has no system turn)
    got = tokenize_rows(tok, len(convs), lambda i: [conversation_pieces(tok, convs[i], index=i,
                                                                        chat_template=template)], chunk=3)
    assert [len(sides) for sides in got] == [1] * len(convs)
    for i, conv in enumerate(convs):
        render = tok.apply_chat_template(conv, tokenize=False, chat_template=template)
        assert got[i][0][0].tolist() == tok(render, add_special_tokens=False)["input_ids"], i
        np.testing.assert_array_equal(got[i][0][1], tokenize_conversation(tok, conv, chat_template=template)[1])
    eos = tokenize_rows(tok, 2, lambda i: [conversation_pieces(tok, convs[1], chat_template=template, eos_id=7)])
    ids, mask = eos[1][0]
    assert (ids == 7).sum() == 2 and mask[ids == 7].all()  # each learned reply closed with the EOS given


def test_a_long_preparation_says_how_far_it_is(caplog):
    now = [0.0]
    p = Progress(1000, "pairs", every_s=30.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.bulk"):
        for done in range(1, 1001):
            now[0] = done * 0.1  # 10 pairs/s: 100 s in all
            p.tick(done)
        p.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["data: tokenized 300 of 1000 pairs (10 pairs/s, about 70 s left)",
                     "data: tokenized 600 of 1000 pairs (10 pairs/s, about 40 s left)",
                     "data: tokenized 900 of 1000 pairs (10 pairs/s, about 10 s left)",
                     "data: tokenized 1000 pairs in 100 s (10 pairs/s)"]
    caplog.clear()
    quick = Progress(10, every_s=30.0, clock=lambda: 1.0)
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.bulk"):
        quick.tick(10)
        quick.finish()
    assert caplog.text == ""  # a short preparation says nothing
