"""Chat templates as real model families write them: which tokens are learned, what the sampler's prompt is, and
clear errors where a template refuses a conversation."""


import numpy as np
import pytest

from jaxrl_llm.data.chat import DataError, tokenize_conversation
from jaxrl_llm.data.preference import to_preference, tokenize_pair


def _learned(tokenizer, ids, mask) -> str:
    return tokenizer.decode(ids[mask == 1])


# As Qwen3's template does: an assistant turn before the last user message loses its reasoning; one after it
# keeps it. So the render of [user, reply] is not a prefix of the render of [user, reply, user, ...].
THINKING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in m.content %}"
    "{{ m.content.split('</think>')[-1].lstrip('\n') }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CONV = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd again\n</think>\n\n6"}]


def test_templates_that_rewrite_earlier_turns_train_the_last_turn(tokenizer):
    """Only the learned turns' own boundaries need the prefix property: a template that drops earlier turns'
    reasoning (Qwen3) trains the last reply (last_assistant_only, DPO with a multi-turn prompt) on exactly the
    tokens the sampler's prompt and the whole render give. Before, every intermediate render was checked and
    all such rows were refused."""
    prompt = tokenizer.apply_chat_template(CONV[:3], tokenize=False, add_generation_prompt=True,
                                           chat_template=THINKING_TEMPLATE)
    full = tokenizer.apply_chat_template(CONV, tokenize=False, chat_template=THINKING_TEMPLATE)
    assert "add\n" not in prompt and full.startswith(prompt)
    ids, mask = tokenize_conversation(tokenizer, CONV, chat_template=THINKING_TEMPLATE, last_assistant_only=True)
    first = int(np.flatnonzero(mask)[0])
    assert list(ids[:first]) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert _learned(tokenizer, ids, mask) == "<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    assert tokenizer.decode(ids) == full
    # every turn learned: the first reply would be trained with its reasoning, which the second turn's prompt
    # does not hold; refused, as before
    with pytest.raises(DataError, match=r"row 4: the chat template renders an earlier assistant turn differently .*"
                                        r"message 3's prompt.*data.last_assistant_only=True"):
        tokenize_conversation(tokenizer, CONV, chat_template=THINKING_TEMPLATE, index=4)
    # DPO: the prompt holds the first exchange, the responses are the second reply
    row = {"prompt": CONV[:3], "chosen": [CONV[3]],
           "rejected": [{"role": "assistant", "content": "<think>\nx\n</think>\n\n7"}]}
    parts = tokenize_pair(tokenizer, *to_preference(row, 0), chat_template=THINKING_TEMPLATE)
    (c_ids, c_mask), (r_ids, r_mask) = parts[0:2], parts[2:4]
    assert _learned(tokenizer, c_ids, c_mask) == "<think>\nadd again\n</think>\n\n6<|im_end|>\n"
    assert _learned(tokenizer, r_ids, r_mask) == "<think>\nx\n</think>\n\n7<|im_end|>\n"


def test_messages_after_the_last_learned_turn_are_left_out(tokenizer):
    """They add no loss (attention is causal), and a template may render them in a way that rewrites the learned
    turn (here: its reasoning dropped once a user message follows)."""
    conv = CONV[:2] + [{"role": "user", "content": "thanks"}]
    ids, mask = tokenize_conversation(tokenizer, conv, chat_template=THINKING_TEMPLATE)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(CONV[:2], tokenize=False,
                                                                  chat_template=THINKING_TEMPLATE)
    assert _learned(tokenizer, ids, mask) == "<think>\nadd\n</think>\n\n4<|im_end|>\n"


# Phi-3's template closes a conversation (no generation prompt) with an end-of-text token.
CLOSING_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>\n{% else %}<|endoftext|>{% endif %}")


def test_templates_that_close_the_conversation_train_single_replies(tokenizer):
    tokenizer = _with_tokens(tokenizer, ["<|user|>", "<|assistant|>", "<|end|>"])
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=CLOSING_TEMPLATE)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                  chat_template=CLOSING_TEMPLATE)
    assert _learned(tokenizer, ids, mask) == "4<|end|>\n<|endoftext|>"
    with pytest.raises(DataError, match="renders an earlier assistant turn differently"):  # two learned turns
        tokenize_conversation(tokenizer, msgs + [{"role": "user", "content": "3+3?"},
                                                 {"role": "assistant", "content": "6"}],
                              chat_template=CLOSING_TEMPLATE)


def _with_tokens(tokenizer, specials):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _sentencepiece_tokenizer(legacy: bool):
    """A small SentencePiece-style BPE tokenizer: `legacy` as Llama 2's tokenizer.json (a normalizer that
    prepends "\u2581" to every text and turns spaces into "\u2581"), else as Mistral v0.3's (Metaspace, prepended to
    the first piece only)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    corpus = ["[INST] [/INST] What is 2+2? It is 4. And 3+3? 6. Hello world, how are you today?"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    if legacy:
        tk.pre_tokenizer = None
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}"
                   "{{ bos_token + '[INST] ' + m.content + ' [/INST]' }}"
                   "{% else %}{{ ' ' + m.content + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_replies_get_no_spurious_leading_token(legacy):
    """A legacy SentencePiece tokenizer prepends "\u2581" to any text it is given: the reply tokenized on its own
    began with a "\u2581" token of its own (learned), which neither the whole render nor the model's own
    continuation of the prompt has. Replies are tokenized after their prompt for such tokenizers."""
    tok = _sentencepiece_tokenizer(legacy)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    ids, mask = tokenize_conversation(tok, msgs, chat_template=LLAMA2_TEMPLATE)
    render = tok.apply_chat_template(msgs, tokenize=False, chat_template=LLAMA2_TEMPLATE)
    assert list(ids) == tok(render, add_special_tokens=False)["input_ids"]
    for k in (1, 3):  # each reply follows exactly the tokens the sampler's prompt has
        prompt = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True,
                                         chat_template=LLAMA2_TEMPLATE)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert list(ids[:len(p_ids)]) == p_ids and mask[len(p_ids)] == 1 and mask[len(p_ids) - 1] == 0
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    assert [tok.convert_ids_to_tokens([int(ids[i])])[0] for i in starts] == ["\u2581It", "\u25816."]


class _Task:
    def __init__(self, messages):
        self.messages = messages


NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m.role == 'system' %}"
                      "{{ raise_exception('System role not supported') }}{% endif %}"
                      "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_grpo_and_evaluation_prompts_name_the_task_a_template_refuses(tokenizer):
    """GRPO's and evaluation's prompts let the template's raw jinja error out, naming no task and no setting
    (Gemma's template refuses a system turn, which data.system_prompt adds to every task)."""
    from jaxrl_llm.rl_train import prompt_ids
    from jaxrl_llm.sampling.text import encode_inputs

    ok = ({"role": "user", "content": "2+2?"},)
    bad = ({"role": "system", "content": "Think."}, {"role": "user", "content": "3+3?"})
    with pytest.raises(DataError, match=r"task 1: the chat template fails on it \(TemplateError: System role not "
                                        r"supported\) \(the task has a system message.*data.system_prompt"):
        prompt_ids(tokenizer, [_Task(ok), _Task(bad)], NO_SYSTEM_TEMPLATE, 512, "drop")
    tokenizer = _with_template(tokenizer, NO_SYSTEM_TEMPLATE)
    with pytest.raises(ValueError, match=r"task 1: the chat template fails on it \(TemplateError: System role"):
        encode_inputs(tokenizer, [list(ok), list(bad)], label="task")
    with pytest.raises(ValueError, match=r"input 1: the chat template fails on it"):
        encode_inputs(tokenizer, [list(ok), list(bad)])
    # what is rendered is unchanged: the generation prompt's tokens, no special tokens added
    ids, _, _ = prompt_ids(tokenizer, [_Task(ok)], None, 512, "drop")
    assert ids[0] == encode_inputs(tokenizer, [list(ok)])[0] == tokenizer.apply_chat_template(
        list(ok), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def _with_template(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# As Qwen3's: with enable_thinking false the generation prompt opens and closes an empty reasoning block.
SWITCH_TEMPLATE = (
    "{% set off = enable_thinking is defined and enable_thinking is false %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and off %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if off %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def test_template_defaults_render_as_apply_chat_template_kwargs(tokenizer):
    from jaxrl_llm.data.chat import with_template_defaults

    msgs = [{"role": "user", "content": "2+2?"}]
    baked = with_template_defaults(SWITCH_TEMPLATE, {"enable_thinking": False, "who": 'a "b"\n', "n": 3})
    for kw in ({}, {"enable_thinking": True}):  # the defaults, and a caller that passes the variable
        want = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                             chat_template=SWITCH_TEMPLATE, **{"enable_thinking": False, **kw})
        got = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, chat_template=baked,
                                            **kw)
        assert got == want
    assert "<think>" in got or "<think>" not in want
    assert "<think>\n\n</think>" in tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                                  chat_template=baked)
    # a template that starts with a newline keeps it; named templates each get the defaults
    nl = "\n" + SWITCH_TEMPLATE
    assert tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=with_template_defaults(
        nl, {"x": None})) == tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=nl)
    named = with_template_defaults({"default": SWITCH_TEMPLATE, "tool_use": SWITCH_TEMPLATE}, {"x": 1.5})
    assert set(named) == {"default", "tool_use"} and all("{% set x = 1.5 %}" in t for t in named.values())
    assert with_template_defaults(SWITCH_TEMPLATE, {}) == SWITCH_TEMPLATE


_BODY = "{% for m in messages %}{{ m.content }}{% endfor %}[{{ flag }}]"


@pytest.mark.parametrize("template", [
    "   {% if flag %}ON{% endif %}|", "\n{{ 'x' }}", "\n\n{%- if flag %}A{% endif %}", "  {%+ if flag %}B{% endif %}",
    "  \n  {% if flag %}C{% endif %}", "\n  {# c #}\nD", "\n\n{{- 'E' }}", "\r\n{% if flag %}F{% endif %}", "  text",
    "", "\t{#- c -#}\n G", "{% set flag = 'own' %}", "\n", " \n", "\rx", "\r{% if flag %}G{% endif %}"])
def test_template_defaults_keep_the_templates_own_start(tokenizer, template):
    """The defaults go in front of the template, where apply_chat_template's trim_blocks and lstrip_blocks could
    eat or keep its leading whitespace differently; and a value with characters outside the BMP renders as it is
    (JSON-escaped, jinja read it as two lone surrogates and the tokenizer refused the text)."""
    from jaxrl_llm.data.chat import with_template_defaults

    msgs = [{"role": "user", "content": "hi"}]
    for value in ("\U0001f600 \"q\" \\ \n", True, None, 3):
        template_b = template + _BODY
        want = tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template_b, flag=value)
        got = tokenizer.apply_chat_template(msgs, tokenize=False,
                                            chat_template=with_template_defaults(template_b, {"flag": value}))
        assert got == want, (template, value)


@pytest.mark.parametrize("value, match", [
    ("{not json", "data.chat_template_kwargs='{not json': not a JSON object"),
    ("[1]", "expected an object of template variables"),
    ('{"enable-thinking": true}', "'enable-thinking' is not a template variable name"),
    ('{"loop": true}', "'loop' is not a template variable name"),
    ('{"a": [1]}', r"data.chat_template_kwargs.a=\[1\]: expected true, false, null, a number or a string"),
    ('{"bos_token": "<s>"}', "'bos_token' is set by the renderer"),  # a default for it would never apply
])
def test_bad_template_kwargs_name_the_entry(tmp_path, value, match):
    from recipes import recipe

    from jaxrl_llm import train

    with pytest.raises(train.ConfigError, match=match):
        train.load_run_tokenizer(recipe("sft_tiny", {"data.chat_template_kwargs": value}))


def test_template_kwargs_reach_every_use_of_the_template(tokenizer, tmp_path):
    """data.chat_template_kwargs (NeMo RL's chat_template_kwargs; Qwen3's enable_thinking): SFT rows, GRPO prompts
    and evaluation prompts, with the tokenizer's own template or data.chat_template, and the saved tokenizer."""
    import json

    from recipes import recipe

    from jaxrl_llm import train
    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.data.chat import run_template
    from jaxrl_llm.rl_train import prompt_ids
    from jaxrl_llm.sampling.text import encode_inputs

    path = tmp_path / "rows.jsonl"
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    empty_think = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    for over in ({"data.chat_template": SWITCH_TEMPLATE}, {"tokenizer": str(tmp_path / "tok")}):
        tok_with_own = _with_template(tokenizer, SWITCH_TEMPLATE)
        tok_with_own.save_pretrained(tmp_path / "tok")
        for kwargs, thinks in (('{"enable_thinking": false}', True), ("", False)):
            c = recipe("sft_tiny", {**over, "data.source": str(path), "data.num_examples": -1,
                                    "data.chat_template_kwargs": kwargs})
            tok = train.load_run_tokenizer(c)
            (ids, mask), = sft.prepare(c, tok)[0]
            assert (empty_think in tok.decode(ids[mask == 0])) == thinks
            assert tok.decode(ids[mask == 1]) == "4<|im_end|>\n"
            grpo_ids, _, _ = prompt_ids(tok, [_Task(tuple(msgs[:1]))], run_template(c.data), 512, "drop")
            assert tok.decode(grpo_ids[0]).endswith(empty_think) == thinks
            assert tok.decode(encode_inputs(tok, [msgs[:1]])[0]).endswith(empty_think) == thinks
            tok.save_pretrained(tmp_path / "saved")
            saved = train.load_tokenizer(str(tmp_path / "saved"))
            assert saved.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
                empty_think) == thinks


def test_generation_blocks_with_plus_whitespace_control_are_recognised(tokenizer):
    """`{%+ generation %}` (lstrip_blocks turned off for the tag) was matched when marking blocks but not when
    deciding whether a template has them: such a template took the prefix path."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' %}{%+ generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
                "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}<|endoftext|>{% endif %}")
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]
    ids, mask = tokenize_conversation(tokenizer, msgs, chat_template=template)
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=template)
    assert _learned(tokenizer, ids, mask) == "4<|im_end|>6<|im_end|>"


def test_a_reply_that_does_not_continue_its_prompt_says_why(tokenizer):
    """A reply with reasoning after a generation prompt that closes the thinking block (Qwen3, enable_thinking
    false): the error said the template did not render prefixes as prefixes, of a row with one turn."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content is defined %}<think>\n"
                "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"}]
    with pytest.raises(DataError, match=r"row 2: the chat template does not render assistant message 1 as a "
                                        r"continuation of its generation prompt .*enable_thinking=false"):
        tokenize_conversation(tokenizer, msgs, chat_template=template, index=2)


def test_sft_layouts_that_would_train_on_the_wrong_text_are_refused_or_read(tokenizer, tmp_path, caplog):
    """TRL's unpaired preference rows (prompt, completion, label) trained the completions labelled false; a
    completion that repeats its prompt doubled the user turn; `messages` saved as JSON text were one literal
    reply; tool calls and tools that the template leaves out (SmolLM2's ChatML renders content only) were
    dropped without a word, the reply learned empty; reasoning_content it leaves out is counted."""
    import json

    from recipes import recipe

    from jaxrl_llm.algorithms import sft
    from jaxrl_llm.data.chat import to_conversation

    for label in (False, "False", "true"):  # (a CSV file's cells are text)
        with pytest.raises(DataError, match="row 3: has a true/false 'label' .*unpaired preference"):
            to_conversation({"prompt": "2+2?", "completion": "5", "label": label}, 3)
    msgs, _ = to_conversation({"prompt": "2+2?", "completion": [{"role": "user", "content": "2+2?"},
                                                                {"role": "assistant", "content": "4"}]}, 0)
    assert msgs == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    import pandas as pd

    from jaxrl_llm.data.sources import load_rows

    pd.DataFrame([{"messages": msgs}]).to_csv(tmp_path / "m.csv", index=False)
    assert to_conversation(load_rows(str(tmp_path / "m.csv"))[0], 0)[0] == msgs

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    rows = {"calls": {"messages": [msgs[0], {"role": "assistant", "content": "", "tool_calls": [call]}]},
            "tools": {"messages": msgs, "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
            "reasoning": {"messages": [msgs[0], {"role": "assistant", "content": "4", "reasoning_content": "add"}]}}
    for name, row in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        c = recipe("sft_tiny", {"data.source": str(path), "data.num_examples": -1})
        if name == "reasoning":
            with caplog.at_level("WARNING"):
                sft.prepare(c, tokenizer)
            assert "1 rows hold reasoning_content, which the chat template leaves out" in caplog.text
        else:
            with pytest.raises(DataError, match="row 0: (message 1 has tool_calls|has tools), which the chat "
                                                "template leaves out of its text"):
                sft.prepare(c, tokenizer)
    # a template that renders them takes them
    tool_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.tool_calls %}"
                     "{% for t in m.tool_calls %}<tool_call>{{ t.function.name }}</tool_call>{% endfor %}{% endif %}"
                     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    c = recipe("sft_tiny", {"data.source": str(tmp_path / "calls.jsonl"), "data.num_examples": -1,
                            "data.chat_template": tool_template})
    (ids, mask), = sft.prepare(c, tokenizer)[0]
    assert tokenizer.decode(ids[mask == 1]) == "<tool_call>get_weather</tool_call><|im_end|>\n"


def test_named_templates_with_a_tool_use_template_keep_tool_calls(tokenizer):
    """Hermes-style tokenizers hold {"default": ..., "tool_use": ...}; rows with tools render with "tool_use".
    The probe rendered tool calls without tools, so with "default", and refused rows the run renders fine."""
    from jaxrl_llm.data.chat import dropped_fields

    plain = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tool_use = plain.replace("{{ m.content }}", "{{ m.content }}{% for t in m.tool_calls or [] %}<tool_call>"
                             "{{ t.function.name }}</tool_call>{% endfor %}").replace(
        "{% for m in messages %}", "{% for t in tools %}{{ t.function.name }}{% endfor %}{% for m in messages %}")
    tok = _with_template(tokenizer, {"default": plain, "tool_use": tool_use})
    assert dropped_fields(tok, None) == {"reasoning_content"}
    assert dropped_fields(_with_template(tokenizer, plain), None) == {"reasoning_content", "tool_calls", "tools"}
