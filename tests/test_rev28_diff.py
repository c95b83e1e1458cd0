"""Review 28 of the session's diff: GGUF metadata of the wrong kind is a CheckpointError naming the file and the key
(not a TypeError from inside the config or tokenizer code), a per-layer head_count_kv loads, and stop strings reach
the sampler from multi-turn rounds and from evaluate_tasks without a prebuilt byte table."""

from __future__ import annotations

import re

import gguf
import jax
import numpy as np
import pytest
from hf_models import build_hf_model, tiny_hf_config
from test_gguf import write_gguf

from jaxrl_llm import models


def test_a_per_layer_head_count_kv_loads(tmp_path, monkeypatch):
    """gguf_config took a per-layer array of equal values (some converters write those), but GGUFSource read the
    same key with int(list): TypeError."""
    hf = build_hf_model(tiny_hf_config("llama", heads=4, kv_heads=2, hidden=64, head_dim=16))
    plain = write_gguf(tmp_path / "plain.gguf", "llama", hf)
    monkeypatch.setattr(gguf.GGUFWriter, "add_head_count_kv", lambda w, n: w.add_array(
        f"{w.arch}.attention.head_count_kv", [n] * hf.config.num_hidden_layers))
    per_layer = write_gguf(tmp_path / "per_layer.gguf", "llama", hf)
    (cfg, params), (cfg0, params0) = models.load_pretrained(per_layer), models.load_pretrained(plain)
    assert cfg == cfg0 and cfg.num_kv_heads == 2
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params0), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tokenizer_file(path, tokens=("<s>", "</s>", "a", "b", "ab"), merges=("a b",), extra=None) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_array("tokenizer.ggml.tokens", list(tokens))
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(list(merges))
    w.add_eos_token_id(1)
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("kw,message", [
    (dict(tokens=(1, 2, 3)), r"'tokenizer.ggml.tokens' is a list of int; expected a list of strings"),
    (dict(merges=("ab",)), r"tokenizer.ggml.merges holds 'ab', not two tokens and a space"),
    (dict(merges=("a q",)), r"tokenizer.ggml.merges rejected \(.*`q` out of vocabulary\)"),
    (dict(extra={"tokenizer.ggml.pre": ["a"]}), r"'tokenizer.ggml.pre' is a list of str; expected a string"),
    (dict(extra={"tokenizer.ggml.bos_token_id": "0"}), r"'tokenizer.ggml.bos_token_id' is '0'; expected an integer"),
    (dict(extra={"tokenizer.chat_template": 7}), r"'tokenizer.chat_template' is 7; expected a string"),
])
def test_tokenizer_metadata_of_the_wrong_kind_is_a_checkpoint_error(tmp_path, kw, message):
    """Before: a 3-line TypeError from the tokenizers library, AttributeError, TypeError: unhashable type, ... none
    naming the file."""
    path = _tokenizer_file(tmp_path / "tok.gguf", **kw)
    with pytest.raises(models.CheckpointError, match=re.escape(path) + ".*" + message) as e:
        models.load_tokenizer(path)
    assert "\n" not in str(e.value)
    assert models.load_tokenizer(_tokenizer_file(tmp_path / "ok.gguf"))("ab")["input_ids"] == [4]


def test_model_metadata_of_the_wrong_kind_is_a_checkpoint_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.add_string("llama.embedding_length", "4")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(models.CheckpointError, match=r"m.gguf: GGUF metadata 'llama.embedding_length' is '4'; "
                                                     r"expected a number"):
        models.load_pretrained(str(tmp_path / "m.gguf"))


class _Stop(Exception):
    pass


def test_multi_turn_rounds_match_stop_strings_with_the_runners_table(monkeypatch):
    """GRPO's multi-turn rounds hand the runner's token-byte table to the sampler (without it, generate refuses
    stop strings: a multi-turn recipe with rollout.stop_strings failed at its first step)."""
    from recipes import recipe

    from jaxrl_llm import multiturn, sampling
    from jaxrl_llm.rl_train import GRPORunner

    seen = {}

    def fake(cfg, params, sp, key, **kw):
        seen.update(kw)
        raise _Stop

    monkeypatch.setattr(multiturn, "SamplerGenerate", fake)
    r = object.__new__(GRPORunner)
    r.config = recipe("grpo_tiny")
    r.cfg = r.mesh = r.rules = r.sampling_rules = None
    r.sp = sampling.SamplingParams(stop_strings=("</answer>",))
    r.tok_bytes = sampling.TokenBytes((b"", b"a"))
    with pytest.raises(_Stop):
        r._multi_turn_round(None, [0], [[1]], None)
    assert seen["tokenizer"] is r.tok_bytes


def test_evaluate_tasks_builds_the_byte_table_from_the_tokenizer(tokenizer, monkeypatch):
    """evaluate.run (the command) passes no token_bytes: the tokenizer itself must reach generate."""
    from jaxrl_llm import evaluation, sampling
    from jaxrl_llm.data.tasks import Task

    seen = []

    def fake(*a, tokenizer=None, **kw):
        seen.append(tokenizer)
        raise _Stop

    monkeypatch.setattr(evaluation, "generate", fake)
    cfg = models.ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                             num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, eos_token_ids=(2,))
    tasks = [Task(messages=({"role": "user", "content": "1+1?"},), metadata={"answer": "2"})]
    sp = sampling.SamplingParams(stop_strings=("</answer>",))
    tb = sampling.token_bytes(tokenizer)
    for given, want in ((None, tokenizer), (tb, tb)):
        with pytest.raises(_Stop):
            evaluation.evaluate_tasks(cfg, None, tokenizer, tasks, None, sampling_params=sp, token_bytes=given)
        assert seen[-1] is want
