"""HF export as vLLM / transformers 4.x users load it: a portable tokenizer class, and --dtype checked up front."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest
import transformers

from jaxrl_llm import models
from jaxrl_llm.export import export_checkpoint

TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def _fast_tokenizer(vocab: int) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer built on a tokenizers.Tokenizer, as load_gguf_tokenizer builds a GGUF file's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = {f"w{i}": i for i in range(3, vocab)} | {"<pad>": 0, "<s>": 1, "</s>": 2}
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = TEMPLATE
    return fast


def _tiny() -> models.ModelConfig:
    return models.ModelConfig(family="llama", vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
                              num_heads=2, num_kv_heads=1, head_dim=4, tie_word_embeddings=True)


def test_exported_tokenizer_names_a_class_transformers_4_has(tmp_path):
    """transformers 5 saved a generic fast tokenizer (every GGUF-sourced run's, the demo's included) with
    tokenizer_class "TokenizersBackend": transformers 4.x, and so vLLM, mlx-lm and llama.cpp's converter on it,
    refused the export ("Tokenizer class TokenizersBackend does not exist or is not currently imported")."""
    cfg = _tiny()
    tok = _fast_tokenizer(cfg.vocab_size)
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.1, a.dtype), models.abstract_params(cfg))
    out = models.save_pretrained(cfg, params, str(tmp_path / "hf"), tokenizer=tok)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert back("w5 w7 </s>")["input_ids"] == tok("w5 w7 </s>")["input_ids"] == [5, 7, 2]
    assert back.chat_template == TEMPLATE and (back.eos_token, back.pad_token) == ("</s>", "<pad>")


def test_export_refuses_an_unknown_dtype_before_restoring_and_names_the_flag(tmp_path):
    """--dtype=int8 was found out only after the checkpoint was restored (minutes for a large model), in a message
    that did not name the flag; here the workdir has no checkpoint at all, which was the error said instead."""
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "model_config.json").write_text(json.dumps({"hf_config": models.config_to_hf(_tiny())}))
    with pytest.raises(ValueError, match=r"^--dtype=int8: unknown dtype 'int8'"):
        export_checkpoint(str(wd), str(tmp_path / "out"), dtype="int8")
    assert not (tmp_path / "out").exists()
