"""The notebook user's path: datasets.Dataset objects passed to train.run / evaluate.run, and what a run leaves
behind in the Python process it ran in."""

from __future__ import annotations

import datasets

from jaxrl_llm.data.sources import load_rows


def test_a_dataset_with_a_transform_is_read_as_it_shows_its_rows():
    """ds.with_transform(f) (or set_transform) shows f's rows in ds[i]; the run read the stored table instead (the
    format was reset to read Python objects), so it trained on other text than the notebook printed, silently."""
    base = datasets.Dataset.from_list([{"prompt": f"q{i}", "completion": f"a{i}", "raw": i} for i in range(3)])
    shout = base.with_transform(lambda b: {"prompt": b["prompt"], "completion": [c.upper() for c in b["completion"]]})
    assert shout[0] == {"prompt": "q0", "completion": "A0"}
    assert load_rows(shout) == [shout[i] for i in range(3)]
    assert load_rows(shout, 2) == [shout[0], shout[1]]  # (data.num_examples: the first rows, transformed)
    assert load_rows(base.with_format("numpy")) == base.to_list()  # other formats: the stored rows, as before


def test_orbax_info_lines_are_dropped_while_a_run_checkpoints_and_only_then():
    """train.run from a notebook logging at INFO printed about 60 of Orbax's absl INFO lines per checkpoint (the
    programs quiet absl; the Python entry points did not). Orbax's INFO records are dropped during the run; its
    warnings, other absl records, and everything after the run are untouched."""
    import logging
    import os

    import orbax.checkpoint as ocp

    from jaxrl_llm.checkpoint import orbax_info_quiet

    absl = logging.getLogger("absl")
    where = os.path.join(os.path.dirname(ocp.__file__), "_src", "checkpoint_manager.py")

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "saving", None, None)

    before = list(absl.filters)
    with orbax_info_quiet():
        assert not absl.filter(record(logging.INFO, where))
        assert absl.filter(record(logging.WARNING, where))
        assert absl.filter(record(logging.INFO, "/elsewhere/app.py"))
    assert absl.filters == before and absl.filter(record(logging.INFO, where))


def test_an_interrupted_run_leaves_the_notebook_as_it_found_it(tmp_path, monkeypatch, caplog):
    """Ctrl-C in a notebook mid-run (after step 2's checkpoint): the KeyboardInterrupt reaches the caller, the
    workdir's lock is free, the SIGTERM handler is the notebook's again, Orbax's threads are done, no file is
    left open, its checkpoints are whole; none of Orbax's INFO lines were logged."""
    import logging
    import os
    import signal
    import threading

    import pytest
    from recipes import text_sft_recipe

    from jaxrl_llm import train
    from jaxrl_llm.workdir import hold_workdir

    config = text_sft_recipe(tmp_path, {"max_steps": 3, "checkpoint.every_steps": 1})
    workdir = str(tmp_path / "run")
    real = train.checkpoint_step

    def interrupted(ckpt, stop, step, *args):
        real(ckpt, stop, step, *args)
        if step == 2:
            raise KeyboardInterrupt

    mine = lambda signum, frame: None  # noqa: E731 (the notebook's own handler)
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        threads, fds = set(threading.enumerate()), set(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(train, "checkpoint_step", interrupted)
        caplog.set_level(logging.INFO)
        with pytest.raises(KeyboardInterrupt):
            train.run(config, workdir)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert set(threading.enumerate()) == threads and set(os.listdir("/proc/self/fd")) <= fds
        assert not [r for r in caplog.records if "orbax" in r.pathname and r.levelno <= logging.INFO]
        with hold_workdir(workdir):  # (free)
            pass
        folder = os.path.join(workdir, "checkpoints")
        assert sorted(os.listdir(folder)) == ["1", "2"]  # both whole (the same call resumes from step 2)
    finally:
        signal.signal(signal.SIGTERM, previous)
