"""Tests added by mutation testing of jaxrl_llm/models and jaxrl_llm/parallel: each pins down a behaviour that a
plausible one-line change broke without any other fast test failing (checked against transformers / torch, or a
formula written out here)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_models import build_hf_model, hf_logits, mixed_padding_batch, tiny_hf_config

from jaxrl_llm import models, parallel
from jaxrl_llm.models.transformer import rms_norm, rope_tables


def _hf_rope(hf_cfg, positions: np.ndarray):
    """transformers' own (cos, sin) [B, T, H/2] for these positions (a fresh module: dynamic NTK is stateful)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(hf_cfg)
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rot(x, torch.tensor(positions))
    h = cos.shape[-1] // 2
    return cos[..., :h].numpy(), sin[..., :h].numpy(), float(rot.attention_scaling)


ROPE_CASES = {
    # head_dim 64, theta 500000: Llama 3's frequencies fall in all three llama3 bands at an original context of 64
    "llama3": dict(rope_theta=500000.0, max_position_embeddings=512,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama3-lowhigh": dict(rope_theta=10000.0, max_position_embeddings=512,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0,
                                         "high_freq_factor": 8.0, "original_max_position_embeddings": 128}),
    # a top-level original_max_position_embeddings beside the scaling dict's: transformers reads the top-level one
    "llama3-toplevel-orig": dict(rope_theta=10000.0, max_position_embeddings=512, original_max_position_embeddings=256,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "linear": dict(max_position_embeddings=512, rope_scaling={"rope_type": "linear", "factor": 3.0}),
    "dynamic-long": dict(max_position_embeddings=32, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "dynamic-exact": dict(max_position_embeddings=40, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_tables_equal_transformers_rotary_embedding(name):
    """cos/sin of every frequency at long positions (up to 4x the trained context), against transformers' own
    rotary module. The logit-parity tests run 12 tokens of an 8-dim head, which leaves most of a scaling rule
    unexercised (which band a frequency falls in, the dynamic base one token past the context)."""
    hf_cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                      **ROPE_CASES[name])
    cfg = models.config_from_hf(hf_cfg.to_dict())
    # dynamic-exact: the longest position is 40 = max_position_embeddings, so the sequence is 41 long: scaled
    T = 41 if name == "dynamic-exact" else 130
    pos = np.arange(T)[None].repeat(2, 0)
    pos[1] = np.minimum(pos[1], 5)
    ref_cos, ref_sin, scaling = _hf_rope(hf_cfg, pos)
    assert scaling == 1.0
    cos, sin = (np.asarray(a) for a in rope_tables(cfg, jnp.asarray(pos)))
    np.testing.assert_allclose(cos, ref_cos, atol=2e-4)
    np.testing.assert_allclose(sin, ref_sin, atol=2e-4)


def test_rms_norm_is_transformers_rmsnorm_where_eps_matters():
    """x / sqrt(mean(x^2) + eps) * w, with activations small enough that eps is a large part of the mean."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(0)
    x = (1e-3 * rng.standard_normal((3, 5, 32))).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(32)).astype(np.float32)
    eps = 1e-5
    formula = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    ref = LlamaRMSNorm(32, eps=eps)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w))
        ref_out = ref(torch.tensor(x)).numpy()
    ours = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), eps))
    np.testing.assert_allclose(ref_out, formula, rtol=1e-5)
    np.testing.assert_allclose(ours, formula, rtol=1e-5)


def test_rms_norm_in_bf16_rounds_before_the_weight_as_transformers_does():
    """HF: y = (x_f32 * rsqrt(...)).to(bf16); out = w_bf16 * y (a bf16 product, rounded twice). Scaling in fp32
    and rounding once gives a different bf16 number on a large share of the elements."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64, 96)).astype(ml_dtypes.bfloat16)
    w = (1 + 0.5 * rng.standard_normal(96)).astype(ml_dtypes.bfloat16)
    ref = LlamaRMSNorm(96, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(w.astype(np.float32)).to(torch.bfloat16))
        ref_out = ref(torch.tensor(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    ours = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)).astype(np.float32)
    assert ours.dtype == np.float32
    # fp32 rsqrt differs between libraries in the last bit, which can flip a bf16 rounding now and then
    assert np.mean(ours != ref_out) < 0.005


@pytest.fixture(scope="module")
def qwen3_biased(tmp_path_factory):
    hf = build_hf_model(tiny_hf_config("qwen3", heads=4, kv_heads=2, head_dim=16, attention_bias=True))
    d = tmp_path_factory.mktemp("qwen3_bias")
    hf.save_pretrained(d)
    return hf, str(d)


def test_qwen3_with_attention_bias_matches_transformers(qwen3_biased):
    """Qwen3 with attention_bias: q/k/v biases go in before the q/k norms (they are part of q_proj/k_proj), and
    o_proj has a bias too. No other test runs Qwen3 with biases."""
    hf, folder = qwen3_biased
    cfg, params = models.load_pretrained(folder)
    assert cfg.qkv_bias and cfg.o_bias and cfg.qk_norm
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    ours = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], hf_logits(hf, ids, mask)[valid], atol=2e-4, rtol=2e-4)


def test_tied_model_exports_a_folder_transformers_runs_the_same(tmp_path):
    """A tied model's export has no lm_head.weight; its config must say tie_word_embeddings=true, or transformers
    builds a fresh random lm_head."""
    hf = build_hf_model(tiny_hf_config("llama", heads=4, kv_heads=2, tie=True))
    hf.save_pretrained(tmp_path / "src")
    cfg, params = models.load_pretrained(str(tmp_path / "src"))
    assert cfg.tie_word_embeddings
    models.save_pretrained(cfg, params, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32,
                                                             attn_implementation="eager")
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))


def test_llama3_rope_scaling_survives_export_and_reload():
    """config_to_hf must write every llama3 parameter: transformers falls back to max_position_embeddings for a
    missing original_max_position_embeddings, another model."""
    hf_cfg = tiny_hf_config("llama", max_position_embeddings=4096, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64})
    cfg = models.config_from_hf(hf_cfg.to_dict())
    d = models.config_to_hf(cfg)
    assert d["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                 "high_freq_factor": 8.0, "original_max_position_embeddings": 64}
    assert models.config_from_hf(d) == cfg
    back = transformers.LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    pos = np.arange(100)[None]
    ref_cos, _, _ = _hf_rope(back, pos)
    np.testing.assert_allclose(np.asarray(rope_tables(cfg, jnp.asarray(pos))[0]), ref_cos, atol=2e-4)


def test_mesh_must_use_every_device():
    """Fixed axes whose product is not the device count are refused (fewer would leave devices idle)."""
    assert parallel.resolve_mesh_shape(2, -1, 2, num_devices=8) == (2, 2, 2)
    with pytest.raises(parallel.MeshError, match="8 devices"):
        parallel.resolve_mesh_shape(2, 2, 1, num_devices=8)
    with pytest.raises(parallel.MeshError, match="not divisible"):
        parallel.resolve_mesh_shape(3, -1, 1, num_devices=8)


def test_tensor_sampling_layout_keeps_weights_whole_over_fsdp():
    """sampling_rules('tensor'): no weight is split over fsdp (a decode step then gathers none); the tensor axis
    still splits heads, MLP width and vocabulary; the batch still splits over data and fsdp."""
    rules = parallel.sampling_rules("tensor")
    mesh_shape = {"data": 1, "fsdp": 4, "tensor": 2}
    cfg = models.config_from_hf(tiny_hf_config("llama", heads=4, kv_heads=2, vocab=96, hidden=64).to_dict())
    for path, spec in models.param_specs(cfg).items():
        ps = rules.spec(spec.axes, spec.shape, mesh_shape)
        assert "fsdp" not in jax.tree.leaves(tuple(ps)), (path, ps)
    assert rules.spec(("embed", "mlp"), (64, 80), mesh_shape) == jax.sharding.PartitionSpec(None, "tensor")
    assert rules.spec(("batch",), (8,), mesh_shape) == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_loading_in_bf16_gives_every_parameter_in_bf16(qwen3_biased):
    """Every parameter in the requested dtype, the unstacked ones (embedding, final norm, lm_head) too: an fp32
    embedding would double its memory and make save_pretrained's default export dtype (the embedding's) fp32."""
    _, folder = qwen3_biased
    cfg, params = models.load_pretrained(folder, dtype="bfloat16")
    dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}, dtypes
    assert "['lm_head']" in dtypes and "['embed']" in dtypes
