"""Review 30 (work redone within a step): the sampler's parameter preparation (the reshard to
rollout.sampling_layout, the unrolled decode loop's output-major weights) depends on the parameters only, which do
not change within a GRPO step; it is made once per step (`sampling.prepare_params`), not at every turn of a
multi-turn rollout and every dynamic-sampling round (SmolLM2 on a CPU: about 0.5 s a call)."""

from __future__ import annotations

import dataclasses
import gc
import sys
import types
import weakref

import jax
import numpy as np
import pytest
from recipes import recipe

from jaxrl_llm import models, parallel, sampling
from jaxrl_llm.models.params import unflatten
from jaxrl_llm.sampling import loop

CFG = models.ModelConfig(family="llama", vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
TP = parallel.sampling_rules("tensor")
GEN = sys.modules["jaxrl_llm.sampling.generate"]


@pytest.fixture
def counts(monkeypatch):
    """Calls of the reshard (param_shardings of the sampling table) and of the decode weights' layout."""
    seen = {"reshard": 0, "layout": 0, "reserve": []}
    real_sh, real_layout, real_auto = GEN.param_shardings, loop.prepare_decode_params, GEN.auto_batch_size

    def sh(*a, **kw):
        seen["reshard"] += 1
        return real_sh(*a, **kw)

    def layout(*a, **kw):
        seen["layout"] += 1
        return real_layout(*a, **kw)

    def auto(*a, **kw):
        seen["reserve"].append(a[5] if len(a) > 5 else kw.get("reserve_bytes", 0))
        return real_auto(*a, **kw)

    monkeypatch.setattr(GEN, "param_shardings", sh)
    monkeypatch.setattr(loop, "prepare_decode_params", layout)
    monkeypatch.setattr(GEN, "auto_batch_size", auto)
    return seen


def _mesh_and_params():
    mesh = parallel.make_mesh(data=1, fsdp=2, tensor=1, devices=jax.devices()[:2])
    rules = parallel.ShardingRules()
    rng = np.random.default_rng(0)  # (numpy: init_params would compile its initializer for this config, ~1 s)
    draw = lambda k, shape: rng.standard_normal(shape) * (0.1 if "norm" in k else 0.3) + ("norm" in k)
    host = unflatten({k: draw(k, s.shape).astype(np.float32) for k, s in models.param_specs(CFG).items()})
    params = jax.device_put(host, models.param_shardings(CFG, mesh, rules))
    return mesh, rules, params


def test_multi_turn_calls_share_one_reshard_and_one_decode_layout(counts):
    """Two turns of SamplerGenerate on prepared params: one reshard and one layout of the decode weights for both
    (there were two of each), the same tokens and log-probs as unprepared calls, and no memory reserved again for
    decode weights that already exist."""
    from jaxrl_llm.multiturn import SamplerGenerate

    mesh, rules, params = _mesh_and_params()
    kw = dict(mesh=mesh, rules=rules, sampling_rules=TP, unroll_layers=True)
    sp = sampling.SamplingParams(max_new_tokens=4, temperature=1.0)
    key = jax.random.key(1)
    turns = [([[1, 2, 3]] * 2 + [[4, 5]] * 2, [4, 3, 4, 4]), ([[1, 2, 3, 7, 8, 9]] * 2 + [[4, 5, 6, 7]] * 2,
                                                           [2, 4, 4, 1])]
    plain = SamplerGenerate(CFG, params, sp, key, **kw)
    want = [plain(p, caps, t) for t, (p, caps) in enumerate(turns)]
    assert counts["reshard"] == counts["layout"] == 2  # unprepared: each call makes its own
    counts.update(reshard=0, layout=0, reserve=[])

    prepared = sampling.prepare_params(CFG, params, mesh=mesh, rules=rules, sampling_rules=TP)
    gen = SamplerGenerate(CFG, prepared, sp, key, **kw)
    got = [gen(p, caps, t) for t, (p, caps) in enumerate(turns)]
    assert counts["reshard"] == 1 and counts["layout"] == 1
    assert counts["reserve"][0] > 0 and counts["reserve"][1] == 0
    assert gen.reshard_seconds == 0 and prepared.reshard_seconds > 0
    assert prepared.params["layers"]["wq"].sharding != params["layers"]["wq"].sharding  # whole on each device
    for a, b in zip(got, want, strict=True):
        assert a.tokens == b.tokens and a.finish_reasons == b.finish_reasons
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            np.testing.assert_array_equal(x, y)


def test_prepared_params_for_another_call_are_refused():
    mesh, rules, params = _mesh_and_params()
    sp = sampling.SamplingParams(max_new_tokens=4)
    prepared = sampling.prepare_params(CFG, params, mesh=mesh, rules=rules, sampling_rules=TP)
    with pytest.raises(ValueError, match=r"prepared \(sampling.prepare_params\) for another cfg, mesh or rules"):
        sampling.generate(CFG, prepared, [[1, 2]], sp, 0, mesh=mesh, rules=rules)  # the trainer's layout
    with pytest.raises(ValueError, match="prepared"):
        sampling.generate(CFG, prepared, [[1, 2]], sp, 0)  # no mesh
    other = dataclasses.replace(CFG, rms_norm_eps=1e-5)
    with pytest.raises(ValueError, match="prepared"):
        sampling.generate(other, prepared, [[1, 2]], sp, 0, mesh=mesh, rules=rules, sampling_rules=TP)


class _Stop(Exception):
    pass


def test_grpo_step_prepares_once_for_its_dynamic_sampling_rounds_and_drops_it(counts, monkeypatch):
    """A GRPO step whose dynamic sampling runs two generation rounds reshards and lays out the decode weights once
    (twice before), and holds no prepared copy once its rollouts are collected (the log-prob and training passes
    need that memory)."""
    from jaxrl_llm import rl_train
    from jaxrl_llm.rl_train import GRPORunner

    mesh, rules, params = _mesh_and_params()
    G = 2
    r = object.__new__(GRPORunner)
    r.config = recipe("grpo_tiny", {"rollout.num_prompts": 2, "rollout.group_size": G, "rollout.max_new_tokens": 4,
                                    "grpo.dynamic_sampling": True, "grpo.dynamic_sampling_max_rounds": 2})
    r.G, r.P, r.max_turns, r.position = G, 2, 1, 0
    r.kept, r.prompt_ids = [0, 1, 2, 3], [[1, 2], [3, 4, 5], [6], [7, 8]]
    r.tasks = [types.SimpleNamespace(metadata={}) for _ in r.kept]
    r.cfg, r.mesh, r.rules, r.sampling_rules = CFG, mesh, rules, TP
    r.missing_said, r.tok_bytes, r.pad = set(), None, 0
    r.sp = sampling.SamplingParams(max_new_tokens=4, temperature=1.0)
    r.tok = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=False: " ".join(map(str, ids)))
    rounds = []

    def score(prompts, completions, metadata):  # round 1: no reward spread (another round); round 2: spread
        rounds.append(len(prompts))
        rewards = [float(len(rounds) > 1 and i % 2) for i in range(len(prompts))]
        return types.SimpleNamespace(rewards=rewards, info=[{} for _ in rewards], counts={})

    r.env = types.SimpleNamespace(score=score)
    seen = []
    real_collect = r.collect

    def collect(p, step):
        seen.append(weakref.ref(p) if not isinstance(p, dict) else lambda: "the raw params")
        return real_collect(p, step)

    def stop(*a, **kw):  # the step's rollouts are collected: the log-prob and training passes start here
        gc.collect()
        seen.append(seen[0]())
        raise _Stop

    r.collect = collect
    monkeypatch.setattr(rl_train, "prepare_batch", stop)
    with pytest.raises(_Stop):
        r.step({"params": params}, None, 0)
    assert len(rounds) == 2
    assert counts["reshard"] == 1 and counts["layout"] == 1
    assert seen[1] is None  # dropped before the training passes
