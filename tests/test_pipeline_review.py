"""Chaining stages (SFT -> DPO/RM -> GRPO -> evaluation): what a user gives the next stage as model.path.

A reward model's export as a causal stage's model, a training workdir as train's model.path, and a tokenizer override
that drops the previous stage's chat template: each said before any work (found running the tiny recipes through the
CLI)."""

from __future__ import annotations

import json
import logging
import os

import jax
import pytest

from jaxrl_llm import models, train
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.run_tokenizer import load_run_tokenizer
from tests.recipes import recipe

TINY = dict(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=8, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny causal-LM export and the reward-model (score head) export made from it, as stages write them."""
    root = tmp_path_factory.mktemp("pipe")
    cfg = models.ModelConfig(**TINY)
    params = models.init_params(cfg, jax.random.key(0))
    lm = models.save_pretrained(cfg, params, str(root / "sft_hf"))
    rm_cfg, rm_params = models.with_score_head(cfg, params, 1, jax.random.key(1))
    rm = models.save_pretrained(rm_cfg, rm_params, str(root / "rm_hf"))
    return {"root": root, "lm": lm, "rm": rm}


def test_export_chain_keeps_ids_and_weights(exports):
    """A stage's start = load_pretrained(previous hf/): same tensors and pad/eos/bos ids."""
    cfg, params = models.load_pretrained(exports["lm"])
    again = models.save_pretrained(cfg, params, str(exports["root"] / "again_hf"))
    cfg2, params2 = models.load_pretrained(again)
    assert (cfg2.bos_token_id, cfg2.eos_token_ids, cfg2.pad_token_id) == (1, (2,), 2)
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True))


def test_causal_stage_from_reward_model_export_is_a_config_error(exports):
    from jaxrl_llm import evaluate

    for name in ("dpo_tiny", "sft_tiny", "grpo_tiny"):
        with pytest.raises(ConfigError, match=r"model.path=.* is a reward model \(LlamaForSequenceClassification"):
            train.validate(recipe(name, {"model.path": exports["rm"], "tokenizer": ""}))
    with pytest.raises(ConfigError, match=r"is a reward model"):
        evaluate.validate(recipe("eval_tiny", {"model.path": exports["rm"], "tokenizer": ""}))
    train.validate(recipe("rm_tiny", {"model.path": exports["rm"], "tokenizer": ""}))  # an RM stage may go on


def test_train_model_path_that_is_a_workdir_names_its_export(exports, tmp_path):
    wd = tmp_path / "sft_run"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "model_config.json").write_text(json.dumps({"hf_config": {}}))
    config = recipe("dpo_tiny", {"model.path": str(wd), "tokenizer": ""})
    with pytest.raises(ConfigError, match=r"is a training workdir, not a model folder: export a checkpoint first"):
        train.validate(config)
    (wd / "hf").mkdir()
    (wd / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a training workdir, not a model folder: start from its export, "
                                          r"model.path='.*sft_run/hf'"):
        train.validate(config)


def _tiny_tokenizer(folder, template):
    import tokenizers
    import transformers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b"])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                               pad_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    tok.save_pretrained(str(folder))
    return str(folder)


def test_other_tokenizer_warning_names_the_lost_chat_template(tmp_path, caplog):
    stage1 = "{% for m in messages %}STAGE1 {{ m['content'] }}{% endfor %}"  # stage 1's data.chat_template
    model_dir = _tiny_tokenizer(tmp_path / "sft_hf", stage1)
    other = _tiny_tokenizer(tmp_path / "other_tok", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    config = recipe("dpo_tiny", {"model.path": model_dir, "tokenizer": other})  # as the recipe's 'smollm2'
    with caplog.at_level(logging.WARNING):
        loaded = load_run_tokenizer(config)
    assert loaded.chat_template != stage1  # (what happens: the other tokenizer's template is used)
    assert "template" in caplog.text


def test_export_folder_is_not_a_workdir(exports):
    assert not os.path.exists(os.path.join(exports["lm"], "model_config.json"))
