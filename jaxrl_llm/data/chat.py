"""Chat-template rendering with loss masks that cover exactly the assistant tokens."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data row or file is malformed; the message names the row and the field."""


Pieces = list[tuple[str, int]]  # a conversation's text in (text, learned) pieces: 1 where the loss counts


def check_message(m: Any, index: int, where: str) -> dict[str, Any]:
    """One message of a row, validated: `role` a string, `content` a string (or None beside `tool_calls`, or a list of
    text parts: `text_of_parts`), `weight`
    (OpenAI's fine-tuning format: 0 keeps an assistant message out of the loss) 0 or 1. Its other fields
    (tool_calls, reasoning_content, name, ...) go to the chat template too; fields that are None are left out (a
    datasets table gives every message every column of the file, None where a message lacks it)."""
    if isinstance(m, dict) and "content" not in m and m.get("tool_calls"):
        m = {**m, "content": None}  # OpenAI's fine-tuning files leave a tool-calling reply's content out
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise DataError(f"row {index}: {where} needs 'role' and 'content'")
    if not isinstance(m["role"], str):
        raise DataError(f"row {index}: {where}.role must be a string; got {type(m['role']).__name__}")
    content = m["content"]
    if isinstance(content, list):  # OpenAI's content parts: text-only models take their text
        content = text_of_parts(content, f"row {index}: {where}.content")
        m = {**m, "content": content}
    if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
        raise DataError(f"row {index}: {where}.content must be a string (or null beside tool_calls); got "
                        f"{type(content).__name__}")
    weight = m.get("weight")
    if weight is not None and (weight not in (0, 1) or not isinstance(weight, int | float)):
        raise DataError(f"row {index}: {where}.weight must be 0 (no loss on the message) or 1; got {weight!r}")
    return {k: v for k, v in m.items() if v is not None or k == "content"}


def text_of_parts(parts: list, where: str) -> str:
    """OpenAI's content parts ([{"type": "text", "text": ...}, ...]) as one string, the parts' texts joined by newlines
    (as vLLM's OpenAI server joins them). A part of another type (image_url, input_audio, ...) is refused: the models
    are text-only, and a chat template given the list would render it or leave it out as it pleases (Qwen3's renders
    a list as nothing)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        extra = sorted(k for k, v in part.items() if k not in ("type", "text") and v is not None) \
            if isinstance(part, dict) else []
        if kind != "text" or not isinstance(part.get("text"), str) or extra:
            what = (f"a part of type {kind!r}" if isinstance(kind, str) and kind != "text" else
                    f"a part with {', '.join(map(repr, extra))}" if extra and kind == "text" else
                    f"{type(part).__name__} {part!r}"[:120])
            raise DataError(f"{where}[{j}] is {what}: content parts must be "
                            '{"type": "text", "text": <string>} (text-only models)')
        texts.append(part["text"])
    return "\n".join(texts)


def as_messages(value: Any, index: int, field: str, default_role: str) -> list[dict[str, Any]]:
    """A row's field as messages: a string is one message of `default_role`; a list must hold {role, content}."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"row {index}: field {field!r} must be a string or a non-empty list of "
                        f"{{role, content}} messages; got {type(value).__name__}")
    return [check_message(m, index, f"{field}[{j}]") for j, m in enumerate(value)]


def present_fields(row: dict[str, Any]) -> list[str]:
    """The row's fields that hold a value (a datasets table fills the columns a row lacks with None)."""
    return sorted(k for k, v in row.items() if v is not None)


def to_conversation(row: dict[str, Any], index: int) -> tuple[list[dict[str, Any]], int]:
    """An SFT row as (OpenAI-style messages, how many of its first assistant turns are context): `messages`
    (context 0), or `prompt` + `completion`, each a string (a user and an assistant message) or a list of
    messages (TRL's conversational prompt-completion form, where the prompt's own assistant turns are context)."""
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"row {index}: field 'messages' must be a non-empty list of {{role, content}}")
        return [check_message(m, index, f"messages[{j}]") for j, m in enumerate(msgs)], 0
    if row.get("prompt") is not None and row.get("completion") is not None:
        if isinstance(row.get("label"), bool) or str(row.get("label")).lower() in ("true", "false"):
            raise DataError(f"row {index}: has a true/false 'label' (TRL's unpaired preference layout, for KTO): SFT "
                            "would learn the completions labelled false as well; keep only the rows to imitate")
        prompt = as_messages(row["prompt"], index, "prompt", "user")
        completion = response_after(prompt, as_messages(row["completion"], index, "completion", "assistant"),
                                    index, "completion")
        return prompt + completion, sum(m["role"] == "assistant" for m in prompt)
    raise DataError(f"row {index}: missing field 'messages' (or 'prompt' and 'completion', or 'text'); has "
                    f"{present_fields(row)}")


def lm_text(row: dict[str, Any], index: int) -> str | None:
    """A language-modeling row's `text` (TRL's "text" layout: plain text, learned whole, no chat template), or None
    for a row with `messages` or `prompt` (a conversation) or without `text`."""
    if row.get("messages") is not None or row.get("prompt") is not None or row.get("text") is None:
        return None
    if not isinstance(row["text"], str):
        raise DataError(f"row {index}: field 'text' must be a string; got {type(row['text']).__name__}")
    return row["text"]


def _same_turn(a: dict[str, Any], b: dict[str, Any]) -> bool:
    strip = (lambda c: c.strip() if isinstance(c, str) else c)
    return a["role"] == b["role"] and strip(a["content"]) == strip(b["content"])


def response_after(prompt: list[dict[str, Any]], response: list[dict[str, Any]], index: int, field: str
                   ) -> list[dict[str, Any]]:
    """A prompt/response row's response, without a repeat of the prompt's messages (ultrafeedback_binarized's
    responses hold the whole conversation): a response that starts with the prompt's messages (whitespace aside)
    has them left out; one that otherwise starts with other messages than the assistant's right after a prompt
    that ends with a user (or tool) turn is an error naming the field (a turn would be taken twice)."""
    n = len(prompt)
    if len(response) > n and all(_same_turn(a, b) for a, b in zip(response[:n], prompt, strict=True)):
        return response[n:]
    first = next((k for k, m in enumerate(response) if m["role"] == "assistant"), len(response))
    if first == 0 or first == len(response) or not prompt or prompt[-1]["role"] == "assistant":
        return response  # (no assistant message at all: the caller says so)
    raise DataError(f"row {index}: field {field!r} starts with {[m['role'] for m in response[:first]]} messages "
                    f"right after the prompt's {prompt[-1]['role']} turn, and they are not the prompt's messages "
                    "repeated; a response starts with the assistant's reply (give the shared messages in the prompt "
                    "only)")


def dropped_fields(tokenizer: Any, chat_template: str | None, roles: Any = ()) -> set[str]:
    """Which of a row's extra fields the template leaves out of its text: "tool_calls" (an assistant message's
    calls), "tools" (the row's function schemas), "reasoning_content"; and "role:<name>" for each of `roles` (the
    data's, other than user and assistant) whose messages it leaves out wherever they stand (Qwen2.5's template
    renders no "developer" message: the instruction would be dropped). A template that fails on a probe is not
    judged (its rows say so themselves)."""
    user = {"role": "user", "content": "Hi"}
    call = {"type": "function", "id": "c1", "function": {"name": "probe_fn_q", "arguments": {"a": 1}}}
    tool = {"type": "function", "function": {"name": "probe_tool_q", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    probes = {"tool_calls": ([user, {"role": "assistant", "content": "", "tool_calls": [call]}], None, "probe_fn_q"),
              "reasoning_content": ([user, {"role": "assistant", "content": "Ok", "reasoning_content": "probe_rs_q"}],
                                    None, "probe_rs_q"),
              "tools": ([user, {"role": "assistant", "content": "Ok"}], [tool], "probe_tool_q")}
    out = set()
    for name, (msgs, tools, mark) in probes.items():
        # tool calls also with tools given: a tokenizer's named templates pick "tool_use" for those
        shown = False
        for t in ((None, [tool]) if name == "tool_calls" else (tools,)):
            try:
                shown = shown or mark in _render(tokenizer, msgs, chat_template, tools=t)
            except Exception:  # noqa: BLE001 (a template's own refusal of the probe: not judged)
                shown = True
        if not shown:
            out.add(name)
    for role in sorted(set(roles) - {"user", "assistant"}):
        probe = {"role": role, "content": "probe_role_q"}
        shown = False
        for msgs in ([probe, user], [user, probe], [user, {"role": "assistant", "content": "Ok"}, probe],
                     [user, {"role": "assistant", "content": "", "tool_calls": [call]}, probe]):  # (a tool's reply)
            for t in (None, [tool]):  # (a "tool_use" named template for rows with tools)
                try:
                    shown = shown or "probe_role_q" in _render(tokenizer, msgs, chat_template, tools=t)
                except Exception:  # noqa: BLE001 (as above)
                    shown = True
        if not shown:
            out.add(f"role:{role}")
    return out


def check_prompt_roles(tokenizer: Any, conversations: list, chat_template: str | None, what: str = "task") -> None:
    """A DataError naming the first prompt (GRPO's and evaluation's tasks) with a message of a role the chat
    template leaves out of its text (`dropped_fields`): the model would be asked without that instruction."""
    roles = {m["role"] for conv in conversations for m in conv} - {"user", "assistant"}
    if not roles:
        return
    dropped = dropped_fields(tokenizer, chat_template, roles)
    for i, conv in enumerate(conversations):
        _refuse_dropped_roles(conv, dropped, f"{what} {i}")


def _refuse_dropped_roles(messages: list[dict[str, Any]], dropped: set[str], where: str) -> None:
    for m in messages:
        if f"role:{m['role']}" in dropped:
            raise DataError(f"{where}: has a {m['role']!r} message, which the chat template leaves out of its text "
                            "(the model would never see it); give it a role the template renders (e.g. 'system' for "
                            "'developer') or set data.chat_template to one that renders it")


def check_rendered(messages: list[dict[str, Any]], tools: Any, dropped: set[str], index: int) -> bool:
    """A DataError when the row holds tool calls or tools that the template (`dropped_fields`) leaves out of its
    text: the reply would be learned without its calls, the model without the schemas. Returns whether the row's
    reasoning_content is left out (counted by the caller). A message of a role the template leaves out is a
    DataError too."""
    _refuse_dropped_roles(messages, dropped, f"row {index}")
    for j, m in enumerate(messages):
        if "tool_calls" in dropped and m.get("tool_calls"):
            raise DataError(f"row {index}: message {j} has tool_calls, which the chat template leaves out of its "
                            "text (the reply would be learned without them); set data.chat_template to one that "
                            "renders tool calls")
    if "tools" in dropped and tools:
        raise DataError(f"row {index}: has tools, which the chat template leaves out of its text; set "
                        "data.chat_template to one that lists them, or drop the column")
    return "reasoning_content" in dropped and any(m.get("reasoning_content") for m in messages)


def to_messages(row: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """`to_conversation`'s messages alone."""
    return to_conversation(row, index)[0]


def row_tools(row: dict[str, Any], index: int) -> list[dict[str, Any]] | None:
    """A row's `tools` (function schemas the chat template lists for the model): a list of objects, or a JSON
    string of one; None when the row has none."""
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"row {index}: field 'tools' is a string but not JSON ({e})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"row {index}: field 'tools' must be a list of objects (function schemas)")
    return tools or None


def _render(tokenizer, messages, chat_template, add_generation_prompt=False, tools=None, index: int | None = None
            ) -> str:
    """The template's text; with `index`, an error the template raises on this row is a DataError naming it."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, tools=tools)
    except jinja2.TemplateError as e:
        if index is None or isinstance(e, jinja2.TemplateSyntaxError):
            raise
        raise DataError(f"row {index}: the chat template fails on it ({type(e).__name__}: {e})") from None


def check_template(tokenizer: Any, chat_template: str | None) -> None:
    """ValueError naming the line when the template (data.chat_template, or the tokenizer's) does not parse, or
    naming data.chat_template when there is none (a base model's tokenizer)."""
    import jinja2

    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("has no chat template (a base model's?): set data.chat_template to one; every row (plain-"
                         "string prompt/completion/chosen/rejected too; SFT rows of plain 'text' need none) and every "
                         "GRPO or evaluation prompt is rendered with it")
    try:
        _render(tokenizer, [{"role": "user", "content": "Hi"}], chat_template, add_generation_prompt=True)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None
    except jinja2.TemplateError:
        pass  # it parses; what it refuses (a system turn, say) is said for each row that has it


_REMEDY = ("set data.chat_template to one that does, or to one that marks the assistant's tokens with "
           "{% generation %} blocks")


def _not_prefix(index: int, turn: int, rewritten: bool) -> str:
    """Why a learned turn cannot be trained as the sampler would write it, and what to do."""
    if rewritten:  # an earlier learned turn renders differently once this one's prompt follows it
        return (f"row {index}: the chat template renders an earlier assistant turn differently once later turns "
                f"follow it (message {turn}'s prompt; some templates drop earlier turns' reasoning), so not every "
                "reply can be learned as generated: learn the last only (data.last_assistant_only=True), or "
                + _REMEDY.replace("does", "keeps earlier turns as they were"))
    return (f"row {index}: the chat template does not render assistant message {turn} as a continuation of its "
            "generation prompt (add_generation_prompt=True): e.g. a reply with reasoning after a prompt that closes "
            "the thinking block (enable_thinking=false), or a template that rewrites the last reply; "
            + _REMEDY.replace("does", "renders the prompt as the start of the reply"))


_GENERATION_BLOCK = re.compile(r"{%[-+]?\s*generation\s*[-+]?%}")


def _has_generation_blocks(tokenizer: Any, chat_template: str | None) -> bool:
    """Whether the template in use marks the assistant's tokens with {% generation %} ... {% endgeneration %}."""
    template = _template_source(tokenizer, chat_template)
    return template is not None and bool(_GENERATION_BLOCK.search(template))


# {% generation %} / {% endgeneration %} tags -> characters that mark the blocks' edges in the rendered text: two
# private-use code points no tokenizer's text should hold.
_GENERATION_TAG = re.compile(r"{%([-+]?)\s*(end)?generation\s*([-+]?)%}")
_OPEN, _CLOSE = "\ue000", "\ue001"


def _marker_tags(m: re.Match) -> str:
    """A generation tag as two always-true block tags with the marker between them: the first takes the tag's
    left whitespace control (and lstrip_blocks), the second its right one (and trim_blocks, which drops a newline
    after a block tag), so the text renders exactly as with the original tag, plus the marker."""
    if m[2]:
        return "{%" + m[1] + " endif %}{{ '" + _CLOSE + "' }}{% endif " + m[3] + "%}"
    return "{%" + m[1] + " if true %}{{ '" + _OPEN + "' }}{% if true " + m[3] + "%}"


def _template_source(tokenizer: Any, chat_template: str | None) -> str | None:
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is used
        template = template.get("default")
    return template if isinstance(template, str) else None


def _holds_marker(tree: Any) -> bool:
    if isinstance(tree, str):
        return _OPEN in tree or _CLOSE in tree
    if isinstance(tree, dict):
        return any(_holds_marker(k) or _holds_marker(v) for k, v in tree.items())
    return isinstance(tree, list | tuple) and any(_holds_marker(v) for v in tree)


def _marked_pieces(tokenizer, messages, chat_template, tools, assistant_turns, learned, index) -> Pieces:
    """The conversation rendered once, with each {% generation %} block's edges marked; the text between the
    edges as (text, learned) pieces, to be tokenized piece by piece as on the prefix path (a reply starts a new
    token, and the tokens before it are those the sampler's prompt has; HF's assistant mask, over the whole
    render's tokens, can take in a token that straddles an edge), the learned turns' blocks learned. Blocks
    are matched to assistant turns in order, one each, after joining a block to the one right before it; with
    another count every block is learned when every turn is, else it is an error. For templates that do not
    render prefixes as prefixes (those that rewrite earlier turns, or close the conversation with an end-of-text
    token)."""
    source = _template_source(tokenizer, chat_template)
    marked = _GENERATION_TAG.sub(_marker_tags, source)
    if _holds_marker((messages, tools)):
        raise DataError(f"row {index}: holds the character U+E000 or U+E001, which mark the chat template's "
                        "{% generation %} blocks here")
    text = _render(tokenizer, messages, marked, tools=tools, index=index)
    pieces = re.split(f"([{_OPEN}{_CLOSE}])", text)
    edges = pieces[1::2]
    if edges != [_OPEN, _CLOSE] * (len(edges) // 2):
        raise DataError(f"row {index}: the chat template's {{% generation %}} blocks are nested or unclosed")
    # (text, block number or -1 outside the blocks); a block that directly follows another continues it (Phi-3's
    # template puts the final EOS in a block of its own right after the last reply's)
    segments: list[tuple[str, int]] = [(pieces[0], -1)]
    for inside, after in zip(pieces[2::4], pieces[4::4], strict=True):
        if len(segments) > 1 and segments[-1] == ("", -1):
            segments.pop()
            segments[-1] = (segments[-1][0] + inside, segments[-1][1])
        else:
            segments.append((inside, 1 + max(b for _, b in segments)))
        segments.append((after, -1))
    n_blocks = 1 + max(b for _, b in segments)
    if n_blocks == len(assistant_turns):
        learned_blocks = {b for b, turn in enumerate(assistant_turns) if turn in learned}
    elif set(learned) == set(assistant_turns):  # every turn learned: no need to tell whose each block is
        learned_blocks = set(range(n_blocks))
    else:
        raise DataError(f"row {index}: the chat template's {{% generation %}} blocks mark {n_blocks} spans for "
                        f"{len(assistant_turns)} assistant turns, and only some turns are learned "
                        "(context turns, data.last_assistant_only): cannot tell which tokens are whose")
    return [(piece, int(block in learned_blocks)) for piece, block in segments]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pieces_tokenize_alone(tokenizer) -> bool:
    """Whether text split before a space or after a newline tokenizes as the whole does: true of byte-level BPE
    (Llama 3, Qwen, SmolLM2); false of a tokenizer that puts a space before every text it is given, which would
    start each reply that follows a newline (ChatML's "assistant\n") with a spurious "▁" token: SentencePiece
    that prepends "▁" to every text (Llama 2's and Mistral v0.1's legacy tokenizers) or to its first word
    (Metaspace prepend_scheme "first": Mistral v0.3's), byte-level BPE with add_prefix_space."""
    return all(_encode(tokenizer, a) + _encode(tokenizer, b) == _encode(tokenizer, a + b)
               for a, b in (("Hello", " world"), ("Hi\n", "Hello")))


def tokenize_pieces(tokenizer, rows: list[tuple[Pieces, int | None]], alone: bool | None = None
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each row's (text, learned) pieces; a row's eos_id (or None) closes each of its learned pieces.

    Each piece is tokenized on its own where the tokenizer allows it (`alone`: `pieces_tokenize_alone`, worked
    out here when not given); else after the piece before it (the tokens the two texts together add to those of
    the one before, when the latter are their prefix; else on its own), as the model reads a reply after its
    prompt. One piece of context, not the whole text before it, keeps long conversations linear in their length.
    Every text of all the rows goes to the tokenizer in one call: a fast tokenizer encodes a batch on all cores,
    and a call per piece cost more in Python than the encoding itself."""
    if alone is None:
        alone = pieces_tokenize_alone(tokenizer)
    rows = [([(t, learn) for t, learn in pieces if t], eos_id) for pieces, eos_id in rows]
    texts = [t for pieces, _ in rows for t, _ in pieces]
    if not alone:  # each piece also after the one before it
        texts += [a + b for pieces, _ in rows for (a, _), (b, _) in zip(pieces, pieces[1:], strict=False)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    owns = [[list(next(encoded)) for _ in pieces] for pieces, _ in rows]
    out = []
    for (pieces, eos_id), own in zip(rows, owns, strict=True):
        ids: list[int] = []
        mask: list[int] = []
        for j, (_, learn) in enumerate(pieces):
            toks = own[j]
            if not alone and j:
                both = list(next(encoded))
                if both[:len(own[j - 1])] == own[j - 1]:
                    toks = both[len(own[j - 1]):]
            if learn and eos_id is not None:
                toks = [*toks, eos_id]
            ids.extend(toks)
            mask.extend([learn] * len(toks))
        out.append((np.asarray(ids, np.int32), np.asarray(mask, np.int32)))
    return out


def turn_end_token(tokenizer: Any, chat_template: str | None = None, *, enabled: bool = True) -> int | None:
    """The EOS id to close each learned assistant turn with when the template ends a turn with no special token
    (a plain-text template, e.g. for a base model: the model would never learn to stop), logged; else None.
    Templates with {% generation %} blocks mark the turn end themselves. `enabled`: data.add_eos."""
    if not enabled or _has_generation_blocks(tokenizer, chat_template):
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    before = _render(tokenizer, probe[:1], chat_template, add_generation_prompt=True)
    full = _render(tokenizer, probe, chat_template)
    if not full.startswith(before):
        return None  # every row says so (tokenize_conversation)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if any(t in special for t in tokenizer(full[len(before):], add_special_tokens=False)["input_ids"]):
        return None
    if tokenizer.eos_token_id is None:
        log.warning("data: the chat template ends assistant turns with no special token and the tokenizer has no "
                    "EOS token: the model will not learn to stop")
        return None
    log.warning("data: the chat template ends assistant turns with no special token; each learned turn is closed "
                "with EOS %r (id %d) so the model learns to stop (data.add_eos=False: not)", tokenizer.eos_token,
                tokenizer.eos_token_id)
    return int(tokenizer.eos_token_id)


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, Any]], **kwargs: Any
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T] int32, loss_mask [T] int32): the templated conversation; mask 1 on assistant tokens only. Keyword
    arguments as `conversation_pieces` takes them; many rows: `conversation_pieces` of each, then one
    `tokenize_pieces` call for all of them (what data preparation does)."""
    return tokenize_pieces(tokenizer, [conversation_pieces(tokenizer, messages, **kwargs)])[0]


def conversation_pieces(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    chat_template: str | None = None,
    last_assistant_only: bool = False,
    index: int = 0,
    context_turns: int = 0,
    tools: list[dict[str, Any]] | None = None,
    eos_id: int | None = None,
) -> tuple[Pieces, int | None]:
    """The templated conversation as (text, learned) pieces, and the EOS id `tokenize_pieces` closes each learned
    piece with (None: none); learned (1) on assistant tokens only.

    The conversation is rendered prefix by prefix; each assistant turn's tokens run from the end of the
    generation prompt (`<|im_start|>assistant\\n` for ChatML) to the end of its turn, end marker included.
    The template must render prefixes as string prefixes (true of ChatML, Llama 3, Qwen templates).
    Assistant turns that are context get no loss: the first `context_turns` (a prompt's own assistant turns),
    those that open the conversation (no user or tool message before them, only a system message or none), and
    those with `weight` 0 (OpenAI's fine-tuning format).
    A template with {% generation %} blocks (TRL's training templates) is rendered once instead, and the blocks
    mark the assistant tokens (`_marked_pieces`): it need not render prefixes as prefixes.
    eos_id: appended (with loss) after each learned turn (`turn_end_token`: templates that end turns with no
    special token).
    Each piece is tokenized on its own, as NeMo RL tokenizes each message: the prompt's tokens are exactly those
    the sampler gets for it (apply_chat_template(..., add_generation_prompt=True)), and the reply starts a new
    token. For a SentencePiece tokenizer this differs from tokenizing the whole render (each piece gets its own
    "▁" prefix); for byte-level BPE (Llama 3, Qwen, SmolLM2) the two agree at ChatML and Llama 3 turn boundaries.
    """
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompted = [any(m["role"] not in ("system", "assistant") for m in messages[:i]) for i in range(len(messages))]
    learned = [i for i in assistant_turns[context_turns:] if prompted[i] and messages[i].get("weight", 1) != 0]
    if last_assistant_only:
        learned = learned[-1:]
    if not learned:
        raise DataError(f"row {index}: no assistant message to learn from" + (
            " (the assistant turns are all context: the prompt's own, one that opens the conversation, or weight 0)"
            if assistant_turns else ""))
    if _has_generation_blocks(tokenizer, chat_template):
        return _marked_pieces(tokenizer, messages, chat_template, tools, assistant_turns, learned, index), None
    pieces: list[tuple[str, int]] = []
    done = ""
    for i in learned:  # messages after the last learned turn would add no loss: left out
        before = _render(tokenizer, messages[:i], chat_template, add_generation_prompt=True, tools=tools,
                         index=index)
        full = _render(tokenizer, messages[: i + 1], chat_template, tools=tools, index=index)
        if not before.startswith(done) or not full.startswith(before):
            raise DataError(_not_prefix(index, i, rewritten=not before.startswith(done)))
        pieces += [(before[len(done):], 0), (full[len(before):], 1)]
        done = full
    return pieces, eos_id


def template_kwargs(data_config: Any) -> dict[str, Any]:
    """data.chat_template_kwargs (a mapping, or a JSON object as a string; absent or empty: none) checked: the
    names of template variables (`enable_thinking` for Qwen3) to values true, false, null, a number or a string.
    A ValueError names the bad entry."""
    raw = data_config.get("chat_template_kwargs") if hasattr(data_config, "get") else None
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.chat_template_kwargs={raw!r}: not a JSON object ({e})") from None
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise ValueError(f"data.chat_template_kwargs={raw!r}: expected an object of template variables, e.g. "
                         '{"enable_thinking": false}')
    for k, v in raw.items():
        if not isinstance(k, str) or not k.isidentifier() or k in _JINJA_WORDS:
            raise ValueError(f"data.chat_template_kwargs: {k!r} is not a template variable name")
        if k in _RENDER_NAMES:
            raise ValueError(f"data.chat_template_kwargs: {k!r} is set by the renderer (the conversation, the "
                             "tokenizer's special tokens); only the template's own variables can be given here")
        if v is not None and not isinstance(v, bool | int | float | str):
            raise ValueError(f"data.chat_template_kwargs.{k}={v!r}: expected true, false, null, a number or a string")
    return raw


_JINJA_WORDS = {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else",
                "for", "set", "loop", "namespace"}


# what apply_chat_template itself passes to every render: a default for these would never apply
_RENDER_NAMES = {"messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
                 "raise_exception", "strftime_now", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                 "cls_token", "mask_token", "additional_special_tokens"}


def _jinja_literal(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return {None: "none", True: "true", False: "false"}[v]
    # numbers, and strings with JSON's escapes (which jinja reads the same); characters outside the BMP as they
    # are (escaped, they would be read as two lone surrogates)
    return json.dumps(v, ensure_ascii=False)


def with_template_defaults(template: Any, kwargs: dict[str, Any]) -> Any:
    """The template (a string, or named templates) with each variable of `kwargs` defaulting to its value: what
    apply_chat_template(..., **kwargs) renders, for every caller of the template (SFT, DPO, GRPO, evaluation,
    the exported tokenizer), while a caller that passes the variable still decides it."""
    if not kwargs or template is None:
        return template
    if isinstance(template, dict):
        return {name: with_template_defaults(t, kwargs) for name, t in template.items()}
    # Placed so that the template's own start renders as before under apply_chat_template's trim_blocks (drops a
    # newline right after a block tag) and lstrip_blocks (drops spaces before a block or comment tag that opens
    # a line): after the leading whitespace when a block or comment tag follows it, else before it.
    rest = template.lstrip(" \t\r\n")
    leading = template[:len(template) - len(rest)]
    mark = rest[2] if rest[:3] in ("{%-", "{%+", "{#-", "{#+") else ""  # its whitespace control, on the first tag
    head = "".join(f"{{%{mark if i == 0 else ''} if {k} is not defined %}}{{% set {k} = {_jinja_literal(v)} %}}"
                   "{% endif %}" for i, (k, v) in enumerate(kwargs.items()))
    if rest.startswith(("{%", "{#")):
        return leading + head + rest
    return head + ("\n" if leading.startswith(("\n", "\r")) else "") + leading + rest


def run_template(data_config: Any) -> str | None:
    """The run's template override (data.chat_template) with data.chat_template_kwargs' defaults, or None (the
    tokenizer's own template, to which `train.load_run_tokenizer` gives the same defaults)."""
    override = data_config.get("chat_template") or None
    return with_template_defaults(override, template_kwargs(data_config))
