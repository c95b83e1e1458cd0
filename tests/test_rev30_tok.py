"""Review 30 (tokenization against TRL): training rows on tokenizers built like Llama 3's (a post-processor that adds
BOS, and a template that writes bos_token) and Qwen2.5's (no BOS, ChatML), token for token against what TRL's
dataset preparation does for conversational rows (apply_chat_template(tokenize=True) of the prompt with the
generation prompt and of the whole conversation; the completion starts where they diverge); and a tokenizer with no
chat template, whose error names the setting that fixes it."""

from __future__ import annotations

import importlib.util
import os

import pytest

from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data.chat import tokenize_conversation, turn_end_token
from jaxrl_llm.data.preference import tokenize_pair

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _trl_template(name: str) -> str:
    """One of the model templates TRL ships (read from its package folder, without importing it)."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs trl (pip install -e '.[test]')")
    with open(os.path.join(list(spec.submodule_search_locations)[0], "chat_templates", f"{name}.jinja")) as f:
        return f.read()


def _tokenizer(style: str, chat_template: str | None = None):
    """A small byte-level BPE tokenizer (Llama 3's pre-tokenizer), Llama-3-like (BOS added by its post-processor,
    EOS <|eot_id|>, no pad token) or Qwen2.5-like (no BOS, EOS <|im_end|>, pad <|endoftext|>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = LLAMA3_SPECIALS if style == "llama3" else CHATML_SPECIALS
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    text = ["What is 2+2? It is 4. Be brief. Hello! See you. No. system user assistant\n\nCutting Knowledge Date"] * 8
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
        tk.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                       chat_template=chat_template or _trl_template("llama3_1"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template or _trl_template("qwen2_5"))


def _trl_row(tok, prompt, completion) -> tuple[list[int], list[int]]:
    """TRL's tokenize_fn for a conversational prompt/completion (or prompt/chosen) row: ids and completion mask."""
    p = tok.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
    full = list(tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    k = next((i for i, (a, b) in enumerate(zip(p, full, strict=False)) if a != b), min(len(p), len(full)))
    return full, [0] * k + [1] * (len(full) - k)


PROMPTS = [[{"role": "user", "content": "What is 2+2?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "See you."}]]


@pytest.mark.parametrize("style", ["llama3", "qwen2.5"])
def test_conversational_rows_tokenize_as_trl_with_one_bos_and_the_turn_end_learned(style):
    tok = _tokenizer(style)
    assert turn_end_token(tok) is None  # the template closes each turn with a special token
    turn_end = tok.convert_tokens_to_ids("<|eot_id|>" if style == "llama3" else "<|im_end|>")
    bos = tok.bos_token_id
    for prompt in PROMPTS:
        chosen, rejected = [{"role": "assistant", "content": "It is 4."}], [{"role": "assistant", "content": "No."}]
        context = sum(m["role"] == "assistant" for m in prompt)
        ids, mask = tokenize_conversation(tok, prompt + chosen, context_turns=context)
        assert (list(ids), list(mask)) == _trl_row(tok, prompt, chosen)
        pair = tokenize_pair(tok, prompt, chosen, rejected)
        for side_ids, side_mask, response in ((pair.chosen_ids, pair.chosen_mask, chosen),
                                              (pair.rejected_ids, pair.rejected_mask, rejected)):
            assert (list(side_ids), list(side_mask)) == _trl_row(tok, prompt, response)
            assert turn_end in side_ids[side_mask == 1]  # the model learns to stop
            assert list(side_ids).count(bos) == (style == "llama3")  # the template's BOS only, never a second


def test_a_tokenizer_without_a_chat_template_names_data_chat_template(tmp_path):
    """A base model's tokenizer has no chat template, and every row (TRL tokenizes plain-string rows without one)
    and prompt here is rendered with one: the start-up error said transformers' "Cannot use chat template
    functions because tokenizer.chat_template is not set and no template argument was passed!", not the setting."""
    from recipes import recipe

    from jaxrl_llm.run_tokenizer import load_run_tokenizer

    tok = _tokenizer("qwen2.5", chat_template="x")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"the tokenizer: has no chat template .*set data\.chat_template"):
        load_run_tokenizer(recipe("sft_tiny", {"tokenizer": str(tmp_path / "tok")}))
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    c = recipe("sft_tiny", {"tokenizer": str(tmp_path / "tok"), "data.chat_template": plain})
    assert load_run_tokenizer(c).chat_template == plain
