"""benchmarks/run.py end to end on a tiny configuration: the ConvNet recipes and the raw DDP baseline with 1 and
2 ranks (monai/'s UNet and modulus/'s FNO entries are checked without launching them), one repeat, a few steps
of batch 8. It checks
that the outputs are complete and well formed, never how fast anything is (a benchmark is not a timed test).
About 40 s on two quiet cores, most of it interpreter and import start-up of the six launches.
"""

import json
import struct

import pytest
from helpers import ROOT, clean_env, env_python, run

pytestmark = [pytest.mark.bench, pytest.mark.timeout(480)]  # ~60 s on a quiet 2-core machine

RUNNER = ROOT / "benchmarks" / "run.py"
ENTRIES = ["raw DDP", "pytorch", "lightning", "deepspeed zero2"]  # one DeepSpeed stage keeps the smoke test short


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_tiny_run_writes_json_markdown_and_png(tmp_path):
    python = env_python("benchmarks")
    for folder in ("pytorch", "lightning", "deepspeed"):  # each recipe runs with its own folder's environment
        env_python(folder)
    published = ROOT / "benchmarks" / "RESULTS.md"
    before = published.read_bytes() if published.exists() else None
    out = tmp_path / "bench"
    # jax is left out here (four more launches of the slowest start-up); test_jax_recipe_launch_and_summary
    # checks how the runner launches and reports it, test_raw_jax_baseline_runs_as_the_runner_launches_it runs
    # its baseline once.
    proc = run([python, RUNNER, "--out", out, "--world-sizes", "1,2", "--repeats", "1", "--steps", "6",
                "--warmup", "2", "--batch-size", "8", "--no-ceiling", "--launch-timeout", "150",
                "--recipes", ",".join(ENTRIES[1:])],
               timeout=240, env=clean_env())

    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"machine", "config", "summary", "verdicts", "runs"}
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"].startswith("2.13.0")
    assert result["config"]["backend"] == "gloo" and result["config"]["batch_size"] == 8
    assert [(r["recipe"], r["world_size"]) for r in result["summary"]] == [(n, w) for n in ENTRIES for w in (1, 2)]
    assert len(result["runs"]) == 2 * len(ENTRIES) and all(r["timed_steps"] == 3 for r in result["runs"])
    assert all(isinstance(r["exit_code"], int) for r in result["runs"])  # non-zero only for a crash at exit
    for row in result["summary"]:
        assert row["step_time_s"] > 0 and row["samples_per_s"] > 0
        assert row["time_to_first_step_s"] > 0
        assert row["overhead"] > 0
        assert (row["scaling_efficiency"] is None) == (row["world_size"] == 1)
        if row["recipe"] == "raw DDP":
            assert row["overhead"] == 1.0
    # scaling efficiency is thr(2) / (2 thr(1)); with one repeat it is exactly that ratio of the two runs
    by = {(r["recipe"], r["world_size"]): r for r in result["runs"]}
    for name in ENTRIES:
        row = next(r for r in result["summary"] if (r["recipe"], r["world_size"]) == (name, 2))
        expected = by[name, 2]["samples_per_s"] / (2 * by[name, 1]["samples_per_s"])
        assert row["scaling_efficiency"] == pytest.approx(expected)
    assert len(result["verdicts"]) == 3 * (len(ENTRIES) - 1)  # per recipe: overhead at 1 and 2 ranks, scaling at 2

    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| recipe | ranks | step time (ms) | samples/s | scaling efficiency")
    assert len(rows) == 1 + 2 * len(ENTRIES) and all(line.count("|") == 8 for line in rows)
    assert "Machine:" in table and "Load:" in table and "torch 2.13.0" in table
    assert table in proc.stdout  # the runner also prints it

    width, height = png_size(out / "results.png")
    assert width >= 600 and height >= 300
    assert not any(p.name.startswith("scratch-") for p in out.iterdir()), "scratch files left behind"
    after = published.read_bytes() if published.exists() else None
    assert after == before, "benchmarks/RESULTS.md changed without --publish"


def load_runner():
    """benchmarks/run.py as a module (it imports matplotlib only when it plots, so .venvs/tests can load it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_pairs_repeats_and_takes_medians():
    bench = load_runner()
    step = {("raw DDP", 1): [0.020, 0.030, 0.021], ("raw DDP", 2): [0.021, 0.032, 0.022],
            ("lightning", 1): [0.022, 0.033, 0.024], ("lightning", 2): [0.024, 0.036, 0.025]}
    runs = [{"recipe": n, "world_size": w, "repeat": k, "step_time_s": s, "samples_per_s": w * 8 / s,
             "time_to_first_step_s": 5.0 + k}
            for (n, w), times in step.items() for k, s in enumerate(times)]
    rows = {(r["recipe"], r["world_size"]): r for r in bench.summarize(runs, ["raw DDP", "lightning"], [1, 2])}
    assert rows["lightning", 2]["step_time_s"] == 0.025
    assert rows["lightning", 2]["time_to_first_step_s"] == 6.0
    # per repeat: 0.022/0.024, 0.033/0.036, 0.024/0.025 -> median
    assert rows["lightning", 2]["scaling_efficiency"] == pytest.approx(0.033 / 0.036)
    assert rows["lightning", 1]["overhead"] == pytest.approx(0.022 / 0.020)
    assert rows["raw DDP", 2]["overhead"] == 1.0 and rows["raw DDP", 1]["scaling_efficiency"] is None
    verdicts = bench.verdicts(list(rows.values()))
    assert any("lightning at 2 rank(s): scaling efficiency 0.92 meets" in v for v in verdicts), verdicts
    assert any("lightning at 1 rank(s): overhead 1.10x raw DDP meets" in v for v in verdicts), verdicts
    # a recipe on another model is measured against the raw loop on that model (baseline_of)
    unet = [{**r, "recipe": {"raw DDP": "raw DDP (UNet)", "lightning": "monai"}[r["recipe"]]} for r in runs]
    rows = {(r["recipe"], r["world_size"]): r
            for r in bench.summarize(runs + unet, ["raw DDP", "raw DDP (UNet)", "monai"], [1, 2],
                                     {"monai": "raw DDP (UNet)", "raw DDP (UNet)": "raw DDP (UNet)"})}
    assert rows["monai", 1]["overhead"] == pytest.approx(0.022 / 0.020) and rows["raw DDP (UNet)", 2]["overhead"] == 1
    assert not any("raw DDP (UNet) at" in v for v in bench.verdicts(list(rows.values())))


def test_srun_launch_spans_nodes_with_one_torchrun_per_node(monkeypatch, tmp_path):
    bench = load_runner()
    monkeypatch.setattr(bench, "python_of", lambda env: f"/venvs/{env}/bin/python")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "15123")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    args = bench.parse_args(["--launcher", "srun", "--gpus-per-node", "4", "--world-sizes", "1,2,4,8"])
    cmd = bench.launch_command(args, bench.RECIPES[0], 8, 3, tmp_path / "t.json", tmp_path / "ckpt")
    assert cmd[:6] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                       "/venvs/pytorch/bin/python"]
    assert "--nnodes=2" in cmd and "--nproc-per-node=4" in cmd and "--rdzv-endpoint=node1:15126" in cmd
    assert cmd[cmd.index("--dataset-size") + 1] == str(60 * 8 * 128)
    local = bench.launch_command(bench.parse_args([]), bench.BASELINE, 2, 1, tmp_path / "t.json", tmp_path / "c")
    assert local[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert local[5].endswith("benchmarks/raw_ddp.py")
    ceiling = bench.launch_command(bench.parse_args([]), bench.CEILING, 2, 1, tmp_path / "t.json", tmp_path / "c")
    assert ceiling[5].endswith("benchmarks/raw_ddp.py") and ceiling[6] == "--no-ddp"
    monai = next(r for r in bench.RECIPES if r.name == "monai")
    unet = bench.launch_command(bench.parse_args([]), monai, 2, 1, tmp_path / "t.json", tmp_path / "c")
    assert unet[unet.index("--batch-size") + 1] == "2" and unet[unet.index("--dataset-size") + 1] == str(60 * 2 * 2)
    assert monai.baseline == bench.RAW_UNET.name and bench.RAW_UNET.pythonpath == "monai"


def test_jax_recipe_launch_and_summary(monkeypatch, tmp_path):
    """jax/multigpu.py starts its own processes (no torchrun); its overhead is measured against raw_jax.py, the
    smallest data-parallel loop in plain JAX on the same model, started the same way -- not against raw DDP."""
    bench = load_runner()
    jax = next(r for r in bench.RECIPES if r.name == "jax")
    monkeypatch.setattr(bench, "python_of", lambda env: f"/venvs/{env}/bin/python")
    cmd = bench.launch_command(bench.parse_args([]), jax, 2, 1, tmp_path / "t.json", tmp_path / "c")
    assert cmd[:4] == ["/venvs/jax/bin/python", str(ROOT / "jax" / "multigpu.py"), "--nprocs", "2"]
    assert "--timings-file" in cmd and "torch.distributed.run" not in cmd
    raw = bench.launch_command(bench.parse_args([]), bench.RAW_JAX, 2, 1, tmp_path / "t.json", tmp_path / "c")
    assert raw[:4] == ["/venvs/jax/bin/python", str(ROOT / "benchmarks" / "raw_jax.py"), "--nprocs", "2"]
    assert raw[raw.index("--batch-size") + 1] == cmd[cmd.index("--batch-size") + 1] == "128"
    assert raw[raw.index("--dataset-size") + 1] == cmd[cmd.index("--dataset-size") + 1]
    assert bench.child_env(bench.parse_args([]), bench.RAW_JAX)["PYTHONPATH"] == str(ROOT / "jax")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "15123")
    srun = bench.launch_command(bench.parse_args(["--launcher", "srun", "--gpus-per-node", "4"]), jax, 2, 1,
                                tmp_path / "t.json", tmp_path / "c")
    assert srun[:4] == ["srun", "--nodes=1", "--ntasks=1", "/venvs/jax/bin/python"]
    runs = [{"recipe": n, "world_size": w, "repeat": 0, "step_time_s": s, "samples_per_s": w * 8 / s,
             "time_to_first_step_s": 5.0}
            for (n, w), s in {("raw DDP", 1): 0.02, ("raw DDP", 2): 0.021, ("raw JAX", 1): 0.025,
                              ("raw JAX", 2): 0.032, ("jax", 1): 0.03, ("jax", 2): 0.04}.items()]
    names = ["raw DDP", "raw JAX", "jax"]
    rows = bench.summarize(runs, names, [1, 2], {"raw DDP": "raw DDP", "raw JAX": "raw JAX", "jax": jax.baseline})
    jax_rows = [r for r in rows if r["recipe"] == "jax"]
    assert [r["overhead"] for r in jax_rows] == [pytest.approx(0.03 / 0.025), pytest.approx(0.04 / 0.032)]
    assert jax_rows[1]["scaling_efficiency"] == pytest.approx(0.03 / 0.04)
    assert [v for v in bench.verdicts(rows) if v.startswith(("jax", "raw JAX"))] == [
        "jax at 1 rank(s): overhead 1.20x raw JAX MISSES the target <= 1.10x",
        "jax at 2 rank(s): scaling efficiency 0.75 MISSES the target >= 0.90",
        "jax at 2 rank(s): overhead 1.25x raw JAX MISSES the target <= 1.10x"]
    # the table's footnote names the raw loops in the table, and only those
    machine = {"cpu_model": "cpu", "cores": 2, "torch": "2.13.0", "jax": "0.10.2", "gpus": [], "python": "3.11",
               "os": "Linux", "date": "today", "load_before": [0.0], "load_after": [0.0]}
    config = {"threads": 1, "batch_size": 8, "steps": 6, "warmup": 2, "repeats": 1, "backend": "gloo",
              "launcher": "local", "redo_disturbed": 0}
    table = bench.markdown({"machine": machine, "config": config, "summary": rows, "verdicts": [], "runs": runs})
    assert "raw JAX, jax/'s ConvNet and synthetic data in plain JAX" in table and "FNO" not in table
    assert "| jax | 2 | 40.0 | 400 | 0.75 | 1.25x |" in table


@pytest.mark.jax
def test_raw_jax_baseline_runs_as_the_runner_launches_it(tmp_path):
    """benchmarks/raw_jax.py for real, with the runner's own command and environment: 2 processes with gloo
    collectives, every step timed on rank 0. One short launch (the numbers themselves are not checked)."""
    env_python("jax")
    bench = load_runner()
    args = bench.parse_args(["--steps", "4", "--warmup", "1", "--batch-size", "8", "--backend", "gloo"])
    timings = tmp_path / "timings.json"
    cmd = bench.launch_command(args, bench.RAW_JAX, 2, 1, timings, tmp_path / "checkpoints")
    run(cmd, timeout=120, env=bench.child_env(args, bench.RAW_JAX), cwd=tmp_path)
    data = json.loads(timings.read_text())
    assert (data["world_size"], data["batch_size"], len(data["step_end_times"])) == (2, 8, 4)
    assert data["start_time"] < data["step_end_times"][0] and data["step_end_times"] == sorted(data["step_end_times"])


def test_a_subset_is_published_beside_the_whole_table_not_over_it(tmp_path):
    """`--publish` with every recipe writes RESULTS.md (the table the READMEs show); with a subset (`--recipes jax`:
    jax, its raw loop, raw DDP and the ceiling) it wrote a table of those few over the whole one. Now the subset goes
    to RESULTS-<recipes>.md, and RESULTS.md gains one line pointing to it, kept once per subset."""
    bench = load_runner()
    (tmp_path / "whole.png").write_bytes(b"png")
    bench.publish("| whole |\n", tmp_path / "whole.png", bench.RECIPES, here=tmp_path)
    assert (tmp_path / "RESULTS.md").read_text().endswith("| whole |\n") and (tmp_path / "results.png").exists()
    jax = [r for r in bench.RECIPES if r.name == "jax"]
    for table in ("| jax, first |\n", "| jax, again |\n"):
        (tmp_path / "run.png").write_bytes(b"jax png")
        bench.publish(table, tmp_path / "run.png", jax, here=tmp_path, date="2026-12-08 02:30 UTC")
    assert (tmp_path / "RESULTS-jax.md").read_text().endswith("| jax, again |\n")
    assert (tmp_path / "results-jax.png").read_bytes() == b"jax png"
    whole = (tmp_path / "RESULTS.md").read_text()
    assert "| whole |" in whole and "jax, " not in whole and (tmp_path / "results.png").read_bytes() == b"png"
    assert whole.count("[jax](RESULTS-jax.md)") == 1, whole
    assert whole.endswith("\nRows measured alone since this table: [jax](RESULTS-jax.md) (2026-12-08 02:30 UTC)\n")
    bench.publish("| whole again |\n", tmp_path / "whole.png", bench.RECIPES, here=tmp_path)
    assert "RESULTS-jax.md" not in (tmp_path / "RESULTS.md").read_text()  # a whole run measured jax too
