"""Review of 66b4e7d..HEAD (rev27b): the tokenizer-override warning about the model's own chat template, and the
reference-weights checksum on resume: a model's own tokenizer that does not load only loses the warning, a template
rendered alike with the same kwargs is not called lost, and another model.dtype is named as such, not as other
reference weights (check_resume runs after the model/dtype comparison)."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest
from recipes import recipe
from test_pipeline_review import _tiny_tokenizer

from jaxrl_llm import models, train
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.run_tokenizer import load_run_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
KWARGS = '{"enable_thinking": false}'


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """`other`: a tokenizer folder with TEMPLATE; `stage1`: the export of a stage that ran with it and
    data.chat_template_kwargs=KWARGS (its saved template has the kwargs' defaults written in, as train saves it)."""
    root = tmp_path_factory.mktemp("toks")
    other = _tiny_tokenizer(root / "other", TEMPLATE)
    tok = load_run_tokenizer(recipe("sft_tiny", {"model.path": "", "tokenizer": other,
                                                 "data.chat_template_kwargs": KWARGS}))
    tok.save_pretrained(str(root / "stage1_hf"))
    broken = root / "broken_tok"  # a model folder whose own tokenizer does not load
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{}")
    return {"other": other, "stage1": str(root / "stage1_hf"), "broken": str(broken), "tok": tok}


def test_same_template_and_kwargs_as_the_previous_stage_is_not_called_a_lost_template(toks, caplog):
    config = recipe("dpo_tiny", {"model.path": toks["stage1"], "tokenizer": toks["other"],
                                 "data.chat_template_kwargs": KWARGS})
    with caplog.at_level(logging.WARNING):
        tok = load_run_tokenizer(config)
    assert tok.chat_template == toks["tok"].chat_template  # the run renders exactly what stage 1 did
    assert "is used, not the model's own" in caplog.text
    assert "chat template differs" not in caplog.text


def test_other_kwargs_than_the_previous_stage_is_said(toks, caplog):
    config = recipe("dpo_tiny", {"model.path": toks["stage1"], "tokenizer": toks["other"]})
    with caplog.at_level(logging.WARNING):
        load_run_tokenizer(config)
    assert "chat template differs" in caplog.text


def test_an_override_for_a_model_whose_own_tokenizer_does_not_load_still_runs(toks, caplog):
    config = recipe("dpo_tiny", {"model.path": toks["broken"], "tokenizer": toks["other"]})
    with caplog.at_level(logging.WARNING):
        tok = load_run_tokenizer(config)  # (worked before 77cf85e: a warning only)
    assert tok.chat_template == TEMPLATE and "is used, not the model's own" in caplog.text


def test_model_head_accepts_causal_folders_without_architectures_and_gguf(tmp_path):
    for i, doc in enumerate(('{"architectures": ["Qwen3ForCausalLM"]}', '{"architectures": ["MistralForCausalLM"]}',
                             '{"model_type": "llama"}', '{"architectures": null}')):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "config.json").write_text(doc)
        train.check_model_head(str(tmp_path / str(i)), needs_scores=False)
    train.check_model_head(str(tmp_path / "m.gguf"), needs_scores=False)
    train.check_model_head("smollm2", needs_scores=False)
    rm_wd = tmp_path / "rm_run"  # a reward model's training workdir (evaluate's model.path)
    rm_wd.mkdir()
    (rm_wd / "model_config.json").write_text('{"hf_config": {"architectures": ["LlamaForSequenceClassification"]}}')
    with pytest.raises(ConfigError, match="is a reward model"):
        train.check_model_head(str(rm_wd), needs_scores=False)
    train.check_model_head(str(rm_wd), needs_scores=True)


def test_a_dpo_resume_with_another_dtype_names_model_dtype(toks, tmp_path):
    cfg = models.ModelConfig(family="llama", vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    over = {"export_hf": False, "checkpoint.every_steps": 1}
    ckpt = train.prepare_workdir(str(tmp_path), cfg, recipe("dpo_tiny", over), toks["tok"], "min",
                                 {"algorithm": "dpo", "reference": "aaaa"})
    ckpt.maybe_save(1, {"params": {"w": jnp.zeros(2)}}, {"algorithm": "dpo", "reference": "aaaa"}, force=True)
    ckpt.close()
    # the same weights loaded in bfloat16 have other bits, so another checksum: the error should say model.dtype
    with pytest.raises(ConfigError, match=r"model.dtype=float32, not bfloat16"):
        train.prepare_workdir(str(tmp_path), cfg, recipe("dpo_tiny", {**over, "model.dtype": "bfloat16"}),
                              toks["tok"], "min", {"algorithm": "dpo", "reference": "bbbb"})
