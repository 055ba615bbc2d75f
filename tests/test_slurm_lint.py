"""The sbatch linter: every rule fires on a deliberately broken script, stays quiet on correct ones, and every
*.sbatch in the repository passes it. Plus shellcheck over slurm_templates/ and the linter's own Slurm job."""

import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, run, unavailable

LINT = ROOT / "slurm_templates" / "tools" / "sbatch_lint.py"
TEMPLATES = ROOT / "slurm_templates"

spec = importlib.util.spec_from_file_location("sbatch_lint", LINT)
sbatch_lint = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbatch_lint)

HEADER = """#!/usr/bin/env bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=00:10:00
"""
GOOD_BODY = """set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
export MASTER_ADDR MASTER_PORT
echo "job $SLURM_JOB_ID: usage: sbatch job.sbatch missing_in_a_message.py"
srun --kill-on-bad-exit=1 --label bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID \\
  exec python3 train.py "$@"' x "$@"
srun bash -c "echo node \\$SLURM_NODEID"
cat <<'EOF' >run_on_node.sh
echo $SLURM_PROCID
EOF
"""

BROKEN = {
    "SB001 space": (HEADER + "# SBATCH --gpus-per-node=4\n" + GOOD_BODY, "SB001", 6),
    "SB001 lowercase": (HEADER + "#sbatch --time=1:00:00\n" + GOOD_BODY, "SB001", 6),
    "SB001 indented": (HEADER + "  #SBATCH --mem=10G\n" + GOOD_BODY, "SB001", 6),
    "SB002 after command": (HEADER + "set -euo pipefail\n#SBATCH --exclusive\n" + GOOD_BODY, "SB002", 7),
    "SB003 torchrun x ntasks": (HEADER + "set -euo pipefail\nMASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))\n"
                                "srun python3 -m torch.distributed.run --nproc_per_node=8 --nnodes=2 train.py\n",
                                "SB003", 8),
    "SB003 torchrun gpus var": (HEADER + "srun torchrun --nproc-per-node \"$SLURM_GPUS_ON_NODE\" \\\n"
                                "  --nnodes 2 train.py\n", "SB003", 6),
    "SB003 torchrun via variable": (HEADER + "nproc=${SLURM_GPUS_ON_NODE:-1}\n"
                                    "srun torchrun --nproc_per_node \"$nproc\" train.py\n", "SB003", 7),
    "SB004 missing script": (HEADER + "srun python3 trian.py --epochs 3\n", "SB004", 6),
    "SB004 missing in bash -c": (HEADER + "srun bash -c 'exec python3 scripts/nope.py'\n", "SB004", 6),
    "SB005 double quotes": (HEADER + "srun bash -c \"RANK=$SLURM_PROCID python3 train.py\"\n", "SB005", 6),
    "SB005 batch shell": (HEADER + "export NODE_RANK=${SLURM_NODEID}\nsrun python3 train.py\n", "SB005", 6),
    "SB005 unquoted heredoc": (HEADER + 'cat <<EOF >"$TMPDIR/x.sh"\nrank=$SLURM_LOCALID\nEOF\n'
                               'srun bash "$TMPDIR/x.sh"\n', "SB005", 7),
    "SB006 syntax": (HEADER + "if true; then\n  srun python3 train.py\n", "SB006", 8),
    "SB007 no srun": (HEADER + "python3 train.py\n", "SB007", 6),
    "SB007 torchrun without srun": (HEADER.replace("--ntasks-per-node=8", "--ntasks-per-node=1") +
                                    "srun hostname\ntorchrun --nnodes=2 --nproc-per-node=8 train.py\n", "SB007", 7),
    "SB101 fixed port": (HEADER + "export MASTER_PORT=29500\nsrun python3 train.py\n", "SB101", 6),
    "SB101 rdzv port": (HEADER.replace("--ntasks-per-node=8", "--ntasks-per-node=1") +
                        "srun torchrun --nproc-per-node=8 --rdzv-endpoint=$HOST:29500 train.py\n", "SB101", 6),
    "SB102 launch": (HEADER.replace("--ntasks-per-node=8", "--ntasks-per-node=1") +
                     "srun python3 -m torch.distributed.launch --nproc_per_node=8 train.py\n", "SB102", 6),
}


def lint(tmp_path, text, name="job.sbatch"):
    (tmp_path / "train.py").write_text("")
    path = tmp_path / name
    path.write_text(text)
    return sbatch_lint.lint_file(path)


@pytest.mark.lint
def test_correct_script_is_clean(tmp_path):
    assert lint(tmp_path, HEADER + GOOD_BODY) == []


@pytest.mark.lint
@pytest.mark.parametrize("name", BROKEN)
def test_rule_fires(tmp_path, name):
    text, code, line = BROKEN[name]
    findings = lint(tmp_path, text)
    assert [(f.code, f.line) for f in findings] == [(code, line)], "\n".join(map(str, findings))


@pytest.mark.lint
def test_disable_comment(tmp_path):
    text, _, _ = BROKEN["SB101 fixed port"]
    assert lint(tmp_path, text + "# sbatch-lint: disable=SB101\n") == []


@pytest.mark.lint
def test_cli_exit_codes(tmp_path):
    (tmp_path / "train.py").write_text("")
    (tmp_path / "ok.sbatch").write_text(HEADER + GOOD_BODY)
    proc = run([sys.executable, LINT, tmp_path], check=False)
    assert proc.returncode == 0, proc.stdout
    (tmp_path / "warn.sbatch").write_text(BROKEN["SB101 fixed port"][0])
    assert run([sys.executable, LINT, tmp_path], check=False).returncode == 0
    proc = run([sys.executable, LINT, "--strict", tmp_path], check=False)
    assert proc.returncode == 1 and "warn.sbatch:6: SB101 warning" in proc.stdout
    (tmp_path / "bad.sbatch").write_text(BROKEN["SB001 space"][0])
    proc = run([sys.executable, LINT, tmp_path], check=False)
    assert proc.returncode == 1 and "bad.sbatch:6: SB001 error" in proc.stdout


def repo_sbatch_files():
    return sbatch_lint.find_scripts([ROOT])


@pytest.mark.lint
def test_every_sbatch_in_the_repository_passes():
    files = repo_sbatch_files()
    assert any(f.parent == TEMPLATES for f in files), files
    proc = run([sys.executable, LINT, *files], check=False)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.lint
def test_slurm_templates_are_strictly_clean_and_shellcheck_clean():
    files = [*TEMPLATES.rglob("*.sbatch"), *TEMPLATES.rglob("*.sh")]
    proc = run([sys.executable, LINT, "--strict", *[f for f in files if f.suffix == ".sbatch"]], check=False)
    assert proc.returncode == 0, proc.stdout
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck not installed (tools/system_deps.sh installs it)")
    proc = subprocess.run(["shellcheck", "-x", *files], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.lint
def test_every_template_has_the_conventions():
    """Real GPU directives, EDIT markers, strict mode, no fixed port; launchers use srun --kill-on-bad-exit."""
    for path in TEMPLATES.rglob("*.sbatch"):
        text = path.read_text()
        for needle in ("#SBATCH --time=", "#SBATCH --nodes=", "set -euo pipefail", "# EDIT",
                       "srun --kill-on-bad-exit=1"):
            assert needle in text, f"{path.relative_to(ROOT)} lacks {needle!r}"
        if "MASTER_PORT" in text:
            assert "SLURM_JOB_ID %" in text, path


@pytest.mark.lint
def test_readme_names_real_files():
    """Every template/tool the slurm_templates README names exists, and every template is in the README."""
    readme = (TEMPLATES / "README.md").read_text()
    named = set(re.findall(r"`((?:[\w]+/)*[\w.]+\.(?:sbatch|py))`", readme))
    missing = [n for n in named if not (TEMPLATES / n).exists() and not (TEMPLATES / "tools" / n).exists()]
    assert not missing, f"README names files that do not exist: {missing}"
    templates = {str(p.relative_to(TEMPLATES)) for p in TEMPLATES.rglob("*.sbatch")}
    assert templates <= named, f"templates missing from the README table: {templates - named}"


@pytest.mark.slurm
def test_lint_job(slurm_cluster, tmp_path):
    """The linter's own Slurm job, run over slurm_templates/ on a compute node."""
    tools = TEMPLATES / "tools"
    job = slurm_cluster.run(tools / "sbatch_lint.sbatch", "--strict", TEMPLATES, cwd=tools,
                            output=tmp_path / "job.out", timeout=60).assert_ok()
    assert textwrap.dedent("sbatch-lint: ") in job.log and "0 finding(s)" in job.log, job.describe()
