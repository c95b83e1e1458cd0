"""Review of the chunked evaluation's rows file (evaluate.Journal): a process killed as it wrote a chunk.

A chunk's last line written without its newline parsed as whole: the resume truncated the file one byte past its
end (a NUL there), the next chunk's rows joined that line, and once interrupted again the file was refused ('line
N is not JSON'), every chunk lost. A header cut short (or an empty file: created, then killed) was refused as 'not
an evaluation's rows file' instead of starting over."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm import evaluate
from jaxrl_llm.evaluation import Chunk

SETTINGS = {"sampling.temperature": 1.0}


def _chunk(i: int) -> Chunk:
    return Chunk([{"index": i, "rewards": [1.0]}], {"timeouts": i})


def _indices(chunks: list[Chunk]) -> list[int]:
    return [r["index"] for c in chunks for r in c.problems]


def test_a_chunk_end_without_its_newline_is_cut_short_and_later_chunks_stay_readable(tmp_path):
    path = str(tmp_path / "r.rows.jsonl")
    j = evaluate.Journal(path, SETTINGS)
    assert j.open(True) == []
    j.append(_chunk(0))
    j.append(_chunk(1))
    j.close()
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # killed after chunk 1's end line, before its newline
        f.write(data[:-1])
    j = evaluate.Journal(path, SETTINGS)
    assert _indices(j.open(True)) == [0]  # chunk 1 runs again
    assert b"\0" not in open(path, "rb").read()
    j.append(_chunk(1))
    j.append(_chunk(2))
    j.close()
    with open(path, "ab") as f:  # interrupted again, mid-line
        f.write(b'{"index": 3, "rew')
    j = evaluate.Journal(path, SETTINGS)
    done = j.open(True)
    assert _indices(done) == [0, 1, 2] and [c.counts for c in done] == [{"timeouts": 0}, {"timeouts": 1},
                                                                        {"timeouts": 2}]
    j.close()
    assert all(json.loads(x) for x in open(path, "rb").read().split(b"\n")[:-1])


@pytest.mark.parametrize("written", [b"", b'{"eval_rows": 1, "sett', b'{"eval_rows": 1, "settings": {"a": 1}}'])
def test_a_header_cut_short_starts_over(tmp_path, written):
    path = tmp_path / "r.rows.jsonl"
    path.write_bytes(written)
    j = evaluate.Journal(str(path), SETTINGS)
    assert j.open(True) == [] and not path.exists()
    j.append(_chunk(0))
    j.close()
    assert _indices(evaluate.Journal(str(path), SETTINGS).open(True)) == [0]


def test_a_file_that_is_not_a_rows_file_is_still_refused(tmp_path):
    path = tmp_path / "r.rows.jsonl"
    for text in (b"my notes", b"my notes\nmore\n"):
        path.write_bytes(text)
        with pytest.raises(evaluate.ConfigError, match="not an evaluation's rows file"):
            evaluate.Journal(str(path), SETTINGS).open(True)
        assert path.read_bytes() == text
