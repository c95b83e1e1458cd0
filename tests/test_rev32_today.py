"""Review of the day's commits (rev32): margins read from a CSV file (cells kept as text), and assert-style code
tests that read a global the program's function rebinds."""

from __future__ import annotations

import ml_collections
import pytest

from jaxrl_llm.data import preference as pref


def _config(path):
    return ml_collections.ConfigDict(dict(algorithm="rm", data=dict(
        source=str(path), num_examples=-1, max_len=64, overlong="truncate", chat_template="", cache=False)))


def test_csv_margins_are_read_as_numbers(tokenizer, tmp_path):
    # the CSV reader keeps every cell as its text ("007" stays "007"): a margin column is text there
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nWhat is 1+1?,It is 2.,It is 3.,0.5\n"
                    "What is 2+2?,It is 4.,It is 5., 2\n")
    pairs, _ = pref.prepare(_config(path), tokenizer)
    assert [p.margin for p in pairs] == [0.5, 2.0]


@pytest.mark.parametrize("cell,match", [("big", "got 'big'"), ("nan", "got 'nan'"), ("inf", "got 'inf'")])
def test_csv_margin_text_that_is_no_finite_number_is_named(tokenizer, tmp_path, cell, match):
    path = tmp_path / "pairs.csv"
    path.write_text(f"prompt,chosen,rejected,margin\nWhat is 1+1?,It is 2.,It is 3.,{cell}\n")
    with pytest.raises(pref.DataError, match=f"row 0: field 'margin' must be a finite number, {match}"):
        pref.prepare(_config(path), tokenizer)
