"""Static checks: ruff on every Python file, shellcheck on every shell and job script."""

import shutil
import subprocess

import pytest
from helpers import ROOT, VENVS, run, unavailable

pytestmark = [pytest.mark.lint, pytest.mark.timeout(120)]


def tracked(*patterns):
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return sorted(ROOT / p for p in out.split())


def test_ruff_is_clean():
    ruff = VENVS / "tests" / "bin" / "ruff"
    if not ruff.exists():
        unavailable("ruff missing: run tools/envs.sh tests")
    run([ruff, "check", "."])


def test_shellcheck_is_clean_on_every_shell_and_sbatch_file():
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck missing: apt-get install shellcheck (tools/system_deps.sh does it as root)")
    scripts = tracked("*.sh", "*.sbatch", ".ci/run")
    assert len(scripts) >= 10, scripts
    run(["shellcheck", "--severity=style", *scripts])
    for s in scripts:
        run(["bash", "-n", s])
