"""Entry point: python -m jaxrl_llm.evaluate --config configs/eval_<x>.py [--config.a.b=value ...] [--out FILE]

pass@k of a model on a benchmark. config.model.path is an HF folder, a .gguf file, 'smollm2', or a training
workdir (config.model.step picks its checkpoint, -1 = latest); empty with config.model.init builds a tiny random
model (tests, demos). Prints a table and writes the results JSON atomically to --out (default
<workdir>/eval/<name>_step<N>.json for a workdir, else runs/eval_<name>/eval_results.json; name: config.name or
the recipe's file name without "eval_"); a file already there is kept as <file>.<k>.old.

Problems are sampled and scored eval.chunk_size at a time (0: a few batches' worth), each chunk's rows appended
to <results>.rows.jsonl as it is scored, and a line logged; the file goes once the results JSON is written. A run
stopped part way (Ctrl-C, preemption, a crash) is resumed by the same command from the chunks written there (with
eval.resume, the default; other settings are refused, naming them; eval.k_values, max_batch_size, chunk_size,
env.num_workers and the mesh may change); eval.resume=False sets the file aside and starts over.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxrl_llm import distributed, models, parallel, train
from jaxrl_llm.checkpoint import Checkpointer, orbax_info_quiet
from jaxrl_llm.cli import exit_if_job_crashed, exit_with_error, parse_flags
from jaxrl_llm.data.sources import describe_source
from jaxrl_llm.data.tasks import load_tasks
from jaxrl_llm.data.vocab import check_ids_fit
from jaxrl_llm.environments import is_multi_turn, make_environment
from jaxrl_llm.evaluation import Chunk, evaluate_tasks, scalar_metrics
from jaxrl_llm.metrics import quiet_libraries
from jaxrl_llm.sampling.generate import PromptLengthError
from jaxrl_llm.sampling.request import SamplingParams
from jaxrl_llm.sampling.text import encode_inputs
from jaxrl_llm.workdir import MODEL_CONFIG_FILE, read_model_config, set_aside

log = logging.getLogger("jaxrl_llm.evaluate")
ConfigError = train.ConfigError
RESULTS_FILE = "eval_results.json"


def is_workdir(path: str) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))


def restore_workdir(workdir: str, step: int | None, mesh, rules, dtype: Any = None
                    ) -> tuple[models.ModelConfig, dict, int]:
    """(cfg, params, step) of checkpoint `step` (latest when None) of a training run, laid out on `mesh`, its
    parameters in `dtype` (model.dtype; None: as the run kept them)."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    saved = read_model_config(workdir)
    cfg = models.config_from_hf(saved["hf_config"], where=path)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          models.abstract_params(cfg, dtype or saved.get("param_dtype", "float32")),
                          models.param_shardings(cfg, mesh, rules))
    with orbax_info_quiet():  # (evaluate.run from a notebook logging at INFO)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=0, keep=1, read_only=True)
        try:
            items, _, step = ckpt.restore({"params": target}, step)
        finally:
            ckpt.close()
    return cfg, items["params"], step


# The keys an evaluation recipe must set (the rest have defaults): found by running eval_tiny without each key.
REQUIRED_KEYS = ("seed", "tokenizer", "model.path", "model.init", "model.step", "model.dtype", "model.compute_dtype",
                 "model.attention_impl", "model.remat", "data.source", "data.num", "data.seed", "data.shuffle",
                 "data.options", "data.system_prompt", "data.instruction", "eval.n_samples", "eval.k_values",
                 "eval.max_batch_size", "eval.max_prompt_len", "eval.truncate_prompts", "eval.correct_threshold",
                 "eval.keep_completions", "mesh.data", "mesh.fsdp", "mesh.tensor")


def validate(config: ml_collections.ConfigDict) -> SamplingParams:
    """User errors before any heavy work, each naming the config key; returns the sampling parameters."""
    if "algorithm" in config:
        raise ConfigError(f"this is a training recipe (algorithm={config.algorithm!r}): python -m jaxrl_llm.evaluate "
                          "takes an evaluation recipe (configs/eval_*.py; its model.path may be the training workdir, "
                          "model.step a checkpoint); GRPO validates during training with val_every > 0")
    missing = [k for k in ("model", "data", "env", "eval", "sampling", "mesh") if k not in config]
    if missing:
        raise ConfigError(f"the config has no {', '.join(repr(k) for k in missing)} block: an evaluation recipe has "
                          "model, data, env, eval, sampling and mesh (see configs/eval_tiny.py)")
    missing = [k for k in REQUIRED_KEYS if not train.has_key(config, k)]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(missing)}: every evaluation needs "
                          f"{'it' if len(missing) == 1 else 'them'} (configs/eval_tiny.py sets every key with its "
                          "default)")
    mc = config.model
    if not mc.path and not mc.init:
        raise ConfigError("model.path is empty and model.init is not set: name a model folder/.gguf/workdir, "
                          "'smollm2' or a tiny init")
    if mc.path and mc.path != "smollm2" and not os.path.exists(mc.path):
        raise ConfigError(f"model.path={mc.path!r}: no such file or folder")
    if mc.step != -1 and not is_workdir(mc.path):
        raise ConfigError(f"model.step={mc.step}: only a training workdir (with {MODEL_CONFIG_FILE}) has steps")
    train.check_model_head(mc.path, needs_scores=False)
    train.check_model_settings(mc)
    ec = config.eval
    if ec.n_samples < 1:
        raise ConfigError(f"eval.n_samples={ec.n_samples}: must be >= 1")
    bad = [k for k in ec.k_values if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ec.n_samples]
    if bad:
        raise ConfigError(f"eval.k_values={tuple(ec.k_values)}: each k must be an integer in [1, eval.n_samples="
                          f"{ec.n_samples}]")
    for key in ("max_batch_size", "max_prompt_len"):
        if ec[key] < 0:
            raise ConfigError(f"eval.{key}={ec[key]}: must be >= 0 (0 = no limit / the default)")
    chunk = ec.get("chunk_size", 0)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise ConfigError(f"eval.chunk_size={chunk!r}: must be an integer >= 0 (problems per chunk; 0 = auto)")
    if not isinstance(ec.get("resume", True), bool):
        raise ConfigError(f"eval.resume={ec.resume!r}: must be True or False")
    try:
        sp = SamplingParams(**config.sampling.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sampling: {e}") from e
    if config.data.num == 0 or config.data.num < -1:
        raise ConfigError(f"data.num={config.data.num}: must be >= 1, or -1 for all")
    for key, seed in (("seed", config.get("seed", 0)), ("data.seed", config.data.get("seed", 0))):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"{key}={seed!r}: must be an integer in [0, 2**32)")
    if sp.temperature == 0 and ec.n_samples > 1:
        log.warning("sampling.temperature=0 samples greedily: the eval.n_samples=%d samples of a problem are the same "
                    "(pass@k and maj@k are pass@1; each problem is sampled once)", ec.n_samples)
    parallel.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    return sp


def make_env(spec: ml_collections.ConfigDict):
    try:
        return make_environment(spec.to_dict())
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"env: {e}") from e


def run(config: ml_collections.ConfigDict, out: str | None = None, name: str | None = None, *,
        data: Any = None) -> dict[str, Any]:
    """Evaluate per the recipe; writes the results JSON (on process 0) and returns the result dict.
    name: of the results (their file, when `out` is None); default the recipe's `name`, else "eval".
    data: a `datasets.Dataset` of tasks (from a notebook) instead of data.source."""
    name = name or config.get("name") or "eval"
    config = train.with_datasets(config, data=data)
    distributed.initialize(graceful_sigterm=False)  # nothing to save: TERM ends it
    sp = validate(config)
    mc, dc, ec = config.model, config.data, config.eval
    workdir = mc.path if is_workdir(mc.path) else ""
    if jax.process_index() == 0:  # (the one that writes)
        check_out(out, os.path.join(workdir, "eval") if workdir else os.path.join("runs", f"eval_{name}"))
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = parallel.ShardingRules()
    own = os.path.join(workdir, "tokenizer") if workdir else mc.path
    tok_path = config.tokenizer or own
    tokenizer = train.load_run_tokenizer(config, own)
    tasks = load_tasks(dc.source, dc.num, dc.seed, system_prompt=dc.system_prompt or None,
                       instruction=dc.instruction, shuffle=dc.shuffle, **dc.options.to_dict())
    try:  # each process takes its rows from its own copy of the tasks
        distributed.check_same_everywhere(f"data.source={describe_source(dc.source)!r} (prompts)",
                                          [t.messages for t in tasks], len(tasks))
    except ValueError as e:
        raise train.DataError(str(e)) from None
    env = make_env(config.env)
    train.check_env_scores_tasks(env, config.env.name, dc.source, tasks)
    if is_multi_turn(env):
        log.warning("env.name=%r plays episodes of several turns; evaluation scores each sample's first answer "
                    "only (its score(); multi-turn episodes are played in GRPO training)", config.env.name)
    model_info: dict[str, Any] = {"path": mc.path or "init", "tokenizer": tok_path}
    if workdir:
        cfg, params, step = restore_workdir(workdir, None if mc.step == -1 else mc.step, mesh, rules, mc.dtype)
        cfg = dataclasses.replace(cfg, compute_dtype=mc.compute_dtype, attention_impl=mc.attention_impl)
        model_info["step"] = step
        log.info("evaluating step %d of %s", step, workdir)
    else:
        cfg, params = train.build_model(config, len(tokenizer), mesh, rules)
    if len(tokenizer) > cfg.vocab_size:
        check_ids_fit(encode_inputs(tokenizer, [list(t.messages) for t in tasks], label="task"), cfg.vocab_size,
                      tokenizer, "task")
    log.info("%d tasks from %s, %d sample(s) each", len(tasks), describe_source(dc.source), ec.n_samples)
    if out is None:
        out = (os.path.join(workdir, "eval", f"{name}_step{model_info['step']}.json") if workdir else
               os.path.join("runs", f"eval_{name}", RESULTS_FILE))
    journal = Journal(journal_path(out), resumed_settings(config, model_info, tasks))
    try:
        done = resume_chunks(journal, ec.get("resume", True))
        result = evaluate_tasks(
            cfg, params, tokenizer, tasks, env, n_samples=ec.n_samples, k_values=tuple(ec.k_values),
            sampling_params=sp, rng=jax.random.key(config.seed), mesh=mesh, rules=rules,
            max_batch_size=ec.max_batch_size or None, max_prompt_len=ec.max_prompt_len or None,
            truncate_prompts=ec.truncate_prompts, correct_threshold=ec.correct_threshold,
            keep_completions=ec.keep_completions, chunk_size=chunk_problems(ec, sp), done=done,
            on_chunk=journal.append if jax.process_index() == 0 else None)
    except PromptLengthError as e:
        hint = ("lower sampling.max_new_tokens" if "leaves no room for a prompt" in str(e) else
                "--config.eval.truncate_prompts=True keeps each prompt's last tokens")
        raise ConfigError(f"{e} (settings: eval.max_prompt_len={ec.max_prompt_len}, eval.truncate_prompts="
                          f"{ec.truncate_prompts}, sampling.max_new_tokens={sp.max_new_tokens}; {hint})") from e
    except BaseException:
        if journal.problems:
            log.warning("evaluation stopped: the %d problems done are kept in %s; the same command resumes from "
                        "them", journal.problems, journal.path)
        raise
    finally:
        journal.close()
        if hasattr(env, "close"):
            env.close()
    if jax.process_index() == 0:
        if os.path.exists(out):
            log.warning("%s held earlier results: moved to %s", out, set_aside(out))
        print(format_table(name, result), flush=True)  # before the log line naming the file, when piped
        doc = {"name": name, "model": model_info, "source": describe_source(dc.source),
               "metrics": scalar_metrics(result),
               "env_counts": result["env_counts"], "config": recorded_config(config),
               **({"per_source": result["per_source"]} if "per_source" in result else {}),
               "problems": result["problems"]}
        write_json_atomic(out, doc)
        journal.remove()  # every row is in the results file now
        log.info("wrote %s", out)
    return result


def chunk_problems(ec: ml_collections.ConfigDict, sp: SamplingParams) -> int:
    """Problems sampled and scored per chunk (each chunk's rows are written down before the next): eval.chunk_size,
    or 0 (auto): the problems whose rows make 256 rows rounded down to whole eval.max_batch_size chunks (at least
    one chunk), or 1024 rows when max_batch_size is 0. Greedy sampling takes one row per problem."""
    if ec.get("chunk_size", 0):
        return ec.chunk_size
    mbs = ec.max_batch_size
    rows = max(mbs, 256) // mbs * mbs if mbs else 1024
    return max(1, rows // (1 if sp.temperature == 0 else ec.n_samples))


# Keys that change how rows are batched or scored, or what is computed from them, and not the rows: an interrupted run
# resumed with other values of them goes on from its rows (eval.max_batch_size: lowered after running out of memory;
# env.num_workers: how many scoring processes share a chunk).
RESUME_FREE_KEYS = ("name", "eval.k_values", "eval.max_batch_size", "eval.chunk_size", "eval.resume", "mesh",
                    "env.num_workers")


def resumed_settings(config: ml_collections.ConfigDict, model_info: dict[str, Any], tasks: list) -> dict[str, Any]:
    """What an interrupted run's rows depend on, flat ("sampling.temperature": 0.7; JSON values): its rows are
    resumed only when every one is the same."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            key = f"{prefix}{k}"
            if any(key == f or key.startswith(f + ".") for f in RESUME_FREE_KEYS):
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                flat[key] = v

    walk(recorded_config(config), "")
    walk({"model": model_info}, "resolved.")
    flat["tasks"] = distributed.digest([[t.messages, t.metadata] for t in tasks])
    return json.loads(json.dumps(flat, default=functools.partial(distributed.json_default, strict=False)))


def resume_chunks(journal: Journal, resume: bool) -> list[Chunk]:
    """The chunks of an unfinished run with the same settings, read by process 0 and handed to every process (each
    skips the same problems); a ConfigError on every process when they cannot be resumed."""
    if jax.process_count() == 1:
        return journal.open(resume)
    mine: Any = None
    if jax.process_index() == 0:
        try:
            mine = [[c.problems, c.counts] for c in journal.open(resume)]
        except ConfigError as e:
            mine = str(e)
    shared = distributed.allgather_json(mine)[0]
    if isinstance(shared, str):
        raise ConfigError(shared)
    return [Chunk(p, c) for p, c in shared]


_HEADER = b'{"eval_rows": 1, "settings": '  # how a rows file begins (`Journal._write`)


class Journal:
    """An evaluation's rows as they are scored, so that an interrupted run loses at most the chunk in progress:
    <results>.rows.jsonl holds a header line (the settings), then per chunk one line per problem (its record) and
    a line {"chunk_end": <problems>, "env_counts": {...}}, flushed and synced. Removed once the results file is
    written; a run that finds one with the same settings resumes from its whole chunks."""

    def __init__(self, path: str, settings: dict[str, Any]) -> None:
        self.path, self.settings, self.problems = path, settings, 0
        self._f: Any = None

    def open(self, resume: bool) -> list[Chunk]:
        """The chunks done before (none when there is no file; with resume=False it is set aside). ConfigError when
        it was written with other settings."""
        if not os.path.exists(self.path):
            return []
        if not resume:
            log.warning("eval.resume=False: the rows of an earlier, unfinished run in %s were moved to %s",
                        self.path, set_aside(self.path))
            return []
        theirs, done, end = self._read()
        if not done:  # stopped before its first chunk was scored: nothing to resume
            os.remove(self.path)
            return []
        if theirs != self.settings:
            diff = sorted(k for k in {*theirs, *self.settings} if theirs.get(k) != self.settings.get(k))
            shown = ", ".join(f"{k}: {theirs.get(k)!r} there, {self.settings.get(k)!r} now" for k in diff[:3])
            raise ConfigError(f"{self.path} holds the rows of an unfinished evaluation with other settings ({shown}"
                              f"{', ...' if len(diff) > 3 else ''}): rerun with its settings to finish it, or "
                              "--config.eval.resume=False to set it aside and start over")
        with open(self.path, "r+b") as f:  # drop a chunk cut short (its problems run again)
            f.truncate(end)
        self.problems = sum(len(c.problems) for c in done)
        log.info("resuming the unfinished evaluation in %s", self.path)
        return done

    def _read(self) -> tuple[dict[str, Any], list[Chunk], int]:
        """(its settings, its whole chunks, the offset where the last one ends). A line is whole once its newline is
        written: a last line without one was cut short, even where it parses (a chunk's end written but not its
        newline: truncating after it would extend the file by a byte, and the next chunk's rows would join it)."""
        with open(self.path, "rb") as f:
            lines = f.read().split(b"\n")
        if len(lines) == 1 and (lines[0].startswith(_HEADER) or _HEADER.startswith(lines[0])):
            return {}, [], 0  # stopped before its header line was written whole: nothing to resume
        lines[-1] = b""  # (what follows the last newline: nothing, or a line cut short)
        try:
            theirs = json.loads(lines[0])["settings"]
            assert isinstance(theirs, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ConfigError(f"{self.path}: not an evaluation's rows file (its first line is no header); move it "
                              "away or set --config.eval.resume=False") from None
        done: list[Chunk] = []
        pending: list[dict[str, Any]] = []
        end = pos = len(lines[0]) + 1
        for i, line in enumerate(lines[1:], 2):
            pos += len(line) + 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                if i >= len(lines) - 1:  # (lines[-1], after the last newline, was blanked above)
                    break  # the last whole line, damaged by the interruption (NULs after a crash)
                raise ConfigError(f"{self.path}: line {i} is not JSON; move the file away or set "
                                  "--config.eval.resume=False") from None
            if "chunk_end" in row:
                if row["chunk_end"] == len(pending):
                    done.append(Chunk(pending, {k: int(v) for k, v in row.get("env_counts", {}).items()}))
                    end = pos
                pending = []
            else:
                pending.append(row)
        return theirs, done, end

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self._f is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            new = not os.path.exists(self.path)
            self._f = open(self.path, "a")
            if new:
                rows = [{"eval_rows": 1, "settings": self.settings}, *rows]
        dump = functools.partial(json.dumps, default=functools.partial(distributed.json_default, strict=False))
        self._f.write("".join(dump(r) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def append(self, chunk: Chunk) -> None:
        self._write([*chunk.problems, {"chunk_end": len(chunk.problems), "env_counts": chunk.counts}])
        self.problems += len(chunk.problems)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def remove(self) -> None:
        self.close()
        if os.path.exists(self.path):
            os.remove(self.path)


def journal_path(out: str) -> str:
    """Where the rows of the evaluation whose results go to `out` are written as they are scored."""
    root, ext = os.path.splitext(out)
    return (root if ext == ".json" else out) + ".rows.jsonl"


def format_table(name: str, result: dict[str, Any]) -> str:
    at_k = lambda prefix: sorted((k for k in result if k.startswith(prefix)), key=lambda k: int(k.split("@")[1]))
    keys = at_k("pass@") + at_k("maj@") + [
        "reward_mean", "num_problems", "n_samples", "mean_length", "truncation_rate", "timeouts", "errors",
        "truncated_prompts", "generate_seconds", "tokens_per_second"]
    width = max(len(k) for k in keys)
    lines = [f"eval {name}", "-" * (width + 14)]
    for k in keys:
        v = result[k]
        lines.append(f"{k:<{width}}  {v:>12.4f}" if isinstance(v, float) else f"{k:<{width}}  {v:>12}")
    for src, m in result.get("per_source", {}).items():  # a mixed source: each part's own
        lines.append(f"{src} ({m['num_problems']} problems): " + ", ".join(
            f"{k} {m[k]:.4f}" for k in at_k("pass@") + at_k("maj@")))
    return "\n".join(lines)


def recorded_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The recipe as the results JSON records it (a Dataset passed in as data.source: by rows and fingerprint)."""
    doc = config.to_dict()
    doc["data"]["source"] = describe_source(config.data.source)
    return doc


def write_json_atomic(path: str, doc: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, default=functools.partial(distributed.json_default, strict=False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_out(out: str | None, default_folder: str = "") -> None:
    """--out must name a file in a folder this process can write (the folder is created): checked before any work,
    so results are never lost to it. out None: the results go to `default_folder`, checked alike."""
    if out is not None and os.path.isdir(out):
        raise ConfigError(f"--out {out!r} is a folder; name the results file, e.g. {os.path.join(out, RESULTS_FILE)}")
    folder = os.path.dirname(os.path.abspath(out)) if out is not None else os.path.abspath(default_folder)
    what = f"--out {out!r}" if out is not None else f"the results folder {folder!r} (--out names another place)"
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} cannot be written: {e.strerror or e} ({e.filename or folder})") from None


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when run as a program (importing `run` defines none)."""
    config_flags.DEFINE_config_file("config", None, "Eval recipe file (configs/eval_*.py) with get_config().",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "Results JSON (default <workdir>/eval/<name>_step<N>.json for a training "
                                     "workdir, else runs/eval_<name>/eval_results.json); a file already there is "
                                     "kept as <file>.<k>.old.")
    distributed.define_flags()


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if FLAGS.config is None:
        sys.exit("error: --config is required (e.g. --config configs/eval_gsm8k.py)")
    recipe = os.path.splitext(os.path.basename(config_flags.get_config_filename(FLAGS["config"])))[0]
    name = FLAGS.config.get("name") or recipe.removeprefix("eval_")
    try:
        distributed.initialize_from_flags(graceful_sigterm=False)
        run(FLAGS.config, FLAGS.out, name)
    except train.USER_ERRORS as e:
        exit_with_error(f"error: {e}")
    except BaseException as e:
        exit_if_job_crashed(e)
        raise


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
