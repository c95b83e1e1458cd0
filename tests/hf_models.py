"""Tiny random HF models saved to a temp dir: the independent reference for parity tests (torch only here)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

ARCH_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def tiny_hf_config(family: str, *, heads: int = 6, kv_heads: int = 2, tie: bool = False, vocab: int = 97,
                   layers: int = 2, hidden: int = 48, head_dim: int | None = None, **extra):
    kw = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=80, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    if head_dim is not None:
        kw["head_dim"] = head_dim
    kw.update(extra)
    cfg = ARCH_CONFIGS[family](**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build_hf_model(cfg, seed: int = 0, cls=None, scale: float = 0.2):
    """A model with random weights large enough that attention patterns differ from uniform."""
    torch.manual_seed(seed)
    cls = cls or transformers.AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def mixed_padding_batch(vocab: int, lengths=(9, 5, 12, 7), T: int = 12, seed: int = 0):
    """ids [B,T] and mask [B,T]: rows alternate left and right padding; pad id 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for b, n in enumerate(lengths):
        toks = rng.integers(3, vocab, size=n)
        if b % 2 == 0:  # right padding
            ids[b, :n], mask[b, :n] = toks, 1
        else:  # left padding
            ids[b, T - n:], mask[b, T - n:] = toks, 1
    return ids, mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference logits with position ids derived from the mask (as HF generate does)."""
    ids_t = torch.tensor(ids)
    mask_t = torch.tensor(mask)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos)
    return out.logits.float().numpy()
