"""Multi-turn GRPO of a tiny random model on number guessing (seconds per step on a CPU): `grpo_tiny` with the
`number_guess` environment, which answers each wrong guess with "Too low." / "Too high." until the episode finds
the secret in [1, 100] or reaches rollout.max_turns. A random policy rarely finds it: this recipe shows the
multi-turn path working end to end (turns_mean, episode_length_mean, env_ended_* metrics), not learning."""

import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_tiny.py"))["get_config"]()
    c.max_steps = 4
    c.data.source = "guess"  # seeded secrets; the task's metadata holds "secret", "lo" and "hi"
    c.data.options = ml_collections.ConfigDict()
    # strip_thinking: answers are read after a reasoning model's last </think> (False: the whole completion)
    c.env = ml_collections.ConfigDict(dict(name="number_guess", strip_thinking=True))
    c.rollout.max_turns = 4
    c.rollout.max_new_tokens = 8
    c.rollout.max_total_tokens = 0  # all tokens after the prompt; 0: 8 x 4 answers + 32 per observation
    c.eval.source = "guess"
    c.eval.options = ml_collections.ConfigDict()
    return c
