"""Review 32 (late): a resumed run's metrics window (checkpoint meta log_window) in a multi-process job."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxrl_llm import resume
from jaxrl_llm.checkpoint import Checkpointer
from jaxrl_llm.metrics import StepWindow


def test_the_resumed_window_is_read_without_orbax_restore_a_barrier_of_every_process(tmp_path, monkeypatch):
    """Process 0 alone restores the window; it read the meta with ckpt.read_meta, an Orbax restore that ends in a
    barrier of every process (sync_global_devices), met by process 0 only: a 2-process job resumed from a checkpoint
    between two rows (log_every=2, a checkpoint at step 3) failed at once (Gloo errors; "checkpoint 3 is damaged")."""
    ck = Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=2, async_save=False)
    before = StepWindow(rates={"tokens_per_s": "step_time_s"})
    before.add({"loss": 3.0, "tokens_per_s": 40.0, "step_time_s": 2.0})  # step 3, after row 2
    window = before.pending()
    ck.maybe_save(3, {"params": {"w": np.zeros(2, np.float32)}}, {"step": 3, "log_window": window})
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n")  # no row at step 3

    def collective(*a, **k):
        raise AssertionError("Checkpointer.restore: a barrier of every process, called by process 0 alone")

    monkeypatch.setattr(Checkpointer, "restore", collective)
    w = StepWindow(rates={"tokens_per_s": "step_time_s"})
    resume.resume_window(w, ck, str(tmp_path), 3)
    w.add({"loss": 4.0, "tokens_per_s": 10.0, "step_time_s": 2.0})
    assert w.take() == pytest.approx({"loss": 3.5, "tokens_per_s": 25.0, "step_time_s": 2.0})
    ck.close()
    assert os.path.isdir(tmp_path / "checkpoints" / "3")


# (program, tests): a correct program whose `global` is bound by a call that no guard sees return (it scored 0)
GLOBALS_BOUND_UNSEEN = {
    "a_method": ("n = 0\nclass Counter:\n    def inc(self):\n        global n\n        n += 1\n        return n\n",
                 "c = Counter()\nc.inc()\nc.inc()\nassert n == 2\n"),
    "a_generator": ("seen = 0\ndef gen(k):\n    global seen\n    for i in range(k):\n        seen += 1\n"
                    "        yield i\n",
                    "assert list(gen(3)) == [0, 1, 2]\nassert seen == 3\n"),
    "a_decorated_function": ("import functools\ncalls = 0\n@functools.lru_cache(None)\ndef f(x):\n    global calls\n"
                             "    calls += 1\n    return x\n", "f(1)\nf(1)\nf(2)\nassert calls == 2\n"),
}


@pytest.mark.parametrize("check_returns", [True, False])
@pytest.mark.parametrize("name", sorted(GLOBALS_BOUND_UNSEEN))
def test_assert_style_tests_see_a_global_bound_by_a_method_a_generator_or_a_decorated_function(name, check_returns):
    from jaxrl_llm.environments.code import Program, run_program

    code, tests = GLOBALS_BOUND_UNSEEN[name]
    assert run_program(Program("", code, tests), check_returns=check_returns) == (True, None)


def test_a_global_bound_by_a_method_does_not_replace_the_tests_own_name():
    from jaxrl_llm.environments.code import Program, run_program

    code = "class C:\n    def go(self):\n        global expected\n        expected = 0\n        return 0\n"
    assert run_program(Program("", code, "expected = 4\nC().go()\nassert C().go() == expected\n"))[0] is False
