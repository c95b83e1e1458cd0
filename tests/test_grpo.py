"""GRPO: host-side reward processing on hand-made batches, config errors, and the whole loop through the CLI
(a seeded learning test on the tiny recipe, and the DAPO/GSPO options end to end)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm.algorithms import batch_indices, grpo
from jaxrl_llm.rl_batch import Rollouts, prepare_batch
from jaxrl_llm.rl_train import GRPORunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**over):
    return recipe("grpo_tiny", over)


def _rollouts(rewards, lengths, finish, prompt_len=3):
    R = len(rewards)
    return Rollouts(task_idx=list(range(R)), prompts=[[5] * prompt_len for _ in range(R)],
                    tokens=[[7] * n for n in lengths], logprobs=[[-0.5] * n for n in lengths], finish=list(finish),
                    rewards=np.asarray(rewards, np.float32), accuracy=np.asarray(rewards, np.float32) >= 1,
                    counts={"timeouts": 1})


# ------------------------------------------------------------------------------------------- host pieces


def test_overlong_shaping_matches_dapo_formula():
    max_new, buf, pen = 20, 8, 0.5
    rewards = np.array([1.0, 1.0, 0.0, 1.0, 0.5])
    lengths = np.array([5, 12, 16, 20, 13])
    got = grpo.shape_overlong(rewards, lengths, max_new, buf, pen)
    expected = []
    for r, n in zip(rewards, lengths, strict=True):
        l_exp = max_new - buf  # 12: no penalty up to here, then linear to -pen at max_new
        expected.append(r + (0.0 if n <= l_exp else -(n - l_exp) / buf * pen))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got[3] == pytest.approx(0.5)  # at the maximum length the full penalty applies
    np.testing.assert_array_equal(grpo.shape_overlong(rewards, lengths, max_new, 0, pen), rewards)  # off


def test_dynamic_sampling_keeps_groups_with_spread():
    rewards = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0.5, 0.5, 0.5, 0.5], np.float32)
    np.testing.assert_array_equal(grpo.dynamic_sampling_keep(rewards, 4), [False, True, False])


def test_build_batch_layout():
    # prompts left-padded to 3 columns, completions from column 3, 3 new-token columns
    b = grpo.build_batch([[1, 2, 3], [4]], [[9, 8], [7, 6, 5]], [[-0.1, -0.2], [-0.3, -0.4, -0.5]], 3, 3, pad_id=0)
    np.testing.assert_array_equal(b["input_ids"], [[1, 2, 3, 9, 8, 0], [0, 0, 4, 7, 6, 5]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    np.testing.assert_allclose(b["sampler_logprobs"][1], [0, 0, 0, -0.3, -0.4, -0.5], atol=1e-7)
    with pytest.raises(ValueError, match="rollout 0: prompt of 3 tokens"):
        grpo.build_batch([[1, 2, 3]], [[4, 5]], [[0.0] * 2], 2, 4, pad_id=0)
    with pytest.raises(ValueError, match="completion of 4 tokens"):
        grpo.build_batch([[1, 2, 3]], [[4, 5, 6, 7]], [[0.0] * 4], 3, 3, pad_id=0)


def test_prepare_batch_overlong_filtering_and_shaping():
    # two groups of 2; sample 1 and 3 hit the length limit (truncated)
    roll = _rollouts([1.0, 0.0, 1.0, 1.0], [4, 8, 6, 8], ["stop", "length", "stop", "length"])
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 2, "rollout.max_new_tokens": 8,
                   "grpo.overlong_filtering": True, "grpo.overlong_buffer": 4, "grpo.overlong_penalty": 1.0,
                   "grpo.leave_one_out": False, "grpo.normalize_std": False})
    batch, m = prepare_batch(roll, c, pad_id=0)
    # truncated samples contribute no loss tokens; the others keep all their completion tokens
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), [4, 0, 6, 0])
    shaped = [1.0 + min(-(4 - 4) / 4, 0), 0.0 - (8 - 4) / 4, 1.0 - (6 - 4) / 4, 1.0 - (8 - 4) / 4]
    # advantages: shaped reward minus its group mean (truncated samples still count in the baseline)
    expected = [shaped[0] - (shaped[0] + shaped[1]) / 2, shaped[1] - (shaped[0] + shaped[1]) / 2,
                shaped[2] - (shaped[2] + shaped[3]) / 2, shaped[3] - (shaped[2] + shaped[3]) / 2]
    assert batch["advantages"].shape == batch["loss_mask"].shape  # [R, T]: one row's advantage on every column
    T = batch["loss_mask"].shape[1]
    np.testing.assert_allclose(batch["advantages"], np.repeat(np.array(expected)[:, None], T, 1), atol=1e-6)
    assert m["truncation_rate"] == 0.5 and m["masked_samples"] == 2
    assert m["reward_mean"] == pytest.approx(0.75) and m["shaped_reward_mean"] == pytest.approx(np.mean(shaped))


def _runner_for_collect(num_prompts, G, max_rounds, rounds_rewards):
    """A GRPORunner whose generation rounds return the given hand-made rewards (collect's logic under test)."""
    r = object.__new__(GRPORunner)
    r.config = _config(**{"rollout.num_prompts": num_prompts, "rollout.group_size": G,
                          "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": max_rounds})
    r.G, r.P = G, num_prompts
    calls = []

    def generate_round(params, step, round_):
        calls.append(round_)
        rw = np.asarray(rounds_rewards[round_], np.float32)
        roll = _rollouts(rw, [2] * len(rw), ["stop"] * len(rw))
        roll.task_idx = [100 * round_ + i for i in range(len(rw))]
        return roll, {"time_generate_s": 1.0, "time_score_s": 0.5, "time_reshard_s": 0.0,
                      "generated_tokens": 2.0 * len(rw), "sampler_compiles": 0.0}

    r.generate_round = generate_round
    return r, calls


def test_dynamic_sampling_generates_more_rounds_until_enough_groups():
    # round 0: groups 0 (spread) and 1 (all equal); round 1: group 0 equal, group 1 spread
    r, calls = _runner_for_collect(2, 2, 5, [[1, 0, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]])
    roll, info = r.collect(None, step=0)
    assert calls == [0, 1]
    assert roll.task_idx == [0, 1, 102, 103]  # the kept groups, in order of discovery
    assert info["dynamic_sampling_rounds"] == 2 and info["dynamic_sampling_discarded_groups"] == 2
    assert info["dynamic_sampling_short_groups"] == 0
    assert info["time_generate_s"] == 2.0 and info["generated_tokens"] == 16.0


def test_prompt_batches_are_read_in_order_whatever_the_rounds_a_step_runs():
    """Step s read prompt batch s x dynamic_sampling_max_rounds + round: with the default 10 rounds and most steps
    needing one, 9 of every 10 batches were never generated from. The data position now moves by the rounds run,
    as NeMo RL's dataloader does."""
    r, calls = _runner_for_collect(2, 2, 5, [[1, 0, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]])
    r.position = 7
    r.collect(None, step=3)
    assert calls == [0, 1] and r.position == 9
    r.kept = list(range(12))
    assert r._prompts_for(1) == batch_indices(12, 2, r.config.seed, 10)  # position 9 + round 1
    plain, _ = _runner_for_collect(2, 2, 5, [[1, 0, 1, 1]])
    plain.config.grpo.dynamic_sampling = False
    plain.collect(None, step=0)
    assert plain.position == 1


def test_dynamic_sampling_fills_with_spreadless_groups_after_max_rounds():
    r, calls = _runner_for_collect(2, 2, 2, [[1, 1, 0, 1], [0, 0, 1, 1]])
    roll, info = r.collect(None, step=0)
    assert calls == [0, 1]
    assert len(roll.tokens) == 4 and roll.task_idx[:2] == [2, 3]  # the one group with spread comes first
    assert info["dynamic_sampling_short_groups"] == 1
    assert grpo.dynamic_sampling_keep(roll.rewards, 2).tolist() == [True, False]


@pytest.mark.parametrize("key,value,needle", [
    ("rollout.group_size", 1, "rollout.group_size"),
    ("rollout.temperature", 0.0, "rollout.temperature"),
    ("train.batch_size", 5, "train.batch_size"),
    ("grpo.kl_type", "k4", "grpo.kl_type"),
    ("grpo.dual_clip", 0.5, "grpo.dual_clip"),
    ("grpo.sequence_level_ratio", True, "grpo.sequence_level_ratio"),
    ("grpo.tis_cap", 2.0, "grpo.tis_cap"),
    ("grpo.overlong_buffer", 8, "grpo.overlong_buffer"),
])
def test_bad_grpo_config_names_the_key(key, value, needle):
    from jaxrl_llm.train import ConfigError, validate

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(_config(**{key: value}))


@pytest.mark.parametrize("over,needle", [
    ({"grpo.adv_estimator": "ppo"}, "grpo.adv_estimator"),
    ({"grpo.adv_estimator": "gdpo"}, "env.name='combined'"),
    ({"grpo.kl_in_reward": True}, "grpo.kl_in_reward"),
    ({"grpo.advantage_clip_low": 1.0, "grpo.advantage_clip_high": -1.0}, "grpo.advantage_clip_low"),
    ({"grpo.reward_scaling.enabled": True, "grpo.reward_scaling.source_max": 0.0}, "grpo.reward_scaling"),
    ({"grpo.stop_properly_penalty": 0.0, "grpo.overlong_buffer": 2}, "grpo.stop_properly_penalty"),
    ({"grpo.cispo": True, "grpo.dual_clip": 3.0}, "grpo.cispo"),
    ({"grpo.tis_type": "clamp"}, "grpo.tis_type"),
    ({"grpo.importance_correction": True, "grpo.tis_cap": 2.0, "grpo.tis_type": "icepop"}, "grpo.tis_min"),
    ({"grpo.importance_correction": True, "grpo.tis_cap": 2.0, "grpo.tis_min": 3.0}, "grpo.tis_min"),
    ({"grpo.on_policy_kl": True}, "grpo.on_policy_kl"),
    ({"grpo.positive_nll_weight": -1.0}, "grpo.positive_nll_weight"),
    ({"grpo.logprob_error_threshold": 2.0}, "grpo.recompute_old_logprobs"),
    ({"grpo.recompute_old_logprobs": True, "grpo.logprob_error_threshold": 0.5}, "grpo.logprob_error_threshold"),
    ({"grpo.batch_multiplier": 2.0}, "grpo.batch_multiplier"),
    # settings another one makes inert were accepted and did nothing
    ({"grpo.reward_weights": (1.0, 3.0)}, "grpo.reward_weights=(1.0, 3.0) would have no effect"),
    ({"grpo.minus_baseline": False}, "grpo.minus_baseline=False would have no effect"),
    ({"grpo.adv_estimator": "reinforce_plus_plus", "grpo.leave_one_out": False}, "grpo.leave_one_out=False, "),
    ({"grpo.adv_estimator": "reinforce_plus_plus", "grpo.kl_in_reward": True, "grpo.importance_correction": True,
      "grpo.recompute_old_logprobs": True, "grpo.on_policy_kl": True}, "grpo.on_policy_kl would have no effect"),
    ({"grpo.kl_coef": 0.0, "grpo.ref_offload": True}, "grpo.ref_offload would have no effect"),
    ({"grpo.reinforce": True, "grpo.dual_clip": 1.5}, "grpo.dual_clip=1.5 would have no effect"),
    ({"grpo.overlong_penalty": 0.5}, "grpo.overlong_penalty=0.5 would have no effect"),
    ({"grpo.overlong_buffer": 2, "grpo.overlong_penalty": -1.0}, "grpo.overlong_penalty=-1.0: must be >= 0"),
    ({"rollout.stop_token_ids": (-5,)}, "rollout.stop_token_ids=(-5,): must be a tuple of token ids"),
])
def test_bad_grpo_variant_config_names_the_key(over, needle):
    from jaxrl_llm.train import ConfigError, validate

    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(_config(**over))


def test_grpo_config_defaults_and_unknown_key():
    c = grpo.grpo_config(kl_coef=0.0, tis_min=0.5)
    assert c.kl_coef == 0.0 and c.tis_min == 0.5 and c.stop_properly_penalty is None and c.adv_estimator == "grpo"
    with pytest.raises(KeyError, match="kl_coeff"):
        grpo.grpo_config(kl_coeff=0.1)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.8), (20, 1.0)])
def test_sampler_logprobs_equal_trainer_logprobs(top_k, top_p):
    """GRPO's old log-probs are the sampler's: they must equal the training-side recomputation (same temperature
    and top-k/top-p processing) on the [pad, prompt | completion, pad] rows the loss sees, within 1e-5 in fp32;
    scoring only the completion columns gives exactly what scoring every column gives there."""
    import jax

    from jaxrl_llm import models, sampling

    cfg = models.ModelConfig(family="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
                             max_position_embeddings=128)
    params = models.init_params(cfg, jax.random.key(0), std=0.1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 256, n).tolist() for n in (5, 9, 3, 12)]
    sp = sampling.SamplingParams(max_new_tokens=10, temperature=0.7, top_k=top_k, top_p=top_p, stop_token_ids=(2,))
    out = sampling.generate(cfg, params, prompts, sp, jax.random.key(1))
    batch = grpo.build_batch(prompts, out.tokens, out.logprobs, 14, 10, pad_id=0)
    fn = jax.jit(grpo.make_logprobs_fn(cfg, 0.7, 2, top_k=top_k, top_p=top_p, first_target=14))
    lp = np.asarray(fn(params, batch["input_ids"], batch["attention_mask"]))
    m = batch["loss_mask"] > 0
    assert m.sum() >= 30
    np.testing.assert_allclose(lp[m], batch["sampler_logprobs"][m], atol=1e-5, rtol=0)
    assert not lp[:, :14].any()  # prompt columns are never scored
    every = np.asarray(jax.jit(grpo.make_logprobs_fn(cfg, 0.7, 2, top_k=top_k, top_p=top_p))(
        params, batch["input_ids"], batch["attention_mask"]))
    np.testing.assert_allclose(lp[:, 14:], every[:, 14:], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- whole loop


def _run_cli(workdir, *overrides, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxrl_llm.train", "--config", os.path.join(ROOT, "configs", "grpo_tiny.py"),
           "--workdir", str(workdir), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_grpo_tiny_reward_rises_and_first_update_is_on_policy(tmp_path):
    """The whole path: sampler on the trainer's arrays -> format reward -> advantages -> KL to the reference ->
    two minibatch updates per step. The reward must rise (seeded), the sampler's log-probs must match the
    trainer's recomputation, and the first update of each step must see a ratio of exactly 1.

    This recipe's policy is deliberately peaked (init_std 0.5: logits in the hundreds), where fp32 round-off in
    log-softmax reaches ~1e-4; the 1e-5 parity at ordinary scale is `test_sampler_logprobs_equal_trainer_logprobs`.
    """
    # 16 steps: over 8 the rise of this weak toy signal depends on the float path (seed 0 went 0.25 -> 0.63 on one
    # CPU and 0.25 -> 0.42 on another); over 16, seeds 0-3 all end at 0.9-1.0 from 0.2-0.3
    p = _run_cli(tmp_path / "run", "--config.grpo.recompute_old_logprobs=True", "--config.checkpoint.every_steps=2",
                 "--config.max_steps=16")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("loss", "reward_mean", "reward_std", "accuracy", "kl", "clip_fraction", "entropy", "gen_length_mean",
                "gen_length_max", "truncation_rate", "gen_tokens_per_s", "time_generate_s", "time_score_s",
                "time_reference_s", "time_train_s", "logprob_error_max", "logprob_error_mean"):
        assert key in rows[0], key
    start = np.mean([r["reward_mean"] for r in rows[:3]])
    end = np.mean([r["reward_mean"] for r in rows[-3:]])
    assert end > start + 0.25, [r["reward_mean"] for r in rows]
    for r in rows:
        assert r["logprob_error_max"] < 1e-3, r["logprob_error_max"]
        assert r["first_update_ratio_min"] == 1.0 and r["first_update_ratio_max"] == 1.0
        assert r["optimizer_updates"] == 2
    assert os.path.isdir(tmp_path / "run" / "tensorboard")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[:2] == ["14", "16"]

    # Resume: the same command on a copy of the workdir that lost its step-16 checkpoint continues from step 14
    # and logs exactly the numbers of the uninterrupted run (prompts, sampling keys and optimizer state restored).
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "16")
    p = _run_cli(tmp_path / "resumed", "--config.grpo.recompute_old_logprobs=True",
                 "--config.checkpoint.every_steps=2", "--config.max_steps=16")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[step 15/16" in p.stderr and "[step 14/16" not in p.stderr
    again = _rows(tmp_path / "resumed")
    assert [r["step"] for r in again] == list(range(1, 17))
    # wall-clock figures and compiles in this process
    varies = ("time_", "gen_tokens_per_s", "sampler_compiles", "train_compiles")
    for r, ref in zip(again[14:], rows[14:], strict=True):
        assert {k: v for k, v in r.items() if not k.startswith(varies)} == \
            {k: v for k, v in ref.items() if not k.startswith(varies)}


def test_grpo_dapo_gspo_gdpo_options_end_to_end(tmp_path):
    """DAPO (dynamic sampling, overlong shaping, clip-higher, no KL), GSPO (sequence-level ratio and loss) with
    importance correction, GDPO advantages over a combined environment's two reward components, two epochs, and
    validation (pass@k on held-out tasks) at step 2: runs, logs its diagnostics, stays finite."""
    from jaxrl_llm import train

    c = _config(**{"max_steps": 2, "metrics.tensorboard": False, "rollout.num_prompts": 4, "train.batch_size": 8,
                   "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 2, "grpo.overlong_buffer": 4,
                   "grpo.clip_high": 0.28, "grpo.kl_coef": 0.0, "grpo.sequence_level_ratio": True,
                   "grpo.token_level": False, "grpo.importance_correction": True, "grpo.tis_cap": 2.0,
                   "grpo.recompute_old_logprobs": True,
                   "grpo.epochs": 2, "val_every": 2, "eval.num_examples": 4, "grpo.adv_estimator": "gdpo",
                   "grpo.reward_weights": (1.0, 0.5)})
    c.env = {"name": "combined", "components": [{"name": "format", "pattern": "k", "label": "has_k"},
                                                {"name": "format", "pattern": "e", "label": "has_e"}]}
    c.checkpoint.every_steps = 1
    train.run(c, str(tmp_path / "run"))
    rows = _rows(tmp_path / "run")
    assert len(rows) == 2
    assert "val_pass@1" in rows[1] and "val_pass@2" in rows[1] and "val_pass@1" not in rows[0]
    # resumed from step 1, it generates from the prompt batches the uninterrupted run did (the data position is
    # the rounds run, saved as prompt_batches) and logs the same step 2
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "2")
    train.run(c, str(tmp_path / "resumed"))
    varies = ("time_", "gen_tokens_per_s", "sampler_compiles", "train_compiles", "val_generate_seconds",
              "val_score_seconds", "val_tokens_per_second")
    again = _rows(tmp_path / "resumed")
    assert {k: v for k, v in again[1].items() if not k.startswith(varies)} == \
        {k: v for k, v in rows[1].items() if not k.startswith(varies)}
    for r in rows:
        assert np.isfinite(r["loss"]) and r["optimizer_updates"] == 4  # 2 epochs x 2 minibatches of 8
        assert 1 <= r["dynamic_sampling_rounds"] <= 2
        assert r["first_update_ratio_min"] == 1.0 and r["first_update_ratio_max"] == 1.0
        assert r["kl_loss"] == 0.0
        # the combined reward is the sum of the components (weights 1 in the environment)
        assert r["reward_mean"] == pytest.approx(r["reward/has_k"] + r["reward/has_e"], abs=1e-6)
        # the random policy never stops within 8 tokens, so shaping charges each completion the full penalty of 1
        assert r["truncation_rate"] == 1.0
        assert r["shaped_reward_mean"] == pytest.approx(r["reward_mean"] - 1.0, abs=1e-5)


def test_grpo_reinforce_pp_cispo_and_other_variants_end_to_end(tmp_path):
    """REINFORCE++ with the KL in the reward, CISPO, ICE-POP importance weights, VAPO's positive-example NLL,
    log-prob-error masking, reward scaling, the stop-properly penalty, advantage clipping, and dynamic sampling with
    a batch multiplier, through `train.run`: each is wired and visible."""
    from jaxrl_llm import train

    c = _config(**{"max_steps": 2, "metrics.tensorboard": False, "grpo.adv_estimator": "reinforce_plus_plus",
                   "grpo.kl_in_reward": True, "grpo.kl_coef": 0.05, "grpo.cispo": True,
                   "grpo.importance_correction": True, "grpo.tis_cap": 2.0, "grpo.tis_type": "icepop",
                   "grpo.tis_min": 0.5, "grpo.positive_nll_weight": 0.1,
                   "grpo.recompute_old_logprobs": True, "grpo.logprob_error_threshold": 1.5,
                   "grpo.reward_scaling.enabled": True, "grpo.reward_scaling.target_min": -1.0,
                   "grpo.stop_properly_penalty": 0.5, "grpo.advantage_clip_low": -1.5,
                   "grpo.advantage_clip_high": 1.5, "grpo.dynamic_sampling": True, "grpo.batch_multiplier": 1.5,
                   "grpo.dynamic_sampling_max_rounds": 2})
    train.run(c, str(tmp_path))
    rows = _rows(tmp_path)
    assert len(rows) == 2
    for r in rows:
        assert np.isfinite(r["loss"]) and r["first_update_ratio_min"] == 1.0 == r["first_update_ratio_max"]
        assert r["kl_loss"] == 0.0 and r["kl"] > 0  # the KL went into the advantages, not the loss
        assert r["positive_nll_loss"] > 0 and r["logprob_error_masked"] == 0.0  # sampler == trainer (no masking)
        assert r["advantage_abs_mean"] <= 1.5
        # every completion is truncated (8 tokens, no stop): [0, 1] -> [-1, 1], then x 0.5
        assert r["truncation_rate"] == 1.0
        assert r["shaped_reward_mean"] == pytest.approx(0.5 * (2 * r["reward_mean"] - 1), abs=1e-6)
        assert 1 <= r["dynamic_sampling_rounds"] <= 2


@pytest.mark.parametrize("override,needle", [
    ("--config.grpo.kl_type=k9", "grpo.kl_type"),
    # raised in rl_train, which imports jaxrl_llm.train: the class the CLI catches must be that one
    ("--config.rollout.max_new_tokens=100000", "rollout.max_new_tokens=100000"),
])
def test_grpo_bad_config_is_one_line(tmp_path, override, needle):
    p = _run_cli(tmp_path / "run", override, timeout=300)
    assert p.returncode != 0
    assert needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr[-3000:]


def test_reference_offloaded_to_host_gives_the_same_logprobs():
    """grpo.ref_offload: the reference lives in pinned host memory between steps (same shardings) and is copied to
    device memory only for its forward."""
    import jax

    from jaxrl_llm import models, parallel
    from jaxrl_llm.rl_train import offload_to_host, reference_logprobs

    cfg = models.ModelConfig(family="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    mesh = parallel.make_mesh(1, -1, 1)
    rules = parallel.ShardingRules()
    params = models.init_params(cfg, jax.random.key(0), mesh=mesh, rules=rules)
    host = offload_to_host(params)
    kinds = lambda tree: {x.sharding.memory_kind for x in jax.tree.leaves(tree)}
    assert kinds(host) == {"pinned_host"} and kinds(params) == {"device"}
    specs = lambda tree: [x.sharding.spec for x in jax.tree.leaves(tree)]
    assert specs(host) == specs(params)  # each device's shard stays with its owner
    ids = np.random.default_rng(0).integers(0, 128, (8, 12)).astype(np.int32)
    attn = np.ones_like(ids)
    with jax.set_mesh(mesh):
        fn = jax.jit(grpo.make_logprobs_fn(cfg, 1.0, 2, rules))
        on_device = reference_logprobs(fn, params, ids, attn)
        offloaded = reference_logprobs(fn, host, ids, attn)
    np.testing.assert_array_equal(on_device, offloaded)
    assert np.abs(on_device[:, 1:]).min() > 0  # real log-probs, not the zero column or padding
    assert kinds(host) == {"pinned_host"} and not any(x.is_deleted() for x in jax.tree.leaves(host))
