"""Text in, text out: chat template -> token ids -> `generate` -> decoded strings."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.sampling.generate import GenerateOutput, generate
from jaxrl_llm.sampling.request import SamplingParams, as_param_list
from jaxrl_llm.sampling.stop_strings import TokenBytes

log = logging.getLogger(__name__)

Conversation = list[dict[str, str]]


@dataclasses.dataclass
class TextOutput:
    """texts[i]: the decoded completion; prompt_ids[i]: the prompt tokens it was generated from (left-truncated
    as generate's truncate_prompts cut them); output: generate's."""

    texts: list[str]
    prompt_ids: list[list[int]]
    output: GenerateOutput


def render_prompt(tokenizer: Any, conversation: Conversation, label: str, chat_template: str | None = None) -> str:
    """The conversation through the chat template, generation prompt appended. A template that refuses it (a
    system turn to a template without one, say) is a ValueError naming `label` ("input 3", "task 3")."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                             chat_template=chat_template)
    except jinja2.TemplateError as e:
        if isinstance(e, jinja2.TemplateSyntaxError):
            raise
        raise ValueError(f"{label}: the chat template fails on it ({type(e).__name__}: {e})") from None


def encode_inputs(tokenizer: Any, inputs: Sequence[str | Conversation], chat_template: bool = True,
                  label: str = "input") -> list[list[int]]:
    """Token ids per input. With the chat template, a string is one user turn and the generation prompt is
    appended; without it, strings are tokenized as they are (with the tokenizer's special tokens). `label`
    names an input in errors ("input 3")."""
    if isinstance(inputs, str) or not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise ValueError("inputs: expected a non-empty list of strings or conversations")
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, dict):
            raise ValueError(f"{label} {i} is a message ({x!r:.60}), not a conversation: inputs is a list of "
                             "strings or conversations; wrap one conversation in a list: [[{...}, ...]]")
        if chat_template:
            conv = [{"role": "user", "content": x}] if isinstance(x, str) else list(x)
            for j, m in enumerate(conv):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                    raise ValueError(f"{label} {i}: message {j} needs a string 'role' and a 'content' "
                                     f"(got {m!r:.80})")
            text = render_prompt(tokenizer, conv, f"{label} {i}")
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        elif isinstance(x, str):
            out.append(list(tokenizer(x)["input_ids"]))
        else:
            raise ValueError(f"{label} {i} is a conversation; pass chat_template=True to format it")
    return out


def default_stop_ids(cfg: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """The model's eos ids (config.json's and generation_config.json's eos_token_id) and the tokenizer's eos id,
    less those outside the model's vocabulary (logged): no token is sampled there, and transformers' generate runs
    with them (the sampler refuses a stop id it can never sample)."""
    ids = list(cfg.eos_token_ids)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    outside = tuple(i for i in ids if not 0 <= i < cfg.vocab_size)
    if outside:
        _warn_outside_vocab(outside, cfg.vocab_size)
    return tuple(i for i in ids if 0 <= i < cfg.vocab_size)


@functools.lru_cache(maxsize=8)
def _warn_outside_vocab(ids: tuple[int, ...], vocab_size: int) -> None:
    log.warning("eos id(s) %s of the model's config (or generation_config.json, or the tokenizer) are outside its "
                "vocabulary [0, %d): no token is ever sampled there, so generation does not stop at them", list(ids),
                vocab_size)


def generate_text(
    cfg: ModelConfig,
    params: dict,
    tokenizer: Any,
    inputs: Sequence[str | Conversation],
    sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    rng: jax.Array | int | None = None,
    *,
    chat_template: bool = True,
    skip_special_tokens: bool = True,
    token_bytes: TokenBytes | None = None,
    **generate_kwargs: Any,
) -> TextOutput:
    """Strings or chat conversations in, decoded completions out (an HF tokenizer or anything with its API).

    sampling_params: one SamplingParams for all inputs, or one per input (as in `generate`). Where a
    SamplingParams names no stop ids, generation stops at the model's and the tokenizer's eos ids. Stop strings
    are matched with a table of the tokenizer's token bytes, built from `tokenizer` at each call (0.3 s for a 49k
    vocabulary) unless given: calls in a loop may build it once, token_bytes=sampling.token_bytes(tok).
    """
    prompt_ids = encode_inputs(tokenizer, inputs, chat_template)
    stops = default_stop_ids(cfg, tokenizer)
    with_stops = lambda p: p if p.stop_token_ids else dataclasses.replace(p, stop_token_ids=stops)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        sp = with_stops(sampling_params or SamplingParams())
    else:
        sp = [with_stops(p) for p in as_param_list(sampling_params, len(prompt_ids))]
    out = generate(cfg, params, prompt_ids, sp, rng, tokenizer=tokenizer if token_bytes is None else token_bytes,
                   **generate_kwargs)
    texts = [tokenizer.decode(t, skip_special_tokens=skip_special_tokens) for t in out.tokens]
    prompt_ids = [p[len(p) - n:] for p, n in zip(prompt_ids, out.prompt_lengths, strict=True)]
    return TextOutput(texts=texts, prompt_ids=prompt_ids, output=out)
