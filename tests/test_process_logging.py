"""In a job of several processes only process 0 logs our INFO lines; the others keep warnings and errors."""

from __future__ import annotations

import logging

import pytest

from jaxrl_llm import distributed


@pytest.fixture
def ours():
    logger = logging.getLogger("jaxrl_llm")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield logger
    logger.setLevel(level)


@pytest.mark.parametrize("pid,n,log_all,info_shown", [(0, 1, False, True), (0, 4, False, True),
                                                      (3, 4, False, False), (3, 4, True, True)])
def test_only_process_0_logs_info_lines(ours, caplog, pid, n, log_all, info_shown):
    distributed.quiet_other_processes(distributed.DistributedInfo(pid, n, "h:1" if n > 1 else None, "explicit"),
                                      log_all)
    child = logging.getLogger("jaxrl_llm.data.sft")
    with caplog.at_level(logging.NOTSET):
        caplog.clear()
        child.info("data: 10 rows")
        child.warning("a warning")
    msgs = [r.getMessage() for r in caplog.records]
    assert ("data: 10 rows" in msgs) == info_shown and "a warning" in msgs


def test_the_command_lines_start_up_quiets_the_other_processes(ours, monkeypatch):
    """`initialize_from_flags` (train's and evaluate's start-up) applies it, with --log_all_processes."""
    import types

    from absl import flags

    info = distributed.DistributedInfo(1, 2, "h:1", "explicit")
    monkeypatch.setattr(distributed, "initialize", lambda **kw: info)
    for log_all, level in ((True, logging.INFO), (False, logging.WARNING)):
        ours.setLevel(logging.INFO)
        monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(
            coordinator_address=None, num_processes=None, process_id=None, init_timeout_s=None,
            log_all_processes=log_all))
        assert distributed.initialize_from_flags() is info
        assert ours.level == level
