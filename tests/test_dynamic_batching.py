"""GRPO dynamic batching (grpo.length_buckets, jaxrl_llm.rl_lengths): the log-prob passes and the optimizer update
on chunks cut to their rows' widths give the full-width results, with fewer columns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import recipe

from jaxrl_llm import models, parallel, rl_lengths
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.optim import make_optimizer

CFG = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
P, BUDGET = 40, 72  # max_prompt_len, max_new_tokens


def _attn(prompts, completions, P=P, C=BUDGET):
    a = np.zeros((len(prompts), P + C), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        a[i, P - p:P + c] = 1
    return a


def test_row_lengths_read_build_batch_rows():
    attn = _attn([3, 40, 1, 7], [0, 72, 5, 33])
    attn[3, P + 10] = 0  # (a hole inside the completion, e.g. a masked observation, still counts to the last column)
    p, c = rl_lengths.row_lengths(attn, P)
    assert p.tolist() == [3, 40, 1, 7] and c.tolist() == [0, 72, 5, 33]


def test_plan_sorts_longest_first_keeps_groups_and_rounds_to_the_ladder():
    comp = np.array([5, 60, 3, 3, 70, 2, 9, 40])
    prom = np.array([10, 10, 33, 33, 20, 20, 5, 5])
    rows = np.arange(8)
    chunks = rl_lengths.plan_chunks(rows, prom, comp, 2, 1, P, BUDGET, 4)
    assert [c.rows.tolist() for c in chunks] == [[4, 1, 7, 6], [0, 2, 3, 5]]
    # prompts: longest 20 -> the ladder's 32 (capped at P=40: 33 -> 40); completions 70 -> 72 (the cap), 5 -> 32
    assert [(c.prompt_width, c.completion_width) for c in chunks] == [(32, 72), (40, 32)]
    # groups of 2 consecutive rows stay together, ranked by their longest completion; ties keep their order
    chunks = rl_lengths.plan_chunks(rows, prom, comp, 2, 2, P, BUDGET, 2)
    assert [c.rows.tolist() for c in chunks] == [[4, 5, 0, 1], [6, 7, 2, 3]]
    assert [(c.prompt_width, c.completion_width) for c in chunks] == [(32, 72), (40, 48)]
    # a minibatch's rows in any order; the chunk keeps each row's own columns
    sub = rl_lengths.plan_chunks(np.array([6, 2, 5, 3]), prom, comp, 2, 1, P, BUDGET, 1)
    assert [c.rows.tolist() for c in sub] == [[6, 2], [3, 5]]
    assert [(c.prompt_width, c.completion_width) for c in sub] == [(40, 32), (40, 32)]
    a = np.arange(8 * (P + BUDGET)).reshape(8, -1)
    np.testing.assert_array_equal(sub[0].take(a, P), a[[6, 2], P - 40:P + 32])
    np.testing.assert_array_equal(sub[0].take(np.arange(8), P), [6, 2])
    # the widest chunk first: here the short completions come with the long prompts
    wide = rl_lengths.plan_chunks(np.arange(4), np.array([5, 5, 120, 120]), np.array([72, 70, 33, 33]), 2, 1, 128,
                                  BUDGET, 4)
    assert [(c.rows.tolist(), c.prompt_width, c.completion_width) for c in wide] == [([2, 3], 128, 40),
                                                                                      ([0, 1], 32, 72)]
    with pytest.raises(ValueError, match="do not split into 3 chunks"):
        rl_lengths.plan_chunks(rows, prom, comp, 3, 1, P, BUDGET, 4)
    with pytest.raises(ValueError, match="whole groups of 4"):
        rl_lengths.plan_chunks(rows, prom, comp, 4, 4, P, BUDGET, 4)
    kept, pad = rl_lengths.padding_share(chunks, prom, comp, P + BUDGET)
    assert kept == pytest.approx(4 * (104 + 88) / (8 * 112))
    assert pad == pytest.approx(1 - (prom.sum() + comp.sum()) / (4 * (104 + 88)))


def _setup(top_k=0, top_p=1.0, microbatches=2, shared=False, G=4, longest=BUDGET):
    config = recipe("grpo_tiny", {"data.max_prompt_len": P, "rollout.max_new_tokens": BUDGET,
                                  "rollout.num_prompts": 4, "rollout.group_size": G, "rollout.temperature": 0.7,
                                  "rollout.top_k": top_k, "rollout.top_p": top_p, "train.batch_size": 16,
                                  "train.microbatches": microbatches, "grpo.shared_prompt": shared,
                                  "grpo.kl_coef": 0.05, "grpo.length_buckets": 4})
    rng = np.random.default_rng(0)
    prompts, completions = [], []
    for i in range(16):  # prompts shared within each group of G; completions from empty to the whole budget
        if i % G == 0:
            prompt = rng.integers(1, 97, rng.integers(2, 30)).tolist()
        prompts.append(prompt)
        n = [0, 3, 9, 20, 45, 72][i % 6] if i % 5 else rng.integers(1, 30)
        completions.append(rng.integers(1, 97, min(n, longest)).tolist())
    batch = grpo.build_batch(prompts, completions, [[-1.0] * len(c) for c in completions], P, BUDGET, 0)
    mesh = parallel.make_mesh(1, -1, 1)
    rules = parallel.ShardingRules()
    params = models.init_params(CFG, jax.random.key(1), mesh=mesh, rules=rules)
    return config, batch, mesh, rules, params


@pytest.mark.parametrize("top_k,top_p,shared", [(0, 1.0, False), (7, 0.9, True)])
def test_chunked_logprobs_equal_full_width_logprobs(top_k, top_p, shared):
    config, batch, mesh, rules, params = _setup(top_k, top_p, shared=shared)
    group = grpo.shared_prompt_group(config)
    assert group == (4 if shared else 1)
    opt, _ = make_optimizer(1e-3, 10)
    passes = rl_lengths.ChunkedPasses(CFG, opt, config, mesh, rules, models.param_shardings(CFG, mesh, rules),
                                      None, group)
    lengths = rl_lengths.row_lengths(batch["attention_mask"], P)
    chunks = passes.plan(np.arange(16), lengths, 2)
    assert sum(c.prompt_width + c.completion_width for c in chunks) < 2 * (P + BUDGET)  # columns were cut
    mask = batch["loss_mask"] > 0
    with jax.set_mesh(mesh):
        for kind, (k, p) in (("reference", (0, 1.0)), ("policy", (top_k, top_p))):
            full = jax.jit(grpo.make_logprobs_fn(CFG, 0.7, 2, rules, k, p, first_target=P, group=group))
            want = np.asarray(full(params, batch["input_ids"], batch["attention_mask"]))
            got = passes.logprobs(kind, chunks, params, batch["input_ids"], batch["attention_mask"])
            np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=2e-5)
            assert (got[~mask] == 0).sum() > 0.3 * (~mask).sum()  # cut columns: no values
    assert {w for kind, w in passes._fns} == {c.prompt_width for c in chunks}


@pytest.mark.parametrize("longest", [BUDGET, 20])
def test_chunked_update_equals_the_full_width_train_step(longest):
    """One optimizer update off-policy (old log-probs given, so ratios, clipping and KL are all live), with the
    positive-example NLL on: the parameters and every metric equal make_train_step's on full-width rows. Longest
    completion 72: microbatches of different widths (one program per microbatch, sums added); 20: both 32 + 32
    columns (one program, make_train_step's, at that width)."""
    config, batch, mesh, rules, params = _setup(microbatches=2, longest=longest)
    config.grpo.positive_nll_weight = 0.3
    rng = np.random.default_rng(1)
    batch["advantages"] = np.repeat(rng.normal(size=(16, 1)), P + BUDGET, 1).astype(np.float32)
    batch["positive"] = (batch["advantages"][:, 0] > 0).astype(np.int32)
    with jax.set_mesh(mesh):
        full = jax.jit(grpo.make_logprobs_fn(CFG, 0.7, 2, rules, first_target=P))
        lp = np.asarray(full(params, batch["input_ids"], batch["attention_mask"]))
    batch["old_logprobs"] = lp + 0.3 * rng.normal(size=lp.shape).astype(np.float32)
    batch["ref_logprobs"] = lp + 0.2 * rng.normal(size=lp.shape).astype(np.float32)
    opt = optax.sgd(0.1)  # (the update is the gradient: Adam's first step, about lr x sign(g), hides its size)
    p_sh = models.param_shardings(CFG, mesh, rules)
    with jax.set_mesh(mesh):
        state = lambda: {"params": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params),
                         "step": jnp.int32(0)}
        want_state, want = jax.jit(grpo.make_train_step(CFG, opt, config, rules))(
            state(), {k: batch[k] for k in grpo.BATCH_AXES}, jnp.bool_(False))
        passes = rl_lengths.ChunkedPasses(CFG, opt, config, mesh, rules, p_sh, None, 1)
        rows = np.random.default_rng(2).permutation(16)  # a shuffled minibatch (later epochs)
        micro = passes.plan(rows, rl_lengths.row_lengths(batch["attention_mask"], P), 2)
        assert sorted(np.concatenate([c.rows for c in micro]).tolist()) == list(range(16))
        got_state, got = passes.update(state(), batch, micro, jnp.bool_(False))
    widths = [(c.prompt_width, c.completion_width) for c in micro]
    assert widths == ([(32, 72), (32, 32)] if longest == BUDGET else [(32, 32), (32, 32)])
    assert passes.shapes == ({("grads", 32, 72), ("grads", 32, 32)} if longest == BUDGET else {("step", 32, 32)})
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    assert 0 < float(want["clip_fraction"]) and float(want["ratio_min"]) < 1 < float(want["ratio_max"])
    assert int(got_state["step"]) == 1
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    for p0, w, g in zip(leaves(params), leaves(want_state["params"]), leaves(got_state["params"]), strict=True):
        moved = np.abs(w - p0).max()
        assert moved > 0 and np.abs(g - w).max() <= 1e-4 * moved + 1e-9, (np.abs(g - w).max(), moved)
