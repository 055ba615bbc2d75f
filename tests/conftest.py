import pytest

from helpers import IN_CI

pytest_plugins = ["slurm_fixtures"]  # local Slurm cluster fixtures (tests/slurm_fixtures.py)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip is a failure: a missing framework must fail loudly, never pass by skipping."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {reason}"
