"""The sampler on a (data=1, fsdp=4, tensor=2) mesh of 8 CPU devices equals the single-device sampler.

Runs in this process when it has 8 devices (tests/conftest.py asks for 8 fake CPU devices); otherwise in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrl_llm import models, parallel, sampling
from jaxrl_llm.sampling import loop

CFG = models.ModelConfig(family="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=256)
# Decode-time table: parameters replicated over fsdp (tensor parallel only); batch still over data x fsdp.
TP_RULES = parallel.sampling_rules("tensor")  # the layout a recipe selects with rollout.sampling_layout


def check_sharded_equals_single_device() -> None:
    assert jax.device_count() >= 8
    params = models.init_params(CFG, jax.random.key(0), std=0.2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, CFG.vocab_size, size=n).tolist() for n in (3, 9, 14, 5, 7, 1)]
    sps = [sampling.SamplingParams(max_new_tokens=10, stop_token_ids=(5, 6), **kw) for kw in (
        dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, top_k=8), dict(temperature=1.2, top_p=0.7),
        dict(temperature=1.0, top_k=20, top_p=0.9), dict(temperature=0.0))]
    key = jax.random.key(42)
    ref = sampling.generate(CFG, params, prompts, sps, key)

    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    rules = parallel.ShardingRules()
    sharded = jax.device_put(params, models.param_shardings(CFG, mesh, rules))
    before = jax.tree.map(lambda x: x.sharding, sharded)
    for kw in (dict(), dict(sampling_rules=TP_RULES)):
        out = sampling.generate(CFG, sharded, prompts, sps, key, mesh=mesh, rules=rules, **kw)
        assert out.tokens == ref.tokens, kw
        assert out.finish_reasons == ref.finish_reasons
        for a, b in zip(out.logprobs, ref.logprobs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert out.stats["shapes"] == [(8, 16, 16)]
        assert (out.stats["reshard_seconds"] > 0) == ("sampling_rules" in kw)
    # A repeated prompt (a GRPO group) is prefilled once on the mesh and its cache copied to its rows.
    dup = [prompts[1]] * 8 + [prompts[2]] * 8
    dsp = sampling.SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(5,))
    ref_dup = sampling.generate(CFG, params, dup, dsp, key, share_prefill=False)
    out = sampling.generate(CFG, sharded, dup, dsp, key, mesh=mesh, rules=rules)
    assert out.stats["prefill_rows"] < 16 and ref_dup.stats["prefill_rows"] == 16
    assert out.tokens == ref_dup.tokens
    for a, b in zip(out.logprobs, ref_dup.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The trainer's arrays were used where they are (no copy, layout untouched).
    assert jax.tree.map(lambda x: x.sharding, sharded) == before

    # The KV cache follows the rules table: batch over fsdp, kv heads over tensor.
    with jax.set_mesh(mesh):
        cache, _ = loop.prefill(CFG, sharded, np.zeros((8, 16), np.int32), np.zeros(8, np.int32), cache_len=32,
                                rules=rules)
    want = sampling.cache_shardings(CFG, mesh, rules, 8, 32)["k"]
    assert cache["k"].sharding.is_equivalent_to(want, 5)
    axes = sampling.CACHE_AXES
    assert want.spec[axes.index("batch")] in ("fsdp", ("data", "fsdp"))
    assert want.spec[axes.index("kv_heads")] == "tensor"


@pytest.mark.slow
def test_sharded_generate_equals_single_device(tmp_path):
    if jax.device_count() >= 8:
        check_sharded_equals_single_device()
        return
    script = tmp_path / "run_sharded.py"
    script.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
                      "from test_sampling_sharded import check_sharded_equals_single_device\n"
                      "check_sharded_equals_single_device()\nprint('OK')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-4000:]
