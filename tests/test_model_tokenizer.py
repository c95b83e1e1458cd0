"""The run's tokenizer against its model: ids without an embedding row, the tokenizer's special ids in the model's
config, another tokenizer than the model's own, and the source model's generation settings in the exports."""

from __future__ import annotations

import json

import pytest
from hf_models import build_hf_model, tiny_hf_config
from recipes import recipe

from jaxrl_llm import evaluate, models, train
from jaxrl_llm.data.chat import DataError
from jaxrl_llm.data.vocab import with_tokenizer_ids
from jaxrl_llm.export import export_checkpoint

SHORT = {"max_steps": 1, "optimizer.warmup_steps": 0, "data.num_examples": 8, "train.batch_size": 4}


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A Llama of 1000 tokens: SmolLM2's tokenizer (49152) gives ids it has no rows for."""
    folder = tmp_path_factory.mktemp("m1000")
    build_hf_model(tiny_hf_config("llama", vocab=1000)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("name", ["sft_tiny", "grpo_tiny", "eval_tiny"])
def test_ids_outside_the_models_vocabulary_are_refused_before_training(small_vocab_model, tmp_path, name):
    """SFT/DPO/RM stopped after the first step with 'loss is nan' (the embedding lookup of an id past its rows
    reads NaN inside the jitted step); GRPO and evaluation ended in a sampler traceback."""
    over = {"model.path": small_vocab_model, "tokenizer": "smollm2"}
    match = (r"(tokenized example|task) 0: token id \d+ \('.*'\) is outside the model's vocabulary of 1000 "
             r"\(the tokenizer has 49152 tokens\): is the tokenizer the model's\?")
    with pytest.raises(DataError, match=match):
        if name == "eval_tiny":
            evaluate.run(recipe(name, over), out=str(tmp_path / "r.json"))
        else:
            train.run(recipe(name, {**over, **SHORT} if name == "sft_tiny" else {**over, "max_steps": 1}),
                      str(tmp_path / "w"))


class _Tok:
    def __init__(self, pad, eos, bos):
        self.pad_token_id, self.eos_token_id, self.bos_token_id = pad, eos, bos


def test_the_tokenizers_special_ids_fill_the_models_missing_ones():
    cfg = models.ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    filled = with_tokenizer_ids(cfg, _Tok(0, 2, 1))
    assert (filled.pad_token_id, filled.eos_token_ids, filled.bos_token_id) == (0, (2,), 1)
    hf = models.config_to_hf(filled)
    assert (hf["pad_token_id"], hf["eos_token_id"], hf["bos_token_id"]) == (0, 2, 1)
    own = models.ModelConfig(**{**cfg.__dict__, "eos_token_ids": (5, 6), "bos_token_id": 4, "pad_token_id": 3})
    assert with_tokenizer_ids(own, _Tok(0, 2, 1)) == own  # the model's own win
    assert with_tokenizer_ids(cfg, _Tok(None, None, None)) == cfg


def test_reward_model_from_init_exports_the_tokenizers_ids_and_pad_eos_without_pad(tokenizer, tmp_path, caplog):
    """A model.init run's export had bos/eos null: transformers' generate on it never stopped at EOS, where the
    run's own sampler stops at the tokenizer's. A reward model trained with a pad-less tokenizer exported
    pad_token_id null, which transformers scores only row by row: it takes pad = EOS, as TRL and NeMo RL
    (test_rev31_rmpad checks the scores)."""
    tok = _copy(tokenizer)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "tok")
    with caplog.at_level("INFO"):
        train.run(recipe("rm_tiny", {**SHORT, "tokenizer": str(tmp_path / "tok")}), str(tmp_path / "w"))
    hf = json.loads((tmp_path / "w" / "hf" / "config.json").read_text())
    assert (hf["eos_token_id"], hf["bos_token_id"], hf["pad_token_id"]) == (
        tok.eos_token_id, tok.bos_token_id, tok.eos_token_id)
    assert models.load_tokenizer(str(tmp_path / "w" / "hf")).pad_token_id == tok.eos_token_id
    assert "the tokenizer has no pad token: pad = EOS '<|im_end|>' (id 2) for the score head" in caplog.text


def test_source_generation_settings_go_with_every_export_and_another_tokenizer_is_said(tokenizer, tmp_path,
                                                                                      caplog):
    """The source folder's generation_config.json (Qwen3's temperature 0.6 / top-p 0.95 / top-k 20) was dropped
    by the run's export and the export CLI, so a plain generate() on them was greedy. And the recipe's
    tokenizer='smollm2' replaced the model folder's own tokenizer without a word."""
    src = tmp_path / "model"
    build_hf_model(tiny_hf_config("llama", vocab=len(tokenizer))).save_pretrained(src)
    tokenizer.save_pretrained(src)
    settings = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [2, 0],
                "transformers_version": "5.0.0"}
    (src / "generation_config.json").write_text(json.dumps(settings))
    with caplog.at_level("WARNING"):
        train.run(recipe("sft_tiny", {**SHORT, "model.path": str(src), "checkpoint.every_steps": 1}),
                  str(tmp_path / "w"))
    assert f"tokenizer='smollm2' is used, not the model's own in {src}" in caplog.text
    export_checkpoint(str(tmp_path / "w"), str(tmp_path / "cli_export"))
    for out in (tmp_path / "w" / "hf", tmp_path / "cli_export"):
        g = json.loads((out / "generation_config.json").read_text())
        assert {k: g[k] for k in ("do_sample", "temperature", "top_p", "top_k")} == {
            "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}
        assert g["eos_token_id"] == [2, 0] == json.loads((out / "config.json").read_text())["eos_token_id"]
        import transformers

        loaded = transformers.GenerationConfig.from_pretrained(out)
        assert (loaded.temperature, loaded.top_k, loaded.eos_token_id) == (0.6, 20, [2, 0])
    caplog.clear()
    with caplog.at_level("WARNING"):  # the model's own tokenizer: nothing to say
        train.load_run_tokenizer(recipe("sft_tiny", {"model.path": str(src), "tokenizer": ""}))
    assert "is used, not the model's own" not in caplog.text


def _copy(tok):
    import copy

    return copy.deepcopy(tok)


def test_packed_rows_are_checked_example_by_example(tokenizer):
    """A packed SFT row is a list of (ids, mask) examples of different lengths: the check read the list as one
    array and failed with numpy's 'inhomogeneous shape' error, on every packed run with a tokenizer larger than
    the model (a few added tokens the data never uses included)."""
    import numpy as np

    from jaxrl_llm.data.vocab import check_ids_fit

    def ex(*ids):
        return (np.array(ids, np.int32), np.ones(len(ids), np.int32))

    vocab = len(tokenizer) - 1  # one token of the tokenizer has no row
    packed = [[ex(1, 2, 3), ex(4, 5)], [ex(6)], ex(7, 8)]
    check_ids_fit(packed, vocab, tokenizer, "tokenized example")
    with pytest.raises(DataError, match=rf"tokenized example 1: token id {vocab} "):
        check_ids_fit([packed[0], [ex(6), ex(9, vocab)]], vocab, tokenizer, "tokenized example")


def test_the_models_own_tokenizer_named_another_way_is_not_another(tokenizer, tmp_path, monkeypatch, caplog):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    for name in (str(model) + "/", "model", str(tmp_path / "link")):
        with caplog.at_level("WARNING"):
            train.load_run_tokenizer(recipe("sft_tiny", {"model.path": str(model), "tokenizer": name}))
    assert "is used, not the model's own" not in caplog.text
