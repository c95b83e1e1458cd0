"""Review 31 (reward models with a tokenizer that has no pad token, as Llama 3's): the run takes pad = EOS (as TRL's
RewardTrainer and NeMo RL's get_tokenizer), trains with it and exports it, so transformers scores the exported
*ForSequenceClassification folder in batches (TRL, NeMo RL's reward environment) and its scores equal training's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_rev30_tok import _tokenizer

from jaxrl_llm import models
from jaxrl_llm.algorithms.pairs import pair_scores
from jaxrl_llm.data import preference as pref
from jaxrl_llm.data.vocab import with_score_pad, with_tokenizer_ids

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": "What is 2+2?"}]
SIDES = ([{"role": "assistant", "content": "It is 4."}], [{"role": "assistant", "content": "No."}])


def _reward_model(tok):
    """A 1-layer Llama with a score head, random numpy parameters (norm weights near 1)."""
    cfg = models.ModelConfig(family="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, num_labels=1)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(("norm" in jax.tree_util.keystr(path)) + 0.2 * rng.standard_normal(a.shape),
                                    jnp.float32), models.abstract_params(cfg))
    return cfg, params


def test_pad_less_tokenizer_gives_the_reward_model_pad_eos_and_batched_hf_scores_equal_training(tmp_path):
    """The export's config.json had pad_token_id null: transformers' *ForSequenceClassification refused batches
    ("Cannot handle batch sizes > 1 if no padding token is defined") and its tokenizer refused padding=True."""
    tok = _tokenizer("llama3")  # BOS by post-processor, EOS <|eot_id|> (the template's turn end), no pad
    assert tok.pad_token_id is None
    cfg, params = _reward_model(tok)
    cfg = with_score_pad(with_tokenizer_ids(cfg, tok), tok)
    eos = tok.convert_tokens_to_ids("<|eot_id|>")
    assert cfg.pad_token_id == tok.pad_token_id == tok.eos_token_id == eos
    models.save_pretrained(cfg, params, str(tmp_path / "hf"), tokenizer=tok)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    htok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.pad_token_id == htok.pad_token_id == eos
    texts = ["It is 4.", "Hello! See you. No.", "No.<|eot_id|>"]  # different lengths; the last ends in EOS
    enc = htok(texts, padding=True, return_tensors="np")  # right padding
    ids, attn = enc["input_ids"], enc["attention_mask"]
    assert attn.sum(1).tolist() != [ids.shape[1]] * 3
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits[:, 0].numpy()
    # (one call, one compile: the batch and, as a 4th row, the last text without its EOS)
    no_eos = htok(["No."], return_tensors="np")["input_ids"][0]
    ids4 = np.concatenate([ids, np.full((1, ids.shape[1]), eos)])
    ids4[3, :len(no_eos)] = no_eos
    attn4 = np.concatenate([attn, (np.arange(ids.shape[1]) < len(no_eos))[None].astype(attn.dtype)])
    ours = np.asarray(jax.jit(models.score_sequences, static_argnums=0)(cfg, params, ids4, attn4))[:, 0]
    np.testing.assert_allclose(ours[:3], theirs, atol=1e-5)
    np.testing.assert_allclose(ours[2], ours[3], atol=1e-5)  # the row ending in EOS: scored at the token before

    # training's pair scores (both pair layouts, padded with the run's pad) read the same tokens transformers does
    pair = pref.tokenize_pair(tok, PROMPT, *SIDES)
    assert pair.chosen_ids[-1] == eos and pair.rejected_ids[-1] == eos  # the template closes the turn with EOS
    rows = [pair.chosen_ids, pair.rejected_ids]
    T = max(map(len, rows))
    ids = np.array([list(r) + [eos] * (T - len(r)) for r in rows])
    attn = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn)).logits[:, 0].numpy()
    config = ml_collections.ConfigDict(dict(data=dict(max_len=T + 5)))
    separate = pref.collate([pair], config, tok.pad_token_id, {"length": T + 5})
    shared = pref.collate_shared(pref.share_prefixes([pair], T + 5), tok.pad_token_id)
    for batch in (separate, shared):
        got = np.asarray(jax.jit(pair_scores, static_argnums=0)(cfg, params, batch))[0]
        np.testing.assert_allclose(got, theirs, atol=1e-5)
    assert abs(theirs[0] - theirs[1]) > 1e-3


def test_score_pad_keeps_a_models_or_tokenizers_own_pad():
    tok = _tokenizer("qwen2.5")  # pad <|endoftext|>, EOS <|im_end|>
    cfg, _ = _reward_model(tok)
    filled = with_score_pad(with_tokenizer_ids(cfg, tok), tok)
    assert filled.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>") == tok.pad_token_id
    llama = _tokenizer("llama3")
    own = dataclasses.replace(cfg, pad_token_id=3)
    assert with_score_pad(own, llama) == own and llama.pad_token_id is None  # the model's own pad wins
