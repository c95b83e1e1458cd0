"""OpenAI's content parts ([{"type": "text", "text": ...}]) as message content: text parts are read (joined by
newlines), other parts refused naming the row, message and part; they were refused whatever they held, and a chat
template given the list renders it or leaves it out as it pleases."""

from __future__ import annotations

import json

import pytest

from jaxrl_llm.data.chat import DataError, to_messages
from jaxrl_llm.data.preference import to_preference
from jaxrl_llm.data.tasks import load_tasks


def _parts(*texts: str, **extra) -> list[dict]:
    return [{"type": "text", "text": t, **extra} for t in texts]


def test_text_parts_are_the_messages_text():
    row = {"messages": [{"role": "user", "content": _parts("Add 2", "and 3.")},
                        {"role": "assistant", "content": _parts("5")}]}
    assert to_messages(row, 0) == [{"role": "user", "content": "Add 2\nand 3."}, {"role": "assistant", "content": "5"}]
    # a datasets table gives every part every key any part has, None where a part lacks it
    row = {"messages": [{"role": "user", "content": _parts("hi", image_url=None)},
                        {"role": "assistant", "content": []}]}
    assert to_messages(row, 0) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    prompt, chosen, rejected = to_preference({"prompt": [{"role": "user", "content": _parts("q")}],
                                              "chosen": [{"role": "assistant", "content": _parts("good")}],
                                              "rejected": "bad"}, 0)
    assert prompt[-1]["content"] == "q" and chosen[-1]["content"] == "good" and rejected[-1]["content"] == "bad"


@pytest.mark.parametrize("part,what", [
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, "a part of type 'image_url'"),
    ({"type": "text", "text": "a", "image_url": {"url": "u"}}, "a part with 'image_url'"),
    ({"type": "text", "text": 3}, "dict"),
    ("plain", "str 'plain'"),
])
def test_other_parts_are_refused_naming_row_message_and_part(part, what):
    row = {"messages": [{"role": "user", "content": _parts("look:") + [part]}, {"role": "assistant", "content": "ok"}]}
    with pytest.raises(DataError, match=rf"row 7: messages\[0\]\.content\[1\] is {what}"):
        to_messages(row, 7)
    with pytest.raises(DataError, match=r"row 2: chosen\[0\]\.content\[1\] is"):
        to_preference({"prompt": "q", "chosen": [{"role": "assistant", "content": _parts("a") + [part]}],
                       "rejected": "r"}, 2)


def test_task_files_read_text_parts(tmp_path):
    path = tmp_path / "tasks.jsonl"
    rows = [{"messages": [{"role": "user", "content": _parts("What is", "2+3?")}], "answer": "5"},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
             "answer": "1"}]
    path.write_text(json.dumps(rows[0]) + "\n")
    (task,) = load_tasks(str(path))
    assert task.messages[-1] == {"role": "user", "content": "What is\n2+3?"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 1: field 'messages\[0\]'.content\[0\] is a part of type 'image_url'"):
        load_tasks(str(path))
