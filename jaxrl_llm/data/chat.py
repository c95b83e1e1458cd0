"""Chat-template rendering with loss masks that cover exactly the assistant tokens."""

from __future__ import annotations

from typing import Any

import numpy as np


class DataError(ValueError):
    """A data row or file is malformed; the message names the row and the field."""


def as_messages(value: Any, index: int, field: str, default_role: str) -> list[dict[str, str]]:
    """A row's field as messages: a string is one message of `default_role`; a list must hold {role, content}."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: field {field!r} must be a string or a non-empty list of "
                        f"{{role, content}} messages; got {type(value).__name__}")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"row {index}: {field}[{j}] needs 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def to_messages(row: dict[str, Any], index: int) -> list[dict[str, str]]:
    """An SFT row as OpenAI-style messages: `messages`, or `prompt` + `completion`, each a string (a user and an
    assistant message) or a list of messages (TRL's conversational prompt-completion form)."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"row {index}: field 'messages' must be a non-empty list of {{role, content}}")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"row {index}: messages[{j}] needs 'role' and 'content'")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in row and "completion" in row:
        return (as_messages(row["prompt"], index, "prompt", "user")
                + as_messages(row["completion"], index, "completion", "assistant"))
    raise DataError(f"row {index}: missing field 'messages' (or 'prompt' and 'completion'); has {sorted(row)}")


def _render(tokenizer, messages, chat_template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    chat_template: str | None = None,
    last_assistant_only: bool = False,
    index: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T] int32, loss_mask [T] int32): the templated conversation; mask 1 on assistant tokens only.

    The conversation is rendered prefix by prefix; each assistant turn's tokens run from the end of the
    generation prompt (`<|im_start|>assistant\\n` for ChatML) to the end of its turn, end marker included.
    The template must render prefixes as string prefixes (true of ChatML, Llama 3, Qwen templates).
    """
    pieces: list[tuple[str, int]] = []
    done = ""
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_turns:
        raise DataError(f"row {index}: no assistant message to learn from")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = _render(tokenizer, messages[:i], chat_template, add_generation_prompt=True) if i else ""
            if not before.startswith(done):
                raise DataError(f"row {index}: the chat template does not render conversation prefixes as prefixes")
            pieces.append((before[len(done):], 0))
            done = before
        full = _render(tokenizer, messages[: i + 1], chat_template)
        if not full.startswith(done):
            raise DataError(f"row {index}: the chat template does not render conversation prefixes as prefixes")
        learn = m["role"] == "assistant" and (not last_assistant_only or i == assistant_turns[-1])
        pieces.append((full[len(done):], int(learn)))
        done = full
    ids: list[int] = []
    mask: list[int] = []
    for text, learn in pieces:
        if not text:
            continue
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        mask.extend([learn] * len(toks))
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
