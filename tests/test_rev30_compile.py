"""Review 30 (wasted work in the loops): the sampler's compile counter against jax's own compile events,
generate_text's prebuilt stop-string table, and init_params compiled once per setting."""

from __future__ import annotations

import jax
import numpy as np
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


class WordTok:
    """A word-level tokenizer of "w<i> " words; `strict`: reading its pieces (building the table) fails the test."""

    eos_token_id = 60

    def __init__(self, strict: bool) -> None:
        self.strict = strict

    def __len__(self) -> int:
        return CFG.vocab_size

    def __call__(self, text: str) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"w{i} " for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def convert_ids_to_tokens(self, ids):
        if self.strict:
            raise AssertionError("the token-bytes table was built again")
        return [f"w{i} " for i in ids]


@pytest.mark.parametrize("given", [True, False], ids=["table_given", "from_tokenizer"])
def test_generate_text_takes_a_prebuilt_token_bytes_table(given):
    """The docstring's advice (build the stop-string table once for calls in a loop) must work: the table is
    passed as token_bytes=, and the tokenizer's pieces are then never read again; without it, the table is built
    from the tokenizer."""
    tb = sampling.TokenBytes(tuple(f"w{i} ".encode() for i in range(CFG.vocab_size))) if given else None
    params = models.init_params(CFG, jax.random.key(3))
    sp = sampling.SamplingParams(max_new_tokens=6, temperature=0.0, stop_strings=("w",))
    out = sampling.generate_text(CFG, params, WordTok(strict=given), ["w1 w2", "w3"], sp, 0, chat_template=False,
                                 token_bytes=tb, unroll_layers=False)
    assert out.output.finish_reasons == ["stop", "stop"] and all(len(t) == 1 for t in out.output.tokens)
    assert out.texts == [f"w{t[0]} " for t in out.output.tokens]
    assert np.all([len(t) for t in out.prompt_ids] == np.array([2, 1]))


def test_init_params_compiles_once_per_setting(jax_compiles):
    """Its random normals take XLA:CPU ~3 s to compile for any model: a second call with the same settings (a
    resumed or second run in one process) reuses them, and gives the same parameters for the same key."""
    first = models.init_params(CFG, jax.random.key(3))
    jax_compiles.clear()
    again = models.init_params(CFG, jax.random.key(3))
    wide = models.init_params(CFG, jax.random.key(3), std=0.5)  # (an argument of the compiled function)
    assert "make" not in jax_compiles
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True))
    assert np.allclose(wide["embed"], first["embed"] * 25, rtol=1e-6) and np.all(wide["final_norm"] == 1)
