"""A pytest plugin (tests/conftest.py loads it): under CI=1 a skipped test is a failure.

A CI machine is set up with everything the tests need (scripts/setup.sh --dev: the reference
package, the browsers, the piper voice); a skip there means something is missing, and a green run
that silently skipped the browser or kernel tests would claim what it did not check.
"""
from __future__ import annotations

import os

import pytest

WHY = "skipped under CI=1 (a CI machine must have what every test needs): "


def ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:     # (path, line, "Skipped: why")
        return f"{longrepr[2]} ({longrepr[0]}:{longrepr[1]})"
    return str(longrepr)


class SkipsFail:
    """Registered for one session when CI is set."""

    def __init__(self) -> None:
        self.module_skips: list[str] = []

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if report.skipped and not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            report.longrepr = WHY + _reason(report.longrepr)

    def pytest_collectreport(self, report):
        """A module that skips itself as it is imported (pytest.importorskip at its top) skips all its
        tests. It fails the session at the end rather than here: a failed collection would stop the
        whole run, and the other tests' results are worth having."""
        if report.skipped:
            self.module_skips.append(f"{report.nodeid}: {_reason(report.longrepr)}")

    def pytest_terminal_summary(self, terminalreporter):
        for line in self.module_skips:
            terminalreporter.write_line("FAILED " + WHY + line, red=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        if self.module_skips and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config):
    if ci():
        config.pluginmanager.register(SkipsFail(), "makima-ci-skips-fail")
