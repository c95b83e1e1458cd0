"""Entry point: python -m jaxrl_llm.train --config configs/<recipe>.py --workdir DIR [--config.a.b=value ...]

Started again with the same workdir, a run resumes from its latest checkpoint: parameters, optimizer state,
step and data position, so the resumed run logs exactly the losses an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import json
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

from jaxrl_llm import distributed, models, parallel
from jaxrl_llm.algorithms import REGISTRY, batch_indices
from jaxrl_llm.algorithms.grpo import validate_config as validate_grpo
from jaxrl_llm.checkpoint import Checkpointer, orbax_info_quiet, resume_note, weights_checksum
from jaxrl_llm.cli import (
    WRITE_ERRNOS,
    ConfigError,
    exit_if_job_crashed,
    exit_with_error,
    where_interrupted,
)
from jaxrl_llm.data import DataError, preference
from jaxrl_llm.data.buckets import RUNGS
from jaxrl_llm.data.cache import DataCache
from jaxrl_llm.data.sources import describe_source
from jaxrl_llm.data.vocab import check_ids_fit, check_pad_fits, with_tokenizer_ids
from jaxrl_llm.metrics import StepWindow, quiet_libraries
from jaxrl_llm.optim import make_optimizer
from jaxrl_llm.preemption import EXIT_STATUS as PREEMPTED_EXIT_STATUS
from jaxrl_llm.preemption import Preempted, StopOnSigterm, checkpoint_step
from jaxrl_llm.resume import (  # noqa: F401 (train.check_resume ...)
    check_resume,
    finish_run,
    prepare_workdir,
    restore_run,
    resume_window,
    score_pad,
    source_generation_config,
)
from jaxrl_llm.run_tokenizer import load_run_tokenizer, load_tokenizer, resolve_path  # noqa: F401 (train.*)
from jaxrl_llm.workdir import (
    MODEL_CONFIG_FILE,
    close_all,
    hold_workdir,
    open_run_records,
)

log = logging.getLogger("jaxrl_llm.train")


# Algorithms that generate their own data (rollouts) run their own loop; the value validates their config.
ONLINE = {"grpo": validate_grpo}


def with_datasets(config: ml_collections.ConfigDict, **datasets_by_block: Any) -> ml_collections.ConfigDict:
    """`config`, or a copy whose `<block>.source` is the `datasets.Dataset` given for that block (e.g. data=ds, built
    in a notebook; None leaves the block as it is). The recipes' source fields hold names and paths (strings) and
    ml_collections refuses to assign another type to them, so the Python entry points take Datasets as arguments
    and place them here."""
    import datasets

    given = {b: d for b, d in datasets_by_block.items() if d is not None}
    for block, dataset in given.items():
        if not isinstance(dataset, datasets.Dataset):
            hint = f" (pass one split, e.g. [{next(iter(dataset), 'train')!r}])" \
                if isinstance(dataset, datasets.DatasetDict) else ""
            raise ConfigError(f"{block}.source: a dataset passed in must be a datasets.Dataset, got "
                              f"{type(dataset).__name__}{hint}")
        if not isinstance(config.get(block), ml_collections.ConfigDict) or "source" not in config[block]:
            raise ConfigError(f"a dataset was passed for {block}.source, but the recipe has no {block}.source")
    if not given:
        return config
    config = copy.deepcopy(config)  # before any Dataset is in it
    with config.unlocked():
        for block, dataset in given.items():
            fields = {**config[block].to_dict(), "source": dataset}
            if fields.get("options"):  # a recipe's reasoning-gym ('rg:') task options say nothing about a Dataset
                log.info("%s.options %s left out: they apply to reasoning-gym sources, not to the Dataset passed in",
                         block, sorted(fields["options"]))
                fields["options"] = {}
            config[block] = ml_collections.ConfigDict(fields)
    return config


def init_config(mc: ml_collections.ConfigDict, vocab_size: int) -> models.ModelConfig:
    try:
        return models.ModelConfig(**{"vocab_size": vocab_size, **dict(mc.init)})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.init: {e}") from None


def build_model(config: ml_collections.ConfigDict, vocab_size: int, mesh, rules, num_labels: int = 0):
    mc = config.model
    if mc.path:
        cfg, params = models.load_pretrained(resolve_path(mc.path), dtype=mc.dtype, mesh=mesh, rules=rules)
    else:
        cfg = init_config(mc, vocab_size)
        params = models.init_params(cfg, jax.random.key(config.seed), dtype=mc.dtype, mesh=mesh, rules=rules,
                                    std=mc.get("init_std", 0.02))
    cfg = dataclasses.replace(cfg, compute_dtype=mc.compute_dtype, attention_impl=mc.attention_impl,
                              remat=mc.remat, logits_chunk=mc.get("logits_chunk", 0))
    if num_labels and cfg.num_labels != num_labels:
        cfg, params = models.with_score_head(cfg, params, num_labels, jax.random.key(config.seed + 1), mesh, rules)
    return cfg, params


def check_env_scores_tasks(env: Any, env_name: str, source: Any, tasks: list) -> None:
    """ConfigError (the environment closed) when `env` cannot score these tasks (`environments.check_metadata`):
    said before any model work, not at the first scoring after generation."""
    from jaxrl_llm.environments import check_metadata

    try:
        check_metadata(env, [t.metadata for t in tasks])
    except ValueError as e:
        if hasattr(env, "close"):
            env.close()
        raise ConfigError(f"env.name={env_name!r} cannot score the tasks of data.source="
                          f"{describe_source(source)!r}: {e}") from None


def check_model_settings(mc: ml_collections.ConfigDict) -> None:
    """model.dtype, model.compute_dtype, model.attention_impl, model.logits_chunk and model.init (when it is
    used), each a ConfigError naming the key (training and evaluation)."""
    from jaxrl_llm.models.config import ATTENTION_IMPLS

    if not mc.path and mc.get("init"):
        init_config(mc, vocab_size=2)  # (the tokenizer's size comes later)
    for key in ("dtype", "compute_dtype"):
        try:
            models.resolve_dtype(mc[key])
        except ValueError as e:
            raise ConfigError(f"model.{key}: {e}") from e
    if mc.get("attention_impl", "xla") not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={mc.attention_impl!r}; expected one of {ATTENTION_IMPLS} "
                          "(fused: jax.nn.dot_product_attention, cuDNN on a GPU)")
    if (mc.get("attention_impl") == "fused" and models.resolve_dtype(mc.compute_dtype) == jnp.float16
            and jax.default_backend() == "cpu"):  # XLA:CPU has no float16 dot with fp32 accumulation
        raise ConfigError("model.attention_impl='fused' with model.compute_dtype='float16' does not run on a CPU "
                          "(jax.nn.dot_product_attention's float16 products with fp32 accumulation): use "
                          "attention_impl='xla' or compute_dtype='bfloat16'")
    chunk = mc.get("logits_chunk", 0)
    if not _int(chunk) or chunk < 0:
        raise ConfigError(f"model.logits_chunk={chunk!r}: must be an integer >= 0 (positions projected onto the "
                          "vocabulary at a time in the losses; 0: all at once)")


def model_architectures(path: str) -> list[str]:
    """The `architectures` a model folder's config.json (or a training workdir's model_config.json) names; [] for
    a .gguf file, 'smollm2' or a folder without them."""
    for name, inner in (("config.json", None), (MODEL_CONFIG_FILE, "hf_config")):
        file = os.path.join(path, name) if path and os.path.isdir(path) else ""
        if file and os.path.isfile(file):
            try:
                with open(file) as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                return []  # (loading the model says what is wrong with it)
            doc = doc.get(inner, {}) if inner else doc
            return [a for a in doc.get("architectures") or [] if isinstance(a, str)] if isinstance(doc, dict) else []
    return []


def check_model_head(path: str, needs_scores: bool, key: str = "model.path") -> None:
    """A stage that generates or scores tokens (SFT, DPO, GRPO, evaluation) needs a causal LM: a reward model's
    export (*ForSequenceClassification) is refused naming the key, before any work (it failed inside the first
    jitted step). A reward-model run may start from either (a causal LM gets a new score head)."""
    scores = [a for a in model_architectures(path) if a.endswith("ForSequenceClassification")]
    if scores and not needs_scores:
        raise ConfigError(f"{key}={path!r} is a reward model ({scores[0]}: a score head, no language-model head); "
                          "this stage needs a causal LM: start from the export the reward model was trained from "
                          "(e.g. the SFT stage's hf/)")


def check_model_outside_export(config: ml_collections.ConfigDict, workdir: str) -> None:
    """model.path (or tokenizer) inside WORKDIR/hf: this run's export replaces the folder it reads (a next stage, DPO
    after SFT, started in the first stage's workdir): refused before any work."""
    export = os.path.realpath(os.path.join(workdir, "hf"))
    for key, value in (("model.path", config.model.get("path", "")), ("tokenizer", config.get("tokenizer", ""))):
        if isinstance(value, str) and value and value != "smollm2":
            real = os.path.realpath(value)
            if real == export or real.startswith(export + os.sep):
                raise ConfigError(f"{key}={value!r} is inside this run's export folder {export}, which the run "
                                  "replaces when it exports (and sets aside when it starts afresh): give this stage a "
                                  "workdir of its own")


def validate(config: ml_collections.ConfigDict) -> None:
    """User errors before any heavy work, each naming the config key."""
    if "algorithm" not in config:
        what = ("an evaluation recipe: run it with python -m jaxrl_llm.evaluate --config ... --out FILE"
                if "eval" in config and "sampling" in config else
                f"a training recipe names one: {sorted([*REGISTRY, *ONLINE])} (see configs/*_tiny.py)")
        raise ConfigError(f"the config has no 'algorithm' key: {what}")
    if config.algorithm not in REGISTRY and config.algorithm not in ONLINE:
        raise ConfigError(f"algorithm={config.algorithm!r}; implemented: {sorted([*REGISTRY, *ONLINE])}")
    missing = [k for k in (*REQUIRED_KEYS, *REQUIRED_BY_ALGORITHM.get(config.algorithm, ())) if not has_key(config, k)]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(missing)}: every training run needs "
                          f"{'it' if len(missing) == 1 else 'them'} (configs/{config.algorithm}_tiny.py sets every key "
                          "with its default)")
    try:
        if config.algorithm in ONLINE:
            ONLINE[config.algorithm](config)
        else:
            REGISTRY[config.algorithm].validate(config)
    except (AttributeError, KeyError) as e:  # a key the algorithm reads is not in the config
        raise ConfigError(f"the config lacks a key algorithm={config.algorithm!r} needs: {e} (configs/"
                          f"{config.algorithm}_tiny.py sets every key with its default)") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if config.max_steps < 1:
        raise ConfigError(f"max_steps={config.max_steps}: must be >= 1")
    tc = config.train
    if config.algorithm not in ONLINE:
        if not _int(tc.batch_size) or tc.batch_size < 1 or not _int(tc.microbatches) or tc.microbatches < 1:
            raise ConfigError(f"train.batch_size={tc.batch_size!r} and train.microbatches={tc.microbatches!r}: each "
                              "must be an integer >= 1")
        if tc.batch_size % tc.microbatches:
            raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by train.microbatches="
                              f"{tc.microbatches}")
    rungs = config.data.get("length_buckets", 4)
    if isinstance(rungs, bool) or rungs not in RUNGS:
        raise ConfigError(f"data.length_buckets={config.data.length_buckets!r}: expected one of {RUNGS} (rungs per "
                          "doubling of a batch's padded width; 0 pads every batch to data.max_len)")
    if config.data.overlong not in ("truncate", "drop"):
        raise ConfigError(f"data.overlong={config.data.overlong!r}; expected truncate | drop")
    for key in ("max_len", "max_prompt_len"):
        if key in config.data and (not _int(config.data[key]) or config.data[key] < 2):
            raise ConfigError(f"data.{key}={config.data[key]!r}: must be an integer >= 2 (tokens)")
    if not config.model.path and not config.model.init:
        raise ConfigError("model.path is empty and model.init is not set: name a model folder/.gguf or a tiny init")
    if config.model.path and config.model.path != "smollm2" and not os.path.exists(config.model.path):
        raise ConfigError(f"model.path={config.model.path!r}: no such file or folder")
    if config.model.path and os.path.isfile(os.path.join(config.model.path, MODEL_CONFIG_FILE)):
        hf = os.path.join(config.model.path, "hf")
        start = (f"start from its export, model.path={hf!r}" if os.path.isfile(os.path.join(hf, "config.json"))
                 else f"export a checkpoint first (python -m jaxrl_llm.export --workdir {config.model.path} --out DIR)"
                 " and start from that")
        raise ConfigError(f"model.path={config.model.path!r} is a training workdir, not a model folder: {start}")
    check_model_head(config.model.path, needs_scores=config.algorithm == "rm")
    check_model_settings(config.model)
    if models.resolve_dtype(config.model.dtype) == jnp.float16:
        raise ConfigError("model.dtype=float16: fp16 parameters cannot take AdamW's small updates (most round away "
                          "and the rest overflow its range); train with model.dtype=float32 (or bfloat16) and "
                          "model.compute_dtype=float16")
    parallel.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    validate_schedule(config)


# The keys a training recipe must set (the rest have defaults), by algorithm; validate names the missing ones.
REQUIRED_KEYS = ("max_steps", "log_every", "seed", "tokenizer", "export_hf", "model.path", "model.init", "model.dtype",
                 "model.compute_dtype", "model.attention_impl", "model.remat", "data.source", "data.num_examples",
                 "data.overlong", "train.batch_size", "train.microbatches", "optimizer.lr", "mesh.data", "mesh.fsdp",
                 "mesh.tensor", "checkpoint.every_steps", "checkpoint.keep")
REQUIRED_BY_ALGORITHM = {
    "sft": ("data.max_len", "data.packing", "data.last_assistant_only"),
    "dpo": ("data.max_len", "dpo.average_log_probs"),
    "rm": ("data.max_len",),
    "grpo": ("data.max_prompt_len", "data.system_prompt", "data.instruction", "env", "rollout.max_batch_size",
             "rollout.stop_token_ids", "grpo.token_level", "grpo.overlong_filtering", "grpo.recompute_old_logprobs"),
}


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    """Whether the config holds the dotted key ("data.max_len"), whatever its value (None included)."""
    node: Any = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_schedule(config: ml_collections.ConfigDict) -> None:
    """The keys every algorithm shares: logging, validation, checkpoints and the optimizer."""
    if not _int(config.log_every) or config.log_every < 1:
        raise ConfigError(f"log_every={config.log_every!r}: must be an integer >= 1 (log every this many steps)")
    val_every = config.get("val_every", 0)
    if not _int(val_every) or val_every < 0:
        raise ConfigError(f"val_every={val_every!r}: must be an integer >= 0 (0: no validation)")
    fraction = config.data.get("val_fraction", 0.0)
    if fraction and (not val_every or config.algorithm in ONLINE):
        why = ("GRPO validates on eval's tasks" if config.algorithm in ONLINE else
               "val_every=0 never validates on them: set val_every > 0, or data.val_fraction=0 to train on every row")
        raise ConfigError(f"data.val_fraction={fraction} holds rows out of training, but {why}")
    cc = config.checkpoint
    if not _int(cc.every_steps) or cc.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps={cc.every_steps!r}: must be an integer >= 0 (0: no checkpoints)")
    if not _int(cc.keep) or cc.keep < 1:
        raise ConfigError(f"checkpoint.keep={cc.keep!r}: must be an integer >= 1 (how many recent checkpoints)")
    if cc.get("best_mode", "min") not in ("min", "max"):
        raise ConfigError(f"checkpoint.best_mode={cc.best_mode!r}; expected min | max")
    best = cc.get("best_metric", "")
    if best and (not val_every or not best.startswith("val_")):
        raise ConfigError(f"checkpoint.best_metric={best!r} ranks checkpoints by a validation metric: it needs "
                          "val_every > 0 and a val_* name (e.g. val_loss)")
    if best and not cc.every_steps:
        raise ConfigError(f"checkpoint.best_metric={best!r} keeps the best checkpoint, but checkpoint.every_steps=0 "
                          "saves none: set checkpoint.every_steps > 0 (validation steps are then saved too)")
    seed = config.get("seed", 0)
    if not _int(seed) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r}: must be an integer in [0, 2**32)")
    oc = config.optimizer
    if not oc.lr > 0:
        raise ConfigError(f"optimizer.lr={oc.lr!r}: must be > 0")
    if oc.get("schedule", "cosine") not in ("cosine", "linear", "constant"):
        raise ConfigError(f"optimizer.schedule={oc.schedule!r}; expected cosine | linear | constant")
    warmup = oc.get("warmup_steps", 0)
    if not _int(warmup) or not 0 <= warmup <= config.max_steps:
        raise ConfigError(f"optimizer.warmup_steps={warmup!r}: must be an integer in [0, max_steps={config.max_steps}]")
    for key, lo, hi in (("weight_decay", 0.0, None), ("grad_clip", 0.0, None), ("final_lr_fraction", 0.0, 1.0)):
        v = oc.get(key, 0.0)
        if v < lo or (hi is not None and v > hi):
            raise ConfigError(f"optimizer.{key}={v!r}: must be in [{lo}, {'inf' if hi is None else hi}]")
    for key in ("b1", "b2"):
        if key in oc and not 0.0 <= oc[key] < 1.0:
            raise ConfigError(f"optimizer.{key}={oc[key]!r}: must be in [0, 1)")
    if "eps" in oc and not oc.eps > 0:
        raise ConfigError(f"optimizer.eps={oc.eps!r}: must be > 0")


def check_best_metric(config: ml_collections.ConfigDict, val: dict[str, float]) -> None:
    """The validation's metrics must hold checkpoint.best_metric: checked before the first step with the metric
    names (for SFT, DPO and RM from the shapes of the validation step; GRPO: rl_train.check_best_metric_name),
    and again at each validation."""
    best = config.checkpoint.get("best_metric", "")
    if best and val and best not in val:
        raise ConfigError(f"checkpoint.best_metric={best!r} is not among the validation metrics {sorted(val)}")


def check_step_finite(step: int, m: dict[str, Any], ckpt: Checkpointer) -> None:
    """Stop at the first step whose loss or gradient norm is not finite. Its update has already gone into the
    parameters (a non-finite gradient makes the clipped, Adam-scaled update NaN), so that state is never saved: the
    run stops before its checkpoint, and the message names the last one written."""
    for name in ("loss", "grad_norm"):
        if name in m and not np.isfinite(m[name]):
            kept = ckpt.latest_step()
            raise FloatingPointError(
                f"step {step}: {name} is {m[name]} (not finite); stopping without saving this step's parameters. "
                + (f"The last good checkpoint (step {kept}) is kept" if kept is not None else
                   "No checkpoint was written before it"))


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out round(fraction * n) examples (a seeded choice, the same on every restart)."""
    if fraction <= 0:
        return examples, []
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction={fraction}: must be in [0, 1)")
    n_val = max(1, round(fraction * len(examples)))
    if n_val >= len(examples):
        raise ConfigError(f"data.val_fraction={fraction} leaves no training examples out of {len(examples)}")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def validation_batches(algo, examples: list, config, pad: int, rows: list[int] | None = None):
    """All validation examples in order, in full batches; the last is filled by repeats weighted 0.
    `rows`: collate only these rows of each batch (this process's part; default all)."""
    B = config.train.batch_size
    rows = list(range(B)) if rows is None else rows
    for start in range(0, len(examples), B):
        chunk = examples[start: start + B]
        weight = np.zeros(B, np.float32)
        weight[: len(chunk)] = 1.0
        chunk = chunk + [examples[0]] * (B - len(chunk))
        yield {**algo.collate([chunk[r] for r in rows], config, pad, algo.widths(chunk, config)),
               "example_weight": weight[rows]}


def batch_tokens(batch: dict[str, Any]) -> Any:
    """The tokens a batch stands for (for tokens/s): its attention mask's sum; for preference pairs each side's
    tokens, a shared prefix counted on both sides (`preference.pair_tokens`). Numpy or jax arrays."""
    if "prefix_mask" in batch or "attention_mask" in batch:
        return preference.pair_tokens(batch)
    return float("nan")


def opt_state_shardings(optimizer, params, p_sh, mesh):
    """Optimizer-state shardings: moments laid out like their parameters, everything else replicated (left to
    the compiler, AdamW's moments come out replicated: 2x the parameters on every device)."""
    import optax

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params), p_sh,
                                 transform_non_params=lambda _: replicated)


# model_config.json's hf_config keys that set parameter shapes: a resumed run must have the same.
def run(config: ml_collections.ConfigDict, workdir: str, *, data: Any = None, eval_data: Any = None) -> dict[str, Any]:
    """Train per the recipe in `workdir` (resuming from its latest checkpoint); returns the last metrics.

    data / eval_data: a `datasets.Dataset` (from a notebook) to use instead of data.source / eval.source (GRPO's
    validation prompts); run_config.json records it by row count and fingerprint.

    In a multi-process job (see jaxrl_llm.distributed) every process runs this with the same arguments; each
    builds only its rows of every global batch; process 0 writes metrics, model config and the HF export."""
    config = with_datasets(config, data=data, eval=eval_data)
    distributed.initialize()
    validate(config)
    check_model_outside_export(config, workdir)
    # (a second run in this workdir stops at hold_workdir, before it writes anything)
    with hold_workdir(workdir), orbax_info_quiet():
        if config.algorithm in ONLINE:
            from jaxrl_llm.rl_train import run_grpo

            return run_grpo(config, workdir)
        return _run_offline(config, workdir)


def _run_offline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`run` for the algorithms that train on a fixed dataset (SFT, DPO, reward models)."""
    algo = REGISTRY[config.algorithm]
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.ShardingRules()
    # (SFT on plain 'text' rows needs no chat template: its rows say whether they do)
    tokenizer = load_run_tokenizer(config, needs_template=config.algorithm != "sft")
    data_cache = DataCache(os.path.join(workdir, "data_cache"), writer=jax.process_index() == 0)
    examples, data_stats = algo.prepare(config, tokenizer, cache=data_cache)
    examples, val_examples = split_validation(examples, config.data.get("val_fraction", 0.0), config.seed)
    try:
        distributed.check_same_everywhere(f"data.source={describe_source(config.data.source)!r} (as tokenized)",
                                          (examples, val_examples), len(examples) + len(val_examples))
    except ValueError as e:
        raise DataError(str(e)) from None
    val_every = config.get("val_every", 0)
    if val_every and (not val_examples or algo.make_eval is None):
        raise ConfigError(f"val_every={val_every} needs data.val_fraction > 0 and an algorithm with validation")
    cfg, params = build_model(config, len(tokenizer), mesh, rules, algo.num_labels)
    cfg = with_tokenizer_ids(cfg, tokenizer)
    if algo.num_labels:
        cfg = score_pad(workdir, cfg, tokenizer)
    check_ids_fit([*examples, *val_examples], cfg.vocab_size, tokenizer, "tokenized example")
    check_pad_fits(cfg.vocab_size, tokenizer)
    optimizer, schedule = make_optimizer(max_steps=config.max_steps, **config.optimizer)
    step_fn = algo.make_step(cfg, optimizer, config, rules)

    B = config.train.batch_size
    warning = parallel.batch_split_warning(rules, mesh, {"train.batch_size": B, "a microbatch (train.batch_size / "
                                                         "train.microbatches)": B // config.train.microbatches})
    if warning:
        log.warning(warning)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batch_shardings(local: dict[str, np.ndarray], extra: dict[str, tuple[str, ...]] | None = None) -> dict:
        """Shardings of a global batch whose arrays have these trailing shapes (widths vary by batch)."""
        axes = {**algo.batch_axes, **(extra or {})}
        return {k: rules.sharding(mesh, axes[k], (B, *v.shape[1:])) for k, v in local.items()}

    probe = algo.collate([examples[batch_indices(len(examples), B, config.seed, 0)[0]]], config, pad)
    rows = distributed.batch_rows(batch_shardings(probe), B, {k: v.shape[1:] for k, v in probe.items()})  # ours
    p_sh = models.param_shardings(cfg, mesh, rules)
    with jax.set_mesh(mesh):
        opt_sh = opt_state_shardings(optimizer, params, p_sh, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        ref_params = jax.tree.map(jnp.copy, params) if algo.needs_reference(config) else None
        state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
        # The batch comes placed by put_local_batch (its sharding per its widths); one compile per batch shape.
        train_step = jax.jit(step_fn, donate_argnums=0,
                             out_shardings=({"params": p_sh, "opt_state": opt_sh, "step": None}, None))
        eval_step = None
        if val_every:
            eval_fn = algo.make_eval(cfg, config, rules)
            eval_step = jax.jit(eval_fn, in_shardings=(p_sh, None, None))
            if config.checkpoint.get("best_metric", ""):  # its metric names, before any step (no computation)
                vb = next(validation_batches(algo, val_examples, config, pad))
                sums, _ = jax.eval_shape(eval_fn, params, vb, ref_params)
                check_best_metric(config, {f"val_{k}": 0.0 for k in sums})

    def validate_now(params) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0.0
        for vb in validation_batches(algo, val_examples, config, pad, rows):
            with jax.set_mesh(mesh):
                vb_sh = batch_shardings(vb, {"example_weight": ("batch",)})
                s, n = jax.device_get(eval_step(params, distributed.put_local_batch(vb, rows, vb_sh, B), ref_params))
            sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
            count += float(n)
        return {f"val_{k}": v / max(count, 1.0) for k, v in sums.items()}

    is_main = jax.process_index() == 0
    digest = data_cache.source_digest(config.data.source)  # (the rows' content; hashed once per start)
    run_meta = {"algorithm": config.algorithm, "seed": config.seed, "batch_size": B,
                "data_rows": len(examples) + len(val_examples), "val_rows": len(val_examples),
                "data_digest": digest and digest[:21]}
    if algo.needs_reference(config):  # a resume takes these weights again as its reference: the same ones
        run_meta["reference"] = weights_checksum(params)
    ckpt = prepare_workdir(workdir, cfg, config, tokenizer, default_best_mode="min", run_meta=run_meta)
    data_cache.flush()  # the workdir is this run's now
    items, start = restore_run(ckpt, state)
    if items is not None:
        with jax.set_mesh(mesh):  # placed as a fresh run's counter: another placement compiles the step again
            state = {**items, "step": jnp.int32(start)}
    writer, last = open_run_records(workdir, config, start, is_main)
    window = StepWindow(rates={"tokens_per_s": "step_time_s"})
    resume_window(window, ckpt, workdir, start)
    t_last = time.time()
    stop = StopOnSigterm().start()
    try:
        def host_batch(step: int) -> dict[str, np.ndarray]:
            idx = batch_indices(len(examples), B, config.seed, step)
            return algo.collate([examples[idx[r]] for r in rows], config, pad,
                                algo.widths([examples[i] for i in idx], config))

        count_tokens = jax.jit(batch_tokens)
        upcoming = host_batch(start) if start < config.max_steps else None
        if start < config.max_steps and jax.process_index() == 0:  # (the first row comes after the compiles)
            log.info("step %d of %d: compiling the train step first (the first step takes longest)", start + 1,
                     config.max_steps)
        for step in range(start, config.max_steps):
            batch = upcoming
            with jax.set_mesh(mesh):
                global_batch = distributed.put_local_batch(batch, rows, batch_shardings(batch), B)
                state, m = train_step(state, global_batch, ref_params)
                # (for tokens/s; a process holding only its rows counts the global batch's on the devices)
                n_tok = batch_tokens(batch) if len(rows) == B else count_tokens(global_batch)
            # the next batch is built while the device runs this step (its metrics wait for the step's end)
            upcoming = host_batch(step + 1) if step + 1 < config.max_steps else None
            m, n_tok = jax.device_get((m, n_tok))  # one wait for both
            check_step_finite(step + 1, m, ckpt)
            done = step + 1
            writer.step_done(done)
            t_train = time.time() - t_last
            val = validate_now(state["params"]) if val_every and (done % val_every == 0 or
                                                                   done == config.max_steps) else {}
            window.add({**m, "step_time_s": t_train, "tokens_per_s": float(n_tok) / max(t_train, 1e-9)})
            if val or done % config.log_every == 0 or done == config.max_steps:
                # the steps since the last row: their mean (tokens/s: all their tokens over all their time)
                last = {**window.take(), **val, "lr": float(schedule(step))}
                writer.write(done, last)
            check_best_metric(config, val)
            meta = {"step": done, **run_meta, "data_position": done * B, **val, "log_window": window.pending()}
            try:
                checkpoint_step(ckpt, stop, done, state, meta, val, config.max_steps)
            except Preempted:  # stopped between two rows: the steps since the last are logged too
                if len(window):
                    writer.write(done, {**window.take(), "lr": float(schedule(step))})
                raise
            t_last = time.time()
    except BaseException:  # the error that stopped the run is the one to say, not one from closing after it
        close_all(stop.close, ckpt.close, writer.close, after_error=True)
        raise
    saved = ckpt.summary()
    close_all(stop.close, ckpt.close, writer.close)
    finish_run(config, cfg, state["params"], tokenizer, workdir, start, saved)
    return {**last, **{f"data_{k}": v for k, v in data_stats.items()}}


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (importing `run` defines none)."""
    config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py) with get_config().",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run folder: metrics.jsonl, checkpoints/, hf/ (default runs/<recipe>).")
    distributed.define_flags()

USER_ERRORS = (ConfigError, DataError, models.CheckpointError, models.UnsupportedModelError, parallel.MeshError,
               FloatingPointError, FileNotFoundError, FileExistsError, distributed.DistributedError)


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if FLAGS.config is None:
        sys.exit("error: --config is required (e.g. --config configs/sft_tiny.py)")
    recipe = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    workdir = FLAGS.workdir or os.path.join("runs", recipe)
    try:
        distributed.initialize_from_flags()
        run(FLAGS.config, workdir)
    except USER_ERRORS as e:
        exit_with_error(f"error: {e}")
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            exit_if_job_crashed(e)
            raise
        exit_with_error(f"error: {e}; {resume_note(workdir)}")
    except KeyboardInterrupt as e:  # (at once: a normal exit can crash in XLA's teardown after an interrupt)
        exit_with_error(f"interrupted {where_interrupted(e.__traceback__)}; {resume_note(workdir)}", 130,
                        at_once=True)
    except Preempted as e:
        log.warning("%s", e)
        sys.exit(PREEMPTED_EXIT_STATUS)
    except BaseException as e:
        exit_if_job_crashed(e)
        raise


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: rl_train and evaluate import jaxrl_llm.train, and the
    # ConfigError they raise must be the class main() catches (a second class would print a traceback).
    from jaxrl_llm import train as _train

    _train.define_flags()
    flags.adopt_module_key_flags(_train)  # --help lists --config and --workdir (defined in that module)
    from jaxrl_llm.cli import parse_flags

    app.run(_train.main, flags_parser=parse_flags)
