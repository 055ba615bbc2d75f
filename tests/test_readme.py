"""The README's promises: the quick start is two commands, the demo works, the recipe matrix names real files."""

import re

import pytest
from helpers import ROOT, clean_env, run

pytestmark = [pytest.mark.pytorch, pytest.mark.timeout(300)]
README = (ROOT / "README.md").read_text()


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_second():
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert "\nmake test\n" in (ROOT / ".ci" / "run").read_text()


def test_recipe_matrix_names_files_that_exist():
    rows = [line for line in README.splitlines() if line.startswith("| ") and ".py`" in line]
    assert len(rows) >= 9
    folder = None
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        link = re.match(r"\[(\w+)\]", cells[0])
        folder = link.group(1) if link else cells[0]
        for name in re.findall(r"`([\w.]+\.(?:py|sbatch))`", cells[2] + cells[3]):
            assert (ROOT / folder / name).exists(), f"README names {folder}/{name}, which does not exist"


def test_make_demo_runs_and_shows_what_the_readme_promises():
    out = run(["make", "demo"], env=clean_env(), timeout=240).stdout
    epochs = re.findall(r"\[rank0\] epoch (\d)/3 \| step \d+ \| loss [\d.]+ \| acc [\d.]+ \| \d+ samples/s", out)
    assert epochs == ["1", "2", "3"], out
    assert "snapshot.pt" in out and (ROOT / "runs" / "demo" / "snapshot.pt").exists()
