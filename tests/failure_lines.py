"""A pytest plugin: the reason of each of the first few failures, printed the moment it happens.

A run that goes wrong from some point on (a full disk, a worker in a bad state) prints a wall of E and F and,
only at its very end, the summary that says why; a log cut short, or shown only around its first failure, keeps
the wall and loses the why. This plugin prints one line per failure (set-up, test or tear-down) as it is
reported, for the first `LIMIT` of them: its phase, node id and the exception's first line. Under pytest-xdist it
runs in the controller, which receives every worker's reports. conftest.py registers it."""

from __future__ import annotations

import pytest

LIMIT = 5


class FailureLines:
    def __init__(self, config: pytest.Config, limit: int = LIMIT):
        self.config, self.limit, self.shown = config, limit, 0

    @staticmethod
    def reason(report: pytest.TestReport) -> str:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = getattr(crash, "message", None) or str(report.longrepr)
        lines = [line for line in text.splitlines() if line.strip()]
        # a crash's message leads with the exception line; a bare text ends with it
        return (lines[0 if crash is not None else -1] if lines else "?")[:300]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not report.failed or self.shown >= self.limit:
            return
        self.shown += 1
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            more = "" if self.shown < self.limit else f" (the first {self.limit} failures are said as they happen)"
            reporter.write_line(f"\n[{report.when} failed] {report.nodeid}: {self.reason(report)}{more}")


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # an xdist worker's reports reach the controller, which prints them
        config.pluginmanager.register(FailureLines(config), "failure_lines_printer")
