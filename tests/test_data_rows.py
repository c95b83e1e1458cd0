"""Data rows as users write them: context turns that get no loss, message fields beyond role/content (tool calls,
reasoning, a row's tools), bad content types, unreadable files, and GRPO tasks from every local format."""

from __future__ import annotations

import importlib.util
import json

import datasets
import numpy as np
import pytest

from jaxrl_llm.data import DataError, load_rows
from jaxrl_llm.data.chat import row_tools, to_conversation, to_messages, tokenize_conversation
from jaxrl_llm.data.preference import to_preference, tokenize_pair
from jaxrl_llm.data.tasks import load_tasks

# A template that renders tool schemas, tool calls and reasoning, ChatML-style (prefix-stable).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content or '' }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}</call>{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _learned(tokenizer, ids, mask) -> str:
    return tokenizer.decode(ids[mask == 1])


def test_assistant_turns_inside_a_prompt_are_context(tokenizer):
    """TRL's conversational prompt-completion form: the loss covers the completion, not the prompt's own replies
    (SFT as TRL's completion_only_loss; DPO/RM the same through tokenize_pair)."""
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "PROMPT REPLY"},
              {"role": "user", "content": "2+2?"}]
    msgs, context = to_conversation({"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]}, 0)
    assert context == 1 and len(msgs) == 4
    ids, mask = tokenize_conversation(tokenizer, msgs, context_turns=context)
    assert _learned(tokenizer, ids, mask) == "4<|im_end|>\n"
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
    # messages rows have no prompt: every assistant turn is learned
    assert to_conversation({"messages": msgs}, 0)[1] == 0
    p, c, r = to_preference({"prompt": prompt, "chosen": "4", "rejected": "5"}, 0)
    pair = tokenize_pair(tokenizer, p, c, r)
    assert _learned(tokenizer, pair.chosen_ids, pair.chosen_mask) == "4<|im_end|>\n"
    assert _learned(tokenizer, pair.rejected_ids, pair.rejected_mask) == "5<|im_end|>\n"


def test_an_assistant_turn_that_opens_the_conversation_is_context(tokenizer):
    """Nothing prompts it, and SmolLM2's template puts its default system message before it: none of that is
    learned (it was, header and system prompt included)."""
    msgs = [{"role": "assistant", "content": "How can I help?"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"}]
    ids, mask = tokenize_conversation(tokenizer, msgs)
    assert _learned(tokenizer, ids, mask) == "Hello there<|im_end|>\n"
    with pytest.raises(DataError, match="row 3: no assistant message to learn from .*all context"):
        tokenize_conversation(tokenizer, msgs[:1], index=3)
    # the same after a system message: still nothing prompts the greeting
    sys_msgs = [{"role": "system", "content": "Be kind."}, *msgs]
    ids, mask = tokenize_conversation(tokenizer, sys_msgs)
    assert _learned(tokenizer, ids, mask) == "Hello there<|im_end|>\n"


def test_tool_calls_reasoning_and_tools_reach_the_template(tokenizer):
    row = {"tools": json.dumps([{"type": "function", "function": {"name": "get_weather"}}]),
           "messages": [
               {"role": "user", "content": "Weather in Paris?", "tool_calls": None},  # a datasets table's None
               {"role": "assistant", "content": None, "reasoning_content": "Call the tool.",
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
               {"role": "tool", "content": "18C"},
               {"role": "assistant", "content": "It is 18C."}]}
    msgs = to_messages(row, 0)
    assert "tool_calls" not in msgs[0]  # None fields are left out
    tools = row_tools(row, 0)
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=TOOL_TEMPLATE, tools=tools)
    full = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=TOOL_TEMPLATE, tools=tools)
    assert tokenizer.decode(ids) == full
    assert full.startswith("<|im_start|>system\nTools: get_weather<|im_end|>")
    assert _learned(tokenizer, ids, mask) == ("<think>Call the tool.</think><call>get_weather</call><|im_end|>\n"
                                              "It is 18C.<|im_end|>\n")
    with pytest.raises(DataError, match="row 2: field 'tools' is a string but not JSON"):
        row_tools({"tools": "[{"}, 2)
    with pytest.raises(DataError, match="row 2: field 'tools' must be a list of objects"):
        row_tools({"tools": [1]}, 2)


def test_preference_rows_with_tools_render_them_on_both_sides(tokenizer, tmp_path):
    """A DPO/RM row's `tools` reach the template for chosen and rejected (they were dropped without a word, so a
    tool-use model trained on prompts it never sees at inference), and a template that leaves tools out refuses
    the row."""
    import ml_collections

    from jaxrl_llm.data import preference as pref

    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    row = {"prompt": "Weather in Paris?", "chosen": "It is 18C.", "rejected": "No idea.", "tools": json.dumps(tools)}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = ml_collections.ConfigDict(dict(data=dict(source=str(path), num_examples=-1, max_len=128, overlong="drop",
                                                   chat_template=TOOL_TEMPLATE, shared_prefix=False)))
    (pair,), _ = pref.prepare(cfg, tokenizer)
    for ids, reply in ((pair.chosen_ids, "It is 18C."), (pair.rejected_ids, "No idea.")):
        msgs = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": reply}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=TOOL_TEMPLATE, tools=tools)
        assert tokenizer.decode(ids) == full and full.startswith("<|im_start|>system\nTools: get_weather")
    cfg.data.chat_template = ""  # SmolLM2's own template renders no tools
    with pytest.raises(DataError, match="row 0: has tools, which the chat template leaves out"):
        pref.prepare(cfg, tokenizer)


@pytest.mark.parametrize("content", [None, 7, {"type": "text", "text": "hi"}], ids=["none", "int", "part"])
def test_message_content_of_the_wrong_type_names_the_row_and_message(content):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    with pytest.raises(DataError, match=r"row 3: messages\[1\]\.content must be a string"):
        to_messages({"messages": msgs}, 3)
    with pytest.raises(DataError, match=r"row 4: chosen\[0\]\.content must be a string"):
        to_preference({"prompt": "q", "chosen": msgs[1:], "rejected": "r"}, 4)
    with pytest.raises(DataError, match=r"row 5: messages\[0\]\.role must be a string"):
        to_messages({"messages": [{"role": 1, "content": "q"}]}, 5)


def test_missing_field_errors_list_only_the_fields_a_row_has():
    """A datasets table gives a row every column of the file, None where the row lacks it."""
    with pytest.raises(DataError, match=r"row 2: missing field 'messages' .*; has \['text'\]$"):
        to_messages({"messages": None, "text": "x"}, 2)
    with pytest.raises(DataError, match=r"row 1: missing field 'rejected'; has \['chosen', 'prompt'\]$"):
        to_preference({"prompt": "p", "chosen": "c", "rejected": None}, 1)


@pytest.mark.parametrize("name,text,needle", [
    ("empty.jsonl", "", "no rows"),
    ("blank.jsonl", "\n\n", "no rows"),
    ("bad.jsonl", '{"prompt": "a"}\n{bad\n', "line 2 is not valid JSON"),
    ("empty.json", "[]", "no rows"),
    ("bad.json", "{", "not valid JSON"),
    ("scalar.json", "7", "expected a list of rows"),
    ("ragged.json", '{"prompt": ["a", "b"], "completion": ["c"]}', "columns of different lengths"),
    ("strings.jsonl", '"a"\n', "row 0 is a str, not an object"),
])
def test_unreadable_json_files_are_data_errors_naming_the_file(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=needle) as e:
        load_rows(str(path))
    assert name in str(e.value)


def test_json_rows_are_read_as_written(tmp_path):
    """A table would cast the column to one type (int 7 among strings made every row an int, and the error named
    row 0); the rows of a file are what it holds, columns missing from a row stay missing."""
    rows = [{"prompt": str(i), "completion": "x"} for i in range(5)] + [{"prompt": "5", "completion": 7}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_rows(str(tmp_path / "r.jsonl"))
    assert got == rows
    with pytest.raises(DataError, match=r"row 5: field 'completion' must be a string .* got int"):
        for i, r in enumerate(got):
            to_messages(r, i)
    (tmp_path / "cols.json").write_text(json.dumps({"prompt": ["a", "b"], "completion": ["c", "d"]}))
    assert load_rows(str(tmp_path / "cols.json")) == [{"prompt": "a", "completion": "c"},
                                                      {"prompt": "b", "completion": "d"}]
    (tmp_path / "lines.json").write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_rows(str(tmp_path / "lines.json")) == [{"prompt": "a"}, {"prompt": "b"}]
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "a", "extra": 1}, {"prompt": "b"}]))
    assert load_rows(str(tmp_path / "list.json")) == [{"prompt": "a", "extra": 1}, {"prompt": "b"}]


def _task_rows():
    return [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]


@pytest.mark.parametrize("kind", ["dataset", "parquet", "csv", "jsonl"])
def test_grpo_tasks_from_every_local_format(tmp_path, kind):
    ds = datasets.Dataset.from_list(_task_rows())
    if kind == "dataset":
        source = ds
    elif kind == "jsonl":
        source = str(tmp_path / "t.jsonl")
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _task_rows()))
    else:
        source = str(tmp_path / f"t.{kind}")
        getattr(ds, f"to_{kind}")(source, **({"index": False} if kind == "csv" else {}))
    tasks = load_tasks(source, 2, instruction="")
    assert [t.messages[-1]["content"] for t in tasks] == ["1+1?", "2+2?"]
    assert [t.metadata["answer"] for t in tasks] == ["2", "4"]
    # 0 means all, as data.num_examples does for SFT/DPO
    assert len(load_tasks(source, 0)) == len(load_tasks(source, -1)) == 3


def test_grpo_task_prompts_given_as_messages(tmp_path):
    """TRL's conversational prompt-only layout ({"prompt": [messages], "answer"}): refused as 'must be a string'."""
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}],
             "answer": "2"}, {"prompt": [{"role": "assistant", "content": "hi"}], "answer": "0"}]
    tasks = load_tasks(datasets.Dataset.from_list(rows[:1]), instruction="")
    assert [dict(m) for m in tasks[0].messages] == rows[0]["prompt"] and tasks[0].metadata["answer"] == "2"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 1: field 'prompt' ends with an assistant turn"):
        load_tasks(str(tmp_path / "t.jsonl"), instruction="")


def test_bad_task_rows_from_a_dataset_name_the_row():
    ds = datasets.Dataset.from_list([{"prompt": "q", "answer": "1"}, {"prompt": None, "answer": "2"}])
    with pytest.raises(DataError, match=r"<datasets.Dataset of 2 rows>: row 1: missing field 'prompt'"):
        load_tasks(ds)
    with pytest.raises(DataError, match="apply only to reasoning-gym"):
        load_tasks(ds, size=3)


def test_loss_mask_is_unchanged_for_plain_conversations(tokenizer):
    """The context rules change nothing for a conversation that starts with the user: every reply is learned."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = tokenize_conversation(tokenizer, msgs)
    assert _learned(tokenizer, ids, mask) == "b<|im_end|>\nd<|im_end|>\n"
    assert np.array_equal(ids, tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False),
                                         add_special_tokens=False)["input_ids"])


# Not prefix-stable (the whole conversation ends with an end-of-text token, as Phi-3's template does), but the
# assistant's tokens are marked with {% generation %} blocks, as in TRL's training templates.
MARKED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")


def test_templates_with_generation_blocks_mark_the_assistant_tokens(tokenizer):
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    plain = MARKED_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match=r"row 0: the chat template renders an earlier .* \{% generation %\} blocks"):
        tokenize_conversation(tokenizer, msgs, chat_template=plain)
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=MARKED_TEMPLATE)
    full = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=MARKED_TEMPLATE)
    assert tokenizer.decode(ids) == full and full.endswith("<|endoftext|>")
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert [tokenizer.decode(ids[a:b]) for a, b in zip(spans[0::2], spans[1::2], strict=True)] == [
        "4<|im_end|>", "6<|im_end|>"]
    _, last = tokenize_conversation(tokenizer, msgs, chat_template=MARKED_TEMPLATE, last_assistant_only=True)
    assert _learned(tokenizer, ids, last) == "6<|im_end|>"
    _, ctx = tokenize_conversation(tokenizer, msgs, chat_template=MARKED_TEMPLATE, context_turns=1)
    assert _learned(tokenizer, ids, ctx) == "6<|im_end|>"
    # a template that marks only the last reply: with every turn learned its one block is the loss; with only
    # some turns learned there is no telling whose the block is
    only_last = MARKED_TEMPLATE.replace("m.role == 'assistant'", "m.role == 'assistant' and loop.last")
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=only_last)
    assert _learned(tokenizer, ids, mask) == "6<|im_end|>"
    with pytest.raises(DataError, match="row 0: .* mark 1 spans for 2 assistant turns, and only some"):
        tokenize_conversation(tokenizer, msgs, chat_template=only_last, context_turns=1)


def test_generation_blocks_are_tokenized_apart_from_the_prompt(tokenizer):
    """The conversation was tokenized whole and the blocks mapped onto its tokens: a reply that starts with a
    newline merged with the header's into one token, learned, and the tokens before the reply were not those
    of the sampler's prompt. Each piece is tokenized on its own now, as on the prefix path."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nFirst, 2+2=4."}]
    for template in (MARKED_TEMPLATE, None):  # the prefix path (the tokenizer's ChatML) agrees
        prompt = tokenizer(tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True,
                                                         chat_template=template), add_special_tokens=False)
        ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=template)
        first = int(np.flatnonzero(mask)[0])
        assert list(ids[:first]) == prompt["input_ids"] and tokenizer.decode(ids[first:first + 1]) == "\n"
    with pytest.raises(DataError, match="row 3: holds the character U\\+E000"):
        tokenize_conversation(tokenizer, [msgs[0], {"role": "assistant", "content": "a\ue000b"}],
                              chat_template=MARKED_TEMPLATE, index=3)


def _trl_training_templates() -> list[str]:
    if importlib.util.find_spec("trl") is None:
        return []
    import glob
    import os

    import trl

    return sorted(glob.glob(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "*_training.jinja")))


@pytest.mark.parametrize("path", _trl_training_templates(), ids=lambda p: p.rsplit("/", 1)[-1])
def test_trl_training_templates_mark_each_reply(tokenizer, path):
    """TRL's training templates (Qwen, Llama 3, Phi-3, Gemma, DeepSeek, gpt-oss, ...): the tokens spell HF's
    render, and the loss covers each reply (with what the template puts in its block), nothing of the prompts.
    Some put one turn in several blocks (Phi-3: the final EOS in its own) or need another message layout."""
    import jinja2

    template = open(path).read()
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "Six."}]
    try:
        full = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template)
    except (jinja2.TemplateError, TypeError, ValueError) as e:  # e.g. content as a list of parts (VLM templates)
        pytest.skip(f"the template does not render plain text messages: {e}")
    if "It is 4." not in full:  # VLM templates that render only a list of content parts
        pytest.skip("the template does not render string content")
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=template)
    assert tokenizer.decode(ids) == full
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [tokenizer.decode(ids[a:b]) for a, b in zip(edges[0::2], edges[1::2], strict=True)]
    assert len(spans) == 2 and "It is 4." in spans[0] and "Six." in spans[1]
    assert not any(q in x for q in ("2+2?", "3+3?") for x in spans)
    _, last = tokenize_conversation(tokenizer, msgs, chat_template=template, last_assistant_only=True)
    assert _learned(tokenizer, ids, last) == spans[1]


PLAIN_TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def test_templates_that_end_turns_with_no_special_token_get_eos(tokenizer, tmp_path, caplog):
    """A plain-text template (a base model's) ends a reply with text: without an EOS in the loss the model never
    learns to stop. Templates whose turns end with a special token (ChatML's <|im_end|>) are left as they are."""
    from recipes import recipe

    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.data.chat import turn_end_token

    eos = tokenizer.eos_token_id
    assert turn_end_token(tokenizer, None) is None  # SmolLM2's ChatML closes turns with <|im_end|>
    assert turn_end_token(tokenizer, MARKED_TEMPLATE) is None  # its blocks say what is learned
    assert turn_end_token(tokenizer, PLAIN_TEMPLATE, enabled=False) is None
    with caplog.at_level("WARNING", logger="jaxrl_llm.data.chat"):
        assert turn_end_token(tokenizer, PLAIN_TEMPLATE) == eos
    assert "ends assistant turns with no special token" in caplog.text
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=PLAIN_TEMPLATE, eos_id=eos)
    spans = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    learned = [tokenizer.decode(ids[a:b]) for a, b in zip(spans[0::2], spans[1::2], strict=True)]
    assert learned == ["b\n\n" + tokenizer.eos_token, "d\n\n" + tokenizer.eos_token]
    # through SFT's data preparation, on by default
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    for add_eos, n_eos in ((True, 2), (False, 0)):
        c = recipe("sft_tiny", {"data.source": str(path), "data.chat_template": PLAIN_TEMPLATE,
                                "data.add_eos": add_eos, "data.num_examples": -1})
        (ex_ids, ex_mask), = sft.prepare(c, tokenizer)[0]
        assert int((ex_ids[ex_mask == 1] == eos).sum()) == n_eos


def test_a_row_cut_and_then_dropped_counts_as_dropped_only(tokenizer, tmp_path):
    """`truncated` counts the rows trained on in cut form: a row whose prompt fills data.max_len is cut, has no
    reply token left and is dropped, and was counted in both (truncated + dropped exceeded the rows)."""
    from recipes import recipe

    from jaxrl_llm.algorithms import sft

    def turn(user, reply):
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [turn("word " * 100, "ok"), turn("hi", "hello " * 100),
                                                             turn("hi", "short")]))
    c = recipe("sft_tiny", {"data.source": str(path), "data.num_examples": -1, "data.max_len": 64,
                            "data.overlong": "truncate"})
    out, stats = sft.prepare(c, tokenizer)
    assert stats == {"rows": 3, "truncated": 1, "dropped": 1} and len(out) == 2
    assert [len(ids) for ids, _ in out] == [64, len(out[1][0])] and len(out[1][0]) < 64


def test_rows_left_out_by_num_examples_are_logged(tmp_path, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(40)))
    with caplog.at_level("INFO", logger="jaxrl_llm.data.sources"):
        assert len(load_rows(str(path), 16)) == 16
        assert len(load_rows(str(path), -1)) == len(load_rows(str(path), 40)) == 40
    # a .jsonl file is read no further than the rows asked for, so its length is not known
    assert caplog.text.count("the first 16 rows of") == 1 and "data.num_examples=16" in caplog.text
    assert "not read" in caplog.text and caplog.text.count("rows of") == 1  # all taken (40 of 40): nothing said


def test_a_row_the_template_refuses_is_a_data_error_naming_it(tokenizer):
    """Gemma's template raises on a system turn: a jinja traceback, not a row number, was what a user saw."""
    refusing = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(DataError, match="row 7: the chat template fails on it .*System role not supported"):
        tokenize_conversation(tokenizer, msgs, chat_template=refusing, index=7)
    ids, mask = tokenize_conversation(tokenizer, msgs[1:], chat_template=refusing)
    assert _learned(tokenizer, ids, mask) == "a<|im_end|>\n"
