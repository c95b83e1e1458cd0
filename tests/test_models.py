"""Logit parity with HF PyTorch on tiny random models of every supported architecture."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_models import build_hf_model, hf_logits, mixed_padding_batch, tiny_hf_config

from jaxrl_llm import models

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# (family, kwargs): GQA ratios 1, 2 and 3; tied and untied; every rope scaling; every bias/norm variant.
CASES = {
    "llama-gqa3-untied": ("llama", dict(heads=6, kv_heads=2)),
    "llama-mha-tied": ("llama", dict(heads=6, kv_heads=6, tie=True)),
    "llama-gqa2-llama3rope": ("llama", dict(heads=6, kv_heads=3, rope_scaling=LLAMA3)),
    "llama-linear-rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-dynamic-rope": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                                         max_position_embeddings=8)),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral-gqa2": ("mistral", dict(heads=4, kv_heads=2, sliding_window=None)),
    "mistral-window": ("mistral", dict(heads=4, kv_heads=2, sliding_window=4)),
    "qwen2-gqa3-tied": ("qwen2", dict(heads=6, kv_heads=2, tie=True)),
    "qwen3-headdim": ("qwen3", dict(heads=4, kv_heads=2, head_dim=16)),
    "qwen3-mha": ("qwen3", dict(heads=4, kv_heads=4, head_dim=8, tie=True)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (hf model, folder); built lazily, once per module."""
    cache: dict[str, tuple] = {}

    def get(name):
        if name not in cache:
            family, kw = CASES[name]
            m = build_hf_model(tiny_hf_config(family, **kw))
            d = tmp_path_factory.mktemp(name)
            m.save_pretrained(d)
            cache[name] = (m, str(d))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_hf(saved, name):
    hf, folder = saved(name)
    cfg, params = models.load_pretrained(folder)
    ids, mask = mixed_padding_batch(cfg.vocab_size, lengths=(9, 5, 12, 7), T=12)
    ref = hf_logits(hf, ids, mask)
    ours = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32
    valid = mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    assert err <= 1e-4, f"{name}: max |diff| {err}"
    # Sanity: the comparison is not vacuous (logits are far from constant).
    assert np.abs(ref[valid]).max() > 1.0


def test_gqa_ratios_and_biases_are_really_exercised(saved):
    assert {CASES[n][1].get("heads", 6) // CASES[n][1].get("kv_heads", 2) for n in CASES} >= {1, 2, 3}
    cfg, _ = models.load_pretrained(saved("qwen2-gqa3-tied")[1])
    assert cfg.qkv_bias and not cfg.o_bias and cfg.tie_word_embeddings
    cfg, _ = models.load_pretrained(saved("qwen3-headdim")[1])
    assert cfg.qk_norm and cfg.head_dim == 16 and cfg.head_dim * cfg.num_heads != cfg.hidden_size
    cfg, _ = models.load_pretrained(saved("llama-gqa2-llama3rope")[1])
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "llama3"


def test_left_and_right_padding_give_the_unpadded_logits(saved):
    """Each row's valid logits equal those of the same sequence run alone without padding."""
    _, folder = saved("llama-gqa3-untied")
    cfg, params = models.load_pretrained(folder)
    ids, mask = mixed_padding_batch(cfg.vocab_size, lengths=(9, 5, 12, 7), T=12)
    batch = np.asarray(models.forward(cfg, params, ids, mask))
    for b in range(ids.shape[0]):
        row = ids[b][mask[b] == 1][None]
        alone = np.asarray(models.forward(cfg, params, row))
        np.testing.assert_allclose(batch[b][mask[b] == 1], alone[0], atol=1e-5)


def test_fused_attention_path_agrees_with_xla(saved):
    _, folder = saved("mistral-window")
    cfg, params = models.load_pretrained(folder)
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    a = np.asarray(models.forward(cfg, params, ids, mask))
    b = np.asarray(models.forward(dataclasses.replace(cfg, attention_impl="fused"), params, ids, mask))
    valid = mask.astype(bool)
    assert np.abs(a - b)[valid].max() <= 1e-5


def test_bf16_params_and_compute_stay_close_and_logits_are_fp32(saved):
    hf, folder = saved("qwen3-headdim")
    cfg, p32 = models.load_pretrained(folder)
    cfg16, p16 = models.load_pretrained(folder, dtype="bfloat16")
    assert p16["layers"]["wq"].dtype == jnp.bfloat16
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    ref = np.asarray(models.forward(cfg, p32, ids, mask))
    out = models.forward(dataclasses.replace(cfg16, compute_dtype="bfloat16"), p16, ids, mask)
    assert out.dtype == jnp.float32
    valid = mask.astype(bool)
    rel = np.abs(np.asarray(out) - ref)[valid].max() / np.abs(ref[valid]).max()
    assert rel < 0.05, rel
    # bf16 params with fp32 compute (the bf16-storage / fp32-math option) are close too.
    out2 = np.asarray(models.forward(cfg16, p16, ids, mask))
    assert np.abs(out2 - ref)[valid].max() / np.abs(ref[valid]).max() < 0.05


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sequence_classification_head_matches_hf(tmp_path, family):
    hf_cfg = tiny_hf_config(family, num_labels=1)
    hf = build_hf_model(hf_cfg, cls=transformers.AutoModelForSequenceClassification)
    hf.save_pretrained(tmp_path)
    cfg, params = models.load_pretrained(str(tmp_path))
    assert cfg.num_labels == 1 and params["score"].shape == (cfg.hidden_size, 1)
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    with torch.no_grad():
        pos = (torch.tensor(mask).cumsum(-1) - 1).clamp(min=0)
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=pos).logits.numpy()
    ours = np.asarray(models.score_sequences(cfg, params, ids, mask))
    assert ours.shape == (ids.shape[0], 1)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # Per-token values (PPO critic) at the last valid token are the same numbers.
    per_tok = np.asarray(models.score_tokens(cfg, params, ids, mask))
    last = (np.arange(ids.shape[1])[None] * mask).argmax(-1)
    np.testing.assert_allclose(per_tok[np.arange(len(last)), last], ours, atol=1e-6)


def test_config_round_trip_is_exact():
    for family, kw in CASES.values():
        hf_cfg = tiny_hf_config(family, **kw)
        cfg = models.config_from_hf(hf_cfg.to_dict())
        assert models.config_from_hf(models.config_to_hf(cfg)) == cfg
        hash(cfg)  # static jit argument


def test_init_params_match_the_spec_table():
    cfg = models.config_from_hf(tiny_hf_config("qwen2", tie=False).to_dict())
    import jax

    params = models.init_params(cfg, jax.random.key(0))
    flat = {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    specs = models.param_specs(cfg)
    assert set(flat) == set(specs)
    for k, s in specs.items():
        assert flat[k].shape == s.shape
    expected = sum(int(np.prod(x.shape)) for x in flat.values())
    assert models.num_params(cfg) == expected
    # Hand count for this config: embed + lm_head + per layer (q,k,v,o + biases + 3 MLP + 2 norms) + final norm.
    D, F, H, N, K, L, V = 48, 80, 8, 6, 2, 2, 97
    layer = D * N * H + 2 * D * K * H + N * H * D + N * H + 2 * K * H + 3 * D * F + 2 * D
    assert expected == 2 * V * D + L * layer + D
