"""How many rows one `generate` chunk may hold when the caller sets no `max_batch_size`.

A row's device memory is dominated by its KV cache (prompt bucket + new-token bucket slots, every layer) and,
at a large vocabulary, by the sampler's fp32 copies of its logits (top-k / top-p filter); prefill activations
of its prompt come on top. `auto_batch_size` fits that estimate into a share of the memory a device has free now:
`memory_stats()` on GPU and TPU (which counts the trainer's parameters and optimizer state already there), the
host's available memory (MemAvailable, within a cgroup's limit) shared by its devices on a CPU. Every process of
a job takes the smallest of their figures, so they all cut the same chunks (each chunk is a collective).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxrl_llm.distributed import allgather_json
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.sampling.cache import cache_bytes
from jaxrl_llm.sampling.loop import narrows, read_in_full

FREE_SHARE = 0.7  # of a device's free memory the rows of a chunk may take (XLA's temporaries need the rest)
_LOGIT_COPIES = 8  # fp32 [V] per row: logits, scaled, probabilities, order keys, filtered, log-softmax, ...


def row_bytes(cfg: ModelConfig, prompt_len: int, new_tokens: int, cache_shards: int = 1) -> int:
    """Device bytes one row needs (an estimate that errs high): its KV cache over `cache_shards` devices, its
    logits' working copies, its prompt's prefill activations (a layer at a time) and its output buffers."""
    cache = cache_bytes(cfg, 1, prompt_len + new_tokens) // cache_shards
    logits = _LOGIT_COPIES * cfg.vocab_size * 4
    width = cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim + 2 * cfg.intermediate_size
    prefill = prompt_len * (4 * cfg.hidden_size + width) * 4 + cfg.num_heads * prompt_len * prompt_len * 4
    return cache + logits + prefill + 8 * new_tokens


def free_bytes(device: jax.Device) -> int | None:
    """Bytes free on `device` now: memory_stats (GPU, TPU), else for a CPU device the host's available memory
    over the process's CPU devices; None when unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        available = host_available_bytes()
        return None if available is None else available // max(1, len(jax.local_devices(backend="cpu")))
    return None


def host_available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory the host can give this process now: Linux's MemAvailable (free pages plus the page cache it can
    drop; MemFree alone leaves out the cache that reading a checkpoint or data set just filled), at most what a
    cgroup v2 memory.max leaves; elsewhere sysconf's free pages; None when unknown."""
    try:
        with open(meminfo) as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open(os.path.join(cgroup, "memory.max")) as f:
            limit = f.read().strip()
        with open(os.path.join(cgroup, "memory.current")) as f:
            used = int(f.read().strip())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


def layout_copy_bytes(params: dict) -> int:
    """Bytes a device holds of the layer weights (and an untied head): the copy `generate(unroll_layers=True)`
    makes for decode (`loop.prepare_decode_params`) after the chunk size is chosen."""
    leaves = jax.tree.leaves({"layers": params["layers"], "lm_head": params.get("lm_head")})
    return sum(x.addressable_shards[0].data.nbytes if hasattr(x, "addressable_shards") else x.nbytes
               for x in leaves)


def cast_copy_bytes(cfg: ModelConfig, params: dict) -> int:
    """Bytes a device holds of the compute-dtype copy that `loop.decode(cast_weights=True)` makes of the weights
    stored in a wider float dtype (`loop.step_weights_in_compute_dtype`): 0 when none is wider than compute."""
    out = 0
    for x in jax.tree.leaves(read_in_full(cfg, params)):
        if narrows(x.dtype, cfg.dtype):
            nbytes = x.addressable_shards[0].data.nbytes if hasattr(x, "addressable_shards") else x.nbytes
            out += nbytes * jnp.dtype(cfg.dtype).itemsize // jnp.dtype(x.dtype).itemsize
    return out


def auto_batch_size(cfg: ModelConfig, mesh: Mesh | None, batch_shards: int, prompt_len: int, new_tokens: int,
                    reserve_bytes: int = 0) -> int | None:
    """Rows per chunk (a power of two times `batch_shards`, at least `batch_shards`) whose estimated memory fits
    FREE_SHARE of the least free device of the mesh (of every process) less `reserve_bytes` a device (memory the
    call takes besides its rows), or None when no device reports it."""
    devices = [d for d in (mesh.devices.flat if mesh is not None else jax.local_devices()[:1])
               if d.process_index == jax.process_index()]
    known = [f for f in map(free_bytes, devices) if f is not None]
    free = min(known) if known else None
    if mesh is not None and jax.process_count() > 1:
        known = [f for f in allgather_json(free) if f is not None]
        free = min(known) if known else None
    if free is None:
        return None
    tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1  # kv heads split over it, when they divide
    cache_shards = tensor if cfg.num_kv_heads % tensor == 0 else 1
    per_device = int(max(0, free - reserve_bytes) * FREE_SHARE) // row_bytes(cfg, prompt_len, new_tokens, cache_shards)
    rows = max(1, per_device)
    return batch_shards * (1 << (rows.bit_length() - 1))
