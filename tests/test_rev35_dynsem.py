"""Review of GRPO dynamic batching (grpo.length_buckets, jaxrl_llm.rl_lengths): a whole GRPO step with columns cut
gives the full-width step's metrics, and the chunked update keeps the on-policy first update exact."""

from __future__ import annotations

import json
import os
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import recipe

from jaxrl_llm import models, parallel, rl_lengths, rl_train, train
from jaxrl_llm.algorithms import grpo
from jaxrl_llm.rl_batch import Rollouts

# Completion lengths of 4 groups of 4 (budget 40: the ladder's 32 and 40 completion widths) and each group's prompt
# length (max_prompt_len 128: widths 32 and 96). Log-prob chunks and microbatches hold one group each; with the
# seed-0 shuffle of the second epoch, both update paths run: microbatches of one width (one program) and of two.
COMPLETIONS = [[40, 3, 0, 9], [5, 7, 2, 1], [20, 33, 1, 2], [12, 0, 6, 35]]
PROMPTS = [20, 70, 28, 9]
REWARDS = [1, 0, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 1]


def _fake_collect(self: Any, params: Any, step: int) -> tuple[Rollouts, dict[str, float]]:
    """Fixed multi-turn rollouts: observation tokens (loss mask 0) inside the episodes, empty episodes, a truncated
    episode, and a group whose episodes all say "length" (all masked out under grpo.overlong_filtering)."""
    rng = np.random.default_rng(step)
    prompts, tokens, logprobs, masks, finish = [], [], [], [], []
    for g, (n_p, group) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
        prompt = rng.integers(10, 300, n_p).tolist()
        for n in group:
            prompts.append(prompt)
            tokens.append(rng.integers(10, 300, n).tolist())
            logprobs.append((-5 * rng.random(n)).tolist())
            masks.append([int((j // 4) % 3 != 1) for j in range(n)])
            finish.append("length" if n == 40 or g == 1 else "stop")
    R = len(tokens)
    rewards = np.asarray(REWARDS, np.float32)
    roll = Rollouts([0] * R, prompts, tokens, logprobs, finish, rewards, rewards.copy(), {}, loss_masks=masks,
                    turns=[2] * R)
    return roll, {"time_generate_s": 1.0, "time_reshard_s": 0.0, "generated_tokens": 1.0, "sampler_compiles": 0.0,
                  "time_score_s": 0.0}


def test_a_chunked_grpo_step_gives_the_full_width_steps_metrics(tmp_path, monkeypatch):
    """One GRPO step (multi-turn budget, 2 epochs of 2 minibatches, shared prompts, GSPO, positive NLL, KL, the old
    log-probs recomputed, overlong filtering) with grpo.length_buckets 2 against 0: every metric of the step equal to
    float rounding, the first update exactly on-policy, and fewer cells through the passes."""
    monkeypatch.setattr(rl_train.GRPORunner, "collect", _fake_collect)
    monkeypatch.setattr(rl_train.sampling, "prepare_params",  # (the rollouts are faked: nothing to sample with)
                        lambda cfg, params, **kw: types.SimpleNamespace(params=params, reshard_seconds=0.0))
    passes: list[rl_lengths.ChunkedPasses] = []
    init = rl_lengths.ChunkedPasses.__init__

    def spy(self: rl_lengths.ChunkedPasses, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        passes.append(self)

    monkeypatch.setattr(rl_lengths.ChunkedPasses, "__init__", spy)

    from test_rev30_tok import _tokenizer

    _tokenizer("qwen2.5").save_pretrained(str(tmp_path / "tok"))  # (323 tokens: a small vocabulary projection)

    def step_one(buckets: int) -> dict[str, float]:
        config = recipe("grpo_guess_tiny", {
            "tokenizer": str(tmp_path / "tok"), "metrics.tensorboard": False, "max_steps": 1,
            "checkpoint.every_steps": 0, "data.num_examples": 8, "data.max_prompt_len": 128,
            "data.overlong": "truncate", "rollout.max_total_tokens": 40, "rollout.num_prompts": 4,
            "rollout.group_size": 4, "rollout.top_k": 200, "train.batch_size": 8, "train.microbatches": 2,
            "model.init.num_layers": 1, "optimizer.lr": 1e-4, "grpo.epochs": 2, "grpo.kl_coef": 0.05,
            "grpo.recompute_old_logprobs": True, "grpo.token_level": False, "grpo.sequence_level_ratio": True,
            "grpo.positive_nll_weight": 0.2, "grpo.overlong_filtering": True, "grpo.length_buckets": buckets})
        workdir = str(tmp_path / f"b{buckets}")
        train.run(config, workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return json.loads(f.readline())

    want, got = step_one(0), step_one(2)
    assert len(passes) == 1 and grpo.shared_prompt_group(passes[0].config) == 4
    kinds = {kind for kind, *_ in passes[0].shapes}
    assert kinds == {"reference", "policy", "grads", "step"}, passes[0].shapes  # both update paths ran
    assert got["train_cells_share"] < 0.6 and "train_cells_share" not in want
    assert want["optimizer_updates"] == 4 and want["masked_samples"] == 5 and want["turns_mean"] == 2
    assert want["first_update_ratio_min"] == want["first_update_ratio_max"] == 1.0
    assert got["first_update_ratio_min"] == got["first_update_ratio_max"] == 1.0
    assert want["ratio_min"] < 0.999 and want["ratio_max"] > 1.001  # (later updates are off-policy)
    for k, v in want.items():
        if not k.startswith("time_") and k != "gen_tokens_per_s":
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


CFG = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256)
P, BUDGET = 48, 72


def test_the_chunked_update_on_policy_with_masked_rows_and_groups():
    """ChunkedPasses.update on microbatches of two widths (a prompt and a completion width each), on-policy, with
    shared prompts, the sampler's top-k/top-p, GSPO with truncated importance weights, observation holes in the loss
    mask, empty completions and a whole group masked out: the parameters and every metric of make_train_step on the
    full-width rows; ratio_min and ratio_max exactly 1."""
    G = 4
    config = recipe("grpo_tiny", {"data.max_prompt_len": P, "rollout.max_new_tokens": BUDGET,
                                  "rollout.num_prompts": 4, "rollout.group_size": G, "rollout.temperature": 0.7,
                                  "rollout.top_k": 7, "rollout.top_p": 0.9, "train.batch_size": 16,
                                  "train.microbatches": 2, "grpo.kl_coef": 0.05, "grpo.token_level": False,
                                  "grpo.sequence_level_ratio": True, "grpo.recompute_old_logprobs": True,
                                  "grpo.importance_correction": True, "grpo.tis_cap": 2.0,
                                  "grpo.positive_nll_weight": 0.3, "grpo.length_buckets": 2})
    rng = np.random.default_rng(0)
    prompts, completions, masks = [], [], []
    for g, (n_p, lengths) in enumerate(zip([40, 9, 12, 30], [[0, 72, 5, 9], [3, 0, 20, 8], [1, 2, 3, 4], [60, 7, 0, 2]],
                                           strict=True)):
        prompt = rng.integers(1, 97, n_p).tolist()
        for n in lengths:
            prompts.append(prompt)
            completions.append(rng.integers(1, 97, n).tolist())
            masks.append([0] * n if g == 2 else [int(j % 5 != 2) for j in range(n)])  # group 2: all masked
    batch = grpo.build_batch(prompts, completions, [[0.0] * len(c) for c in completions], P, BUDGET, 0,
                             loss_masks=masks)
    mesh = parallel.make_mesh(1, -1, 1)
    rules = parallel.ShardingRules()
    params = models.init_params(CFG, jax.random.key(1), mesh=mesh, rules=rules)
    with jax.set_mesh(mesh):
        full = jax.jit(grpo.make_logprobs_fn(CFG, 0.7, 2, rules, 7, 0.9, first_target=P, group=G))
        lp = np.asarray(full(params, batch["input_ids"], batch["attention_mask"]))
    batch["old_logprobs"] = lp
    batch["sampler_logprobs"] = np.where(batch["loss_mask"] > 0, lp + 0.2 * rng.normal(size=lp.shape), 0.0
                                         ).astype(np.float32)
    batch["ref_logprobs"] = (lp + 0.2 * rng.normal(size=lp.shape)).astype(np.float32)
    batch["advantages"] = np.repeat(rng.normal(size=(16, 1)), P + BUDGET, 1).astype(np.float32)
    batch["positive"] = (batch["advantages"][:, 0] > 0).astype(np.int32)
    opt = optax.sgd(0.1)
    state = lambda: {"params": jax.tree.map(jnp.copy, params), "opt_state": opt.init(params), "step": jnp.int32(0)}
    with jax.set_mesh(mesh):
        want_state, want = jax.jit(grpo.make_train_step(CFG, opt, config, rules))(
            state(), {k: batch[k] for k in grpo.BATCH_AXES}, jnp.bool_(True))
        passes = rl_lengths.ChunkedPasses(CFG, opt, config, mesh, rules, models.param_shardings(CFG, mesh, rules),
                                          None, grpo.shared_prompt_group(config))
        micro = passes.plan(np.arange(16), rl_lengths.row_lengths(batch["attention_mask"], P), 2)
        got_state, got = passes.update(state(), batch, micro, jnp.bool_(True))
    assert [(c.prompt_width, c.completion_width) for c in micro] == [(48, 72), (32, 32)]
    assert passes.shapes == {("grads", 48, 72), ("grads", 32, 32)}
    assert float(got["ratio_min"]) == float(got["ratio_max"]) == 1.0 == float(want["ratio_max"])
    assert float(want["count"]) == 9 and float(want["is_weight_mean"]) != 1.0
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    for p0, w, g in zip(leaves(params), leaves(want_state["params"]), leaves(got_state["params"]), strict=True):
        moved = np.abs(w - p0).max()
        assert moved > 0 and np.abs(g - w).max() <= 1e-4 * moved + 1e-9, (np.abs(g - w).max(), moved)
