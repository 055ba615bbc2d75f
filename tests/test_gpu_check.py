"""tools/gpu_check.py (`make gpu-check`, issue #22) where there is no GPU: the one line and exit 4, --list (every
check of every folder, each command naming real scripts and flags they take), the report writer, the weight
comparison. What it checks on a GPU only a GPU run shows (GPU_RESULTS.md at the repository root)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, VENVS

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402 - the tool lives in tools/, not on the tests' path

pytestmark = pytest.mark.gpu_check
SCRIPT = ROOT / "tools" / "gpu_check.py"
NO_GPU = re.compile(r"^gpu-check: no CUDA GPU here \((.+)\): nothing to check$")


def tool(*args, path=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_PYTHON"}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_without_nvidia_smi_one_line_and_exit_4(tmp_path):
    proc = tool("--out", tmp_path, path=str(tmp_path))  # a PATH with no nvidia-smi on it
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 4, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 1 and NO_GPU.match(proc.stdout.strip()).group(1) == "no nvidia-smi"
    assert proc.stderr == "" and not list(tmp_path.glob("*.md"))


def test_nvidia_smi_but_cpu_torch_is_no_gpu_too(tmp_path):
    if not (VENVS / "pytorch" / "bin" / "python").exists():
        pytest.skip("no .venvs/pytorch: the fallback python3 may have no torch either (also exit 4, another why)")
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")
    fake.chmod(0o755)
    proc = tool("--out", tmp_path, path=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    why = NO_GPU.match(proc.stdout.strip()).group(1)
    assert why.startswith("torch.cuda.is_available() is False in") and proc.stdout.count("\n") == 1


def listed(*args) -> dict[str, list[str]]:
    """--list's output: {check: [its command lines]}."""
    proc = tool("--list", *args, path=os.environ["PATH"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks, name = {}, None
    for line in proc.stdout.splitlines():
        if not line.startswith(" "):
            name = line
            checks[name] = []
        elif line.strip().startswith("cd "):
            checks[name].append(line.strip())
    return checks


def expected_names() -> set[str]:
    names = {"pytorch/fsdp-amp-resume", "tools/doctor-nccl", "tools/doctor-gloo", "tools/allreduce-1G",
             "deepspeed/zero1", "deepspeed/zero2", "deepspeed/zero3"}
    for folder in gpu_check.FOLDERS:
        names |= {f"{folder}/{kind}" for kind in ("single", "single-amp", "resume", "usr1", "spawn")}
        if folder not in ("jax", "ray"):
            names.add(f"{folder}/torchrun")
        if folder != "ray":
            names.add(f"{folder}/srun")
    return names


def flags_of(folder: Path, script: str) -> str:
    """The source where the script's flags are declared: the script and its folder's cluster.py."""
    return "".join((folder / f).read_text() for f in (script, "cluster.py") if (folder / f).exists())


def test_list_names_every_check_of_every_folder_with_real_scripts_and_flags():
    checks = listed("--gpus", "3")
    framework_folders = {p.parent.name for p in ROOT.glob("*/requirements.txt")} - {
        "benchmarks", "slurm_templates", "tests", "tools"}
    assert set(gpu_check.FOLDERS) == framework_folders  # a new folder needs its row in FOLDERS
    assert set(checks) == expected_names()
    for name, commands in checks.items():
        assert commands, name
        for line in commands:
            cd, _, command = line.partition(" && ")
            cwd = ROOT / cd.removeprefix("cd ")
            words = shlex.split(command)
            while "=" in words[0] and not words[0].startswith("/"):  # srun's variables before the interpreter
                words.pop(0)
            assert Path(words[0]).name.startswith("python"), line
            script_at = next(i for i, w in enumerate(words) if w.endswith(".py"))
            script, args = words[script_at], words[script_at + 1:]
            assert (cwd / script).is_file(), f"{name}: {cwd / script} missing"
            if words[1] == "-m":
                assert words[2] == "torch.distributed.run" and "--nproc-per-node=3" in words, line
            source = flags_of(cwd, script)
            for flag in (a for a in args if a.startswith("--")):
                assert f'"{flag}"' in source, f"{name}: {script} declares no {flag}"
            for value in (a for a in args if a.endswith(".json") and "configs" in a):
                assert Path(value).is_file(), f"{name}: {value} missing"
            assert "--backend" in args, f"{name}: every run names its backend (C12: no silent CPU)"
            if "spawn" in name:
                assert args[args.index("--nprocs") + 1] == "3"
    assert len(checks["pytorch/srun"]) == 3 and "SLURM_PROCID=2 SLURM_NTASKS=3" in checks["pytorch/srun"][2]
    assert any("--max-steps" in c for c in checks["pytorch/resume"])
    assert "--amp" in checks["monai/single-amp"][0] and "--backend nccl" in checks["jax/single"][0]
    assert "--min-bytes 1G --max-bytes 1G" in checks["tools/allreduce-1G"][0]
    assert "--backend gloo" in checks["tools/doctor-gloo"][0]
    assert set(listed("--only", "deepspeed/zero")) == {"deepspeed/zero1", "deepspeed/zero2", "deepspeed/zero3"}


def test_srun_tasks_get_the_variables_the_tests_launch_table_sets(monkeypatch):
    """slurm_env (stdlib, the tool) and tests/recipes.py's Recipe.srun describe the same srun launch."""
    import recipes

    for folder, recipe in recipes.RECIPES.items():
        if recipe.no_srun:
            continue
        seen = []
        monkeypatch.setattr(recipes.subprocess, "Popen", lambda *a, env, seen=seen, **kw: seen.append(env))
        monkeypatch.setattr(recipes, "env_python", lambda folder: "python")
        recipe.srun((), 2, 12345)
        ours = gpu_check.slurm_env(1, 2, folder)
        theirs = {k: v for k, v in seen[1].items() if k.startswith(("SLURM_", "MASTER_", "JAX_COORDINATOR"))}
        assert set(theirs) <= set(ours), f"{folder}: {sorted(set(theirs) - set(ours))}"
        for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "MASTER_ADDR"):
            assert ours[k] == theirs[k], (folder, k)


def test_report_header_table_and_failure_tail():
    header = dict(host="gpu01", cards=["NVIDIA H100 80GB HBM3 (81559 MiB)"] * 2, driver="550.54.15", cuda="12.4",
                  date="2027-01-01T00:00:00+00:00", commit="abc1234", n=2,
                  envs={"pytorch": {"versions": {"torch": "2.13.0"}, "torch_cuda": "12.4", "python": "3.12.3"},
                        "jax": {"versions": {"jax": "0.10.2"}, "jax_backend": "gpu", "python": "3.12.3"},
                        "nemo": {"missing": "import nemo: ModuleNotFoundError: No module named 'nemo'"}})
    results = [dict(check="pytorch/single", result="PASS", wall_s=4.2, step_ms=1.5, peak_mib=1234, detail="ok"),
               dict(check="pytorch/srun", result="FAIL", wall_s=90.0, step_ms=None, peak_mib=None,
                    detail="timed out", tail=["[rank1] error: lost contact | rank 0"]),
               dict(check="nemo/single", result="SKIP", detail="import nemo: ModuleNotFoundError")]
    md = gpu_check.format_markdown(header, results)
    lines = md.splitlines()
    assert lines[0].startswith("# GPU check")
    assert "- machine: gpu01, 2 x NVIDIA H100 80GB HBM3 (81559 MiB)" in lines
    assert "- driver 550.54.15, CUDA 12.4 (nvidia-smi)" in lines
    assert "- pytorch: torch 2.13.0 (torch CUDA 12.4), python 3.12.3" in lines
    assert "- jax: jax 0.10.2 (jax backend gpu), python 3.12.3" in lines
    assert "- nemo: not checked (import nemo: ModuleNotFoundError: No module named 'nemo')" in lines
    assert "1 PASS, 1 FAIL, 1 SKIP" in lines
    assert "| check | result | wall s | step ms | peak GPU MiB | detail |" in lines
    assert "| pytorch/single | PASS | 4.2 | 1.5 | 1234 | ok |" in lines
    assert "| pytorch/srun | FAIL | 90.0 |  |  | timed out |" in lines
    assert "| nemo/single | SKIP |  |  |  | import nemo: ModuleNotFoundError |" in lines
    fail = lines.index("## pytorch/srun: last lines")
    assert lines[fail + 2:fail + 5] == ["```", "[rank1] error: lost contact | rank 0", "```"]


def test_step_time_is_the_median_gap_after_the_first_step(tmp_path):
    timings = tmp_path / "t.json"
    timings.write_text('{"start_time": 0, "step_end_times": [5.0, 5.1, 5.3, 5.4, 5.5]}')
    assert gpu_check.step_time_ms(timings) == 100.0
    assert gpu_check.step_time_ms(tmp_path / "missing.json") is None


def test_weights_compared_within_tolerance():
    torch = pytest.importorskip("torch")
    a = {"w": torch.ones(3, 2), "b": torch.zeros(2), "n": torch.tensor(5)}
    assert gpu_check.compare_state_dicts(a, {k: v.clone() for k, v in a.items()}, 0.0, 0.0)[0]
    near = {"w": torch.ones(3, 2) + 5e-5, "b": torch.zeros(2), "n": torch.tensor(5)}
    ok, detail = gpu_check.compare_state_dicts(a, near, **gpu_check.TOL)
    assert ok and detail.endswith(" at w)")
    far = {"w": torch.ones(3, 2), "b": torch.tensor([0.0, 0.01]), "n": torch.tensor(5)}
    ok, detail = gpu_check.compare_state_dicts(a, far, **gpu_check.TOL)
    assert not ok and detail.startswith("b: max |diff| 0.01")
    assert not gpu_check.compare_state_dicts(a, {"w": a["w"]}, **gpu_check.TOL)[0]
    assert "shape" in gpu_check.compare_state_dicts(a, {**a, "w": torch.ones(2, 3)}, **gpu_check.TOL)[1]
    np = pytest.importorskip("numpy")  # jax/'s snapshots are numpy arrays
    assert gpu_check.compare_state_dicts({"leaf0": np.ones(4)}, {"leaf0": np.ones(4) + 1e-6}, **gpu_check.TOL)[0]
    assert not gpu_check.compare_state_dicts({"leaf0": np.ones(4)}, {"leaf0": np.ones(4) * 2}, **gpu_check.TOL)[0]
