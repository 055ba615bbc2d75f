"""nemo/'s plumbing: the contract's flags (CONTRACT.md C2) translated into NeMo's Hydra overrides, composed with
conf/config.yaml and checked, the launchers' variables, and the callbacks' bookkeeping. recipe.py is the lesson.

Light imports only (the standard library and OmegaConf; Hydra, torch, NeMo and Lightning's cluster environments
inside the functions that need them): the scripts check the command line and the launch here before they import
NeMo (seconds), so bad input is one line and exit 2 at once.

Map:
    parse_args            the command line: the flags become Hydra overrides, composed and checked; --print-config;
                          Hydra's --config-path/--config-name (a config of the user's own, checked the same way);
                          a process given GPUs it cannot use stops here (CONTRACT.md C12)
    run                   the entry point's wrapper: toolkit.run as it is (Lightning tears its process group down)
    run_hydra             fit(cfg) the NeMo way, under @hydra_runner; a RecipeError inside comes out as one line
    torchrun_layout       (devices, num_nodes) as torchrun started the job, or one line saying how to start it
    slurm_layout          (devices, num_nodes) from srun's variables, checked against --devices/--num-nodes
    launcher_ranks        (rank, world size, local rank) from torchrun's or srun's variables (megatron_parallel.py)
    local_device          this process's GPU: local rank modulo the GPUs it sees (one GPU per process: cuda:0)
    parallel_devices      Lightning's devices for a launcher's processes, the same GPUs as local_device
    init_distributed      the process group, made before Lightning's under --timeout: a failed rendezvous (a busy
                          MASTER_PORT, missing ranks) is one line and exit 2; on the GPU the process's device is
                          set first and NCCL bound to it (device_id)
    rendezvous_store      where the ranks meet; torch 2.13 under torchrun --max-restarts: a key prefix per attempt
    check_dataset_fits    one line when the data is too small for one step of every rank
    reduce_max            the ranks' maximum of a float, for toolkit.PREEMPTION.agreed (the ranks stop together)
    save_last_checkpoint  the preemption checkpoint (*-last.ckpt) as NeMo's PreemptionCallback saves it, with
                          NeMo's and Lightning's private API (nemo/ uses it here alone, on tagged lines)
    without_training_step_proxy  a NeMo model's state for ddp_spawn's pickle (ModelPT's proxy left out)
    last_step             whether a batch is the run's last: a preemption stopping there still exports the .nemo
    settle_last_checkpoints  which *-last.ckpt exp_manager resumes from when a killed save left two (NeMo #7948)
    ReportHooks           the contract's log lines (C3) as Lightning hooks (recipe.Report adds the Callback base)
                          and the world size and batch in every checkpoint: another one is refused in one line
    ResumableHooks        a loader Lightning resumes mid-epoch: the trained batches skipped (recipe.ResumableLoader)
    TimingHooks           --timings-file as Lightning hooks, through toolkit.StepTimer (recipe.StepTimings)
    allow_tf32, TF32Hooks  TF32 matmuls and convolutions for fp32 runs on a GPU (CONTRACT.md C10; recipe.TF32)
    CONF_DIR, FLAG_TO_KEY  conf/, and the config key each contract flag sets
"""

import argparse
import functools
import math
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

import toolkit
from toolkit import OneLineParser, RecipeError, StepTimer, launcher_rank, log

CONF_DIR = Path(__file__).resolve().parent / "conf"

run = toolkit.run  # signals first, RecipeError -> one line and exit 2; nothing to clean up: Lightning does

# ------------------------------------------------------------------------------------------ the command line

# The contract's flags (CONTRACT.md C2) and the config key each one sets. The values go into Hydra as overrides,
# so a flag and its key are one setting, validated once (_validate() below) whichever way it was given.
FLAG_TO_KEY = {
    "--epochs": "trainer.max_epochs",
    "--max-steps": "trainer.max_steps",
    "--batch-size": "model.train_ds.batch_size",
    "--lr": "model.optim.lr",
    "--data": "model.train_ds.data",
    "--data-dir": "model.train_ds.data_dir",
    "--dataset-size": "model.train_ds.dataset_size",
    "--checkpoint-dir": "exp_manager.explicit_log_dir",
    "--save-every": "exp_manager.checkpoint_callback_params.every_n_epochs",
    "--save-every-steps": "recipe.save_every_steps",
    "--seed": "seed",
    "--num-workers": "model.train_ds.num_workers",
    "--backend": "recipe.backend",
    "--timeout": "recipe.timeout",
    "--log-every": "recipe.log_every",
    "--timings-file": "recipe.timings_file",
    "--nprocs": "trainer.devices",
    "--devices": "trainer.devices",
    "--num-nodes": "trainer.num_nodes",
}
EXTRA_FLAGS = ("--nprocs", "--devices", "--num-nodes")  # only for the scripts that ask for them (extra=...)
# What each value must be. Keys whose default is null need their type spelled out; the others must keep the type
# of their default in conf/config.yaml (an int may stand for a float).
POSITIVE_INT = ["trainer.max_epochs", "model.train_ds.batch_size", "model.train_ds.dataset_size", "recipe.timeout",
                "exp_manager.checkpoint_callback_params.every_n_epochs", "recipe.save_every_steps", "recipe.log_every",
                "trainer.devices", "trainer.num_nodes"]
CHOICES = {"model.train_ds.data": ["synthetic"], "recipe.backend": ["auto", "nccl", "gloo"]}
STRINGS = ["model.train_ds.data_dir", "exp_manager.explicit_log_dir", "recipe.timings_file"]

HELP = """
The contract's flags below, or NeMo's Hydra overrides (KEY=VALUE, keys of conf/config.yaml), or both:

    python {script} --epochs 5 model.optim.lr=0.1 trainer.precision=bf16-mixed

Each flag is an override of one key (shown after the flag); setting a key both ways is an error. A bad value or
an unknown key is one line and exit 2. Print the composed config: --print-config. Your own config instead of
conf/config.yaml (a copy of it, or one that extends it with Hydra's `defaults: [config, _self_]`): Hydra's
--config-path DIR --config-name NAME.
"""


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The Hydra overrides for this run (`overrides`) and the config they compose to (`cfg`), checked: a bad flag,
    key or value ends here in one line and exit 2, in about a second, before the script's NeMo imports (which
    take several). extra: which of --nprocs, --devices, --num-nodes the script takes. --print-config prints the
    config and exits.

    No silent CPU (CONTRACT.md C12): a process given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) or asked for
    nccl (--backend nccl or recipe.backend=nccl: the composed config's value) whose torch cannot use a GPU stops
    here, with one line and exit 2, before NeMo and Lightning's accelerator=auto would quietly pick the CPU.
    recipe.backend=gloo trains on the CPU on purpose.

    Hydra's --config-path DIR (absolute, or relative to the script's directory as Hydra reads it) and --config-name
    NAME select the config instead of conf/config.yaml (`config_dir`, `config_name`: run_hydra hands them to
    @hydra_runner); a missing directory or file is one line and exit 2, and the config is checked as conf/'s is."""
    overrides, options = _command_line(description, extra or ())
    config_dir, config_name = _config_source(options.config_path, options.config_name)
    cfg = _compose(overrides, config_dir, config_name)
    if options.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        sys.exit(0)
    toolkit.refuse_silent_cpu(cfg.recipe.backend, toolkit.torch_cuda_problem)
    return argparse.Namespace(overrides=overrides, cfg=cfg, config_dir=config_dir, config_name=config_name)


def _command_line(description: str, extra) -> tuple[list[str], argparse.Namespace]:
    """The contract's flags plus Hydra overrides -> (the overrides for Hydra, the options that are not overrides:
    print_config, config_path, config_name).

    Values stay text: they become overrides and _validate() checks them in the composed config, the same way as
    an override typed by hand."""
    p = OneLineParser(description=description + HELP.format(script=Path(sys.argv[0]).name),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for flag, key in FLAG_TO_KEY.items():
        if flag in EXTRA_FLAGS and flag not in extra:
            continue
        default = OmegaConf.select(defaults, key)
        if flag == "--nprocs":
            default = "one per visible GPU; 2 on a machine without CUDA"
        p.add_argument(flag, dest=key, default=None, help=f"{key} (default: {default})")
    p.add_argument("--amp", action="store_true",
                   help="trainer.precision=bf16-mixed where the device does bf16 natively (CPUs, GPUs of compute "
                        "capability >= 8.0), else 16-mixed (fp16 with loss scaling)")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    p.add_argument("--config-path", "-cp", help="Hydra's: the config's directory, absolute or relative to the "
                                                "script's directory (default: conf)")
    p.add_argument("--config-name", "-cn", help="Hydra's: the config's name in it (default: config)")
    args, rest = p.parse_known_args()
    options = argparse.Namespace(**{k: vars(args).pop(k) for k in ("print_config", "config_path", "config_name")})
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (Hydra overrides are KEY=VALUE)")
    typed = {a.split("=", 1)[0].lstrip("+~") for a in rest}
    overrides = []
    for key, value in vars(args).items():
        if value is None or key == "amp":
            continue
        if key in typed:
            p.error(f"{key} is set twice, by its flag and as an override: keep one")
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        overrides.append(f"{key}='{quoted}'" if key in STRINGS else f"{key}={value}")
    if args.amp:
        if "trainer.precision" in typed:
            p.error("trainer.precision is set twice, by --amp and as an override: keep one")
        overrides.append(f"trainer.precision={_amp_precision()}")
    return overrides + rest, options


def _config_source(path: str | None, name: str | None) -> tuple[Path, str]:
    """(directory, name) of the config Hydra composes: conf/config.yaml, or Hydra's --config-path/--config-name.
    A relative --config-path is read from the script's directory, as Hydra itself does."""
    directory = CONF_DIR if path is None else (Path(sys.argv[0]).resolve().parent / path).resolve()
    name = "config" if name is None else name.removesuffix(".yaml")
    if not directory.is_dir():
        raise RecipeError(f"--config-path {path}: no such directory ({directory}; a relative path is read from the "
                          f"script's directory, as Hydra does)")
    if not (directory / f"{name}.yaml").is_file():
        raise RecipeError(f"--config-name {name}: there is no {directory / name}.yaml")
    return directory, name


def _amp_precision() -> str:
    """--amp: bf16 where the device does it natively, else fp16 with loss scaling (CONTRACT.md C10).
    torch.cuda.is_bf16_supported() also says yes on V100/T4, where bf16 is emulated and slow."""
    import warnings

    import torch  # here: only --amp needs it, and the command line is checked before the slow imports

    with warnings.catch_warnings():  # a driver too old for torch: parse_args says so in its one line (C12)
        warnings.simplefilter("ignore")
        cuda = torch.cuda.is_available()
    if cuda and torch.cuda.get_device_capability() < (8, 0):
        return "16-mixed"
    return "bf16-mixed"


def _compose(overrides: list[str], config_dir: Path = CONF_DIR, config_name: str = "config") -> DictConfig:
    """The config Hydra will build from conf/config.yaml (or --config-path/--config-name) and these overrides,
    checked before anything runs.
    Hydra's own errors (unknown key, bad syntax) are condensed to one line instead of its multi-line report."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            if (config_dir, config_name) != (CONF_DIR, "config"):  # a missing key first, not an override's error
                _check_keys(hydra_compose(config_name=config_name), config_dir / f"{config_name}.yaml")
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        causes, cause = [], e
        while cause is not None:  # Hydra wraps OmegaConf's reason ("Key 'x' is not in struct")
            causes.append(" ".join(str(cause).split()))
            cause = cause.__cause__
        raise RecipeError("invalid override: " + "; ".join(dict.fromkeys(c for c in causes if c))) from None
    except YAMLError as e:  # a config of the user's own (--config-name)
        raise RecipeError(f"{config_dir / config_name}.yaml is not valid YAML: {' '.join(str(e).split())}") from None
    _validate(cfg)
    return cfg


def _check_keys(cfg: DictConfig, source: Path) -> None:
    """A config of the user's own (--config-name) must have every key of conf/config.yaml: the recipe reads them."""
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    missing = [key for key, _ in _flatten(defaults) if OmegaConf.select(cfg, key, default=KeyError) is KeyError]
    if missing:
        raise RecipeError(f"{source} lacks {len(missing)} key(s) of conf/config.yaml that the recipe reads: "
                          f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''} (start from a copy of it)")


def _validate(cfg: DictConfig) -> None:
    """Types and ranges of the composed config (Hydra itself accepts `trainer.max_epochs=abc`)."""
    flag_of = {key: flag for flag, key in FLAG_TO_KEY.items()}

    def name(key):
        return f"{key} ({flag_of[key]})" if key in flag_of else key

    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for key, default in _flatten(defaults):
        value = OmegaConf.select(cfg, key)
        if default is None or value is None:
            continue
        want = float if isinstance(default, float) else type(default)
        if not isinstance(value, want) or isinstance(value, bool) != isinstance(default, bool):
            if not (want is float and isinstance(value, int) and not isinstance(value, bool)):
                raise RecipeError(f"{name(key)} must be of type {want.__name__}, got {value!r}")
    for key in POSITIVE_INT:
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise RecipeError(f"{name(key)} must be an integer >= 1, got {value!r}")
    checks = [
        ("trainer.max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 1), "an integer >= 1 (or -1: none)"),
        ("model.optim.lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
        ("model.train_ds.num_workers", lambda v: v >= 0, "an integer >= 0"),
        # on a GPU it would take SIGTERM from recipe.Preemption and exit 0: a time limit would look like success
        ("exp_manager.create_preemption_callback", lambda v: v is False,
         "false (recipe.Preemption handles SIGUSR1/SIGTERM and exits 75; exp_manager's callback exits 0)"),
        *[(key, lambda v, c=choices: v in c, f"one of {', '.join(choices)}") for key, choices in CHOICES.items()],
        *[(key, lambda v: isinstance(v, str), "a path") for key in STRINGS],
    ]
    for key, ok, what in checks:
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise RecipeError(f"{name(key)} must be {what}, got {value!r}")
    for key in ("model.train_ds.data_dir", "exp_manager.explicit_log_dir"):
        value = OmegaConf.select(cfg, key)
        try:
            toolkit.directory(value) if value is not None else None
        except argparse.ArgumentTypeError as e:
            raise RecipeError(f"{name(key)} {e}") from None


def _flatten(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run_hydra(task, args: argparse.Namespace) -> None:
    """task(cfg) as NeMo's scripts run it: @hydra_runner reads the overrides from sys.argv and composes
    conf/config.yaml, or the config parse_args checked (with hydra.run.dir=.: no outputs/ directories, no change
    of directory).

    Hydra reports an exception raised inside the task as a traceback and exit 1: a RecipeError, and a collective
    that timed out (toolkit.HANG's evidence and line, C13), are carried out of Hydra instead, for run() to print
    as one line."""
    from nemo.core.config import hydra_runner

    raised = []

    def guarded(cfg):
        try:
            task(cfg)
        except RecipeError as e:
            raised.append(e)
        except RuntimeError as e:
            if not toolkit.timed_out(e):
                raise
            raised.append(e)

    sys.argv = [sys.argv[0], *args.overrides]
    hydra_runner(config_path=str(args.config_dir), config_name=args.config_name)(guarded)()
    if raised:
        raise raised[0]


# ------------------------------------------------------------------------------------------ the launchers


def torchrun_layout() -> tuple[int, int]:
    """(devices, num_nodes) as torchrun started this job: Lightning must agree with the launcher."""
    if "RANK" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        raise RecipeError("RANK/LOCAL_WORLD_SIZE not set: start this script with torchrun, e.g. "
                          "`torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py` (or use single_gpu.py)")
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, int(os.environ["WORLD_SIZE"]) // per_node


def slurm_layout(cfg: DictConfig) -> tuple[int, int]:
    """(devices, num_nodes) from the job. Lightning's devices must equal --ntasks-per-node and its num_nodes
    --nodes; a mismatch is the classic hang at "Initializing distributed", so stop with a clear message."""
    env = os.environ
    if "SLURM_NTASKS" not in env:
        raise RecipeError("SLURM_NTASKS not set: multinode.py runs one task per device started by srun: submit "
                          "multinode.sbatch, or run `srun python multinode.py` inside an allocation")
    if "SLURM_STEP_ID" not in env and int(env["SLURM_NTASKS"]) > 1:
        raise RecipeError(f"multinode.py was started without srun, as 1 process of a {env['SLURM_NTASKS']}-task "
                          "job: it would wait forever for the others. Start it with `srun python multinode.py` "
                          "(see multinode.sbatch)")
    if "SLURM_NTASKS_PER_NODE" not in env:
        raise RecipeError("SLURM_NTASKS_PER_NODE not set: set `#SBATCH --ntasks-per-node` (= devices per node); "
                          "Lightning needs it (--ntasks alone is not enough)")
    per_node, nodes = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), int(env["SLURM_NNODES"])
    problems = []
    if cfg.trainer.devices is not None and cfg.trainer.devices != per_node:
        problems.append(f"trainer.devices (--devices) {cfg.trainer.devices} but the job has "
                        f"--ntasks-per-node={per_node}")
    if cfg.trainer.num_nodes is not None and cfg.trainer.num_nodes != nodes:
        problems.append(f"trainer.num_nodes (--num-nodes) {cfg.trainer.num_nodes} but the job has --nodes={nodes}")
    if problems:  # one message (rank 0's), not one per task
        raise RecipeError("; ".join(problems) + ". Lightning needs one Slurm task per device: make "
                          "--ntasks-per-node equal the devices per node, or drop --devices/--num-nodes.",
                          every_rank=False)
    return per_node, nodes


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables or, under srun, Slurm's."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        env.setdefault("MASTER_PORT", str(15000 + int(env["SLURM_JOB_ID"]) % 15000))  # as the sbatch templates
        if "MASTER_ADDR" not in env:
            raise RecipeError("MASTER_ADDR not set: export it in the job script (see megatron_parallel.sbatch)")
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    raise RecipeError("no launcher variables (RANK/WORLD_SIZE or SLURM_PROCID under srun): start this script with "
                      "`srun` (megatron_parallel.sbatch) or `torchrun --nproc_per_node N megatron_parallel.py`")


def local_device(local_rank: int):
    """This process's GPU: its local rank modulo the GPUs it sees. Where every process sees the node's GPUs
    (torchrun; srun with --gpus-per-node, as the templates) that is cuda:<local rank>; a process that was given
    only its own GPU (CUDA_VISIBLE_DEVICES set per process) uses cuda:0, its only device, not cuda:<local rank>,
    which does not exist there. (Under srun Lightning itself refuses that layout for multinode.py: README.md.)"""
    import torch

    return torch.device("cuda", local_rank % torch.cuda.device_count())


def parallel_devices(per_node: int):
    """Lightning's parallel_devices for one process per device on each node (DDPStrategy(parallel_devices=...)):
    its root device is parallel_devices[local rank], so this makes it local_device(local rank), the GPU
    init_distributed chose, instead of Lightning's own cuda:<local rank>. None without CUDA (Lightning's CPUs)."""
    import torch

    return [local_device(i) for i in range(per_node)] if torch.cuda.is_available() else None


def init_distributed(cfg: DictConfig) -> None:
    """Under srun (multinode.py) or torchrun (multigpu_torchrun.py): create the process group before Lightning does,
    under a deadline of recipe.timeout (--timeout), before Hydra starts; Lightning's DDPStrategy then uses it as it
    is (its _init_dist_connection skips init_process_group when a group exists). A failed rendezvous is one line.

    Lightning's own init_process_group waits in C++ where no timeout reaches: with MASTER_PORT held by a program
    that listens but never answers, rank 0 died with a traceback (EADDRINUSE) and the other ranks waited forever
    in TCPStore's connect (README.md, Troubleshooting). Here each way a rendezvous fails is one line and exit 2.
    Ranks, world size, MASTER_ADDR/MASTER_PORT come from the ClusterEnvironment Lightning uses for these launches
    (TorchElasticEnvironment when torchrun started the process, as Lightning checks it first; else multinode.py's
    SLURMEnvironment, which derives the address and port from the job when they are unset); the backend is
    Lightning's choice too (nccl with CUDA, else gloo) unless --backend says otherwise. torch and Lightning are
    imported here, after the command line and the launch were checked (this module stays light).

    On the GPU the process's device is set first (local_device, the root device parallel_devices gives Lightning)
    and NCCL's communicator is bound to it (device_id=): made at once on the right GPU, not lazily on whichever
    device is current at the first collective (cuda:0 for every rank)."""
    import atexit
    from datetime import timedelta

    import torch
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        environment = TorchElasticEnvironment()
    elif "SLURM_NTASKS" in os.environ:
        environment = SLURMEnvironment(auto_requeue=False)
    else:
        return  # no launcher: nothing to join
    rank, world_size = environment.global_rank(), environment.world_size()
    addr, port = environment.main_address, environment.main_port  # as Lightning reads (and exports) them
    backend = cfg.recipe.backend if cfg.recipe.backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
    seconds = cfg.recipe.timeout
    timeout = timedelta(seconds=seconds)
    toolkit.HANG.remember(cfg.exp_manager.explicit_log_dir, seconds)  # a hang's evidence and deadline (C13)
    what = (f"rendezvous at {addr}:{port} (are all {world_size} ranks started, MASTER_ADDR reachable from every "
            f"node, MASTER_PORT used by nothing else?)")
    try:
        with toolkit.deadline(seconds, rank, what):  # a connect to a port that never answers: no timeout
            store = rendezvous_store(addr, port, rank, world_size, timeout)
            if torch.cuda.is_available():
                torch.cuda.set_device(local_device(environment.local_rank()))  # Lightning's root device too
            device = local_device(environment.local_rank()) if backend == "nccl" else None
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                                 timeout=timeout, device_id=device)
    except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {seconds} s")
        raise RecipeError(f"rendezvous at {addr}:{port} failed: {hint} ({str(e).splitlines()[0][:200]})") from None
    if backend == "nccl":  # as Lightning does for a group it creates (torch warns about one left undestroyed)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


def rendezvous_store(addr: str, port: int, rank: int, world_size: int, timeout):
    """The store torch's env:// rendezvous would make: under torchrun the agent hosts it and every worker is a
    client; under srun rank 0 hosts it.

    Under `torchrun --max-restarts` on one node each attempt meets under a key prefix of its own: the agent's store
    still holds the keys the failed attempt wrote, and a restarted worker could read a dead worker's address from
    them (torch 2.13: "Gloo connectFullMesh failed ... Connection refused"). Across nodes the agents count restarts
    differently (only the one whose worker failed counts it): no prefix there, Slurm requeues (README.md,
    Troubleshooting)."""
    import torch

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return torch.distributed.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout,
                                          multi_tenant=True)
    store = torch.distributed.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    if os.environ.get("GROUP_WORLD_SIZE") != "1" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return store
    # WORKAROUND(torch 2.13, pytorch/pytorch#167288): a restarted attempt must not read the dead workers' keys
    return torch.distributed.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


# ------------------------------------------------------------------------------------------ training's plumbing


def check_dataset_fits(dataset_size: int, world_size: int, batch_size: int) -> None:
    if dataset_size // (world_size * batch_size) == 0:
        raise RecipeError(f"--dataset-size {dataset_size} is too small for one step of {world_size} processes x "
                          f"--batch-size {batch_size}: lower --batch-size or use more data")


def reduce_max(trainer, device):
    """The maximum of a float over the ranks (Lightning's strategy: an all-reduce MAX; as is with one process):
    PREEMPTION.agreed's inf (a rank got the signal) or the slowest rank's seconds per step."""
    import torch

    return lambda value: trainer.strategy.reduce(torch.tensor(float(value), device=device), reduce_op="max").item()


def save_last_checkpoint(trainer, checkpoint, batch_in_flight=True) -> None:
    """*-last.ckpt now, through exp_manager's checkpoint callback (the file exp_manager resumes from), as NeMo's own
    PreemptionCallback saves it: in on_train_batch_end the in-flight batch counted as completed first (Lightning
    counts it only after on_train_batch_end, so the resumed run would replay it); in on_train_batch_start
    (batch_in_flight=False) the batch fetched is not trained yet. Neither has a public API: NeMo's helper and
    Lightning's ModelCheckpoint methods are private, so they are called here alone, each on a tagged line."""
    # WORKAROUND(nemo-toolkit 3.0.0, nemo/utils/callbacks/preemption.py): NeMo's private helper, as PreemptionCallback
    from nemo.utils.exp_manager import _flush_in_flight_batch_progress as count_the_batch_in_flight

    if batch_in_flight:
        count_the_batch_in_flight(trainer)
    # WORKAROUND(lightning 2.4.0, nemo/utils/callbacks/preemption.py): ModelCheckpoint's private save of *-last.ckpt
    checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


def without_training_step_proxy(state: dict) -> dict:
    """A NeMo model's pickled state without the wrapt proxy ModelPT.__init__ puts over training_step, which cannot
    be pickled to ddp_spawn's workers (NVIDIA-NeMo/Speech#1594). The proxy only forwards a 'log' key ToyClassifier
    never returns, so the workers use the plain method (README.md, troubleshooting)."""
    # WORKAROUND(nemo-toolkit 3.0.0, NVIDIA-NeMo/Speech#1594): ModelPT's instance attribute, left out of the pickle
    return {key: value for key, value in state.items() if key != "training_step"}


def last_step(trainer, batch_idx: int) -> bool:
    """Whether the batch just trained is the run's last one (its last epoch's last batch, or --max-steps): a
    preemption that stops there ends training all the same, so the .nemo archive is exported. Skipped, it was lost:
    the requeued run resumes a finished run, trains nothing and never reaches on_train_end, where NeMo exports it."""
    last_batch = trainer.current_epoch + 1 >= trainer.max_epochs and batch_idx + 1 >= trainer.num_training_batches
    return last_batch or 0 < trainer.max_steps <= trainer.global_step


def settle_last_checkpoints(exp_cfg: DictConfig) -> DictConfig:
    """exp_manager's settings, with the checkpoint to resume from chosen here when exp_manager would refuse.

    exp_manager resumes from the one *-last.ckpt in <dir>/checkpoints and stops with "Multiple checkpoints ...
    that matches *last.ckpt" when a job was killed between writing the new one and deleting the old one (NeMo
    issue #7948: "manually clean up the checkpoints folder"). Then the readable one with the most progress (its
    stored global_step, never the file time) is resumed, with a warning; none readable is an error naming them.
    """
    import torch
    from nemo.utils.callbacks import NeMoModelCheckpoint

    directory = Path(exp_cfg.explicit_log_dir) / "checkpoints"
    candidates = sorted(directory.glob("*last.ckpt")) if directory.is_dir() else []
    if len(candidates) <= 1:
        return exp_cfg  # exp_manager's own rule
    best, best_step, problems = None, -1, []
    for path in candidates:
        try:
            if NeMoModelCheckpoint.is_checkpoint_unfinished(path):
                raise ValueError("its save never finished")
            # weights_only=False: a NeMo checkpoint holds its OmegaConf config; these are this run's own files
            step = int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        except Exception as e:  # truncated, unfinished, not a checkpoint
            problems.append(f"{path} is unusable ({type(e).__name__}: {e})")
            continue
        if step > best_step:
            best, best_step = path, step
    if best is None:
        raise RecipeError("no usable checkpoint: " + "; ".join(problems) + ". Delete or move them to start over.")
    if launcher_rank() == 0:
        log(0, f"warning: {len(candidates)} *last.ckpt files in {directory} (a save was interrupted?); "
               f"resuming from the one with the most progress: {best.name} (step {best_step})", file=sys.stderr)
    exp_cfg = exp_cfg.copy()
    with open_dict(exp_cfg):
        exp_cfg.resume_if_exists, exp_cfg.resume_from_checkpoint = False, str(best)
    return exp_cfg


class ReportHooks:
    """The contract's log lines (CONTRACT.md C3), printed by rank 0: a progress line every --log-every steps, one
    line per epoch with the loss and accuracy averaged over all ranks and the samples/s of the whole job, and where
    training starts, resumes and ends. Lightning's hooks without Lightning's Callback base (recipe.Report adds it:
    this module imports no Lightning at its top); torch is imported where a hook needs it."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.saving, self.last_snapshot_step = cfg, None, None

    def _print(self, trainer, message):
        if trainer.is_global_zero:
            log(0, message)

    def on_fit_start(self, trainer, pl_module):
        self.fit_start, self.resume_reported = time.perf_counter(), False

    def _report_resume(self, trainer):
        if trainer.ckpt_path and not self.resume_reported:
            self.resume_reported = True
            self._print(trainer, f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch + 1}, "
                                 f"step {trainer.global_step}")

    def on_train_start(self, trainer, pl_module):
        import torch

        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self._print(trainer, f"world size {trainer.world_size} | backend {backend} | device {pl_module.device} | "
                             f"{len(pl_module.train_set)} samples | batch {self.cfg.model.train_ds.batch_size}/rank"
                             f" | {trainer.num_training_batches} steps/epoch")
        self._report_resume(trainer)
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module):
        import torch

        self._report_saved(trainer)
        self.epoch_start, self.epoch_first_step = time.perf_counter(), trainer.global_step
        self.sums = torch.zeros(2, device=pl_module.device)  # this rank's loss x samples, correct predictions

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._report_saved(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch[1])  # on the device, no sync: nothing is read before the epoch ends
        self.sums[0] += outputs["loss"].detach().float() * n
        self.sums[1] += outputs["correct"].float()
        if trainer.global_step % self.cfg.recipe.log_every == 0:
            self._print(trainer, f"epoch {trainer.current_epoch + 1} | batch {batch_idx + 1}/"
                                 f"{trainer.num_training_batches} | step {trainer.global_step} | "
                                 f"loss {outputs['loss'].item():.4f}")

    def on_train_epoch_end(self, trainer, pl_module):
        self._report_saved(trainer)
        seconds = time.perf_counter() - self.epoch_start
        samples = (trainer.global_step - self.epoch_first_step) * self.cfg.model.train_ds.batch_size * \
            trainer.world_size
        totals = trainer.strategy.reduce(self.sums, reduce_op="sum")  # every rank: one collective per epoch
        if samples:
            loss, acc = (totals / samples).tolist()
            self._print(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} | step "
                                 f"{trainer.global_step} | loss {loss:.4f} | acc {acc:.4f} | "
                                 f"{samples / seconds:.0f} samples/s | {seconds:.1f} s")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["layout"] = {"world_size": trainer.world_size, "batch_size": self.cfg.model.train_ds.batch_size}
        # Lightning calls this before it writes the file: the line waits for the next hook, once the file is on
        # disk (a crash after the line resumes from this step)
        self.saving = trainer.global_step

    def _report_saved(self, trainer):
        # NeMo's callback writes the top-k file and *-last.ckpt at the same step: one line for both
        if self.saving is not None and self.saving != self.last_snapshot_step:
            self.last_snapshot_step = self.saving
            self._print(trainer, f"snapshot saved to {self.cfg.exp_manager.explicit_log_dir} (step {self.saving})")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        """Before anything trains: a checkpoint of another world size or batch is refused in one line. Lightning
        resumes its step and epoch counters and the scheduler (its T_max too) as they were, in steps of the old
        layout: under another one the cosine curve no longer ends with the run. (Checkpoints written before the
        layout was recorded are not checked.)"""
        old, batch = checkpoint.get("layout"), self.cfg.model.train_ds.batch_size
        if old and (old["world_size"], old["batch_size"]) != (trainer.world_size, batch):
            raise RecipeError(f"{trainer.ckpt_path} was written by {old['world_size']} rank(s) x batch "
                              f"{old['batch_size']}, this job is {trainer.world_size} x {batch}: Lightning resumes "
                              f"its counters in steps of the old layout. Resubmit with {old['world_size']} rank(s) x "
                              f"--batch-size {old['batch_size']}, or start a new --checkpoint-dir", every_rank=False)

    def on_fit_end(self, trainer, pl_module):
        self._report_saved(trainer)
        self._report_resume(trainer)  # a finished run resumed: Lightning trains nothing and skips on_train_start
        self._print(trainer, f"done: {trainer.global_step} steps in {time.perf_counter() - self.fit_start:.1f} s")


class ResumableHooks:
    """A DataLoader Lightning resumes mid-epoch (from a --save-every-steps or a preemption checkpoint), as
    lightning/'s ResumableLoader: state_dict holds the optimizer step (one batch per step), load_state_dict makes
    the resumed epoch skip the batches before it. Without them Lightning restarts the epoch at its first batch
    ("your dataloader is not resumable") and the weights differ from an uninterrupted run's. The DataLoader is
    recipe.ResumableLoader's other base (this module imports no torch at its top)."""

    def __init__(self, *args, trainer, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer, self.skip = trainer, 0

    def state_dict(self) -> dict:
        return {"global_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["global_step"] % len(self)  # 0 at an epoch boundary

    def __iter__(self):
        # A generator: nothing is drawn before the first batch is asked for (Lightning creates the iterator before
        # it calls the sampler's set_epoch). Only the resumed epoch skips.
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class TimingHooks:
    """--timings-file for the benchmark runner: rank 0 records the wall time right after every optimizer step
    (toolkit.StepTimer). Lightning's hooks without Lightning's Callback base (recipe.StepTimings adds it)."""

    def __init__(self, path: str, start_time: float, batch_size: int):
        self.timer = StepTimer(path, start_time=start_time, batch_size=batch_size)

    def on_train_start(self, trainer, pl_module):
        if pl_module.device.type == "cuda":  # the step's kernels, not just their launch (as pytorch/)
            import torch

            self.timer.sync = functools.partial(torch.cuda.synchronize, pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            self.timer()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.timer.path).parent.mkdir(parents=True, exist_ok=True)
            self.timer.write(world_size=trainer.world_size)


def allow_tf32(device, precision: str) -> bool:
    """fp32 runs on a GPU: matmuls and convolutions in TF32 on Ampere+ (inputs rounded to a 10-bit mantissa,
    accumulation in fp32: about twice the matmul speed, CONTRACT.md C10); True when set. Not on the CPU, where
    the "high" matmul setting would reach oneDNN's matmuls too, nor under --amp (autocast does bf16/fp16).

    torch.set_float32_matmul_precision("high"), not torch 2.13's torch.backends.cuda.matmul.fp32_precision: with
    that one alone torch.get_float32_matmul_precision() raises ("mix of the legacy and new APIs"), and Lightning
    calls it when it sets up an Ampere GPU."""
    import torch

    if device.type != "cuda" or precision != "32-true":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default; said here
    return True


class TF32Hooks:
    """allow_tf32 on the Trainer's device, in every process that trains (also ddp_spawn's workers, new processes
    that do not inherit the flags). Lightning's hook without Lightning's Callback base (recipe.TF32 adds it)."""

    def setup(self, trainer, pl_module, stage):
        allow_tf32(trainer.strategy.root_device, trainer.precision)
