"""Suite-wide rules: a skipped test is a failure here (CI must never count a missing server
as a pass)."""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and session.exitstatus == 0:
        reporter.write_line(
            f"{skipped} tests were skipped: skips are failures in this suite", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
