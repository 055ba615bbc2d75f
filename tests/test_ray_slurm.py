"""ray/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), from
inside ray/ as a user would, interpreter in PYTHON.

All four jobs are submitted at once and waited for together (Ray start-up dominates each; run side by side they
cost about what the slowest costs): single_gpu.sbatch, multigpu.sbatch (a local Ray cluster inside one task),
and multinode.sbatch twice on the same two nodes at the same time -- a Ray cluster per job, head on n1 and a
worker node on n2, ports and token of their own -- which must not collide. While the multinode jobs run, the
PIDs of their Ray processes are collected (their command lines name the job's temp dirs, /tmp/ray-JOBID-NODE);
afterwards none of them may be alive, on either node.
"""

import re
from pathlib import Path

import pytest
import torch
from helpers import ROOT, env_python

pytestmark = [pytest.mark.ray, pytest.mark.slurm, pytest.mark.timeout(400)]

FOLDER = ROOT / "ray"
ARGS = ["--epochs", 2, "--dataset-size", 512, "--batch-size", 16, "--log-every", 8]


def shape(nodes, gpus_per_node=1, cpus=1):
    return [f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus_per_node}", f"--cpus-per-task={cpus}",
            "--time=00:05:00"]


def ray_pids(job_id):
    """{pid: command line} of the live processes whose command line names this job's Ray temp dirs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"/tmp/ray-{job_id}-" in cmdline:
                found[int(entry.name)] = cmdline[:200]
    return found


def snapshot_step(ckpt):
    steps = [torch.load(p, map_location="cpu", weights_only=True)["step"]
             for p in (ckpt / "train").glob("checkpoint_*/snapshot.pt")]
    assert steps, f"no snapshot under {ckpt}"
    return max(steps)


def test_templates_run_and_two_ray_clusters_at_once_do_not_collide(slurm_cluster, tmp_path):
    python = {"PYTHON": env_python("ray")}
    jobs = {}
    for name, template, sbatch_args in [("single", "single_gpu.sbatch", shape(1)),
                                        ("multigpu", "multigpu.sbatch", shape(1, gpus_per_node=2, cpus=2)),
                                        ("multinode-a", "multinode.sbatch", shape(2)),
                                        ("multinode-b", "multinode.sbatch", shape(2))]:
        ckpt, out = tmp_path / name / "ckpt", tmp_path / name / "job.out"
        job_id = slurm_cluster.submit(FOLDER / template, *ARGS, "--checkpoint-dir", ckpt, sbatch_args=sbatch_args,
                                      cwd=FOLDER, output=out, env=python)
        jobs[name] = (job_id, ckpt, out)
    seen = {}  # pid -> command line, of every Ray process of the multinode jobs seen while they ran

    def collect(info, log):
        for name in ("multinode-a", "multinode-b"):
            seen.update(ray_pids(jobs[name][0]))

    results = {name: slurm_cluster.wait(job_id, out, timeout=300, on_poll=collect, name=name)
               for name, (job_id, ckpt, out) in jobs.items()}
    for job in results.values():
        job.assert_ok()
        assert len(re.findall(r"\[rank0\] epoch \d+/2 \|", job.log)) == 2, job.describe()
    # steps: 512 samples / (workers x 16)
    assert snapshot_step(jobs["single"][1]) == 2 * 512 // 16
    for name in ("multigpu", "multinode-a", "multinode-b"):
        assert snapshot_step(jobs[name][1]) == 2 * 512 // 32, results[name].describe()
    ports = set()
    for name in ("multinode-a", "multinode-b"):
        job = results[name]
        hosts = dict(re.findall(r"\[rank(\d)\] host (\S+) \|", job.log))
        assert set(hosts) == {"0", "1"} and set(hosts.values()) == {"n1", "n2"}, job.describe()  # one per node
        assert "cluster: 2 nodes (10.77.0.11, 10.77.0.12)" in job.log, job.describe()  # IPs from the nodes
        ports.add(re.search(r"head \S+:(\d+), ports (\d+)-", job.log).groups())
        assert "torn down" in job.log, job.describe()
    assert len(ports) == 2 and len({p[0] for p in ports}) == 2, f"two jobs, same ports: {ports}"
    assert seen, "no Ray process of the multinode jobs was ever seen (is the temp dir in their command lines?)"
    assert any("raylet" in c for c in seen.values()) and any("gcs_server" in c for c in seen.values())
    left = {pid: c for pid, c in seen.items() if Path(f"/proc/{pid}").exists() and pid in ray_pids_all(jobs)}
    assert not left, f"Ray processes of the jobs survived them: {left}"
    for name in ("multinode-a", "multinode-b"):
        assert not list(Path("/tmp").glob(f"ray-{jobs[name][0]}-*")), "a node's Ray temp dir was left behind"


def ray_pids_all(jobs):
    return {pid for name in ("multinode-a", "multinode-b") for pid in ray_pids(jobs[name][0])}
