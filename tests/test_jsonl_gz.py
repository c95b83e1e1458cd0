"""Gzipped JSON Lines (`.jsonl.gz`, as HF datasets reads them) as SFT/DPO data and as GRPO task files: read as the
plain file is; a damaged archive names the file."""

from __future__ import annotations

import gzip
import json

import pytest

from jaxrl_llm.data import DataError, load_rows
from jaxrl_llm.data.tasks import load_tasks

ROWS = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}],
         "answer": str(2 * i)} for i in range(5)]


def _write(path, rows) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_gz_rows_read_as_the_plain_file(tmp_path):
    path = _write(tmp_path / "Rows.JSONL.GZ", ROWS)
    assert load_rows(path) == ROWS
    assert load_rows(path, 2) == ROWS[:2]
    task_rows = [{"messages": r["messages"][:1], "answer": r["answer"]} for r in ROWS]
    prompts = _write(tmp_path / "tasks.jsonl.gz", task_rows)
    tasks = load_tasks(prompts, 3, 0, shuffle=False)
    assert [t.messages[-1]["content"] for t in tasks] == [r["messages"][0]["content"] for r in ROWS[:3]]
    assert [t.metadata["answer"] for t in tasks] == ["0", "2", "4"]


def test_a_damaged_gzip_names_the_file(tmp_path):
    good = _write(tmp_path / "good.jsonl.gz", ROWS * 200)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(open(good, "rb").read()[:-40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: not a readable gzip file after \d+ rows \(EOFError"):
        load_rows(str(cut))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"plain text, not gzip\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz: not a readable gzip file after 0 rows"):
        load_rows(str(bad))
    with pytest.raises(DataError, match=r"nor a file with extension \[.*'\.jsonl\.gz'"):
        load_rows(str(tmp_path / "rows.json.gz"))
