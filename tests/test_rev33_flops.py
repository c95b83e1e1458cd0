"""Arithmetic the compiled train steps should not do (a static audit on the CPU: lowered and compiled programs, no
timing): the vocabulary head's backward products in fp32 under bf16 compute, DPO projecting prompt and padding
positions onto the vocabulary, a second top-k/top-p sort in GRPO's chunked backward pass, and chunks padded far
past the positions they project."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxrl_llm import models
from jaxrl_llm.algorithms import REGISTRY, grpo
from jaxrl_llm.algorithms.losses import target_logprobs
from jaxrl_llm.algorithms.pairs import pair_logprobs
from jaxrl_llm.data import preference as pref
from jaxrl_llm.models.logit_chunks import over_positions
from jaxrl_llm.optim import make_optimizer

V = 4096
CFG = models.ModelConfig(family="llama", vocab_size=V, hidden_size=64, intermediate_size=128, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16)
_DOT = re.compile(r"stablehlo\.dot_general.*?:\s*\(tensor<(?:\d+x)*([a-z]\w*)>, tensor<(?:\d+x)*([a-z]\w*)>\)")


def _pairs(n: int, prompt: int, seed: int = 0, common: int = 0) -> list[pref.PreferencePair]:
    """Pairs of a long prompt (out of the loss) and short responses (in it) that start with `common` shared tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c0 = rng.integers(3, V, prompt).astype(np.int32), rng.integers(3, V, common).astype(np.int32)
        sides = []
        for _side in range(2):
            r = np.r_[c0, rng.integers(3, V, int(rng.integers(3, 9))).astype(np.int32)]
            sides += [np.r_[p, r], np.r_[np.zeros(prompt, np.int32), np.ones(len(r), np.int32)]]
        out.append(pref.PreferencePair(*sides))
    return out


@pytest.mark.parametrize("tied,chunk", [(False, 0), (True, 0), (False, 8)])
def test_bf16_head_backward_runs_no_fp32_matmul(tied, chunk):
    """With bf16 compute every product of the loss's gradient takes bf16 operands. FAILS before the fix: the fp32
    cotangent of the fp32 logits promoted both backward products of the vocabulary head (its weight and input
    gradients, 2/3 of its FLOPs) to fp32 x fp32 matmuls on an fp32 copy of the head."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied, compute_dtype="bfloat16", logits_chunk=chunk)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0), dtype="bfloat16"))
    ids = jax.ShapeDtypeStruct((2, 24), jnp.int32)

    def loss(p, ids):
        return target_logprobs(cfg, p, models.hidden_states(cfg, p, ids)[:, :-1], ids[:, 1:]).sum()

    dots = _DOT.findall(jax.jit(jax.grad(loss)).lower(params, ids).as_text())
    assert dots and ("f32", "f32") not in dots, dots


def _dot_flops_ratio(batch: dict, targets: int, tokens: int, attn_pairs: int) -> float:
    """cost_analysis FLOPs of DPO's compiled step (one layer: its scan body runs once, as counted) over the model
    FLOPs of the policy's forward + backward and the reference's forward, the head projecting `targets` positions."""
    cfg = CFG
    opt, _ = make_optimizer(1e-5, 10, schedule="constant")
    conf = ml_collections.ConfigDict(dict(dpo=dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                                   average_log_probs=False, preference_weight=1.0, sft_weight=0.0,
                                                   sft_average_log_probs=False), train=dict(microbatches=1)))
    step = REGISTRY["dpo"].make_step(cfg, opt, conf, None)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    state = {"params": params, "opt_state": jax.eval_shape(opt.init, params), "step": jnp.int32(0)}
    flops = jax.jit(step, donate_argnums=0).lower(state, batch, params).compile().cost_analysis()["flops"]
    D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    p_layers = D * H * (2 * N + 2 * K) + 3 * D * F
    # policy: 6 x (layers per token + head per target) + attention (4 forward, 10 backward: the probabilities
    # recomputed, models/sdpa.py); the reference: 2 + 2 + 4
    model = 8 * p_layers * tokens + 8 * V * D * targets + 18 * N * H * attn_pairs
    return flops / model


@pytest.mark.parametrize("shared", [False, True])
def test_dpo_projects_only_the_loss_targets_onto_the_vocabulary(shared):
    """DPO's train step (as `python -m jaxrl_llm.train` collates and runs it) projects onto the vocabulary the
    positions that predict a response token, not the prompt's and the padding's. FAILS before the fix: every
    position of both sides (separate rows), or every prefix column (shared prefix: the prompt, out of the loss),
    was projected, in the policy's forward and backward and the reference's forward: here 3.5x / 2.5x the model
    FLOPs. Values and gradients: test_dpo_target_lists_give_the_full_projections_values_and_gradients."""
    algo, conf = REGISTRY["dpo"], ml_collections.ConfigDict(dict(data=dict(max_len=64, length_buckets=4)))
    pairs = _pairs(4, 40)
    examples = pref.share_prefixes(pairs, 64) if shared else pairs
    batch = algo.collate(examples, conf, 0, algo.widths(examples, conf))
    if shared:
        W, C = batch["prefix_ids"].shape[1], batch["suffix_ids"].shape[2]
        targets = 4 * (batch["prefix_target_index"].shape[1] + 2 * batch["suffix_target_index"].shape[2])
        tokens, attn_pairs = 4 * (W + 2 * C), 4 * (W * W + 2 * C * (W + C))
    else:
        T = batch["input_ids"].shape[-1]
        targets, tokens, attn_pairs = 8 * batch["target_index"].shape[-1], 8 * T, 8 * T * T
    assert targets <= 8 * 16  # the responses' tokens (3 to 8 a side), not the prompt's 40 and the padding
    assert _dot_flops_ratio(batch, targets, tokens, attn_pairs) < 1.1


@pytest.mark.parametrize("shared,chunk,common", [(False, 0, 0), (True, 0, 0), (True, 4, 3)])
def test_dpo_target_lists_give_the_full_projections_values_and_gradients(shared, chunk, common):
    """The target lists (`pref.pair_targets`) change which positions are projected, not the sums: the same sequence
    log-probs, token counts and gradients as projecting every position (a batch without the lists), in both layouts,
    with prefixes that hold loss tokens (common > 0) or none (a prefix target width of 0)."""
    cfg = dataclasses.replace(CFG, vocab_size=256, hidden_size=32, intermediate_size=32, head_dim=8, logits_chunk=chunk)
    params = models.init_params(cfg, jax.random.key(1), std=0.05)
    conf = ml_collections.ConfigDict(dict(data=dict(max_len=64, length_buckets=4)))
    pairs = [p._replace(chosen_ids=p.chosen_ids % 256, rejected_ids=p.rejected_ids % 256)
             for p in _pairs(3, 10, seed=2, common=common)]
    examples = pref.share_prefixes(pairs, 64) if shared else pairs
    listed = REGISTRY["dpo"].collate(examples, conf, 0)
    full = {k: v for k, v in listed.items() if "target" not in k}
    assert len(full) < len(listed)
    if shared:
        assert (listed["prefix_target_index"].shape[1] == 0) == (common == 0)

    def f(p, mb):
        lp, n = pair_logprobs(cfg, p, mb)
        return (0.1 * lp + 1e-3 * lp**2).sum(), (lp, n)

    (_, (lp1, n1)), g1 = jax.jit(jax.value_and_grad(f, has_aux=True))(params, listed)
    (_, (lp0, n0)), g0 = jax.jit(jax.value_and_grad(f, has_aux=True))(params, full)
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_grpo_chunked_backward_does_not_sort_the_vocabulary_again():
    """GRPO's loss with the sampler's top-k/top-p filter and model.logits_chunk finds each position's threshold once.
    FAILS before the fix: a chunk's backward recomputation sorted them again (a [positions, V] sort, dearer than
    the head's matmul on a GPU); the threshold it needs is now kept from the forward pass (one float a position)."""
    cfg = dataclasses.replace(CFG, logits_chunk=4)
    params = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def loss(p, ids):
        return grpo._policy_logprobs(cfg, p, ids, jnp.ones_like(ids), 0.7, 5, 0.9, None, first_target=6)[0].sum()

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params, ids).compile().as_text()  # (the loss is reported)
    # (on a CPU, top_k 5 <= 256: the threshold is XLA:CPU's TopK call on the 256 largest, no sort at all)
    assert len(re.findall(r"= \S+ sort\(", hlo)) == 0
    assert hlo.count('custom_call_target="TopK"') == 1


@pytest.mark.parametrize("K,chunk,size", [(9, 8, 5), (17, 8, 6), (16, 8, 8), (5, 8, 5)])
def test_chunks_are_balanced_not_padded_to_the_chunk_size(K, chunk, size):
    """over_positions runs ceil(K / chunk) chunks of equal size (<= chunk). FAILS before the fix: K = 9 positions in
    chunks of 8 projected 16 (the second chunk almost all padding), 1.8x the head's FLOPs."""
    seen = []

    def fn(h, t):
        seen.append(h.shape[1])
        return (h.sum(-1) * t,)

    h, t = jnp.ones((2, K, 3)), jnp.ones((2, K))
    out = over_positions(fn, chunk, h, t)[0]
    assert seen == [size] and out.shape == (2, K)
    np.testing.assert_allclose(out, 3.0)
