"""Local task files (evaluate's data.source, GRPO's data.source): read as SFT/DPO's data files are.

Failing on the current code (each a reported defect): a non-UTF-8 .json is a raw UnicodeDecodeError (not a
DataError naming the file); num=N reads and checks every row of a .jsonl, so a bad row after the first N fails
the load; a .json of columns or of JSON Lines (which load_rows reads for SFT) is refused.
"""

import json

import pytest

from jaxrl_llm.data.chat import DataError
from jaxrl_llm.data.sources import load_rows
from jaxrl_llm.data.tasks import load_tasks


def test_non_utf8_json_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"prompt": "caf\u00e9 2+2?", "answer": "4"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.json"):
        load_tasks(str(path))


def test_num_reads_only_the_rows_asked_for(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) for i in range(5)]
    path.write_text("\n".join([*lines, '{"question": "no prompt", "answer": "1"}', "not json"]) + "\n")
    assert [t.metadata["answer"] for t in load_tasks(str(path), num=3)] == ["1", "2", "3"]


@pytest.mark.parametrize("text", ['{"prompt": ["2+2?", "3+3?"], "answer": ["4", "6"]}',
                                  '{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": "6"}\n'])
def test_json_layouts_that_sft_reads(tmp_path, text):
    path = tmp_path / "tasks.json"
    path.write_text(text)
    assert len(load_rows(str(path))) == 2
    assert [t.metadata["answer"] for t in load_tasks(str(path))] == ["4", "6"]
