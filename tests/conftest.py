import os
import re

import pytest

from helpers import IN_CI, PYCACHE, ROOT, without_group

# Every process the tests start (through helpers.clean_env, or as Slurm jobs, which inherit this environment)
# caches its bytecode under helpers.PYCACHE instead of compiling every import again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """`make test` runs three test processes (pytest-xdist, --dist loadgroup): every Slurm test in one of them, one
    after the other (a file's independent one-job tests submit their jobs together, SlurmCluster.run_together; what
    signals or kills a job runs alone) -- and every other test file whole in one of the other two (module fixtures
    and the per-folder forked processes are computed once). The Slurm jobs run bound to one core each
    (--cpus-per-task=1) and wait on the scheduler, so on two cores the other files fill the idle one."""
    for item in items:
        slurm = item.get_closest_marker("slurm") or "slurm_cluster" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("slurm" if slurm else item.path.name))


# Time per part of the suite (the README's CI section quotes these): setup + call + teardown of every test,
# grouped by the first of these markers the test carries.
GROUPS = ("slurm", "contract", "lightning", "pytorch", "jax", "monai", "modulus", "bench", "lint", "deepspeed", "nemo",
          "ray", "soak")
_seconds: dict[str, float] = {}
# And per framework folder (each folder's CI budget): its own test files (tests/test_<folder>*.py) plus the
# table tests' rows of it (test_contract.py::...[<folder>], test_slurm_preemption.py::...[<folder>]).
_folder_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    group = next((g for g in GROUPS if g in report.keywords), "other")
    _seconds[group] = _seconds.get(group, 0.0) + report.duration
    path, _, name = without_group(report.nodeid).partition("::")
    own = re.fullmatch(r"tests/test_(?:slurm_)?([a-z]+?)(?:_slurm)?\.py", path)
    table = path in {"tests/test_contract.py", "tests/test_slurm_preemption.py"}
    param = re.search(r"\[([a-z]+)\]$", name) if table else None
    folder = (param or own).group(1) if (param or own) else None
    if folder and (ROOT / folder / "requirements.txt").exists():
        _folder_seconds[folder] = _folder_seconds.get(folder, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if _seconds:
        terminalreporter.section("time per part of the suite")
        for group, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:8.1f} s  {group}")
    if _folder_seconds:
        terminalreporter.section("time per framework folder (its tests + the contract tests over it)")
        for folder, seconds in sorted(_folder_seconds.items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"{seconds:8.1f} s  {folder}")
