"""A disk that fills, a save that fails, a Ctrl-C, an export killed half way: each ends the run with one line
naming what failed and what is left to resume from, leaves no stray folders, and never hangs the run.
(Reproduced by hand on small tmpfs mounts; here in-process, with /dev/full's ENOSPC and failures injected where
Orbax would raise them.)"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading

import jax.numpy as jnp
import pytest
from tb_events import read_events

from jaxrl_llm import cli, export, train
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.metrics import MetricsWriter
from jaxrl_llm.models import CheckpointError
from jaxrl_llm.models.staging import remove_leftovers, staging_folder
from jaxrl_llm.workdir import close_all, replace_folder


def test_tensorboard_events_are_written_and_a_resume_purges_later_steps(tmp_path):
    w = MetricsWriter(str(tmp_path), 10, start_step=4, console_keys=())
    w.write(5, {"loss": 1.5, "lr": 0.1, "note": "text"})
    w.write(6, {"loss": 1.25})
    w.close()
    (name,) = os.listdir(tmp_path / "tensorboard")
    events = read_events(tmp_path / "tensorboard" / name)
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, e.session_log.status) for e in events if e.HasField("session_log")] == [(5, 1)]  # START at 5
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert scalars == [(5, "loss", 1.5), (5, "lr", pytest.approx(0.1)), (6, "loss", 1.25)]
    assert all(e.wall_time > 0 for e in events)


def _in_thread(fn, timeout=20.0):
    """fn() in a thread: (returned or raised); a fn still running after `timeout` s is a hang."""
    out: list = []

    def call():
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001
            out.append(("raised", e))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} still running after {timeout} s: hung"
    return out[0]


def test_a_full_disk_under_tensorboard_is_an_error_naming_the_file_not_a_hang(tmp_path):
    """tensorboardX's SummaryWriter wrote from a thread of its own: on ENOSPC that thread died, its queue of 10
    events filled, and the next add_scalar blocked forever, a run hung with no error that SIGTERM could not stop
    at a step."""
    w = MetricsWriter(str(tmp_path), 100, console_keys=())
    w.write(1, {"loss": 1.0})
    w._tb._f.close()
    w._tb._f = open("/dev/full", "wb")  # every write from now on: ENOSPC

    def log_steps():
        for step in range(2, 40):
            w.write(step, {f"m{i}": float(i) for i in range(8)})

    kind, e = _in_thread(log_steps)
    assert kind == "raised" and isinstance(e, OSError) and e.errno == errno.ENOSPC, e
    assert e.filename == w._tb.path and "TensorBoard" in str(e)
    w._tb._f = open(tmp_path / "sink", "wb")  # room again, for close()
    w.close()


def test_a_full_disk_under_metrics_jsonl_names_the_file_and_step(tmp_path):
    w = MetricsWriter(str(tmp_path), 10, tensorboard=False, console_keys=())
    w.path = "/dev/full"
    with pytest.raises(OSError) as e:
        w.write(3, {"loss": 1.0})
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/dev/full" and "step 3" in str(e.value)


def test_replace_folder_leaves_nothing_behind(tmp_path):
    target = tmp_path / "tokenizer"
    (tmp_path / "tokenizer.tmp-999999").mkdir()  # a killed run's (the workdir is this run's now)
    (tmp_path / "tokenizer.old-999998").mkdir()
    (tmp_path / "tokenizer.keep").mkdir()

    def failing(path):
        os.makedirs(path)
        open(os.path.join(path, "tokenizer.json"), "w").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        replace_folder(str(target), failing)
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.keep"]
    replace_folder(str(target), lambda path: os.makedirs(path))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer", "tokenizer.keep"]


def test_close_all_closes_everything_and_raises_the_first_error():
    closed = []

    def fail(tag):
        def close():
            closed.append(tag)
            raise OSError(errno.ENOSPC, f"disk full in {tag}")
        return close

    with pytest.raises(OSError, match="disk full in ckpt"):
        close_all(lambda: closed.append("stop"), fail("ckpt"), None, fail("writer"), lambda: closed.append("env"))
    assert closed == ["stop", "ckpt", "writer", "env"]


def _ckpt(tmp_path, async_save=False) -> Checkpointer:
    return Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=3, async_save=async_save)


ITEMS = {"params": {"w": jnp.ones((4,))}}


def test_a_failed_save_names_the_step_and_the_last_complete_checkpoint(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path)
    assert ckpt.maybe_save(1, ITEMS, {"step": 1})
    ckpt.wait()

    def full(*a, **k):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "params/w" in OCDBT: No space left on device')

    monkeypatch.setattr(ckpt._mngr, "save", full)
    with pytest.raises(CheckpointError) as e:
        ckpt.maybe_save(2, ITEMS, {"step": 2})
    msg = str(e.value)
    assert msg.startswith(f"{ckpt.directory}/2: the checkpoint could not be saved (ValueError: RESOURCE_EXHAUSTED")
    assert "the last complete checkpoint is step 1: the same command resumes from it" in msg and "\n" not in msg
    monkeypatch.undo()
    ckpt.close()


def test_an_asynchronous_save_that_failed_is_said_as_its_own_step(tmp_path, monkeypatch):
    """Orbax raises an async save's failure when the next save starts (or at the wait): the error names the step
    that failed, not the one being started."""
    ckpt = _ckpt(tmp_path, async_save=True)
    assert ckpt.maybe_save(1, ITEMS, {"step": 1})
    ckpt.wait()
    assert ckpt.maybe_save(2, ITEMS, {"step": 2})
    real_wait, calls = ckpt._mngr.wait_until_finished, []

    def failed_in_background():
        real_wait()
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Exception in thread: OSError: [Errno 28] No space left on device")

    monkeypatch.setattr(ckpt._mngr, "wait_until_finished", failed_in_background)
    with pytest.raises(CheckpointError, match=r"/2: the checkpoint could not be saved \(RuntimeError: .*step 2:"):
        ckpt.maybe_save(3, ITEMS, {"step": 3})
    ckpt.close()  # nothing pending: closes quietly


def test_a_save_into_a_folder_that_went_away_is_one_line(tmp_path):
    """A real Orbax failure: checkpoints/ replaced by a file under the run (a vanished or broken mount)."""
    ckpt = _ckpt(tmp_path)
    assert ckpt.maybe_save(1, ITEMS, {"step": 1})
    ckpt.wait()
    os.rename(ckpt.directory, str(tmp_path / "moved"))
    open(ckpt.directory, "w").close()
    with pytest.raises(CheckpointError, match=r"/2: the checkpoint could not be saved .*no complete checkpoint"):
        ckpt.maybe_save(2, ITEMS, {"step": 2})
    ckpt.close()


def test_main_says_a_full_disk_and_a_ctrl_c_in_one_line(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()
    monkeypatch.setattr(train.distributed, "initialize_from_flags", lambda: None)
    monkeypatch.setattr(train, "FLAGS", type("F", (), {"config": object(), "workdir": str(workdir),
                                                       "__getitem__": lambda self, k: None})())
    monkeypatch.setattr(train.config_flags, "get_config_filename", lambda _: "configs/sft_tiny.py")

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    def stop_with(e):
        def run(config, wd):
            raise e
        monkeypatch.setattr(train, "run", run)

    stop_with(OSError(errno.ENOSPC, "No space left on device (writing step 5's metrics)", "W/metrics.jsonl"))
    with pytest.raises(SystemExit) as e:
        train.main([])
    assert e.value.code == ("error: [Errno 28] No space left on device (writing step 5's metrics): "
                            "'W/metrics.jsonl'; the same command resumes from step 4, the last complete checkpoint "
                            f"in {workdir}/checkpoints")
    monkeypatch.setattr(os, "_exit", fake_exit)
    stop_with(KeyboardInterrupt())
    with pytest.raises(Exited) as e:
        train.main([])
    assert e.value.args == (130,)
    err = capsys.readouterr().err.strip()
    assert err == ("interrupted during start-up; the same command resumes from step 4, the last complete checkpoint "
                   f"in {workdir}/checkpoints")
    stop_with(OSError(errno.ECONNRESET, "a bug, not the disk"))
    with pytest.raises(OSError, match="a bug"):  # other OSErrors keep their traceback
        train.main([])


def test_where_a_ctrl_c_landed_names_the_library_frame():
    from jaxrl_llm.data import bulk

    def main():  # the frame that catches it, as train.main
        try:
            bulk.Progress(1, clock=lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
        except KeyboardInterrupt as e:
            return cli.where_interrupted(e.__traceback__)

    where = main()
    assert where.startswith("in __init__ (jaxrl_llm/data/bulk.py:"), where


def test_export_refuses_the_runs_own_folders_and_says_a_full_disk(tmp_path, monkeypatch):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "model_config.json").write_text(json.dumps({}))
    for inside in ("checkpoints", "checkpoints/99", "tokenizer/x", "tensorboard"):
        with pytest.raises(FileExistsError, match=f"inside the workdir's {inside.split('/')[0]}/"):
            export.export_checkpoint(str(wd), str(wd / inside))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_checkpoint", full)
    monkeypatch.setattr(export, "FLAGS", type("F", (), {"workdir": str(wd), "out": "/x/hf", "step": None,
                                                        "dtype": None})())
    with pytest.raises(SystemExit, match=r"^error: writing the export to /x/hf: \[Errno 28\] No space left"):
        export.main([])


def test_a_killed_exports_hidden_folders_are_removed_and_a_live_ones_kept(tmp_path):
    parent = str(tmp_path)
    os.makedirs(tmp_path / ".hf.tmp-dead1234" / "sub")
    (tmp_path / ".hf.tmp-dead1234" / "sub" / "model.safetensors").write_bytes(b"x" * 1000)
    os.makedirs(tmp_path / ".hf.old-dead5678")
    os.makedirs(tmp_path / ".hf2.tmp-other123")  # another export's name: not ours
    os.makedirs(tmp_path / "hf")
    with staging_folder(parent, "hf") as live:  # an export writing now (its lock held)
        assert os.path.basename(live).startswith(".hf.tmp-")
        fd = os.open(live, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        removed = remove_leftovers(parent, "hf")
        assert sorted(os.path.basename(p) for p in removed) == [".hf.old-dead5678", ".hf.tmp-dead1234"]
        assert sorted(os.listdir(parent)) == sorted([".hf2.tmp-other123", "hf", os.path.basename(live)])
    assert remove_leftovers(parent, "hf") == [live]  # once its writer is gone


# ------------------------------------------------------------------------------ found by a review of the above
def _steps_on_disk(workdir) -> list[int]:
    (name,) = os.listdir(os.path.join(workdir, "tensorboard"))
    return sorted({e.step for e in read_events(os.path.join(workdir, "tensorboard", name)) for _ in e.summary.value})


def test_tensorboard_scalars_reach_the_file_when_written(tmp_path):
    """Handed to the OS at each write (fsync only every 10 s): TensorBoard shows them at once and a SIGKILL keeps
    them, as tensorboardX's thread, which flushed within 10 s whatever the run did next."""
    w = MetricsWriter(str(tmp_path), 100, console_keys=())
    w.write(10, {"loss": 1.0})
    w.write(20, {"loss": 0.5})
    try:
        assert _steps_on_disk(tmp_path) == [10, 20]
    finally:
        w.close()


def test_a_tensorboard_close_that_fails_still_finishes_the_wandb_run(tmp_path):
    finished = []

    class Run:
        def log(self, *a, **k):
            pass

        def finish(self):
            finished.append(True)

    w = MetricsWriter(str(tmp_path), 100, console_keys=())
    w._wandb = Run()
    w.write(1, {"loss": 1.0})
    w._tb._f.close()
    w._tb._f = open("/dev/full", "wb")
    with pytest.raises(OSError):
        w.write(2, {"loss": 1.0})
    with pytest.raises(OSError):
        w.close()
    assert finished == [True]


def test_an_error_while_closing_does_not_replace_the_one_that_stopped_the_run(tmp_path, monkeypatch, caplog):
    """A run stopped by a NaN whose checkpoint close then fails (a full disk): the NaN is what the user is told;
    the close error is logged."""
    from recipes import SFT_ONE_STEP, recipe

    def nan(step, m, ckpt):
        raise FloatingPointError(f"step {step}: loss is nan (not finite)")

    def full(self):
        raise CheckpointError("checkpoints/1: the checkpoint could not be saved (No space left on device)")

    monkeypatch.setattr(train, "check_step_finite", nan)
    monkeypatch.setattr(Checkpointer, "close", full)
    with caplog.at_level("WARNING"), pytest.raises(FloatingPointError, match="step 1: loss is nan"):
        train.run(recipe("sft_tiny", SFT_ONE_STEP), str(tmp_path / "run"))
    assert "while closing after an error: CheckpointError: checkpoints/1: the checkpoint could not" in caplog.text
    with pytest.raises(OSError, match="disk full"):  # with no error before it, a closer's error is raised
        close_all(lambda: (_ for _ in ()).throw(OSError("disk full")))


def test_a_staging_folder_cannot_be_removed_before_its_writer_locks_it(tmp_path, monkeypatch):
    """Another export to the same --out running remove_leftovers between the folder's creation and its lock."""
    from jaxrl_llm.models import staging

    parent = str(tmp_path)
    real_lock, other = staging._try_lock, []

    def another_export_cleans_up_first(path):
        if not other:
            other.append(staging.remove_leftovers(parent, "hf"))
        return real_lock(path)

    monkeypatch.setattr(staging, "_try_lock", another_export_cleans_up_first)
    with staging.staging_folder(parent, "hf") as tmp:
        assert os.path.isdir(tmp) and other == [[]]
    os.makedirs(tmp_path / ".hf.old-backup")  # a user's own folder: not one mkdtemp names
    monkeypatch.setattr(staging, "_try_lock", real_lock)
    assert staging.remove_leftovers(parent, "hf") == [tmp]
    assert os.path.isdir(tmp_path / ".hf.old-backup")


def test_a_jsonl_file_with_cr_line_endings_reads_as_before(tmp_path):
    from jaxrl_llm.data.sources import read_jsonl

    path = tmp_path / "cr.jsonl"
    path.write_bytes(b'{"a": 1}\r{"a": 2}\r\n\r\n{"a": 3}\n')
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": 2}, {"a": 3}]
    path.write_bytes(b'{"a": 1}\r{"a": \r')
    with pytest.raises(Exception, match="line 2 is not valid JSON"):
        read_jsonl(str(path))


def test_a_bug_in_a_save_keeps_its_traceback(tmp_path, monkeypatch):
    ckpt = _ckpt(tmp_path)

    def bug(*a, **k):
        raise TypeError("Object of type set is not JSON serializable")

    monkeypatch.setattr(ckpt._mngr, "save", bug)
    with pytest.raises(TypeError, match="not JSON serializable"):
        ckpt.maybe_save(1, ITEMS, {"step": 1})
    monkeypatch.undo()
    ckpt.close()
