"""The run's tokenizer against its model: every id the data holds must be a row of the embedding, and the
tokenizer's special ids stand in for those a model config leaves out (a model built from model.init)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxrl_llm.data.chat import DataError
from jaxrl_llm.models.config import ModelConfig


def with_tokenizer_ids(cfg: ModelConfig, tokenizer: Any) -> ModelConfig:
    """`cfg` with the tokenizer's pad, EOS and BOS ids where it has none: the sampler stops at the tokenizer's EOS,
    and so must transformers' generate on the run's HF export (its config.json is written from `cfg`)."""
    changes: dict[str, Any] = {}
    if cfg.pad_token_id is None and tokenizer.pad_token_id is not None:
        changes["pad_token_id"] = int(tokenizer.pad_token_id)
    if not cfg.eos_token_ids and tokenizer.eos_token_id is not None:
        changes["eos_token_ids"] = (int(tokenizer.eos_token_id),)
    if cfg.bos_token_id is None and tokenizer.bos_token_id is not None:
        changes["bos_token_id"] = int(tokenizer.bos_token_id)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def with_score_pad(cfg: ModelConfig, tokenizer: Any) -> ModelConfig:
    """A score-head model's pad id where neither its config nor the tokenizer has one (Llama 3's tokenizer): the
    tokenizer's EOS, as TRL's RewardTrainer and NeMo RL's get_tokenizer set it; the tokenizer gets it as its pad token
    too (the run pads with it and the export saves it). HF *ForSequenceClassification finds each row's last token by
    `config.pad_token_id` and refuses batches of more than one row without it; training reads the score at the same
    token (`models.score_positions`), so a row ending in EOS is scored at the token before it, here and there."""
    if cfg.pad_token_id is not None or tokenizer.pad_token_id is not None or tokenizer.eos_token_id is None:
        return cfg
    tokenizer.pad_token = tokenizer.eos_token
    return dataclasses.replace(cfg, pad_token_id=int(tokenizer.eos_token_id))


def _token_arrays(item: Any) -> list[Any]:
    """The token-id arrays of an example: a NamedTuple's *ids fields, a tuple's first element (SFT's (ids,
    mask)), those of each example of a list (a packed row), or the item itself (a prompt's ids)."""
    if hasattr(item, "_fields"):
        return [getattr(item, f) for f in item._fields if f.endswith("ids")]
    if isinstance(item, tuple):
        return [item[0]]
    if isinstance(item, list) and item and isinstance(item[0], tuple):  # a packed SFT row: its examples
        return [a for part in item for a in _token_arrays(part)]
    return [item]


def check_pad_fits(vocab_size: int, tokenizer: Any) -> None:
    """A DataError when the tokenizer's pad id (what batches are padded with) has no embedding row: a pad token
    added to the tokenizer past the model's rows (`add_special_tokens({"pad_token": "<pad>"})` without resizing the
    embedding). Padding positions are masked, but the NaN the lookup reads there reaches every position through
    attention (0 * NaN), and the first step's loss is NaN."""
    pad = tokenizer.pad_token_id
    if pad is not None and not 0 <= pad < vocab_size:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r} (id {pad}) is outside the model's "
                        f"vocabulary of {vocab_size} (the tokenizer has {len(tokenizer)} tokens): batches padded with "
                        "it would read NaN; give the tokenizer a pad token the model has (e.g. its EOS: \"pad_token\" "
                        "in tokenizer_config.json), or use the model's own tokenizer")


def check_ids_fit(items: Sequence[Any], vocab_size: int, tokenizer: Any, what: str,
                  indices: Sequence[int] | None = None) -> None:
    """A DataError naming the first item (`what` i: "example 3", "task 3"; i from `indices` if given) that holds a
    token id the model has no embedding row for: the tokenizer has more tokens than the model (added special
    tokens, or another model's tokenizer). Inside the jitted step such an id reads NaN from the embedding, and the
    loss is NaN."""
    n = len(tokenizer)
    if n <= vocab_size:  # every id the tokenizer gives is a row
        return
    for i, item in enumerate(items):
        for arr in _token_arrays(item):
            arr = np.asarray(arr)
            if arr.size and int(arr.max()) >= vocab_size:
                bad = int(arr.max())
                name = tokenizer.convert_ids_to_tokens(bad)
                raise DataError(f"{what} {i if indices is None else indices[i]}: token id {bad} ({name!r}) is "
                                f"outside the model's vocabulary of {vocab_size} (the tokenizer has {n} tokens): "
                                "is the tokenizer the model's? (tokenizer, model.path)")
