"""Data as users have it (review 29, shapes): OpenAI's per-message `weight`, a UTF-8 BOM before a JSON(L) file, a
datasets.Dataset set to the numpy/pandas format, and the nulls an Arrow table fills into tool calls and tool
schemas."""

from __future__ import annotations

import json

import datasets
import pytest

from jaxrl_llm.data import DataError, load_rows
from jaxrl_llm.data.chat import row_tools, to_conversation, tokenize_conversation
from jaxrl_llm.data.preference import to_preference


def _learned(tokenizer, ids, mask) -> str:
    return tokenizer.decode(ids[mask == 1])


def test_assistant_messages_with_weight_0_get_no_loss(tokenizer):
    """OpenAI's chat fine-tuning format: `"weight": 0` keeps an assistant message out of the loss (it was learned,
    as every other reply); a weight other than 0/1 names the row and message."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "BAD", "weight": 0},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "GOOD", "weight": 1}]
    conv, context = to_conversation({"messages": msgs}, 0)
    ids, mask = tokenize_conversation(tokenizer, conv, context_turns=context)
    assert _learned(tokenizer, ids, mask) == "GOOD<|im_end|>\n"
    assert "BAD" in tokenizer.decode(ids)  # still context
    with pytest.raises(DataError, match="row 2: no assistant message to learn from .*weight 0"):
        tokenize_conversation(tokenizer, to_conversation({"messages": msgs[:2]}, 2)[0], index=2)
    for bad in (0.5, "0", 2):
        with pytest.raises(DataError, match=r"row 4: messages\[1\].weight must be 0 .* or 1"):
            to_conversation({"messages": [msgs[0], {**msgs[1], "weight": bad}]}, 4)


def test_json_and_jsonl_files_with_a_bom_are_read(tmp_path):
    """Windows editors (Notepad, PowerShell 5's Out-File) start UTF-8 files with a BOM; datasets.load_dataset reads
    them, and they were refused as "line 1 is not valid JSON"."""
    rows = [{"prompt": "Hi", "completion": "Yo"}, {"prompt": "a", "completion": "b"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8-sig")
    (tmp_path / "r.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    assert load_rows(str(tmp_path / "r.jsonl")) == rows
    assert load_rows(str(tmp_path / "r.json")) == rows
    # a BOM anywhere else is still not JSON
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n\ufeff" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize("fmt", ["numpy", "pandas"])
def test_a_dataset_in_numpy_or_pandas_format_reads_as_python_rows(fmt):
    """ds.set_format("numpy") in a notebook gave each row's messages as an array of dicts, refused as "must be a
    non-empty list"; the rows are read as Python objects whatever the format."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "id": 1}]
    ds = datasets.Dataset.from_list(rows).with_format(fmt)
    got = load_rows(ds)
    assert got == rows and isinstance(got[0]["messages"], list)
    assert to_conversation(got[0], 0)[0] == rows[0]["messages"]


def _tool(name: str, prop: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object",
                                                                          "properties": {prop: {"type": "string"}}}}}


def _call_row(fn: str, arg: str, value: str) -> dict:
    return {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": None,
                          "tool_calls": [{"type": "function", "function": {"name": fn, "arguments": {arg: value}}}]},
                         {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}],
            "tools": [_tool(fn, arg)]}


def test_a_tables_filled_in_nulls_stay_out_of_tool_calls_and_schemas(tmp_path):
    """An Arrow table gives every tool call's arguments (and every tool schema's properties) the keys of all rows,
    None where a row lacks them: the call was learned as {"city": "Paris", "n": null} and the schema listed the
    other tools' parameters. From a Dataset or parquet they are left out; a JSONL file's own nulls stay."""
    rows = [_call_row("f", "city", "Paris"), _call_row("g", "n", "3")]
    ds = datasets.Dataset.from_list(rows)
    assert ds[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "n": None}
    ds.to_parquet(str(tmp_path / "t.parquet"))
    for got in (load_rows(ds), load_rows(str(tmp_path / "t.parquet"))):
        for i, row in enumerate(rows):
            msgs, _ = to_conversation(got[i], i)
            assert msgs[1]["tool_calls"] == row["messages"][1]["tool_calls"] and msgs[1]["content"] is None
            assert row_tools(got[i], i) == row["tools"]
    # preference rows from a table: the same
    pairs = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "chosen": r["messages"][1:],
                                         "rejected": [{"role": "assistant", "content": "no"}]} for r in rows])
    assert to_preference(load_rows(pairs)[0], 0)[1] == rows[0]["messages"][1:]
    # a JSONL file is read as written: an explicit null argument is the user's
    row = _call_row("f", "city", "Paris")
    row["messages"][1]["tool_calls"][0]["function"]["arguments"]["unit"] = None
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    got = load_rows(str(tmp_path / "t.jsonl"))[0]
    assert got["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": None}


# Qwen2.5's chat template's dispatch on roles (tools left out): a "developer" message matches no branch.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + "
    "'\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_role_the_template_leaves_out_is_refused(tokenizer, tmp_path):
    """OpenAI's "developer" role (its system role since o1): Qwen2.5's template renders no such message, so SFT and
    DPO trained without the instruction, silently. The row is refused naming the role; roles the template renders
    (system, tool; any role under SmolLM2's ChatML) pass."""
    from recipes import recipe

    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.data import preference as pref

    dev = {"role": "developer", "content": "Answer in French."}
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                          {"role": "tool", "content": "t"}, {"role": "assistant", "content": "Yo"}]},
            {"messages": [dev, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Salut"}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = recipe("sft_tiny", {"data.source": str(path), "data.num_examples": -1, "data.chat_template": QWEN25_TEMPLATE,
                            "data.cache": False})
    with pytest.raises(DataError, match="row 1: has a 'developer' message, which the chat template leaves out"):
        sft.prepare(c, tokenizer)
    path.write_text(json.dumps(rows[0]) + "\n")
    (ids, mask), = sft.prepare(c, tokenizer)[0]
    assert _learned(tokenizer, ids, mask) == "Yo<|im_end|>\n"
    c.data.chat_template = ""  # SmolLM2's ChatML renders every role
    path.write_text(json.dumps(rows[1]) + "\n")
    (ids, _), = sft.prepare(c, tokenizer)[0]
    assert "<|im_start|>developer\nAnswer in French." in tokenizer.decode(ids)
    # DPO/RM rows: the same
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": [dev, {"role": "user", "content": "Hi"}], "chosen": "Salut",
                                "rejected": "Hello"}) + "\n")
    c = recipe("dpo_tiny", {"data.source": str(path), "data.num_examples": -1, "data.chat_template": QWEN25_TEMPLATE,
                            "data.cache": False})
    with pytest.raises(DataError, match="row 0: has a 'developer' message"):
        pref.prepare(c, tokenizer)


def test_a_tool_calling_reply_without_content_reads_as_openai_writes_it(tokenizer):
    """OpenAI's fine-tuning files give an assistant message with tool_calls and no `content` key; it was refused
    as "needs 'role' and 'content'". It reads as content null; without tool_calls a missing content still errs."""
    from test_data_rows import TOOL_TEMPLATE

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    row = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                        {"role": "assistant", "content": "18C."}], "parallel_tool_calls": False}
    msgs, _ = to_conversation(row, 0)
    assert msgs[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=TOOL_TEMPLATE)
    assert _learned(tokenizer, ids, mask) == "<call>get_weather</call><|im_end|>\n18C.<|im_end|>\n"
    with pytest.raises(DataError, match=r"row 3: messages\[1\] needs 'role' and 'content'"):
        to_conversation({"messages": [row["messages"][0], {"role": "assistant"}]}, 3)


def test_a_lone_surrogate_escape_names_its_line(tmp_path):
    """JSON's "\\ud83d" without its pair (an emoji cut in half by a scraper) parses to a string no tokenizer takes:
    SFT stopped with the tokenizer's "TypeError: TextEncodeInput must be Union[...]", naming no row. Whole emoji
    escaped as pairs (json.dumps' default) read as before."""
    good = {"prompt": "smile \U0001F600 \u4f60\u597d \u05e9\u05dc\u05d5\u05dd", "completion": "ok"}
    bad = '{"prompt": "broken \\ud83d emoji", "completion": "x"}'
    (tmp_path / "r.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
    with pytest.raises(DataError, match=r"r.jsonl: line 2 holds a lone UTF-16 surrogate"):
        load_rows(str(tmp_path / "r.jsonl"))
    (tmp_path / "r.json").write_text("[" + json.dumps(good) + ", " + bad + "]")
    with pytest.raises(DataError, match=r"r.json: row 1 holds a lone UTF-16 surrogate"):
        load_rows(str(tmp_path / "r.json"))
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")  # ensure_ascii: "\ud83d\ude00"
    assert "\\ud83d\\ude00" in (tmp_path / "ok.jsonl").read_text() and load_rows(str(tmp_path / "ok.jsonl")) == [good]
