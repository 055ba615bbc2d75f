"""tools/gpu_check.py (`make gpu-check`, issue #22) where there is no GPU: the one line and exit 4, --list (every
check of every folder, each command naming real scripts and flags they take), the report writer, the weight
comparison, the other verdicts (the ZeRO-3 memory line, the Flight Recorder report) on fake outputs and dumps, a
launch meant to fail. What it checks on a GPU only a GPU run shows (GPU_RESULTS.md at the repository root)."""

import os
import pickle
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
             "tools/flight-recorder-nccl", "deepspeed/zero1", "deepspeed/zero2", "deepspeed/zero3",
             "deepspeed/gpu-zero2", "deepspeed/gpu-zero3", "deepspeed/gpt-zero3-memory", "monai/gpu-cache-resume",
             "monai/gpu-cache-torchrun-resume", "nemo/megatron-pp2-resume", "nemo/megatron-pp2-usr1"}
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
    assert "--ds-config " + str(ROOT / "deepspeed/configs/gpu/zero3.json") in checks["deepspeed/gpu-zero3"][0]
    assert all("--gpu-cache" in c for c in checks["monai/gpu-cache-torchrun-resume"])
    assert checks["tools/flight-recorder-nccl"][0].startswith("cd tools && TORCH_FR_BUFFER_SIZE=2000 ")


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


def one(checks, name):
    return next(c for c in checks if c.name == name)


def test_the_rows_of_the_cuda_only_paths(tmp_path):
    """The rows for what only a GPU runs: DeepSpeed's configs/gpu/ and the GPT under zero.Init, MONAI's --gpu-cache
    cut + resumed, the Flight Recorder on an NCCL timeout; each with its verdict."""
    checks = gpu_check.plan(3, tmp_path)
    for stage in (2, 3):
        check = one(checks, f"deepspeed/gpu-zero{stage}")
        (argv, env), = check.launches[0].procs
        assert "--nproc-per-node=3" in argv and argv[argv.index("--ds-config") + 1] == str(
            ROOT / "deepspeed" / "configs" / "gpu" / f"zero{stage}.json")
        assert check.verify[:2] == ("snapshot", "deepspeed") and check.launches[0].expect == 0
    check = one(checks, "deepspeed/gpt-zero3-memory")
    (argv, env), = check.launches[0].procs
    assert " ".join(argv[argv.index("multigpu_torchrun.py"):]).startswith(
        "multigpu_torchrun.py --model gpt --gpt-params 125M --amp --memory-report --max-steps 2")
    assert argv[argv.index("--ds-config") + 1] == str(ROOT / "deepspeed" / "configs" / "gpu" / "zero3.json")
    assert check.verify == ("memory", 3)
    for name, per_epoch in (("monai/gpu-cache-resume", 8), ("monai/gpu-cache-torchrun-resume", 16 // 3 // 2)):
        check = one(checks, name)
        runs = [argv for launch in check.launches for argv, _ in launch.procs]
        dirs = [argv[argv.index("--checkpoint-dir") + 1] for argv in runs]
        assert len(runs) == 3 and all("--gpu-cache" in argv and "--backend" in argv for argv in runs), runs
        assert dirs[0] != dirs[1] == dirs[2] and ["--max-steps" in argv for argv in runs] == [False, True, False]
        cut = int(runs[1][runs[1].index("--max-steps") + 1])
        assert 0 < cut < 2 * per_epoch and cut % per_epoch, (name, cut)  # mid-epoch: the resume skips batches
        assert check.verify == ("same", "snapshot_pt", Path(dirs[0]), Path(dirs[1]), gpu_check.TOL)
    check = one(checks, "tools/flight-recorder-nccl")
    (argv, env), = check.launches[0].procs
    dumps = tmp_path / "work" / "tools-flight-recorder" / "debug"
    # the variables the multi-node templates export, with the values they give them
    exported = re.search(r"^export (TORCH_FR_BUFFER_SIZE=.*)$", (ROOT / "slurm_templates" / "srun_per_gpu.sbatch")
                         .read_text(), re.M).group(1).split()
    assert [f"{k}={v}" for k, v in env.items() if k != "TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC"] == [
        w.replace("$fr_dir", str(dumps)) for w in exported]
    assert argv[argv.index("--nproc-per-node=3") + 1:] == ["gpu_fr_probe.py", "--backend", "nccl", "--timeout", "10",
                                                           "--wait", "45"]
    assert check.launches[0].cwd == ROOT / "tools" and check.launches[0].expect is None
    assert check.verify == ("flight-recorder", dumps, 3, 1) and check.fresh == (dumps,) and not check.skip
    alone = one(gpu_check.plan(1, tmp_path), "tools/flight-recorder-nccl")
    assert alone.skip.startswith("needs 2 GPUs or more") and "    skipped: needs 2 GPUs" in gpu_check.describe(alone)


def test_the_megatron_pipeline_rows_and_their_checkpoint_reader(tmp_path):
    """megatron_parallel.py at pipeline 2 as two srun-style tasks (SKIP below 2 GPUs): cut at step 10 + resumed ==
    straight, and SIGUSR1 -> 75; its step line counts as progress. The reader takes the step the tracker names and
    its iter_<step>/ as one torch.distributed.checkpoint (here a DCP written by torch itself), its tensors only:
    megatron-core writes each layer's _extra_state as an object, which compared as NaN and failed every run."""
    import torch
    import torch.distributed.checkpoint as dcp

    checks = gpu_check.plan(3, tmp_path)
    resume, usr1 = one(checks, "nemo/megatron-pp2-resume"), one(checks, "nemo/megatron-pp2-usr1")
    runs = [argv for launch in resume.launches for argv, _ in launch.procs]
    assert len(runs) == 6 and all(argv[1:4] == ["megatron_parallel.py", "--pipeline-model-parallel-size", "2"]
                                  and "--backend" in argv for argv in runs), runs
    assert [argv[argv.index("--steps") + 1] for argv in runs[::2]] == ["20", "10", "20"]
    dirs = [argv[argv.index("--checkpoint-dir") + 1] for argv in runs[::2]]
    assert dirs[0] != dirs[1] == dirs[2] and resume.verify == ("same", "megatron", Path(dirs[0]), Path(dirs[1]),
                                                              gpu_check.TOL)
    assert [env["SLURM_PROCID"] for _, env in resume.launches[0].procs] == ["0", "1"]
    assert usr1.launches[0].usr1 and usr1.launches[0].expect == 75 and usr1.verify[:2] == ("snapshot", "megatron")
    assert gpu_check.PROGRESS.search("[rank1] step 3 | lm loss 4.8520") and not resume.skip
    assert one(gpu_check.plan(1, tmp_path), "nemo/megatron-pp2-resume").skip.startswith("needs 2 GPUs or more")
    weights = {"decoder.layers.mlp.linear_fc1.weight": torch.arange(8.0).reshape(2, 4),
               "decoder.layers.mlp.linear_fc1._extra_state/shard_0_2": [None]}  # as megatron-core 0.16.1 saves it
    dcp.save(weights, checkpoint_id=tmp_path / "ckpt" / "iter_0000020", no_dist=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("20")
    got, step = gpu_check._read_weights("megatron", tmp_path / "ckpt")
    assert step == 20 and list(got) == ["decoder.layers.mlp.linear_fc1.weight"], got  # no object to compare as NaN
    assert torch.equal(got["decoder.layers.mlp.linear_fc1.weight"], torch.arange(8.0).reshape(2, 4))
    assert gpu_check.compare_state_dicts(got, got, **gpu_check.TOL)[0]


MEMORY_LINE = ("[rank0] memory per rank | stage {stage} | world {world} | params 1000000 | param bytes {param_bytes} | "
               "grad bytes 500000 | optimizer bytes 3000000 | params held whole {whole}")


@pytest.mark.parametrize("stage, world, param_bytes, whole, said", [
    (3, 4, 502_000, 1000, "param bytes 502000 = 0.2510 of 2 x 1000000 (1/4 = 0.2500; 1000 held whole)"),
    (3, 4, 510_000, 1000, None),  # padding: within 2 %
    (3, 4, 2_000_000, 0, "param bytes 2000000, want 2 x (1000000 / 4 + 0 held whole) = 500000 within 2%"),
    (3, 4, 2_500_000, 1_000_000, "param bytes 2500000: 5.00 x 2 x 1000000 / 4, not about 1/4"),  # all kept whole
    (2, 4, 500_000, 0, "stage 2, world 4: want stage 3, world 4"),
    (3, 2, 1_000_000, 0, "stage 3, world 2: want stage 3, world 4"),
], ids=["shards", "padded", "not-partitioned", "all-persistent", "stage-2", "world-2"])
def test_zero3_memory_line_says_each_rank_holds_a_quarter_at_4_ranks(stage, world, param_bytes, whole, said):
    check = gpu_check.Check("deepspeed/gpt-zero3-memory", "deepspeed", [], ("memory", 4))
    out = "[rank0] epoch 1 | batch 1/16 | step 1 | loss 5.5\n" + MEMORY_LINE.format(
        stage=stage, world=world, param_bytes=param_bytes, whole=whole) + "\n[rank0] done: 2 steps in 3.0 s\n"
    ok, detail, shown = gpu_check.verify(check, out)
    assert ok == (param_bytes in (502_000, 510_000)) and shown == out, detail
    assert said is None or detail == said
    assert gpu_check.verify(check, "[rank0] done: 2 steps in 3.0 s\n")[:2] == (
        False, "no 'memory per rank' line (--memory-report)")


def fr_dump(folder: Path, rank: int, last: int, state: str, ranks: str = "[0, 1, 2]"):
    """A Flight Recorder dump of `rank` whose all_reduces #1..#last are recorded, the last in `state` (the keys
    fr_report.py reads of torch 2.13's format)."""
    entries = [{"collective_seq_id": seq, "profiling_name": "nccl:all_reduce", "process_group": ("0", "default_pg"),
                "state": "completed" if seq < last else state, "input_sizes": [[1024]], "is_p2p": False,
                "frames": [{"name": "main", "filename": "/repo/tools/gpu_fr_probe.py", "line": 60}]}
               for seq in range(1, last + 1)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"nccl_trace_rank_{rank}").write_bytes(pickle.dumps(
        {"version": "2.10", "entries": entries, "pg_config": {"0": {"name": "0", "desc": "default_pg",
                                                                      "ranks": ranks}}}))


@pytest.mark.parametrize("dumps, said", [
    ({0: (3, "scheduled"), 1: (2, "completed"), 2: (3, "scheduled")},
     "rank 1 is behind in process group 0 (default_pg): its last collective is #2 nccl:all_reduce (completed) from "
     "main (gpu_fr_probe.py:60), 1 behind ranks 0,2, which wait in #3 nccl:all_reduce (scheduled) from main "
     "(gpu_fr_probe.py:60)"),
    ({0: (3, "scheduled"), 2: (3, "scheduled")}, "want 3 rank dumps: 2 rank dumps in "),  # rank 1 wrote none
    ({0: (3, "scheduled"), 1: (3, "scheduled"), 2: (3, "scheduled")},
     "want rank 1 (only) named as behind, got: every rank entered #3"),
    ({0: (3, "scheduled"), 1: (3, "scheduled"), 2: (2, "completed")},
     "want rank 1 (only) named as behind, got: rank 2 is behind"),
    ({}, "fr_report.py exit 2: error: no Flight Recorder dumps"),
], ids=["rank-1-behind", "no-dump-of-rank-1", "nobody-behind", "rank-2-behind", "no-dumps"])
def test_flight_recorder_verdict_is_fr_report_naming_rank_1(tmp_path, dumps, said):
    folder = tmp_path / "debug"
    folder.mkdir()
    for rank, (last, state) in dumps.items():
        fr_dump(folder, rank, last, state)
    check = gpu_check.Check("tools/flight-recorder-nccl", "pytorch", [], ("flight-recorder", folder, 3, 1))
    ok, detail, shown = gpu_check.verify(check)
    assert ok == (said.startswith("rank 1 is behind")), (detail, shown)
    assert detail.startswith(said), (detail, shown)


def test_a_launch_meant_to_fail_passes_on_any_exit_but_not_on_a_timeout(tmp_path):
    """Launch(expect=None): the Flight Recorder's job dies of NCCL's abort by design; it must still end."""
    stale = tmp_path / "dumps" / "nccl_trace_rank_0"
    stale.parent.mkdir()
    stale.write_text("from an earlier run")

    def check(code, expect, sleep=0):
        argv = [sys.executable, "-c", f"import time; time.sleep({sleep}); raise SystemExit({code})"]
        return gpu_check.Check("tools/x", "pytorch", [gpu_check.Launch([(argv, {})], ROOT, expect=expect)],
                               fresh=(stale.parent,))

    result = gpu_check.run_check(check(1, None), 60, set())
    assert result["result"] == "PASS" and not stale.exists(), result
    assert gpu_check.run_check(check(134, None), 60, set())["result"] == "PASS"
    assert gpu_check.run_check(check(1, 0), 60, set())["detail"] == "exit 1, want 0"
    result = gpu_check.run_check(check(0, None, sleep=30), 0.5, set())
    assert (result["result"], result["detail"]) == ("FAIL", "timed out"), result
    assert "(any exit code: it is meant to fail)" in gpu_check.describe(check(1, None))


def test_the_probe_says_in_one_line_what_it_lacks(monkeypatch, capsys):
    """tools/gpu_fr_probe.py outside torchrun, without a dump path, alone, or without CUDA: exit 2, one line."""
    pytest.importorskip("torch")
    import gpu_fr_probe

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(k, raising=False)
    cases = [({}, "start it under torchrun"),
             ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "TORCH_FR_DUMP_TEMP_FILE is not set"),
             ({"WORLD_SIZE": "1", "TORCH_FR_DUMP_TEMP_FILE": "/nonexistent/nccl_trace_rank_"},
              "--behind 1 needs a world of 2 ranks or more, not 1")]
    import torch

    if not torch.cuda.is_available():
        cases.append(({"WORLD_SIZE": "2"}, "no CUDA GPU: NCCL needs one per rank"))
    for env, said in cases:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert gpu_fr_probe.main(["--backend", "nccl"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: gpu_fr_probe: {said}") and err.count("\n") == 1, err




ORBAX = """
import sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[2])
import cluster, gpu_check, jax.numpy as jnp, orbax.checkpoint as ocp

for name, w in (("a", jnp.ones((3, 2))), ("b", jnp.ones((3, 2)) + 1e-6), ("c", jnp.ones((3, 2)) * 2)):
    manager = cluster.checkpoint_manager(f"{sys.argv[3]}/{name}", every_steps=1)  # as jax/recipe.py saves
    for step in (2, 4):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(({"w": w * step / 4}, jnp.zeros(2))),
                                                   progress=ocp.args.JsonSave({"step": step, "epoch": 1})))
    manager.wait_until_finished()
    manager.close()
d = sys.argv[3]
gpu_check.child_main(["snapshot", "jax", f"{d}/a"])
gpu_check.child_main(["same", "jax", f"{d}/a", f"{d}/b", "1e-4", "1e-3"])
gpu_check.child_main(["same", "jax", f"{d}/a", f"{d}/c", "1e-4", "1e-3"])
"""


def test_jax_weights_are_read_from_orbax_checkpoints(tmp_path):
    """jax/ saves with Orbax's CheckpointManager (a folder per step): the checks on jax/ read the newest step as
    tests/recipes.py does (jax/cluster.read_checkpoint, in jax's environment), not the snapshot.npz it replaced."""
    from helpers import clean_env, env_python

    proc = subprocess.run([str(env_python("jax")), "-c", ORBAX, str(ROOT / "jax"), str(ROOT / "tools"), tmp_path],
                          env=clean_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    answers = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and len(answers) == 3, proc.stdout + proc.stderr
    assert answers[0] == '{"ok": true, "detail": "snapshot at step 4", "step": 4}'
    assert answers[1].startswith('{"ok": true, "detail": "2 tensors within atol 0.0001, rtol 0.001'), answers[1]
    assert answers[2].startswith('{"ok": false, "detail": "leaf'), answers[2]
