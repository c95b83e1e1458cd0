"""Review 28 (stop strings): GRPO's rollout.stop_strings reaches the rollouts' and the validation's sampler as
SamplingParams takes it (one string, None or a list in a recipe of one's own), not split into its characters."""

from __future__ import annotations

import pytest
from recipes import GRPO_ONE_STEP, recipe

from jaxrl_llm import evaluation, rl_train, train


class _Built(Exception):
    pass


def test_grpo_rollout_stop_strings_as_sampling_params_take_them(tokenizer, tmp_path, monkeypatch):
    """rollout.stop_strings="</answer>" passed grpo.validate_config (one string is one stop string) but the runner
    and the validation sampler used tuple("</answer>"): rows stopped at the first "<", "/", "a", ...; None (NeMo
    RL's `stop_strings: null`) passed validation and then crashed the runner with a TypeError."""
    seen = {}

    class Runner(rl_train.GRPORunner):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.update(rollout=self.sp.stop_strings, tok_bytes=self.tok_bytes,
                        made=(self.cfg, self.tok, self.mesh, self.rules))
            raise _Built

    def fake_eval(cfg, params, tok, tasks, env, *, sampling_params, **kw):
        seen["validation"] = sampling_params.stop_strings
        return {}

    monkeypatch.setattr(rl_train, "GRPORunner", Runner)
    monkeypatch.setattr(evaluation, "evaluate_tasks", fake_eval)
    monkeypatch.setattr(train, "load_run_tokenizer", lambda config, *a, **kw: tokenizer)
    for given, want in [("</answer>", ("</answer>",)), (None, ()), (["a", "b"], ("a", "b"))]:
        c = recipe("grpo_guess_tiny", {**GRPO_ONE_STEP, "checkpoint.every_steps": 0, "val_every": 1,
                                       "eval.num_examples": 2})
        del c.rollout["stop_strings"]
        c.rollout.stop_strings = given  # as a recipe file of one's own may hold it (the shipped ones: a tuple)
        with pytest.raises(_Built):
            rl_train.run_grpo(c, str(tmp_path / "run"))
        assert seen["rollout"] == want and (seen["tok_bytes"] is None) == (not want), given
        rl_train._make_evaluator(c, *seen["made"])(None, 1)
        assert seen["validation"] == want, given
