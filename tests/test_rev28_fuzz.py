"""Defects found by property-based fuzzing (hypothesis, in throwaway scripts) of the data pipeline and the sampler,
each pinned by its minimal failing example."""

from __future__ import annotations

import pytest
from test_chat_templates import _sentencepiece_tokenizer

from jaxrl_llm.data.chat import pieces_tokenize_alone, tokenize_conversation

# A ChatML-like template (TRL's setup_chat_format gives base models one): the reply follows a newline, no space.
NEWLINE_TEMPLATE = ("{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>{% endfor %}"
                    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _byte_level_with_prefix_space():
    """A byte-level BPE tokenizer that puts a space before every text it is given (add_prefix_space=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["What is 2+2? It is 4.\nassistant\nuser\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("make", [lambda: _sentencepiece_tokenizer(legacy=False), _byte_level_with_prefix_space],
                         ids=["metaspace_prepend_first", "byte_level_add_prefix_space"])
def test_a_tokenizer_that_prefixes_each_text_gets_no_spurious_token_before_a_reply(make):
    """Mistral v0.3's tokenizer (Metaspace, prepend_scheme="first": "▁" before the first word of every text it is
    given) passed the "Hello" + " world" probe, so each reply was tokenized alone and learned as "▁It" where the
    render (and the model's continuation of the sampler's prompt "...assistant\\n") has "It": the model learned
    to start every reply with a space. Replies are now tokenized after their prompt for such tokenizers."""
    tok = make()
    assert not pieces_tokenize_alone(tok)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ids, mask = tokenize_conversation(tok, msgs, chat_template=NEWLINE_TEMPLATE)
    render = tok.apply_chat_template(msgs, tokenize=False, chat_template=NEWLINE_TEMPLATE)
    assert list(ids) == tok(render, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[mask == 1]) == "It is 4.</s>"
