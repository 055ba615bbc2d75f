"""Submit multinode.py to Slurm with NeMo-Run: a SlurmExecutor writes the sbatch script and submits it.

NeMo-Run is how NVIDIA launches NeMo and Megatron-Bridge training today. It lives in an environment of its own
(requirements-run.txt: nemo-run breaks nemo-toolkit's pins), so this script imports neither torch nor NeMo;
the job runs multinode.py with the training environment named by --python. Run it on a login node (LocalTunnel:
sbatch runs on this machine); from a laptop, NeMo-Run's SSHTunnel does the same over ssh.

    python launch_nemo_run.py --nodes 2 --gpus-per-node 8 --account ACCT --partition gpu --dryrun   # print it
    python launch_nemo_run.py --nodes 2 --gpus-per-node 8 --account ACCT --partition gpu \\
        --python /path/to/nemo-env/bin/python -- --epochs 10 model.optim.lr=0.05

Everything after `--` goes to multinode.py (the contract's flags and NeMo's Hydra overrides). The job is
preemption-safe the NeMo-Run way: `--signal=USR1@90` reaches every rank, which checkpoints and exits 75; NeMo-Run's
script requeues any non-zero exit while SLURM_RESTART_COUNT < --retries, and exp_manager resumes.
"""

import argparse
import os
import re
import signal
import sys

# toolkit.py is standard library only: this environment (.venvs/nemo-run) has no torch, NeMo or Hydra, so this
# script imports no other module of the folder.
from toolkit import OneLineParser, PreemptionFlag, RecipeError, positive_int, run

HERE = os.path.dirname(os.path.abspath(__file__))
# Lightning's SLURMEnvironment reads MASTER_ADDR/MASTER_PORT when set (as multinode.sbatch does): the first node,
# and a port derived from the job id, below the ephemeral range, so that two jobs on one node never collide.
RENDEZVOUS = ('export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)\n'
              "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))")


def slurm_time(text):
    if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}(:\d{2})?", text):
        raise argparse.ArgumentTypeError(f"want [D-]HH:MM[:SS], got {text}")
    return text


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=1, help="= tasks per node (one task per GPU)")
    p.add_argument("--cpus-per-gpu", type=positive_int, default=8, help="cores per task (srun --cpus-per-task)")
    p.add_argument("--account", default="", help="Slurm account (left out when empty)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=slurm_time, default="02:00:00")
    p.add_argument("--python", default="python3",
                   help="the interpreter of the training environment (requirements.txt) on the nodes")
    p.add_argument("--checkpoint-dir", default="checkpoints/nemo-run",
                   help="exp_manager's directory; resubmitting with the same one resumes")
    p.add_argument("--retries", type=int, default=3, help="requeues after a non-zero exit (a preemption is 75)")
    p.add_argument("--name", default="multinode", help="experiment name (the job is nemo-run-NAME)")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    args = p.parse_args(argv[:split])
    if args.retries < 0:
        p.error(f"--retries must be >= 0, got {args.retries}")
    args.overrides = argv[split + 1:]
    return args


def import_nemo_run():
    try:
        import nemo_run
    except ImportError as e:
        raise RecipeError(f"cannot import nemo_run ({e}): install requirements-run.txt into an environment of its "
                          "own") from None
    return nemo_run


def executor(nemo_run, args):
    """NeMo-Run's SlurmExecutor: one task per GPU, the recipe's rendezvous variables, Slurm's warning signal.
    nemo_run.Packager() ships no code: the job runs multinode.py where it is (a shared filesystem, as on clusters)."""
    ex = nemo_run.SlurmExecutor(
        account=args.account, partition=args.partition, nodes=args.nodes, ntasks_per_node=args.gpus_per_node,
        gpus_per_node=args.gpus_per_node, time=args.time, signal="USR1@90",
        # srun does not inherit --cpus-per-task (Slurm 22.05-23.02): ask for it on the step itself.
        srun_args=[f"--cpus-per-task={args.cpus_per_gpu}"], env_vars={"OMP_NUM_THREADS": str(args.cpus_per_gpu)},
        setup_lines=RENDEZVOUS, tunnel=nemo_run.LocalTunnel(job_dir=""),  # "": the experiment's own directory
        packager=nemo_run.Packager(), poll_estimated_start_time=False,
        job_name_prefix="nemo-run-")  # NeMo-Run's default prefix is made from the account name
    ex.retries = args.retries  # NeMo-Run's script: `scontrol requeue` after a failure while restarts < retries
    return ex


def exp_dir(experiment):
    """The experiment's directory, where NeMo-Run writes the job script and the logs: the public name the
    experiment gives it is its job's executor's experiment_dir (the Experiment's own is private)."""
    return experiment.jobs[0].executor.experiment_dir


def main():
    # A launcher that saves nothing: SIGUSR1/SIGTERM end it at once (their default), as before run() caught them.
    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    args = parse_args()
    nemo_run = import_nemo_run()
    script = nemo_run.Script(path=os.path.join(HERE, "multinode.py"), entrypoint=args.python,
                             args=["--checkpoint-dir", os.path.abspath(args.checkpoint_dir), *args.overrides])
    ex = executor(nemo_run, args)
    with nemo_run.Experiment(args.name, executor=ex, log_level="WARN") as experiment:
        experiment.add(script, name=args.name)
        if args.dryrun:  # NeMo-Run writes the job script into the experiment's directory: show it as is
            experiment.dryrun(log=False, delete_exp_dir=False)
            path = os.path.join(exp_dir(experiment), f"{args.name}_sbatch.sh")
            print(open(path).read(), flush=True)
            print(f"dry run: job script written to {path}; nothing submitted", flush=True)
            return
        try:
            experiment.run(detach=True)
        except Exception as e:  # sbatch missing or refusing the job: its message, in one line
            raise RecipeError(f"submitting with NeMo-Run failed: {' '.join(str(e).split())[:300]}") from None
        job_id = experiment.jobs[0].handle.rsplit("/", 1)[-1]
    print(f"submitted Slurm job {job_id}; job script and logs under {exp_dir(experiment)}", flush=True)


if __name__ == "__main__":
    run(main, rank=0)
