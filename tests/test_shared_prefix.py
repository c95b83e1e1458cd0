"""A group's prompt runs once (models.shared_prefix, grpo.shared_prompt): the same hidden states, log-probs,
gradients and optimizer updates as running every row's own copy of the prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import recipe

from jaxrl_llm import models, parallel
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.models.shared_prefix import shared_prefix_hidden_states
from jaxrl_llm.rl_batch import check_shared_prompts, shuffled_rows

N, G, P, C = 3, 4, 7, 6

FAMILIES = [("llama", {}), ("qwen3", dict(qk_norm=True)), ("mistral", dict(sliding_window=5)),
            ("qwen2", dict(qkv_bias=True)), ("llama", dict(attention_impl="fused"))]


def _cfg(family="llama", vocab=97, **kw):
    return models.ModelConfig(family=family, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=8, **kw)


def _group_batch(vocab=97, seed=0):
    """Prompts [N, P] (left-padded: group 0 by 3, group 1 by 1) and continuations [N, G, C] (right-padded; one
    empty, one of a single token)."""
    rng = np.random.default_rng(seed)
    pid = rng.integers(0, vocab, (N, P)).astype(np.int32)
    pm = np.ones((N, P), np.int32)
    pm[0, :3] = 0
    pm[1, :1] = 0
    cid = rng.integers(0, vocab, (N, G, C)).astype(np.int32)
    cm = np.ones((N, G, C), np.int32)
    cm[0, 1, 4:] = 0
    cm[2, 3, 1:] = 0
    cm[1, 0, :] = 0
    return pid, pm, cid, cm


def _rows(pid, pm, cid, cm):
    """The same groups as N x G rows [prompt | continuation] (what every row running its own prompt sees)."""
    ids = np.concatenate([np.repeat(pid[:, None], G, 1), cid], -1).reshape(N * G, P + C)
    mask = np.concatenate([np.repeat(pm[:, None], G, 1), cm], -1).reshape(N * G, P + C)
    return ids, mask


@pytest.mark.parametrize("family,extra", FAMILIES, ids=lambda x: x if isinstance(x, str) else "-".join(x) or "plain")
def test_shared_prefix_hidden_states_equal_separate_rows(family, extra):
    cfg = _cfg(family, **extra)
    params = models.init_params(cfg, jax.random.key(0), std=0.2)
    pid, pm, cid, cm = _group_batch()
    hp, hc = shared_prefix_hidden_states(cfg, params, pid, pm, cid, cm)
    assert hp.shape == (N, P, 32) and hc.shape == (N, G, C, 32)
    ids, mask = _rows(pid, pm, cid, cm)
    h = np.asarray(models.hidden_states(cfg, params, ids, mask)).reshape(N, G, P + C, -1)
    valid = mask.reshape(N, G, P + C).astype(bool)
    np.testing.assert_allclose(np.broadcast_to(np.asarray(hp)[:, None], (N, G, P, 32))[valid[:, :, :P]],
                               h[:, :, :P][valid[:, :, :P]], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hc)[valid[:, :, P:]], h[:, :, P:][valid[:, :, P:]], atol=2e-5, rtol=0)


def test_a_continuation_never_sees_another():
    """Changing one continuation's tokens changes no other continuation's hidden states (and not the prompt's)."""
    cfg = _cfg()
    params = models.init_params(cfg, jax.random.key(0), std=0.2)
    pid, pm, cid, cm = _group_batch()
    hp, hc = shared_prefix_hidden_states(cfg, params, pid, pm, cid, cm)
    cid2 = cid.copy()
    cid2[2, 1] = (cid2[2, 1] + 1) % 97
    hp2, hc2 = shared_prefix_hidden_states(cfg, params, pid, pm, cid2, cm)
    np.testing.assert_array_equal(np.asarray(hp), np.asarray(hp2))
    others = np.ones((N, G), bool)
    others[2, 1] = False
    np.testing.assert_allclose(np.asarray(hc)[others], np.asarray(hc2)[others], atol=1e-6, rtol=0)
    assert np.abs(np.asarray(hc)[2, 1] - np.asarray(hc2)[2, 1]).max() > 1e-3


def _grpo_rows(vocab=97, seed=0):
    """`build_batch` rows of N groups of G rollouts (each group's prompt repeated), prompt width P, C new tokens."""
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    for i, n_p in enumerate((4, 7, 2)):
        p = rng.integers(3, vocab, n_p).tolist()
        for g in range(G):
            prompts.append(p)
            comps.append(rng.integers(3, vocab, [C, 3, 1, C - 1][(i + g) % 4]).tolist())
    lps = [[-1.0] * len(c) for c in comps]
    return grpo.build_batch(prompts, comps, lps, P, C, pad_id=0)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_logprobs_with_shared_prompt_equal_separate_rows(top_k, top_p):
    cfg = _cfg(vocab=64)
    params = models.init_params(cfg, jax.random.key(1), std=0.2)
    b = _grpo_rows(64)
    sep = jax.jit(grpo.make_logprobs_fn(cfg, 0.7, 3, top_k=top_k, top_p=top_p, first_target=P))
    shr = jax.jit(grpo.make_logprobs_fn(cfg, 0.7, 3, top_k=top_k, top_p=top_p, first_target=P, group=G))
    a = np.asarray(sep(params, b["input_ids"], b["attention_mask"]))
    s = np.asarray(shr(params, b["input_ids"], b["attention_mask"]))
    m = b["loss_mask"] > 0
    assert m.sum() >= 40 and np.abs(a[m]).min() > 0
    np.testing.assert_allclose(s[m], a[m], atol=2e-5, rtol=0)
    assert not s[:, :P].any()


def _train_config(shared: bool, micro: int = 2):
    return recipe("grpo_tiny", {"rollout.num_prompts": N, "rollout.group_size": G, "rollout.max_new_tokens": C,
                                "data.max_prompt_len": P, "train.batch_size": N * G, "train.microbatches": micro,
                                "grpo.shared_prompt": shared, "grpo.kl_coef": 0.05, "grpo.importance_correction": True,
                                "grpo.tis_cap": 2.0, "grpo.positive_nll_weight": 0.1})


def test_train_step_with_shared_prompt_equals_separate_rows():
    """One optimizer update (loss, metrics, gradient norm, new params) is the same either way; the microbatch of 4
    rows holds one whole group each time (3 microbatches), so the shared path is the one that ran."""
    cfg = _cfg(vocab=64)
    params = models.init_params(cfg, jax.random.key(2), std=0.2)
    b = _grpo_rows(64)
    rng = np.random.default_rng(3)
    R, T = b["input_ids"].shape
    mb = dict(b, advantages=rng.normal(size=(R, T)).astype(np.float32),
              old_logprobs=b["sampler_logprobs"] + rng.normal(0, 0.1, (R, T)).astype(np.float32),
              ref_logprobs=b["sampler_logprobs"] + rng.normal(0, 0.1, (R, T)).astype(np.float32),
              positive=(np.arange(R) % 3 == 0))
    mb = {k: mb[k] for k in grpo.BATCH_AXES}
    out = {}
    for shared in (True, False):
        config = _train_config(shared, micro=3)
        assert grpo.shared_prompt_group(config) == (G if shared else 1)
        opt = optax.sgd(1.0)  # the new params differ by the gradients (Adam's first step is ~sign(g) x lr)
        state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
        step = jax.jit(grpo.make_train_step(cfg, opt, config))
        out[shared] = step(state, mb, jnp.bool_(False))
    (s1, m1), (s0, m0) = out[True], out[False]
    for k in ("loss", "grad_norm", "count", "kl", "clip_fraction", "entropy", "positive_nll_loss"):
        np.testing.assert_allclose(float(m1[k]), float(m0[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(m1["clip_fraction"]) > 0 and float(m1["kl"]) > 0
    for a, b_ in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s0["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-6, rtol=0)


def test_shared_prompt_group_needs_whole_groups_per_microbatch():
    assert grpo.shared_prompt_group(_train_config(True, micro=1)) == G
    assert grpo.shared_prompt_group(_train_config(True, micro=3)) == G  # 4 rows each
    c = _train_config(True, micro=2)  # 6 rows: one and a half groups
    assert grpo.shared_prompt_group(c) == 1
    assert grpo.shared_prompt_group(_train_config(False, micro=1)) == 1
    assert grpo.grpo_config().shared_prompt is True


def test_shuffled_rows_keep_groups_together():
    rng = np.random.default_rng(0)
    order = shuffled_rows(rng, 12, 4)
    assert sorted(order.tolist()) == list(range(12))
    groups = order.reshape(3, 4)
    assert (groups == groups[:, :1] + np.arange(4)).all() and (groups[:, 0] % 4 == 0).all()
    assert any((shuffled_rows(rng, 12, 4) != np.arange(12)).any() for _ in range(5))


def test_rows_of_a_group_that_differ_in_their_prompt_are_an_error():
    b = _grpo_rows()
    check_shared_prompts(b, G, P)
    b["input_ids"][5, P - 1] += 1
    with pytest.raises(RuntimeError, match="group 1 .*input_ids"):
        check_shared_prompts(b, G, P)


def test_shared_prompt_logprobs_on_a_sharded_mesh_equal_one_device():
    """Under mesh (fsdp=4, tensor=2) on 8 fake devices, with 2 groups per log-prob chunk."""
    cfg = _cfg(vocab=64)
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    rules = parallel.ShardingRules()
    params1 = models.init_params(cfg, jax.random.key(4), std=0.2)
    b = _grpo_rows(64)
    ids = np.concatenate([b["input_ids"], b["input_ids"][:4]])  # 4 groups: 2 chunks of 2 groups
    attn = np.concatenate([b["attention_mask"], b["attention_mask"][:4]])
    ref = np.asarray(jax.jit(grpo.make_logprobs_fn(cfg, 1.0, 2, first_target=P))(params1, ids, attn))
    params = jax.device_put(params1, models.param_shardings(cfg, mesh, rules))
    full = rules.sharding(mesh, ("batch", "length"), ids.shape)
    with jax.set_mesh(mesh):
        fn = jax.jit(grpo.make_logprobs_fn(cfg, 1.0, 2, rules, first_target=P, group=G),
                     in_shardings=(models.param_shardings(cfg, mesh, rules), full, full))
        out = np.asarray(fn(params, ids, attn))
    m = np.concatenate([b["loss_mask"], b["loss_mask"][:4]]) > 0
    np.testing.assert_allclose(out[m], ref[m], atol=2e-5, rtol=0)
