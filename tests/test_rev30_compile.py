"""Review 30 (wasted work in the loops): the sampler's compile counter against jax's own compile events."""

from __future__ import annotations

import jax
import pytest
from jax import monitoring

from jaxrl_llm import models, sampling

CFG = models.ModelConfig(family="llama", vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
SP = sampling.SamplingParams(max_new_tokens=4, temperature=0.0)
_SAMPLER = ("prefill", "decode", "_output_major")


def _bare(name: str) -> str:
    return name[4:-1] if name.startswith("jit(") and name.endswith(")") else name


@pytest.fixture
def jax_compiles():
    """The names of the functions jax compiles while the test runs (jax's compile event), 'jit(' ')' removed."""
    seen: list[str] = []

    def on(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(_bare(str(kw.get("fun_name"))))

    monitoring.register_event_duration_secs_listener(on)
    yield seen
    monitoring.unregister_event_duration_listener(on)


def test_compiles_count_what_jax_compiles_when_only_the_placement_changes(jax_compiles):
    """The same shapes with parameters committed to a device: jax compiles prefill and decode again (the trace is
    reused, so a trace counter said 0). stats['compiles'] (GRPO's sampler_compiles) must say what jax compiled."""
    params = models.init_params(CFG, jax.random.key(3))
    for p in (params, jax.device_put(params, jax.devices()[0]), params):
        jax_compiles.clear()
        out = sampling.generate(CFG, p, [[1, 2, 3], [4, 5]], SP, 0, unroll_layers=False)
        assert out.stats["compiles"] == len([n for n in jax_compiles if n in _SAMPLER])
    assert out.stats["compiles"] == 0  # the first placement again: nothing new
