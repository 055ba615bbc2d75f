"""The templates' preemption handling outside Slurm (CONTRACT.md C7, C8; issues #21, #27), and the multi-node
torch templates' Flight Recorder settings (#23).

Every template that trains carries the same preemption block, and the block does what it says when bash runs the
real template file with stand-ins for srun and scontrol: Slurm's USR1 reaches the step, a step that saved (exit 75)
is requeued, any other end is passed on. The copies are checked for identity, so a fix made in one template fails
here until it reaches all."""

import os
import re
import signal
import subprocess
import time

import pytest
from helpers import ROOT, clean_env

FOLDERS = ["pytorch", "lightning", "monai", "modulus", "nemo", "deepspeed", "jax", "ray"]
REFERENCE = ROOT / "pytorch" / "multinode.sbatch"
BEGIN = "# --- preemption block: identical in every template (tests/test_templates.py checks it) ---\n"
END = "# --- end of the preemption block ---\n"
# The lines around the block that belong to it, word for word too: the signal's lead time (the one line to edit,
# with its guidance), requeue permission, an appending log, and the cap on requeues.
HEADER = """\
# The signal's lead time is up to 30 s of steps (to the ranks' next check) plus the save, about checkpoint GB /
# (filesystem GB/s per node): 90 s leaves 60 s, a checkpoint under 60 GB at 1 GB/s. B: = to this batch shell, which
# forwards it (below).
#SBATCH --signal=B:USR1@90           # EDIT: seconds before the time limit (see above)
#SBATCH --requeue                    # allow `scontrol requeue`
#SBATCH --open-mode=append           # a requeued run appends to the log instead of truncating it
"""
RESTARTS = """\
MAX_RESTARTS=${MAX_RESTARTS:-3}      # EDIT: requeues before giving up (a crash loop must not run forever)
restarts=${SLURM_RESTART_COUNT:-0}
"""
# Templates without the block; each folder README says why.
NO_PREEMPTION = {
    "modulus/darcy.sbatch": "writes a data set: nothing to resume",
    "deepspeed/multinode_deepspeed.sbatch": "the launcher runs srun itself and passes no USR1 on",
    "ray/multigpu.sbatch": "srun would signal Ray's own processes; only the driver takes the signal",
}
# Templates with the forwarding half only, their decision being their own (and said so in the template).
OWN_DECISION = {
    "pytorch/multinode_torchrun.sbatch": "also requeues a crash after new progress",
    "ray/multinode.sbatch": "tears the Ray cluster down between the step's end and the requeue",
}
TEMPLATES = sorted(f"{p.parent.name}/{p.name}" for folder in FOLDERS for p in (ROOT / folder).glob("*.sbatch"))
BLOCKED = [t for t in TEMPLATES if t not in NO_PREEMPTION and t not in OWN_DECISION]


def block(text: str, begin: str = BEGIN, end: str = END) -> str | None:
    found = re.search(re.escape(begin) + r"(.*?)" + re.escape(end), text, re.S)
    return found.group(1) if found else None


def test_the_exceptions_are_templates_and_their_readmes_say_why():
    for template in [*NO_PREEMPTION, *OWN_DECISION]:
        assert template in TEMPLATES, f"{template}: no such template (a stale exception)"
    for template in NO_PREEMPTION:
        assert block((ROOT / template).read_text()) is None, f"{template} has the block: not an exception any more"
        folder, name = template.split("/")
        paragraphs = (ROOT / folder / "README.md").read_text().split("\n\n")
        assert any(name in p and "no preemption block" in " ".join(p.lower().split()) for p in paragraphs), \
            f"{folder}/README.md does not say that (and why) {name} has no preemption block"


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t not in NO_PREEMPTION])
def test_every_training_template_carries_the_one_preemption_block(template):
    """Five messages for one event were five copies drifting apart (#21); single_gpu, multigpu*, fsdp had no
    --signal at all, so nothing was saved under a real preemption (#27)."""
    reference = block(REFERENCE.read_text())
    assert reference and reference.startswith("step=$! preempted=0\n") and reference.endswith('exit "$rc"\n')
    text = (ROOT / template).read_text()
    assert HEADER in text and RESTARTS in text, f"{template}: the --signal/--requeue lines or MAX_RESTARTS differ"
    assert "of at most $MAX_RESTARTS" in text, f"{template}: its log does not say which restart this run is"
    if template in OWN_DECISION:
        forward = reference[:reference.index("trap '' USR1 TERM\n")]
        assert forward in text, f"{template}: the signal forwarding differs from {REFERENCE.relative_to(ROOT)}'s"
    else:
        assert block(text) == reference, f"{template}: the preemption block differs from {REFERENCE.name}'s"
        assert text.endswith(END), f"{template}: something runs after the preemption block's exit"


FR_BEGIN = ("# --- flight recorder block: identical in every multi-node torch template (tests/test_templates.py "
            "checks it) ---\n")
FR_END = "# --- end of the flight recorder block ---\n"
# Every multi-node template of the torch folders, and the generic ones, found by name: a new one is checked too.
TORCH_FOLDERS = ["pytorch", "lightning", "monai", "modulus", "nemo", "deepspeed"]
FLIGHT_RECORDED = sorted(f"{f}/{p.name}" for f in TORCH_FOLDERS for p in (ROOT / f).glob("multinode*.sbatch"))
FLIGHT_RECORDED += ["slurm_templates/srun_per_gpu.sbatch", "slurm_templates/torchrun_per_node.sbatch"]


def test_every_multinode_torch_template_keeps_the_flight_recorder_on_shared_storage():
    """#23: NCCL's watchdog writes each rank's last collectives when it fires, by default into /tmp of the node,
    gone with it. Every multi-node torch template sets the same lines, before its step starts: dumps on timeout,
    into checkpoints/$RUN/debug/$SLURM_JOB_ID/ under the submit directory (torch 2.13's variable names)."""
    assert len(FLIGHT_RECORDED) >= 12, FLIGHT_RECORDED
    reference = block(REFERENCE.read_text(), FR_BEGIN, FR_END)
    assert reference, f"{REFERENCE.relative_to(ROOT)} has no flight recorder block"
    for line in ["fr_dir=$PWD/checkpoints/${RUN:-$SLURM_JOB_NAME}/debug/$SLURM_JOB_ID\n", 'mkdir -p "$fr_dir"\n',
                 "export TORCH_FR_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 "
                 "TORCH_FR_DUMP_TEMP_FILE=$fr_dir/nccl_trace_rank_\n"]:
        assert line in reference, line
    wrong = []
    for template in FLIGHT_RECORDED:
        text = (ROOT / template).read_text()
        launch = re.search(r'^(srun|"\$launcher") ', text, re.M)
        if block(text, FR_BEGIN, FR_END) != reference:
            wrong.append(f"{template}: no flight recorder block, or not {REFERENCE.name}'s")
        elif not launch or text.index(FR_END) > launch.start():
            wrong.append(f"{template}: the flight recorder block comes after the step starts")
    assert wrong == [], "\n".join(wrong)


FABRIC_BEGIN = ("# --- fabric block: identical in every multi-node torch template (tests/test_templates.py checks "
                "it) ---\n")
FABRIC_END = "# --- end of the fabric block ---\n"


def test_every_multinode_torch_template_offers_the_same_fabric_presets_all_commented_out():
    """#23: NCCL falls back to TCP sockets without a word when the fast network does not come up. Every multi-node
    torch template carries the same presets -- InfiniBand/RoCE, AWS EFA, HPE Slingshot -- each with NCCL_NET, which
    makes NCCL fail instead; all commented out (a preset for the wrong fabric fails every job), and no NCCL network
    variable anywhere else in the template, so that there is one place to edit."""
    reference = block(REFERENCE.read_text(), FABRIC_BEGIN, FABRIC_END)
    assert reference, f"{REFERENCE.relative_to(ROOT)} has no fabric block"
    for preset in ("export NCCL_NET=IB ", 'export NCCL_NET="AWS Libfabric" FI_PROVIDER=efa',
                   'export NCCL_NET="AWS Libfabric" FI_PROVIDER=cxi'):
        assert preset in reference, preset
    active = [line for line in reference.splitlines() if line.strip() and not line.startswith("#")]
    assert active == [], f"fabric settings not commented out: {active}"
    wrong = []
    for template in FLIGHT_RECORDED:
        text = (ROOT / template).read_text()
        if block(text, FABRIC_BEGIN, FABRIC_END) != reference:
            wrong.append(f"{template}: no fabric block, or not {REFERENCE.name}'s")
            continue
        rest = text.replace(FABRIC_BEGIN + reference + FABRIC_END, "")
        stray = re.findall(r"^.*\b(?:NCCL_(?:NET|SOCKET_IFNAME|IB_\w+)|GLOO_SOCKET_IFNAME|FI_PROVIDER)=.*$", rest, re.M)
        if stray:
            wrong.append(f"{template}: network settings outside the fabric block: {stray}")
    assert wrong == [], "\n".join(wrong)


# Stand-ins: srun is the step (it records its command line and the signals it gets, and saves -- exits 75 -- on
# USR1, or exits FAKE_STEP_EXIT at once; on TERM it ends 137, as the real srun SIGKILLs its tasks on a TERM of its
# own, Slurm 22.05-25.11); scontrol names two nodes and records a requeue; python has no CUDA.
FAKES = {
    "srun": """#!/bin/bash
printf '%s\\n' "$*" >>"$FAKE_DIR/srun.args"
printf '%s\\n' "${TORCH_FR_DUMP_TEMP_FILE-unset}" >"$FAKE_DIR/fr_file"
trap 'echo USR1 >>"$FAKE_DIR/step.signals"; exit 75' USR1
trap 'echo TERM >>"$FAKE_DIR/step.signals"; exit 137' TERM
# saved-by-ranks: what a step behind torchrun's agent does when Slurm signals it alone (GraceTime): the ranks save,
# leave the flag toolkit.PreemptionFlag.saved writes and exit 75, the agent exits 1 -- once the batch shell has set
# its traps, as real ranks (interpreters that import a framework first) always do
if [ "$FAKE_STEP_EXIT" = saved-by-ranks ]; then
  until (( 0x$(awk '/^SigCgt/ {print $2}' "/proc/$PPID/status") & 1 << 9 )); do sleep 0.01; done
  touch "$SLURM_SUBMIT_DIR/.preempted-$SLURM_JOB_ID"
  exit 1
fi
[ "$FAKE_STEP_EXIT" = wait ] || exit "$FAKE_STEP_EXIT"
touch "$FAKE_DIR/step.started"
while :; do sleep 0.02; done
""",
    "scontrol": """#!/bin/bash
case "$1" in
  show) echo n1; echo n2 ;;
  requeue) echo "$*" >>"$FAKE_DIR/requeued" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
""",
    "python": "#!/bin/bash\nexit 1\n",
}


def start(template, tmp_path, step_exit, **slurm):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm = dict(SLURM_JOB_ID=4242, SLURM_JOB_NAME="t", SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES=2, SLURM_NTASKS=2,
                 SLURM_NTASKS_PER_NODE=1, SLURM_CPUS_PER_TASK=2, SLURM_GPUS_ON_NODE=1) | slurm
    slurm.setdefault("SLURM_SUBMIT_DIR", tmp_path)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=bin_dir / "python", FAKE_DIR=tmp_path,
                    FAKE_STEP_EXIT=step_exit, CUDA_VISIBLE_DEVICES=0,
                    **{k: v for k, v in slurm.items() if v is not None})  # None: a variable Slurm does not set
    return subprocess.Popen(["bash", ROOT / template, "--epochs", "1"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def catches_usr1(pid: int) -> bool:
    status = open(f"/proc/{pid}/status").read()
    return bool(int(re.search(r"^SigCgt:\s*(\w+)", status, re.M).group(1), 16) & 1 << 9)


def read(path) -> str:
    return path.read_text() if path.exists() else ""


def signalled(template, tmp_path, signum):
    """The template run with a step that waits; `signum` sent to the batch shell once the step is up and the trap
    set; the shell's (out, err)."""
    proc = start(template, tmp_path, "wait")
    for _ in range(1000):  # polled, not timed: the step is up and the shell's trap is set
        if proc.poll() is not None or (tmp_path / "step.started").exists() and catches_usr1(proc.pid):
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, f"{template}: exit {proc.returncode}\n{out}\n{err}"
    return out, err


@pytest.mark.parametrize("template", BLOCKED + ["pytorch/multinode_torchrun.sbatch", "slurm_templates/requeue.sbatch"])
def test_term_to_the_batch_shell_reaches_the_step_as_usr1(template, tmp_path):
    """TERM to the batch shell alone (--signal=B:TERM@N, scancel --batch --signal=TERM): passed on as TERM, srun
    would SIGKILL every task at once and nothing would be saved; passed on as USR1, the ranks save and exit 75."""
    out, err = signalled(template, tmp_path, signal.SIGTERM)
    assert read(tmp_path / "step.signals") == "USR1\n", f"{template}: the step did not get USR1 once\n{out}"
    assert read(tmp_path / "requeued") == "requeue 4242\n", f"{template}: not requeued\n{out}\n{err}"
    assert "requeue: got TERM, forwarding it as USR1" in out, out


@pytest.mark.parametrize("template", BLOCKED + ["pytorch/multinode_torchrun.sbatch"])
def test_usr1_reaches_the_step_and_the_job_is_requeued(template, tmp_path):
    """Slurm's USR1 (--signal=B:) to the batch shell: the shell passes it to the step, which saves and exits 75,
    and the job is requeued; the shell ends 0. A torchrun launcher must handle USR1 itself (by default it dies of it)
    and give its workers less time to save than the signal's lead time."""
    out, err = signalled(template, tmp_path, signal.SIGUSR1)
    assert read(tmp_path / "step.signals") == "USR1\n", f"{template}: the step did not get USR1 once\n{out}"
    assert read(tmp_path / "requeued") == "requeue 4242\n", f"{template}: not requeued\n{out}\n{err}"
    assert "requeue: got USR1, forwarding it" in out, out
    if template in FLIGHT_RECORDED:  # the step's ranks write their Flight Recorder dumps on shared storage
        fr_dir = tmp_path / "checkpoints" / "t" / "debug" / "4242"
        assert read(tmp_path / "fr_file") == f"{fr_dir}/nccl_trace_rank_\n" and fr_dir.is_dir(), template
    command = read(tmp_path / "srun.args")
    if "torch.distributed.run" in command:
        handled = re.search(r"--signals-to-handle (\S+)", command)
        assert handled and "SIGUSR1" in handled.group(1).split(","), f"{template}: torchrun dies of USR1\n{command}"
        lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)", (ROOT / template).read_text(), re.M).group(1))
        shutdown = re.search(r"--shutdown-timeout (\d+)", command)
        assert shutdown and int(shutdown.group(1)) < lead, f"{template}: the workers' time to save exceeds the lead"


@pytest.mark.parametrize("template", BLOCKED)
def test_the_block_passes_on_what_is_not_a_preemption(template, tmp_path):
    """A finished step ends the job 0, not requeued; a failure without a signal is passed on, not requeued (no
    crash loop); a step that saved (75) after MAX_RESTARTS requeues gives up with one line, exit 1."""
    for case, (step_exit, restart, code) in {"done": (0, 0, 0), "failed": (1, 0, 1), "cap": (75, 3, 1)}.items():
        case_dir = tmp_path / case
        case_dir.mkdir()
        proc = start(template, case_dir, step_exit, SLURM_RESTART_COUNT=restart)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == code, f"{template} ({case}): exit {proc.returncode}\n{out}\n{err}"
        assert not (case_dir / "requeued").exists(), f"{template} ({case}): requeued\n{out}"
        if case == "cap":
            assert "requeue: checkpointed, but restarted 3 times already (MAX_RESTARTS=3): giving up" in err, err


@pytest.mark.parametrize("template", BLOCKED + ["pytorch/multinode_torchrun.sbatch"])
def test_a_step_signalled_alone_whose_ranks_saved_is_requeued(template, tmp_path):
    """Slurm's preemption with GraceTime signals the step, not the batch shell: behind a launcher that exits 1
    after a signal (torchrun's agent), the block saw exit 1 and no signal of its own -- a crash, not requeued, the
    job FAILED with a snapshot saved. The ranks that saved leave a flag (toolkit.PreemptionFlag.saved); the block
    reads it, requeues and removes it. A flag left from before the step (a run killed before its block) counts for
    nothing: a failure after it is passed on."""
    proc = start(template, tmp_path, "saved-by-ranks")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and read(tmp_path / "requeued") == "requeue 4242\n", \
        f"{template}: exit {proc.returncode}, not requeued\n{out}\n{err}"
    assert not (tmp_path / ".preempted-4242").exists(), f"{template}: the flag was left behind"
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".preempted-4242").touch()
    proc = start(template, stale, 1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and not (stale / "requeued").exists(), f"{template}: a stale flag requeued\n{out}"


# Every template that sets the cores of srun's tasks, wherever it lives: a new one is checked too.
CPU_TEMPLATES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.sbatch")
                       if p.relative_to(ROOT).parts[0] not in {".venvs", "tests", "runs"}
                       and "checkpoints" not in p.parts
                       and "SRUN_CPUS_PER_TASK" in p.read_text())  # the tools' and the local cluster's too
# CONTRACT C8's CPU line: srun of Slurm 22.05-23.02 reads SRUN_CPUS_PER_TASK, not --cpus-per-task; a job submitted
# with --cpus-per-gpu has no SLURM_CPUS_PER_TASK (sbatch sets only SLURM_CPUS_PER_GPU), which set -u turned into
# 'SLURM_CPUS_PER_TASK: unbound variable'.
CPU_LINE = (': "${SLURM_CPUS_PER_TASK:?unset: submit with --cpus-per-task (--cpus-per-gpu sets SLURM_CPUS_PER_GPU '
            'only)}"; export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n')


@pytest.mark.parametrize("template", CPU_TEMPLATES)
def test_a_job_without_cpus_per_task_is_refused_in_one_line(template, tmp_path):
    """Submitted with --cpus-per-gpu instead of --cpus-per-task: one line naming the option to use, before srun."""
    assert len(CPU_TEMPLATES) >= 40, CPU_TEMPLATES
    proc = start(template, tmp_path, 0, SLURM_CPUS_PER_TASK=None, SLURM_CPUS_PER_GPU=4, SLURM_ARRAY_TASK_ID=0)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and not (tmp_path / "srun.args").exists(), f"{template}: {proc.returncode}\n{err}"
    assert re.fullmatch(r".*: SLURM_CPUS_PER_TASK: unset: submit with --cpus-per-task \(--cpus-per-gpu sets "
                        r"SLURM_CPUS_PER_GPU only\)\n", err), err
    assert CPU_LINE in (ROOT / template).read_text(), f"{template}: its SRUN_CPUS_PER_TASK line is not C8's"
