"""Review 28 (sampling/budget.py): a CPU host's free memory is what the kernel can hand out (MemAvailable, within
a cgroup v2 limit), not MemFree, which leaves out the page cache a checkpoint read just filled."""

from __future__ import annotations

from jaxrl_llm.sampling import budget

MEMINFO = "MemTotal:       16000000 kB\nMemFree:          300000 kB\nMemAvailable:   12000000 kB\nCached: 11000000 kB\n"


def test_host_memory_counts_the_page_cache_the_kernel_can_drop(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)
    assert budget.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path / "nocgroup")) == 12000000 * 1024


def test_host_memory_stays_within_a_cgroup_limit(tmp_path):
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "memory.max").write_text("4000000000\n")
    (tmp_path / "memory.current").write_text("1000000000\n")
    assert budget.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path)) == 3000000000
    (tmp_path / "memory.max").write_text("max\n")
    assert budget.host_available_bytes(str(tmp_path / "meminfo"), str(tmp_path)) == 12000000 * 1024


def test_host_memory_without_proc_falls_back_to_free_pages(tmp_path):
    got = budget.host_available_bytes(str(tmp_path / "missing"), str(tmp_path))
    assert got is not None and got > 0


def test_the_unrolled_decode_weight_copy_comes_out_of_the_free_memory(monkeypatch):
    """generate(unroll_layers=True) (the CPU default in fp32) copies the layer weights after the chunk size is
    chosen: that copy is taken off the free memory first, or the chunk plus the copy overran it."""
    import jax

    from jaxrl_llm import models, sampling

    cfg = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    params = models.init_params(cfg, jax.random.key(0))
    per_row, copy = budget.row_bytes(cfg, 16, 16), budget.layout_copy_bytes(params)
    assert copy == sum(x.nbytes for x in jax.tree.leaves((params["layers"], params["lm_head"]))) and copy > 2 * per_row
    monkeypatch.setattr(budget, "free_bytes", lambda d: copy + int(2.5 * per_row / budget.FREE_SHARE))
    assert budget.auto_batch_size(cfg, None, 1, 16, 16, reserve_bytes=copy) == 2
    prompts = [[5, 6, 7]] * 6
    sp = sampling.SamplingParams(max_new_tokens=4)
    assert sampling.generate(cfg, params, prompts, sp, unroll_layers=True).stats["auto_batch_size"] == 2
    assert sampling.generate(cfg, params, prompts, sp, unroll_layers=False).stats["auto_batch_size"] > 2
