"""SFT rows of plain `text` (TRL's language-modeling layout, for continued training of a base model): the
tokenizer's own encoding (its BOS) then EOS, every token learned, no chat template needed; they were refused
("missing field 'messages'"), and a base model's tokenizer, which has no template, could not train at all."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recipes import recipe
from test_rev30_tok import _tokenizer

from jaxrl_llm.algorithms import sft
from jaxrl_llm.data.bulk import tokenize_texts
from jaxrl_llm.data.chat import DataError


@pytest.mark.parametrize("style", ["llama3", "qwen2.5"])
def test_texts_tokenize_as_the_tokenizer_does_then_eos_all_learned(style):
    tok = _tokenizer(style)
    texts = ["What is 2+2? It is 4.", "Hello!", "   ", "See you.<|eot_id|>" if style == "llama3" else "No."]
    out = tokenize_texts(tok, texts, chunk=3)
    eos = tok.eos_token_id
    for text, ((ids, mask),) in zip(texts, out, strict=True):
        own = tok(text)["input_ids"]  # with the tokenizer's special tokens: Llama 3's BOS
        assert ids.dtype == np.uint16 and mask.dtype == np.uint8
        if not text.strip():
            assert ids.tolist() == own and not mask.any()  # nothing to learn: the caller drops it
            continue
        assert ids.tolist() == (own if own[-1] == eos else own + [eos])  # EOS once, learned: the model stops
        lead = 1 if style == "llama3" else 0
        assert ids.tolist().count(tok.bos_token_id) == lead if tok.bos_token_id is not None else True
        assert mask.tolist() == [0] * lead + [1] * (len(ids) - lead)


def _config(tmp_path, rows, tokenizer_dir, **over):
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return recipe("sft_tiny", {"tokenizer": str(tokenizer_dir), "data.source": str(src), "data.num_examples": -1,
                               "data.max_len": 32, **over})


def test_text_rows_train_without_a_chat_template_and_conversations_say_they_need_one(tmp_path):
    from jaxrl_llm import train
    from jaxrl_llm.run_tokenizer import load_run_tokenizer

    tok = _tokenizer("llama3", chat_template="x")
    tok.chat_template = None  # a base model's tokenizer
    tok.save_pretrained(tmp_path / "tok")
    rows = [{"text": "What is 2+2? It is 4."}, {"text": ""}, {"text": "Hello! See you. " * 6}]
    c = _config(tmp_path, rows, tmp_path / "tok")
    examples, stats = sft.prepare(c, load_run_tokenizer(c, needs_template=False))
    assert stats == {"rows": 3, "truncated": 1, "dropped": 1}
    assert [int(ids[0]) for ids, _ in examples] == [tok.bos_token_id] * 2 and len(examples[1][0]) == 32
    assert examples[0][0][-1] == tok.eos_token_id and examples[0][1][1:].all()

    mixed = rows + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]}]
    c = _config(tmp_path, mixed, tmp_path / "tok")
    with pytest.raises(DataError, match=r"row 3 is a conversation and the tokenizer has no chat template"):
        sft.prepare(c, load_run_tokenizer(c, needs_template=False))
    with pytest.raises(DataError, match=r"row 0: field 'text' must be a string; got int"):
        sft.prepare(_config(tmp_path, [{"text": 7}], tmp_path / "tok"), load_run_tokenizer(c, needs_template=False))

    # the whole run, as the command line starts it
    c = _config(tmp_path, rows * 4, tmp_path / "tok", max_steps=2, export_hf=False, **{
        "metrics.tensorboard": False, "train.batch_size": 4, "data.cache": False})
    out = train.run(c, str(tmp_path / "run"))
    assert np.isfinite(out["loss"]) and out["data_rows"] == 12 and out["data_dropped"] == 4


def test_add_eos_false_leaves_texts_open_and_keys_the_token_cache(tmp_path):
    """data.add_eos=False: a text cut from a longer document gets no EOS (the model is not taught to stop there);
    the token cache keeps the two apart (a cached run with EOS is not read back without)."""
    from jaxrl_llm.data.cache import DataCache
    from jaxrl_llm.run_tokenizer import load_run_tokenizer

    tok = _tokenizer("llama3", chat_template="x")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    rows = [{"text": "What is 2+2? It is 4."}, {"text": "Hello!"}]
    own = [tok(r["text"])["input_ids"] for r in rows]
    cache = DataCache(str(tmp_path / "cache"))
    for add_eos in (True, False, True):
        c = _config(tmp_path, rows, tmp_path / "tok", **{"data.add_eos": add_eos})
        examples, _ = sft.prepare(c, load_run_tokenizer(c, needs_template=False), cache)
        want = [o + [tok.eos_token_id] * add_eos for o in own]
        assert [ids.tolist() for ids, _ in examples] == want
        assert all(m[1:].all() and not m[0] for _, m in examples)
