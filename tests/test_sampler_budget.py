"""generate() without max_batch_size cuts its prompts into chunks that fit the memory free on a device
(sampling/budget.py), with the same completions as one batch; every process of a job takes the smallest figure."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from jaxrl_llm import models, sampling
from jaxrl_llm.sampling import budget
from jaxrl_llm.sampling.cache import cache_bytes

CFG = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8)
SP = sampling.SamplingParams(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def params():
    return models.init_params(CFG, jax.random.key(0), std=0.3)


def test_row_bytes_counts_the_kv_cache_of_every_slot():
    assert budget.row_bytes(CFG, 16, 24) - budget.row_bytes(CFG, 16, 16) == cache_bytes(CFG, 1, 8) + 8 * 8
    assert budget.row_bytes(CFG, 16, 16) > cache_bytes(CFG, 1, 32) + 8 * CFG.vocab_size * 4
    assert budget.row_bytes(CFG, 16, 16, cache_shards=2) < budget.row_bytes(CFG, 16, 16)


def test_free_bytes_reads_memory_stats_then_the_host():
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 100, "bytes_in_use": 40})
    assert budget.free_bytes(gpu) == 60
    assert budget.free_bytes(types.SimpleNamespace(platform="tpu", memory_stats=lambda: None)) is None
    cpu = budget.free_bytes(jax.devices("cpu")[0])
    assert cpu is not None and 0 < cpu * len(jax.local_devices(backend="cpu")) <= \
        __import__("os").sysconf("SC_PHYS_PAGES") * __import__("os").sysconf("SC_PAGE_SIZE")


def test_prompts_beyond_the_free_memory_go_in_chunks_with_the_same_completions(params, monkeypatch, caplog):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, size=int(n)).tolist() for n in (5, 9, 3, 12, 7)]
    whole = sampling.generate(CFG, params, prompts, SP, 1)
    assert whole.stats["chunks"] == 1 and whole.stats["auto_batch_size"] >= 8  # the tiny rows fit at once
    per_row = budget.row_bytes(CFG, 16, 8)
    copy = budget.layout_copy_bytes(params)  # the unrolled decode (the CPU default) copies the weights
    monkeypatch.setattr(budget, "free_bytes", lambda d: copy + int(2.5 * per_row / budget.FREE_SHARE))
    with caplog.at_level("INFO", logger="jaxrl_llm.sampling.generate"):
        cut = sampling.generate(CFG, params, prompts, SP, 1)
    assert cut.stats["auto_batch_size"] == 2 and cut.stats["chunks"] == 3
    assert cut.tokens == whole.tokens and cut.finish_reasons == whole.finish_reasons
    np.testing.assert_allclose(np.concatenate(cut.logprobs), np.concatenate(whole.logprobs), atol=1e-5)
    assert "sampling 5 prompts in chunks of 2 rows" in caplog.text
    explicit = sampling.generate(CFG, params, prompts, SP, 1, max_batch_size=8)  # the caller's setting wins
    assert explicit.stats["chunks"] == 1 and explicit.stats["auto_batch_size"] is None


def test_unknown_free_memory_keeps_one_chunk_and_processes_take_the_smallest(monkeypatch):
    monkeypatch.setattr(budget, "free_bytes", lambda d: None)
    assert budget.auto_batch_size(CFG, None, 1, 16, 8) is None
    per_row = budget.row_bytes(CFG, 16, 8)
    monkeypatch.setattr(budget, "free_bytes", lambda d: int(64.5 * per_row / budget.FREE_SHARE))
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    assert budget.auto_batch_size(CFG, mesh, 2, 16, 8) == 128  # 64 rows a device x 2 batch shards
    # in a two-process job the other process has a quarter of the memory free: both cut chunks of its size
    monkeypatch.setattr(budget.jax, "process_count", lambda: 2)
    monkeypatch.setattr(budget, "allgather_json", lambda v: [v, v // 4])
    assert budget.auto_batch_size(CFG, mesh, 2, 16, 8) == 32
