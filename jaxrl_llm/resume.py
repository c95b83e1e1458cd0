"""A run folder from start to end: what its checkpoints must share with this start (`check_resume`,
`prepare_workdir`), restoring the latest one (`restore_run`), and the export and closing line (`finish_run`).
Shared by the offline algorithms (train.py) and GRPO (rl_train.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import jax
import ml_collections

from jaxrl_llm import distributed, models
from jaxrl_llm.checkpoint import Checkpointer, complete_steps, require_finite, step_record
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.data.sources import describe_source
from jaxrl_llm.data.vocab import with_score_pad
from jaxrl_llm.run_tokenizer import resolve_path
from jaxrl_llm.workdir import (
    MODEL_CONFIG_FILE,
    RUN_CONFIG_FILE,
    config_changes,
    export_is_current,
    logged_metrics,
    replace_folder,
    set_aside,
    write_atomically,
)

log = logging.getLogger("jaxrl_llm.train")


def source_generation_config(config: ml_collections.ConfigDict) -> dict | None:
    """model.path's generation_config.json (its sampling defaults go with the run's exports), or None."""
    return models.read_generation_config(resolve_path(config.model.path)) if config.model.path else None


# What a resumed run must share with the run that wrote the checkpoint, as meta names them: the data position and
# the learning-rate schedule depend on them. The data is compared by its number of rows, not its tokens: a
# template may render today's date (Llama 3.2), and reasoning-gym tasks vary with Python's hash seed.
_RESUME_NAMES = {"batch_size": "train.batch_size",
                 "reference": "the reference model's weights (model.path's, as this start loaded them: a checksum)",
                 "data_rows": "the number of data rows (data.source after tokenization, truncation and drops)",
                 "data_digest": "the data (data.source's content: its file's SHA-256, or a Dataset's fingerprint)",
                 "val_rows": "the rows held out for validation (data.val_fraction of the rows: the others are trained "
                             "on, so another split validates on rows the run trained on)",
                 "num_prompts": "rollout.num_prompts", "group_size": "rollout.group_size", "epochs": "grpo.epochs",
                 "prompts_per_round": "the prompts of each generation round (rollout.num_prompts, times "
                                      "grpo.batch_multiplier with grpo.dynamic_sampling)"}


def check_resume(workdir: str, saved: dict[str, Any], now: dict[str, Any], edits: list[str] | None = None) -> None:
    """ConfigError naming every setting in `now` that differs from the checkpoint's meta `saved` (settings that
    an older checkpoint did not record are not compared). Other rows of the same count (an edited file, another
    Dataset) are allowed, as a changed data.source path is, and logged: the run goes on from its data position
    over the new rows. `edits`: the data, tokenizer and model keys changed since the last start ('key: old -> new'),
    named as the cause of another row count or reference."""
    digest = now.get("data_digest")
    if saved.get("data_digest") not in (None, digest):
        log.warning("resuming on other data than the checkpoint's (%s: %r there, %r now): the same number of rows, "
                    "so the run goes on from its data position over the new rows", _RESUME_NAMES["data_digest"],
                    saved["data_digest"], digest)
    changed = [f"{_RESUME_NAMES.get(k, k)}: {saved[k]!r} there, {v!r} now" for k, v in now.items()
               if k in saved and saved[k] != v and k != "data_digest"]
    if changed:
        # (what the code makes of the settings: another version of jaxrl_llm can change it with the same settings)
        derived = [what for k, what in (("data_rows", "number of data rows"), ("reference", "reference checksum"))
                   if k in now and k in saved and saved[k] != now[k]]
        why = ("" if not derived else f" (changed since the last start: {'; '.join(edits)})" if edits else
               f"; the same settings give another {' and '.join(derived)} where another version of jaxrl_llm (one "
               "that tokenized, dropped or loaded otherwise) wrote the checkpoint: start a fresh workdir then")
        raise ConfigError(f"workdir {workdir!r} holds a run with other settings ({'; '.join(changed)}); resume it "
                          "with its own settings, or start a fresh workdir (model.path can start from this run's "
                          f"export){why}")


def check_max_steps(workdir: str, ckpt: Checkpointer, max_steps: int) -> None:
    """A latest checkpoint past max_steps (max_steps lowered to stop or export a run earlier) is a ConfigError: the
    run would train nothing, and its export (and closing line) would be the later step's model as if of max_steps."""
    latest = ckpt.latest_step()
    if latest is not None and latest > max_steps:
        raise ConfigError(f"max_steps={max_steps}, but workdir {workdir!r} holds a checkpoint of step {latest}: the "
                          f"run is past it (nothing to train; its export would be step {latest}'s model); export an "
                          f"earlier step with python -m jaxrl_llm.export --workdir {workdir} --step N --out DIR "
                          f"(checkpoints: {ckpt.all_steps()}), or give max_steps >= {latest}")


def restore_run(ckpt: Checkpointer, state: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
    """(params and opt_state of the latest checkpoint, its step), or (None, 0) with none (`prepare_workdir` has
    checked the checkpoint's settings). When there is one, the arrays of state["params"] and state["opt_state"]
    are deleted before it is read. On an error the checkpointer is closed (its background threads would
    otherwise fail at exit)."""
    if ckpt.latest_step() is None:
        return None, 0
    # The restored arrays replace these: free them first (their shapes, dtypes and shardings are the targets), or
    # a resumed run would hold two copies of the parameters and the optimizer state for as long as it runs (the
    # caller's own references to them outlive `state`), and twice that while restoring.
    old = {"params": state["params"], "opt_state": state["opt_state"]}
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), old)
    for x in jax.tree.leaves(old):
        x.delete()
    try:
        items, _, start = ckpt.restore(targets)
    except BaseException:
        ckpt.close()
        raise
    log.info("resumed from %s at step %d", ckpt.directory, start)
    return items, start


def resume_window(window: Any, ckpt: Checkpointer, workdir: str, start: int) -> None:
    """A resumed run's first row covers the steps since the last row before its checkpoint (the meta's log_window,
    `metrics.StepWindow.pending`), unless metrics.jsonl has a row at the checkpoint's step (a SIGTERM stop logs one).
    The meta is read from its file: Orbax's restore (`ckpt.read_meta`) ends in a barrier of every process, which
    process 0 alone would meet in the others' first train step (a 2-process resume failed: Gloo errors, "the
    checkpoint is damaged")."""
    if start and jax.process_index() == 0 and not logged_metrics(workdir, start):
        window.restore((step_record(ckpt.directory, start, "meta") or {}).get("log_window", []))


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def earlier_best(workdir: str, default_mode: str) -> tuple[int, ...]:
    """The checkpoints an earlier start kept as the best by its checkpoint.best_metric, for a start without one: the
    latest checkpoint's recorded `kept_steps`, or the best of the ranked steps by the best_metric and best_mode of
    the latest start that had one (run_config.json, then its earlier copies). Without them the first save deleted
    the run's best checkpoint (only the last checkpoint.keep were kept), e.g. when validation was turned off to
    extend a run; the HF Trainer keeps its best_model_checkpoint."""
    folder = os.path.join(workdir, "checkpoints")
    steps = complete_steps(folder)
    if not steps:
        return ()
    meta = step_record(folder, steps[-1], "meta")
    if meta is not None and isinstance(meta.get("kept_steps"), list):
        return tuple(s for s in meta["kept_steps"] if s in steps)
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    olds = sorted((int(k) for f in os.listdir(workdir) if f.startswith(RUN_CONFIG_FILE + ".") and f.endswith(".old")
                   and (k := f[len(RUN_CONFIG_FILE) + 1:-4]).isdigit()), reverse=True)
    for name in (path, *(f"{path}.{k}.old" for k in olds)):
        earlier = _read_json(name)
        cc = earlier.get("checkpoint") if isinstance(earlier, dict) else None
        metric = cc.get("best_metric") if isinstance(cc, dict) else None
        if metric and isinstance(metric, str):
            break
    else:
        return ()
    ranked = {}
    for step in steps:
        value = (step_record(folder, step, "metrics") or {}).get(metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            ranked[step] = float(value)
    if not ranked:
        return ()
    best = (max if cc.get("best_mode", default_mode) == "max" else min)(ranked, key=ranked.__getitem__)
    log.warning("checkpoint.best_metric is off now: the earlier start's best checkpoint by %s (step %d, %s=%g) is "
                "kept beside the last checkpoint.keep (delete it, or set best_metric again, to let it go)", metric,
                best, metric, ranked[best])
    return (best,)


def edits_since_last_start(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """The data, tokenizer and model settings of `config` other than run_config.json's (the last start's), as
    'key: old -> new'; [] without a readable file."""
    earlier = _read_json(os.path.join(workdir, RUN_CONFIG_FILE))
    if not isinstance(earlier, dict):
        return []
    now = json.loads(json.dumps(config.to_dict(), default=describe_source))
    return [c for c in config_changes(earlier, now) if c.startswith(("data.", "tokenizer:", "model."))]


_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "num_labels")


def prepare_workdir(workdir: str, cfg: models.ModelConfig, config: ml_collections.ConfigDict, tokenizer,
                    default_best_mode: str, run_meta: dict[str, Any]) -> Checkpointer:
    """The run folder every algorithm shares: model_config.json and tokenizer/ (process 0, for export and
    evaluation; with data.chat_template's override as its template) and the checkpointer over checkpoints/.
    A folder that holds another run's checkpoints (another model or dtype, or `run_meta` settings other than
    its latest checkpoint's: `check_resume`) is a ConfigError raised before anything in it is written."""
    os.makedirs(workdir, exist_ok=True)
    if config.get("export_hf", False):  # the end-of-run export would refuse it: say so before training
        from jaxrl_llm.models.hf_io import check_replaceable

        check_replaceable(os.path.abspath(os.path.join(workdir, "hf")))
    cc = config.checkpoint
    best_metric = cc.get("best_metric", "")
    # process 0's reading on every process (read there only: each process said its warning, once per host)
    mine = list(earlier_best(workdir, default_best_mode)) if not best_metric and jax.process_index() == 0 else []
    kept = tuple(distributed.allgather_json(mine)[0])
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cc.every_steps, cc.keep, best_metric=best_metric,
                        best_mode=cc.get("best_mode", default_best_mode), kept_steps=kept)
    saved = os.path.join(workdir, MODEL_CONFIG_FILE)
    saved_doc = None
    if ckpt.latest_step() is not None and os.path.exists(saved):
        try:
            with open(saved) as f:
                saved_doc = json.load(f)
            if not isinstance(saved_doc, dict):
                raise ValueError(f"a JSON {type(saved_doc).__name__}, not an object")
        except (OSError, ValueError) as e:  # cut short by a kill (before it was written atomically)
            saved_doc = None
            log.warning("%s: unreadable (%s): set aside as %s; the model is not compared with the checkpoint's "
                        "before it is restored", saved, e, set_aside(saved) if jax.process_index() == 0 else "-")
    if saved_doc is not None:
        before = saved_doc.get("param_dtype")
        old_hf, new_hf = saved_doc.get("hf_config", {}), models.config_to_hf(cfg)
        changed = [f"{k}: {old_hf[k]!r} there, {new_hf.get(k)!r} now" for k in _SHAPE_KEYS
                   if k in old_hf and old_hf[k] != new_hf.get(k)]
        if changed:
            ckpt.close()
            raise ConfigError(f"workdir {workdir!r} holds checkpoints of another model ({'; '.join(changed)}): its "
                              "parameters do not fit this one; use a fresh workdir, or the run's own model settings")
        if before is not None and models.resolve_dtype(before) != models.resolve_dtype(config.model.dtype):
            ckpt.close()
            raise ConfigError(f"workdir {workdir!r} holds checkpoints of a run with model.dtype={before}, not "
                              f"{config.model.dtype}: resuming would round its parameters (and every export of "
                              "its checkpoints) to the new dtype; use a fresh workdir to change it")
    # (after the model and dtype: another dtype or model also changes the reference's checksum)
    if ckpt.latest_step() is not None:
        try:
            check_resume(workdir, ckpt.read_meta(), run_meta, edits_since_last_start(workdir, config))
            check_max_steps(workdir, ckpt, config.max_steps)
        except BaseException:
            ckpt.close()
            raise
    if jax.process_index() == 0:  # each written whole or not at all: a kill here must not break the restart
        write_atomically(saved, json.dumps({"hf_config": models.config_to_hf(cfg), "compute_dtype": cfg.compute_dtype,
                                            "attention_impl": cfg.attention_impl, "param_dtype": config.model.dtype,
                                            "generation_config": source_generation_config(config)}, indent=2))
        replace_folder(os.path.join(workdir, "tokenizer"), tokenizer.save_pretrained)
    return ckpt


def score_pad(workdir: str, cfg: models.ModelConfig, tokenizer: Any) -> models.ModelConfig:
    """A score-head model's pad id where neither its config nor the tokenizer has one: the tokenizer's EOS
    (`with_score_pad`), unless the workdir's checkpoints were trained without one (model_config.json's pad_token_id
    null: a run started before pad = EOS, which read each row's score at its last token, EOS included); a resume keeps
    that, or the score would be read at the token before a closing EOS from the resumed step on (process 0's reading
    on every process)."""
    if cfg.pad_token_id is not None:
        return cfg
    saved = _read_json(os.path.join(workdir, MODEL_CONFIG_FILE)) if jax.process_index() == 0 else None
    hf = saved.get("hf_config") if isinstance(saved, dict) else None
    trained_without = bool(complete_steps(os.path.join(workdir, "checkpoints"))) and isinstance(hf, dict) \
        and "pad_token_id" in hf and hf["pad_token_id"] is None
    if distributed.allgather_json(trained_without)[0]:
        log.warning("the tokenizer has no pad token, and %s's checkpoints were trained without one (each row scored "
                    "at its last token): kept so, rather than pad = EOS; the exported *ForSequenceClassification "
                    "model scores one row at a time in transformers (start a fresh workdir for pad = EOS)", workdir)
        return cfg
    cfg = with_score_pad(cfg, tokenizer)
    if cfg.pad_token_id is not None:
        log.info("the tokenizer has no pad token: pad = EOS %r (id %d) for the score head, as TRL and NeMo RL; a row "
                 "ending in it is scored at the token before it (here and in transformers)", tokenizer.pad_token,
                 cfg.pad_token_id)
    else:
        log.warning("the tokenizer has no pad token and no EOS: the exported *ForSequenceClassification model scores "
                    "only one row at a time in transformers (it finds each row's last token by the pad id); give the "
                    "tokenizer one (tokenizer folder) to score batches there")
    return cfg


def finish_run(config: ml_collections.ConfigDict, cfg: models.ModelConfig, params: Any, tokenizer: Any, workdir: str,
               start: int, checkpoints: str) -> None:
    """After the last step: the HF export (every process takes part in the gather; process 0 writes), unless a
    finished run was started again and its export is already there (process 0's view, so that every process takes
    the same branch), then one line saying where the metrics, `checkpoints` (Checkpointer.summary) and export are."""
    hf = os.path.join(workdir, "hf")
    exported = distributed.allgather_json(export_is_current(workdir, start, config.max_steps))[0]
    if exported:
        log.info("nothing to train: the checkpoint is at max_steps=%d, and its export in %s is kept",
                 config.max_steps, hf)
    elif config.export_hf:
        require_finite({"params": params}, "the HF export is not written")
        # (save_pretrained says "exported DIR (N tensors, ...)"; the line below names the folder again)
        models.save_pretrained(cfg, params, hf, tokenizer=tokenizer, generation_config=source_generation_config(config))
    if jax.process_index() == 0:
        tensorboard = config.get("metrics", {}).get("tensorboard", True)
        log.info("done: %d step%s; metrics in %s%s; %s%s", config.max_steps, "s" * (config.max_steps != 1),
                 os.path.join(workdir, "metrics.jsonl"),
                 f" and {os.path.join(workdir, 'tensorboard')}" if tensorboard else "", checkpoints,
                 f"; the trained model in {hf}" if config.export_hf else "")
