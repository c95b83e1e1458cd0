"""Tests that kill what mutation testing of the RL host side left alive: rollouts' group selection keeps the reward
components aligned, per-sample accuracy, multi-turn overlong shaping against the whole token budget, ...
(host-side numpy only: no model, no sampler)."""

from __future__ import annotations

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm.rl_batch import Rollouts, prepare_batch, sample_accuracy, shaped_rewards


def _config(**over):
    return recipe("grpo_tiny", over)


def _rollouts(rewards, lengths, finish, components=None, loss_masks=None, turns=None):
    R = len(rewards)
    return Rollouts(task_idx=list(range(R)), prompts=[[5] * 3 for _ in range(R)],
                    tokens=[[7] * n for n in lengths], logprobs=[[-0.5] * n for n in lengths], finish=list(finish),
                    rewards=np.asarray(rewards, np.float32), accuracy=np.asarray(rewards, np.float32) >= 1,
                    counts={"n": R}, components={k: np.asarray(v, np.float32) for k, v in (components or {}).items()},
                    loss_masks=loss_masks, turns=turns)


def test_take_groups_and_concat_keep_components_aligned_with_rewards():
    """Dynamic sampling picks groups with take_groups: the reward components (GDPO's inputs) must follow the same
    rows as the rewards, or GDPO trains on another group's components."""
    comps = {"a": [0, 1, 2, 3, 4, 5], "b": [10, 11, 12, 13, 14, 15]}
    roll = _rollouts([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [1] * 6, ["stop"] * 6, components=comps)
    part = roll.take_groups(np.array([2, 0]), 2)
    np.testing.assert_array_equal(part.rewards, [4, 5, 0, 1])
    np.testing.assert_array_equal(part.components["a"], [4, 5, 0, 1])
    np.testing.assert_array_equal(part.components["b"], [14, 15, 10, 11])
    both = Rollouts.concat([part, roll.take_groups(np.array([1]), 2)])
    np.testing.assert_array_equal(both.components["a"], both.rewards)
    assert both.counts == {"n": 12}


def test_sample_accuracy_prefers_the_environments_correct_and_counts_reward_one_as_correct():
    info = [{"correct": False}, {"correct": True}, {}, {}, {}]
    rewards = np.array([1.0, 0.0, 1.0, 0.999, 2.0], np.float32)
    np.testing.assert_array_equal(sample_accuracy(info, rewards), [0.0, 1.0, 1.0, 0.0, 1.0])


def test_multi_turn_overlong_shaping_measures_every_token_after_the_prompt_against_the_whole_budget():
    """Multi-turn rows: DAPO's overlong shaping counts generated and observation tokens alike (the row's length
    after the prompt) against the total token budget, not max_new_tokens (validation bounds overlong_buffer by
    that budget)."""
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 1, "rollout.max_turns": 2,
                   "rollout.max_total_tokens": 20, "rollout.max_new_tokens": 8, "env.name": "number_guess",
                   "grpo.overlong_buffer": 8, "grpo.overlong_penalty": 1.0})
    # sample 0: 16 tokens, 6 of them generated; sample 1: 8 generated tokens, one turn
    roll = _rollouts([1.0, 1.0], [16, 8], ["stop", "stop"],
                     loss_masks=[[1] * 3 + [0] * 10 + [1] * 3, [1] * 8], turns=[2, 1])
    r, _ = shaped_rewards(roll, c)
    np.testing.assert_allclose(r, [1.0 - (16 - 12) / 8, 1.0], atol=1e-6)
    batch, m = prepare_batch(roll, c, pad_id=0)
    np.testing.assert_allclose(batch["shaped_rewards"], r, atol=0)
    assert m["gen_length_mean"] == 7.0 and m["episode_length_mean"] == 12.0


def _whiten_ref(a_R, mask_RT):
    """REINFORCE++'s batch whitening of per-sample advantages a_R over the valid tokens of mask_RT (float64)."""
    A = np.broadcast_to(np.asarray(a_R, np.float64)[:, None], mask_RT.shape)
    v = A[mask_RT > 0]
    return (A - v.mean()) / np.sqrt(max(v.var(), 1e-8))


def test_prepare_batch_reinforce_pp_whitens_over_the_kept_completion_tokens_only():
    """The whitening statistics come from the loss mask as trained: completion tokens only (not prompt or padding
    columns) and not the tokens of samples overlong filtering masks out."""
    rewards, lengths = [1.0, 0.0, 0.0, 0.5], [2, 8, 5, 3]
    roll = _rollouts(rewards, lengths, ["stop", "length", "stop", "stop"])
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 2, "rollout.max_new_tokens": 8,
                   "grpo.adv_estimator": "reinforce_plus_plus", "grpo.overlong_filtering": True})
    batch, m = prepare_batch(roll, c, pad_id=0)
    mask = batch["loss_mask"]
    np.testing.assert_array_equal(mask.sum(1), [2, 0, 5, 3])
    a = np.array([0.5, -0.5, -0.25, 0.25])  # r - group mean
    ref = _whiten_ref(a, mask)
    np.testing.assert_allclose(batch["advantages"][mask > 0], ref[mask > 0], atol=2e-5)
    assert m["masked_samples"] == 1
    assert m["advantage_abs_mean"] == pytest.approx(np.abs(ref[mask > 0]).mean(), abs=2e-5)


def test_prepare_batch_metrics_without_overlong_filtering():
    """masked_samples counts samples masked out by overlong filtering only (0 when it is off, truncated or not);
    advantage_abs_mean averages over the loss tokens, not over the prompt and padding columns."""
    roll = _rollouts([1.0, 0.0, 0.0, 0.0], [2, 8, 5, 3], ["stop", "length", "stop", "length"])
    c = _config(**{"rollout.group_size": 2, "rollout.num_prompts": 2, "rollout.max_new_tokens": 8,
                   "grpo.leave_one_out": False, "grpo.normalize_std": False})
    batch, m = prepare_batch(roll, c, pad_id=0)
    assert m["masked_samples"] == 0 and m["truncation_rate"] == 0.5
    # advantages [0.5, -0.5, 0, 0]: |A| over the 2 + 8 + 5 + 3 completion tokens
    assert m["advantage_abs_mean"] == pytest.approx((0.5 * 2 + 0.5 * 8) / 18)
    assert m["groups_all_equal"] == 0.5


# ------------------------------------------------------------------------------------------ dynamic sampling, batch


def test_dynamic_sampling_keeps_a_group_with_any_spread_however_small():
    from jaxrl_llm.algorithms.grpo import dynamic_sampling_keep

    r = np.array([0.0, 0.01, 0.5, 0.5, 0.2, 0.2 + 1e-3], np.float32)
    np.testing.assert_array_equal(dynamic_sampling_keep(r, 2), [True, False, True])


def test_build_batch_refuses_more_loss_masks_than_rollouts():
    from jaxrl_llm.algorithms.grpo import build_batch

    with pytest.raises(ValueError, match="2 loss masks for 1 rollouts"):
        build_batch([[1]], [[3]], [[0.0]], 1, 2, 0, loss_masks=[[1], [1]])


# ------------------------------------------------------------------------------------------ multi-turn


class CharTokenizer:
    """One token per character; a ChatML-like template that trims message contents (as many real templates do),
    so a reply with surrounding whitespace is rendered stripped."""

    eos = "#"

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def decode(self, ids, skip_special_tokens=False):
        s = "".join(chr(i) for i in ids)
        return s.replace(self.eos, "") if skip_special_tokens else s

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, chat_template=None):
        s = "".join(f"<{m['role']}>{m['content'].strip()}{self.eos}" for m in messages)
        return s + ("<assistant>" if add_generation_prompt else "")


def test_observation_delta_with_a_template_that_trims_the_reply():
    from jaxrl_llm.multiturn import observation_delta

    tok = CharTokenizer()
    conv = [{"role": "user", "content": "guess"}, {"role": "assistant", "content": " 42\n"}]
    delta = observation_delta(tok, conv, tok.encode(" 42\n"), "Too low.")
    assert delta == "#<user>Too low.#<assistant>"
    assert observation_delta(tok, conv, tok.encode(" 42\n#"), "Too low.") == "<user>Too low.#<assistant>"


class _Scripted:
    def __init__(self, tok, script):
        self.tok, self.script = tok, script

    def __call__(self, prompts, caps, turn):
        from jaxrl_llm.multiturn import Generation

        toks = [self.tok.encode(t + "#")[:c] for t, c in zip(self.script[turn], caps, strict=True)]
        return Generation(toks, [[-0.1] * len(t) for t in toks],
                          ["length" if len(t) < len(s) + 1 else "stop"
                           for t, s in zip(toks, self.script[turn], strict=True)])


def test_multi_turn_rollout_info_records_turns_and_episode_end():
    from jaxrl_llm.environments.multiturn import NumberGuessEnvironment
    from jaxrl_llm.multiturn import multi_turn_rollout

    tok = CharTokenizer()
    env = NumberGuessEnvironment()
    prompt = tok.encode("<user>guess#<assistant>")
    out = multi_turn_rollout(_Scripted(tok, [["42", "10", "5"], ["7", "50"]]), tok, env, [prompt] * 3,
                             [[{"role": "user", "content": "guess"}]] * 3, [{"secret": 42}, {"secret": 7},
                                                                            {"secret": 1}],
                             max_turns=2, max_new_tokens=4, max_total_tokens=64)
    assert [i["turns"] for i in out.info] == [1, 2, 2] == out.turns
    assert [i["episode_end"] for i in out.info] == ["done", "done", "max_turns"]
    np.testing.assert_allclose(out.rewards, [1.0, 1.0, 0.0])


def test_multi_turn_rollout_refuses_a_budget_below_one_generation():
    from jaxrl_llm.environments.multiturn import NumberGuessEnvironment
    from jaxrl_llm.multiturn import multi_turn_rollout

    with pytest.raises(ValueError, match="max_total_tokens >= max_new_tokens"):
        multi_turn_rollout(None, CharTokenizer(), NumberGuessEnvironment(), [[1]], [[]], [{"secret": 1}],
                           max_turns=2, max_new_tokens=8, max_total_tokens=7)


def test_sampler_generate_folds_the_turn_into_the_key_and_caps_each_prompt(monkeypatch):
    import jax

    from jaxrl_llm import multiturn, sampling

    seen = []

    def fake_generate(cfg, params, prompts, sps, key, **kw):
        seen.append(([sp.max_new_tokens for sp in sps], np.asarray(jax.random.key_data(key)), kw))
        n = len(prompts)
        return type("Out", (), {"tokens": [[1]] * n, "logprobs": [[-0.5]] * n, "finish_reasons": ["stop"] * n,
                                "stats": {"generated_tokens": n, "compiles": 0, "reshard_seconds": 0.0}})()

    monkeypatch.setattr(sampling, "generate", fake_generate)
    key = jax.random.key(3)
    gen = multiturn.SamplerGenerate(None, None, sampling.SamplingParams(max_new_tokens=16), key, max_batch_size=4)
    gen([[1], [2]], [5, 7], 0)
    gen([[1]], [3], 1)
    assert seen[0][0] == [5, 7] and seen[1][0] == [3] and seen[0][2] == {"max_batch_size": 4}
    np.testing.assert_array_equal(seen[0][1], jax.random.key_data(jax.random.fold_in(key, 0)))
    np.testing.assert_array_equal(seen[1][1], jax.random.key_data(jax.random.fold_in(key, 1)))
    assert not np.array_equal(seen[0][1], seen[1][1])
    assert gen.generated_tokens == 3


# ------------------------------------------------------------------------------------------ number_guess


def test_number_guess_edges():
    from jaxrl_llm.environments.multiturn import NumberGuessEnvironment, TurnResult, check_turn_result, last_integer

    assert last_integer("x 123456789012345678") == 123456789012345678  # 18 digits: kept
    assert last_integer("1234567890123456789") == 10 ** 18  # 19: clamped
    assert last_integer("-007 then 0012") == 12 and last_integer("-3") == -3 and last_integer("none") is None
    with pytest.raises(ValueError, match="turn_discount"):
        NumberGuessEnvironment(turn_discount=1.5)
    NumberGuessEnvironment(lo=3, hi=3)  # a one-number range is valid
    bad = TurnResult(np.zeros(2, np.float32), np.array([True, False]), [None, None], [{}, {}])
    with pytest.raises(ValueError, match="sample 1 is not done but its observation is None"):
        check_turn_result(bad, 2, "g")
    check_turn_result(TurnResult(np.zeros(1, np.float32), np.array([True]), [None], [{}]), 1, "g")


# ------------------------------------------------------------------------------------------ config validation


def _validate(over):
    from jaxrl_llm.train import validate

    validate(_config(**over))


@pytest.mark.parametrize("over,needle", [
    ({"grpo.kl_in_reward": True, "grpo.adv_estimator": "reinforce_plus_plus", "grpo.kl_coef": 0.0},
     "grpo.kl_in_reward"),
    ({"rollout.top_p": 0.0}, "rollout.top_p"),
    ({"rollout.top_k": -1}, "rollout.top_k"),
    ({"grpo.epochs": 0}, "grpo.epochs"),
    ({"grpo.kl_coef": -0.5}, "grpo.kl_coef"),
    ({"grpo.clip_low": 1.0}, "grpo.clip_low"),
    ({"grpo.dual_clip": 1.0}, "grpo.dual_clip"),
    ({"grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 0}, "grpo.dynamic_sampling_max_rounds"),
    ({"grpo.batch_multiplier": 1.5}, "grpo.batch_multiplier"),
    ({"grpo.overlong_penalty": -0.5, "grpo.overlong_buffer": 2}, "grpo.overlong_penalty"),
    ({"rollout.num_prompts": 0}, "rollout.num_prompts"),
    ({"train.batch_size": 4, "train.microbatches": 3}, "train.microbatches"),
])
def test_more_bad_grpo_settings_name_the_key(over, needle):
    from jaxrl_llm.train import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _validate(over)


@pytest.mark.parametrize("over", [
    {"rollout.max_turns": 2, "env.name": "number_guess", "rollout.max_total_tokens": 8},  # = max_new_tokens
    {"grpo.advantage_clip_low": 0.5, "grpo.advantage_clip_high": 0.5},
    {"grpo.dynamic_sampling": True, "grpo.batch_multiplier": 1.5},
])
def test_boundary_grpo_settings_are_accepted(over):
    _validate(over)


# ------------------------------------------------------------------------------------------ evaluate


def _eval_config(**over):
    import os
    import runpy

    from recipes import ROOT

    c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
    for k, v in over.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


@pytest.mark.parametrize("over,needle", [({"data.num": -2}, "data.num=-2"),
                                         ({"eval.max_batch_size": -1}, "eval.max_batch_size=-1"),
                                         ({"eval.max_prompt_len": -1}, "eval.max_prompt_len=-1")])
def test_evaluate_validate_refuses_negative_counts(over, needle):
    from jaxrl_llm import evaluate

    with pytest.raises(evaluate.ConfigError, match=needle):
        evaluate.validate(_eval_config(**over))
    evaluate.validate(_eval_config(**{"data.num": -1}))  # -1 = all


def test_evaluate_check_out_refuses_a_folder_and_format_table_orders_k_numerically(tmp_path):
    from jaxrl_llm import evaluate

    with pytest.raises(evaluate.ConfigError, match="is a folder"):
        evaluate.check_out(str(tmp_path))
    evaluate.check_out(str(tmp_path / "r.json"))
    keys = ["reward_mean", "num_problems", "n_samples", "mean_length", "truncation_rate", "timeouts", "errors",
            "truncated_prompts", "generate_seconds", "tokens_per_second"]
    result = {"pass@10": 0.9, "pass@2": 0.5, "pass@1": 0.25, "maj@10": 0.4, **{k: 1 for k in keys}}
    lines = evaluate.format_table("x", result).splitlines()
    names = [ln.split()[0] for ln in lines[2:]]
    assert names[:4] == ["pass@1", "pass@2", "pass@10", "maj@10"] and names[4:] == keys


def test_grpo_config_defaults_are_nemo_rls():
    from jaxrl_llm.algorithms.grpo import grpo_config

    c = grpo_config()
    assert (c.adv_estimator, c.leave_one_out, c.normalize_std, c.minus_baseline) == ("grpo", True, True, True)
    assert (c.clip_low, c.clip_high, c.dual_clip, c.kl_coef, c.kl_type) == (0.2, 0.2, 0.0, 0.01, "k3")
    assert (c.token_level, c.sequence_level_ratio, c.importance_correction, c.kl_in_reward) == (True, False, False,
                                                                                                 False)
    assert (c.overlong_buffer, c.overlong_penalty, c.overlong_filtering, c.dynamic_sampling) == (0, 1.0, False, False)
    assert c.positive_nll_weight == 0.0 and c.epochs == 1 and c.batch_multiplier == 1.0


@pytest.mark.parametrize("over,needle", [
    ({"grpo.reinforce": True, "grpo.clip_high": 0.28}, "grpo.clip_high=0.28"),
    ({"grpo.importance_correction": True, "grpo.recompute_old_logprobs": True, "grpo.tis_cap": 2.0,
      "grpo.tis_min": -0.1}, "grpo.tis_min=-0.1"),
])
def test_more_refused_grpo_variants(over, needle):
    from jaxrl_llm.train import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _validate(over)
