"""python -m jaxrl_llm.export --workdir DIR [--step N] --out DIR: an HF folder from any checkpoint of a run."""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags

from jaxrl_llm import models, parallel
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.cli import WRITE_ERRNOS
from jaxrl_llm.data.vocab import with_tokenizer_ids
from jaxrl_llm.metrics import quiet_libraries
from jaxrl_llm.models.hf_io import check_replaceable
from jaxrl_llm.workdir import read_model_config

FLAGS = flags.FLAGS
log = logging.getLogger("jaxrl_llm.export")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A training run's workdir (holds checkpoints/ and model_config.json).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
    flags.DEFINE_string("out", None, "Output HF folder: new, empty or an earlier export (which it replaces).")
    flags.DEFINE_string("dtype", None, "Export dtype (float32 | bfloat16 | float16); default: the run's parameter "
                                       "dtype.")


def export_checkpoint(workdir: str, out: str, step: int | None = None, dtype: str | None = None) -> str:
    """Restore the params of checkpoint `step` (latest when None) and write them as an HF folder."""
    path = os.path.join(workdir, "model_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: not a training workdir (no model_config.json)")
    real_out, real_wd = os.path.realpath(out), os.path.realpath(workdir)
    if real_out == real_wd or real_wd.startswith(real_out.rstrip(os.sep) + os.sep):
        raise FileExistsError(f"--out {out} is (or holds) the workdir {workdir}: the export would replace it; "
                              "name a folder of its own (e.g. WORKDIR/hf_export)")
    for own in ("checkpoints", "tokenizer", "tensorboard"):  # the run's own folders: an export there breaks it
        inside = os.path.join(real_wd, own)
        if real_out == inside or real_out.startswith(inside + os.sep):
            raise FileExistsError(f"--out {out} is inside the workdir's {own}/, which the run reads and writes; "
                                  "name a folder of its own (e.g. WORKDIR/hf_export)")
    if dtype is not None:  # before the restore (minutes for a large model)
        try:
            models.resolve_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"--dtype={dtype}: {e}") from None
    check_replaceable(os.path.abspath(out))  # before the restore; save_pretrained checks again before replacing
    saved = read_model_config(workdir)
    cfg = models.config_from_hf(saved["hf_config"], where=path)
    mesh = parallel.make_mesh(1, -1, 1)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          models.abstract_params(cfg, saved.get("param_dtype", "float32")),
                          models.param_shardings(cfg, mesh))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=0, keep=1, read_only=True)
    try:
        items, _, step = ckpt.restore({"params": target}, step)
    finally:
        ckpt.close()
    tok_dir = os.path.join(workdir, "tokenizer")
    tokenizer = models.load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    if tokenizer is not None:  # (a workdir written before the run's config took the tokenizer's ids)
        cfg = with_tokenizer_ids(cfg, tokenizer)
    log.info("exporting step %d of %s to %s", step, workdir, out)
    return models.save_pretrained(cfg, items["params"], out, tokenizer=tokenizer, dtype=dtype,
                                  generation_config=saved.get("generation_config"))


def main(argv) -> None:
    if argv[1:]:  # a mistyped flag is not dropped without a word
        sys.exit(f"error: unexpected argument(s) {argv[1:]}: flags are --workdir=DIR --out=DIR [--step=N] [--dtype=D]")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    if not FLAGS.workdir or not FLAGS.out:
        sys.exit("error: --workdir and --out are required")
    try:
        # (`--out=~/x`: the shell leaves a `~` after `=` as it is)
        export_checkpoint(os.path.expanduser(FLAGS.workdir), os.path.expanduser(FLAGS.out), FLAGS.step, FLAGS.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        sys.exit(f"error: writing the export to {FLAGS.out}: {e} (nothing was written there; an earlier export "
                 "there is left as it was)")


if __name__ == "__main__":
    define_flags()
    app.run(main)
