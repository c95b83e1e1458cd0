"""Readers (export, evaluate) of a workdir a training run is still writing: the run's keep-last-K deletes old
steps while a reader lists or reads them. The reader must never write into checkpoints/, and a step deleted under
it must be said as such (or the next latest read), not called damaged."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """checkpoints/ with steps 1, 2, 3 and an unfinished save of step 4 (its Orbax temp folder)."""
    import jax.numpy as jnp

    from jaxrl_llm.checkpoint import Checkpointer

    d = str(tmp_path_factory.mktemp("live") / "checkpoints")
    ck = Checkpointer(d, every_steps=1, keep=3, async_save=False)
    for step in (1, 2, 3):
        ck.maybe_save(step, {"params": {"w": jnp.full((8,), float(step))}}, {"step": step})
    ck.close()
    shutil.copytree(os.path.join(d, "3"), os.path.join(d, "4.orbax-checkpoint-tmp"))
    return d


def _reader(d: str):
    """The checkpointer export.export_checkpoint and evaluate.restore_workdir open (keep in step with them)."""
    from jaxrl_llm.checkpoint import Checkpointer

    return Checkpointer(d, every_steps=0, keep=1, read_only=True)


def _copy(folder, tmp_path) -> str:
    d = str(tmp_path / "checkpoints")
    shutil.copytree(folder, d)
    return d


def _tree(d: str) -> list[tuple[str, int, int]]:
    return sorted((os.path.relpath(os.path.join(r, x), d), os.stat(os.path.join(r, x)).st_size,
                   os.stat(os.path.join(r, x)).st_mtime_ns) for r, ds, fs in os.walk(d) for x in ds + fs)


def _target():
    import jax.numpy as jnp

    return {"params": {"w": jnp.zeros((8,))}}


def test_a_reader_changes_nothing_in_the_folder(folder, tmp_path):
    """keep=1 on the reading side must not prune steps 1-2, nor remove step 4's temp folder (the run's save)."""
    d = _copy(folder, tmp_path)
    before = _tree(d)
    ck = _reader(d)
    items, meta, step = ck.restore(_target())
    assert step == 3 and meta["step"] == 3 and float(items["params"]["w"][0]) == 3.0
    ck.close()
    assert _tree(d) == before


def test_an_export_of_a_run_without_checkpoints_yet_writes_nothing_into_its_workdir(tmp_path):
    """A run before its first checkpoint: export says so and must not create <workdir>/checkpoints."""

    d = str(tmp_path / "checkpoints")
    ck = _reader(d)
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        ck.restore(_target())
    ck.close()
    assert not os.path.exists(d)  # a reader's manager creates nothing


def test_the_latest_step_deleted_between_listing_and_reading(folder, tmp_path, caplog):
    """The run's keep-last-K deletes the step a reader just picked: the latest is read again (here step 2), not
    called damaged."""
    d = _copy(folder, tmp_path)
    ck = _reader(d)
    assert ck.latest_step() == 3
    shutil.rmtree(os.path.join(d, "3"))  # the run rotates it out
    try:
        with caplog.at_level("WARNING", logger="jaxrl_llm.checkpoint"):
            items, _, step = ck.restore(_target())
    finally:
        ck.close()
    assert step == 2 and float(items["params"]["w"][0]) == 2.0
    assert f"{d}/3: deleted while it was being read" in caplog.text and "reading the latest step again" in caplog.text


def test_a_named_step_deleted_while_read_is_said_and_a_damaged_one_is_still_damaged(folder, tmp_path, monkeypatch):
    from jaxrl_llm import checkpoint
    from jaxrl_llm.models import CheckpointError

    monkeypatch.setattr(checkpoint, "GONE_WAIT_S", 0.2)
    d = _copy(folder, tmp_path)
    ck = _reader(d)
    shutil.rmtree(os.path.join(d, "2"))
    try:
        with pytest.raises(FileNotFoundError, match=r"/2: deleted while it was being read \(the training run .*; "
                                                    r"have \[1, 3\]$"):
            ck.restore(_target(), step=2)
        for f in os.listdir(os.path.join(d, "1", "params")):  # still there, but broken: damaged, as before
            if not f.startswith("_"):
                shutil.rmtree(os.path.join(d, "1", "params", f), ignore_errors=True)
        with pytest.raises(CheckpointError, match=r"/1: cannot restore \['params'\] .*the checkpoint is damaged"):
            ck.restore(_target(), step=1)
    finally:
        ck.close()


def test_a_step_deleted_while_the_reader_opens_the_folder(folder, tmp_path, monkeypatch):
    """The run deletes a step after Orbax listed the folder and before it stat()s the step: the reader
    must still open (the step is simply gone), not fail with a bare '[Errno 2] ... checkpoints/1'."""
    from orbax.checkpoint._src.path import step as step_lib

    d = _copy(folder, tmp_path)
    orig = step_lib.standard_name_format

    def listing_then_rotation(*a, **k):
        fmt = orig(*a, **k)
        find_all = fmt.find_all

        def find_all_then_delete(base):
            found = list(find_all(base))
            shutil.rmtree(os.path.join(d, "1"), ignore_errors=True)
            return found

        object.__setattr__(fmt, "find_all", find_all_then_delete)
        return fmt

    monkeypatch.setattr(step_lib, "standard_name_format", listing_then_rotation)
    ck = _reader(d)
    try:
        _, _, step = ck.restore(_target())
        assert step == 3
    finally:
        ck.close()


def test_a_step_that_is_not_kept_is_named(folder, tmp_path):

    ck = _reader(_copy(folder, tmp_path))
    try:
        with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 4; have \[1, 2, 3\]"):
            ck.restore(_target(), step=4)  # only its temp folder exists: not listed, not read
    finally:
        ck.close()


def test_export_and_evaluate_read_without_writing(tmp_path):
    """Both readers open the checkpoints read-only: a run before its first checkpoint gets no checkpoints/ folder
    from them, only the error."""
    import json

    from jaxrl_llm import models, parallel
    from jaxrl_llm.evaluate import restore_workdir
    from jaxrl_llm.export import export_checkpoint

    cfg = models.ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=1,
                             num_heads=4, num_kv_heads=2, head_dim=8)
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "model_config.json").write_text(json.dumps({"hf_config": models.config_to_hf(cfg)}))
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        export_checkpoint(str(wd), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore"):
        restore_workdir(str(wd), None, parallel.make_mesh(1, -1, 1), parallel.ShardingRules())
    assert sorted(os.listdir(wd)) == ["model_config.json"] and not os.path.exists(tmp_path / "out")
