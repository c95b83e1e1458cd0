"""GRPO fixes: dynamic sampling's environment counts and group metrics when it falls short, config validation of
train.batch_size/microbatches, eval.n_samples and the truncated-importance-sampling keys, and the multi-turn bound
of grpo.overlong_buffer (host-side and validation only: no model, no sampler)."""

from __future__ import annotations

import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import multiturn
from jaxrl_llm.rl_batch import Rollouts
from jaxrl_llm.rl_train import GRPORunner


def _runner(P, G, max_rounds, rounds_rewards, counts_per_round):
    """A GRPORunner whose round r returns rounds_rewards[r] and reports counts_per_round(n samples scored)."""
    r = object.__new__(GRPORunner)
    r.config = recipe("grpo_tiny", {"rollout.num_prompts": P, "rollout.group_size": G, "grpo.dynamic_sampling": True,
                                    "grpo.dynamic_sampling_max_rounds": max_rounds})
    r.G, r.P = G, P

    def generate_round(params, step, round_):
        rw = np.asarray(rounds_rewards[round_], np.float32)
        n = len(rw)
        roll = Rollouts(list(range(100 * round_, 100 * round_ + n)), [[1]] * n, [[2]] * n, [[0.0]] * n,
                        ["stop"] * n, rw, rw.copy(), counts_per_round(n))
        return roll, {"time_generate_s": 0.0, "time_score_s": 0.0, "time_reshard_s": 0.0, "generated_tokens": 0.0,
                      "sampler_compiles": 0.0}

    r.generate_round = generate_round
    return r


def test_dynamic_sampling_short_counts_each_scored_sample_once():
    # 2 prompts x 2 per round, 2 rounds, no group with spread: the 2 rounds' 4 spread-less groups, 2 fill the batch
    r = _runner(2, 2, 2, [[0, 0, 1, 1], [1, 1, 0, 0]], lambda n: {"format_miss": n, "timeouts": 1})
    roll, info = r.collect(None, step=0)
    assert len(roll.tokens) == 4
    assert roll.counts == {"format_miss": 8, "timeouts": 2}  # 8 samples scored in 2 rounds, not doubled
    assert info["dynamic_sampling_short_groups"] == 2
    assert info["dynamic_sampling_discarded_groups"] == 2  # 4 spread-less, 2 of them used to fill the batch
    assert info["dynamic_sampling_excess_groups"] == 0


def test_dynamic_sampling_partly_short_metrics_add_up():
    # round 0: groups (spread, equal, equal); round 1: (equal, equal, equal); 2 prompts wanted
    r = _runner(2, 2, 2, [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], lambda n: {"scored": n})
    roll, info = r.collect(None, step=0)
    assert roll.task_idx[:2] == [0, 1] and len(roll.tokens) == 4
    assert roll.counts == {"scored": 12}
    assert info["dynamic_sampling_short_groups"] == 1
    assert info["dynamic_sampling_discarded_groups"] == 4  # 5 spread-less, 1 filled the batch
    generated = 2 * 3
    assert 2 + info["dynamic_sampling_discarded_groups"] + info["dynamic_sampling_excess_groups"] == generated


def test_dynamic_sampling_filters_on_the_scaled_rewards():
    """NeMo RL tests the spread of the scaled (clamped), unshaped rewards: a group of 1.0 and 1.5 under reward
    scaling from [0, 1] has none (both clamp to 1) and must be replaced, not trained on with zero advantage."""
    r = _runner(2, 2, 4, [[1.0, 1.5, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]], lambda n: {"scored": n})
    r.config.grpo.reward_scaling.enabled = True
    r.config.grpo.reward_scaling.target_min = -1.0
    roll, info = r.collect(None, step=0)
    assert roll.task_idx == [2, 3, 100, 101]  # round 0's second group, then round 1's first
    assert info["dynamic_sampling_rounds"] == 2 and info["dynamic_sampling_discarded_groups"] == 2
    # every sample generated this step, discarded rounds included: (3.5 + 3) / 8
    assert info["reward_mean_all"] == pytest.approx(6.5 / 8)
    # Without scaling, 1.0 and 1.5 are a spread: round 0 fills the batch.
    r.config.grpo.reward_scaling.enabled = False
    roll, info = r.collect(None, step=0)
    assert roll.task_idx == [0, 1, 2, 3] and info["dynamic_sampling_rounds"] == 1
    assert info["reward_mean_all"] == pytest.approx(3.5 / 4)


def test_groups_all_equal_counts_groups_equal_after_scaling():
    """groups_all_equal says how many groups carry no advantage: as the advantages see the rewards, after
    reward scaling's clamp (1.0 and 1.5 both clamp to 1)."""
    from jaxrl_llm.rl_batch import prepare_batch

    config = recipe("grpo_tiny", {"rollout.num_prompts": 2, "rollout.group_size": 2})
    rw = np.asarray([1.0, 1.5, 0.0, 1.0], np.float32)
    roll = Rollouts(list(range(4)), [[5] * 3] * 4, [[7] * 2] * 4, [[-0.5] * 2] * 4, ["stop"] * 4, rw, rw >= 1, {})
    assert prepare_batch(roll, config, 0)[1]["groups_all_equal"] == 0.0
    config.grpo.reward_scaling.enabled = True
    batch, metrics = prepare_batch(roll, config, 0)
    assert metrics["groups_all_equal"] == 0.5 and np.all(batch["advantages"][:2] == 0)


def test_dynamic_sampling_default_rounds_are_nemo_rls():
    from jaxrl_llm.algorithms.grpo import grpo_config

    assert grpo_config().dynamic_sampling_max_rounds == 10  # NeMo RL's dynamic_sampling_max_gen_batches


def test_dynamic_sampling_excess_groups_with_spread():
    # round 0 already has 3 groups with spread for 2 prompts: one is left out (excess), none discarded
    r = _runner(2, 2, 3, [[1, 0, 0, 1, 1, 0]], lambda n: {"scored": n})
    roll, info = r.collect(None, step=0)
    assert roll.counts == {"scored": 6}
    assert info["dynamic_sampling_rounds"] == 1 and info["dynamic_sampling_short_groups"] == 0
    assert info["dynamic_sampling_discarded_groups"] == 0 and info["dynamic_sampling_excess_groups"] == 1


def _validate(over):
    from jaxrl_llm.train import validate

    validate(recipe("grpo_tiny", over))


@pytest.mark.parametrize("over,needle", [
    ({"train.microbatches": 0}, "train.microbatches=0"),
    ({"train.microbatches": -1}, "train.microbatches=-1"),
    ({"train.batch_size": -16}, "train.batch_size=-16"),
    ({"val_every": 2, "eval.n_samples": 0}, "eval.n_samples=0"),
    ({"grpo.tis_type": "icepop", "grpo.tis_min": 0.5, "grpo.importance_correction": True,
      "grpo.recompute_old_logprobs": True}, "grpo.tis_type='icepop'"),
    ({"grpo.tis_type": "seq-mask-tis"}, "grpo.tis_cap"),
    ({"grpo.tis_min": 0.5, "grpo.importance_correction": True, "grpo.recompute_old_logprobs": True},
     "grpo.tis_min=0.5"),
    ({"grpo.importance_correction": True}, "it needs grpo.recompute_old_logprobs=True (without it"),
])
def test_bad_config_is_one_config_error_naming_the_key(over, needle):
    from jaxrl_llm.train import ConfigError

    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        _validate(over)


@pytest.mark.parametrize("over", [
    {"train.batch_size": 0},  # 0: all rollouts in one update
    {"val_every": 0, "eval.n_samples": 0},  # no validation: eval is unused
    {"grpo.importance_correction": True, "grpo.tis_cap": 2.0, "grpo.tis_type": "icepop", "grpo.tis_min": 0.5,
     "grpo.recompute_old_logprobs": True},
    {"grpo.importance_correction": True, "grpo.tis_cap": 2.0, "grpo.tis_min": 0.5, "grpo.recompute_old_logprobs": True},
])
def test_good_config_still_accepted(over):
    _validate(over)


def _multi_turn(**over):
    base = {"env": {"name": "number_guess"}, "data.source": "guess", "data.options": {}, "rollout.max_turns": 4,
            "rollout.max_new_tokens": 8, "rollout.max_total_tokens": 64}
    return {**base, **over}


def test_multi_turn_overlong_buffer_bounded_by_the_shaping_budget():
    from jaxrl_llm.train import ConfigError

    c = recipe("grpo_tiny", _multi_turn())
    assert multiturn.total_token_budget(c.rollout) == 64
    _validate(_multi_turn(**{"grpo.overlong_buffer": 32}))  # > max_new_tokens, < the 64-token budget shaping uses
    _validate(_multi_turn(**{"grpo.overlong_buffer": 63}))
    with pytest.raises(ConfigError, match=r"grpo\.overlong_buffer=64: must be in \[0, 64\)"):
        _validate(_multi_turn(**{"grpo.overlong_buffer": 64}))
    # max_total_tokens=0: the default budget, 8 x 4 + the observations' allowance
    default = multiturn.total_token_budget(recipe("grpo_tiny", _multi_turn(**{"rollout.max_total_tokens": 0})).rollout)
    assert default > 32
    _validate(_multi_turn(**{"rollout.max_total_tokens": 0, "grpo.overlong_buffer": 32}))
    with pytest.raises(ConfigError, match=r"grpo\.overlong_buffer"):
        _validate(_multi_turn(**{"rollout.max_total_tokens": 0, "grpo.overlong_buffer": default}))


def test_single_turn_overlong_buffer_still_bounded_by_max_new_tokens():
    from jaxrl_llm.train import ConfigError

    _validate({"grpo.overlong_buffer": 7})
    with pytest.raises(ConfigError, match=r"grpo\.overlong_buffer=8: must be in \[0, 8\)"):
        _validate({"grpo.overlong_buffer": 8})


@pytest.mark.parametrize("over,needle", [
    ({}, r"data\.max_prompt_len=96 \+ rollout\.max_new_tokens=8 is more than the model's "
         r"max_position_embeddings=100"),
    (_multi_turn(), r"data\.max_prompt_len=96 \+ the multi-turn budget .*=64 is more than"),
])
def test_rows_that_could_outgrow_the_models_context_are_refused_at_the_start(tmp_path, over, needle):
    """The sampler refuses a prompt that leaves no room for its generation; a multi-turn row grows every turn, so
    without this check a run would stop at the first episode that gets long, possibly hours in."""
    from jaxrl_llm.rl_train import run_grpo
    from jaxrl_llm.train import ConfigError

    c = recipe("grpo_tiny", {**over, "model.init.max_position_embeddings": 100})
    with pytest.raises(ConfigError, match=needle):
        run_grpo(c, str(tmp_path))


def test_a_microbatch_that_does_not_split_over_the_mesh_is_reported(tmp_path, caplog, monkeypatch):
    """On 8 devices (fsdp=8), microbatches of 16 / 4 = 4 rows are replicated along fsdp: said once at the start."""
    from jaxrl_llm import rl_train

    class Started(Exception):
        pass

    def first_step(self, *a, **k):
        raise Started

    monkeypatch.setattr(rl_train.GRPORunner, "step", first_step)
    with caplog.at_level("WARNING", logger="jaxrl_llm.rl_train"), pytest.raises(Started):
        rl_train.run_grpo(recipe("grpo_tiny", {"train.microbatches": 4}), str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if "do not split" in r.getMessage()]
    assert warned == ["a microbatch (that / train.microbatches)=4 rows do not split over the mesh's batch axes "
                      "fsdp=8: the rows are replicated along fsdp (those devices all compute the same rows); "
                      "use a multiple of 8"]


def test_an_unknown_environment_of_a_multi_turn_recipe_is_named_as_unknown():
    from jaxrl_llm.train import ConfigError, validate

    with pytest.raises(ConfigError, match="env: unknown environment name 'bogus'"):
        validate(recipe("grpo_guess_tiny", {"env.name": "bogus"}))


def test_an_environment_that_cannot_score_the_tasks_stops_before_the_model(tmp_path, monkeypatch):
    """number_guess on reasoning-gym tasks (no secret): one ConfigError before any model work, not a traceback
    after the first generation."""
    from jaxrl_llm import rl_train
    from jaxrl_llm.train import ConfigError

    def no_model(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(rl_train, "build_model", no_model, raising=False)
    monkeypatch.setattr("jaxrl_llm.train.build_model", no_model)
    c = recipe("grpo_guess_tiny", {"data.source": "rg:chain_sum", "data.num_examples": 4,
                                   "data.options": {"min_terms": 2, "max_terms": 2}})
    with pytest.raises(ConfigError, match=r"env.name='number_guess' cannot score the tasks of "
                                          r"data.source='rg:chain_sum': number_guess: metadata\[0\] needs"):
        rl_train.run_grpo(c, str(tmp_path))


def test_check_metadata_of_combined_and_routed_environments():
    from jaxrl_llm.environments import check_metadata, make_environment

    routed = make_environment({"name": "routed", "routes": {"math": {"name": "math", "num_workers": 0,
                                                                      "sandbox": False},
                                                             "guess": {"name": "number_guess"}}})
    check_metadata(routed, [{"env": "math", "answer": "3"}, {"env": "guess", "secret": 4}])
    with pytest.raises(ValueError, match=r"number_guess: metadata\[0\] needs an integer 'secret'"):
        check_metadata(routed, [{"env": "math", "answer": "3"}, {"env": "guess", "answer": "4"}])
    with pytest.raises(ValueError, match=r"metadata\[1\]\['env'\] is 'code', not a configured route"):
        check_metadata(routed, [{"env": "math", "answer": "3"}, {"env": "code"}])
    combined = make_environment({"name": "combined", "components": [
        {"name": "format", "pattern": "x"}, {"name": "math", "num_workers": 0, "sandbox": False}]})
    with pytest.raises(ValueError, match=r"math: metadata\[1\] has no 'answer'"):
        check_metadata(combined, [{"answer": "1"}, {"question": "?"}])
    check_metadata(make_environment({"name": "format", "pattern": "x"}), [{}])  # nothing to check


def test_sampling_with_the_tensor_layout_gives_the_same_step_and_logs_the_reshard(tmp_path):
    """rollout.sampling_layout='tensor' on a (fsdp=4, tensor=2) mesh: the sampler runs on weights resharded to
    the tensor-only layout (timed as time_reshard_s), and the step's rollouts, rewards and loss are the ones the
    trainer's own layout gives."""
    import jax

    from jaxrl_llm.rl_train import run_grpo

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    runs = {}
    for layout in ("", "tensor"):
        over = {"max_steps": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "rollout.sampling_layout": layout,
                "checkpoint.every_steps": 0}
        runs[layout] = run_grpo(recipe("grpo_tiny", over), str(tmp_path / (layout or "train")))
    assert runs[""]["time_reshard_s"] == 0.0 and runs["tensor"]["time_reshard_s"] > 0.0
    for key in ("reward_mean", "gen_length_mean", "loss", "kl", "entropy"):
        assert runs["tensor"][key] == pytest.approx(runs[""][key], rel=1e-4, abs=1e-6), key


def test_an_unknown_sampling_layout_is_named():
    from jaxrl_llm.train import ConfigError, validate

    with pytest.raises(ConfigError, match=r"rollout\.sampling_layout='tp': expected one of \('', 'tensor'\)"):
        validate(recipe("grpo_tiny", {"rollout.sampling_layout": "tp"}))
