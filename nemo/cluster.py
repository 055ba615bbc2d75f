"""The command line of every script in this folder: the contract's flags (CONTRACT.md C2) translated into NeMo's
Hydra overrides, composed with conf/config.yaml and checked, before the scripts import NeMo (seconds).

Only light imports here (argparse, OmegaConf, Hydra): a bad flag or override is one line and exit 2 at once.
"""

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def rank_prefix() -> str:
    """`[rankN] ` for every line (CONTRACT.md C3); the global rank from whichever launcher set it."""
    return f"[rank{os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] "


def fail(message: str) -> None:
    """Bad input or a bad launch: one line on stderr and exit 2 (CONTRACT.md C4), never a traceback or a hang."""
    print(f"{rank_prefix()}error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ------------------------------------------------------------------------------------------ the command line

# The contract's flags (CONTRACT.md C2) and the config key each one sets. The values go into Hydra as overrides,
# so a flag and its key are one setting, validated once (validate() below) whichever way it was given.
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
# What each value must be. Keys whose default is null need their type spelled out; the others must keep the type
# of their default in conf/config.yaml (an int may stand for a float).
POSITIVE_INT = ["trainer.max_epochs", "model.train_ds.batch_size", "model.train_ds.dataset_size", "recipe.timeout",
                "exp_manager.checkpoint_callback_params.every_n_epochs", "recipe.log_every", "trainer.devices",
                "trainer.num_nodes"]
CHOICES = {"model.train_ds.data": ["synthetic"], "recipe.backend": ["auto", "nccl", "gloo"]}
STRINGS = ["model.train_ds.data_dir", "exp_manager.explicit_log_dir", "recipe.timings_file"]

HELP = """
The contract's flags below, or NeMo's Hydra overrides (KEY=VALUE, keys of conf/config.yaml), or both:

    python {script} --epochs 5 model.optim.lr=0.1 trainer.precision=bf16-mixed

Each flag is an override of one key (shown after the flag); setting a key both ways is an error. A bad value or
an unknown key is one line and exit 2. Print the composed config: --print-config.
"""


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line and exit 2, like every other bad input (not argparse's usage block)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_command_line(description: str, *, nprocs: bool = False, num_nodes: bool = False):
    """The contract's flags plus Hydra overrides -> (the overrides for Hydra, whether to only print the config).

    Values stay text: they become overrides and validate() checks them in the composed config, the same way as
    an override typed by hand."""
    p = OneLineParser(description=description + HELP.format(script=Path(sys.argv[0]).name),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for flag, key in FLAG_TO_KEY.items():
        if flag == "--nprocs" and not nprocs or flag in ("--devices", "--num-nodes") and not num_nodes:
            continue
        default = OmegaConf.select(defaults, key)
        if flag == "--nprocs":
            default = "one per visible GPU; 2 on a machine without CUDA"
        p.add_argument(flag, dest=key, default=None, help=f"{key} (default: {default})")
    p.add_argument("--amp", action="store_true",
                   help="trainer.precision=bf16-mixed where the device does bf16 natively (CPUs, GPUs of compute "
                        "capability >= 8.0), else 16-mixed (fp16 with loss scaling)")
    p.add_argument("--print-config", action="store_true", help="print the composed config and exit")
    args, rest = p.parse_known_args()
    bad = [a for a in rest if "=" not in a or a.startswith("-")]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (Hydra overrides are KEY=VALUE)")
    typed = {a.split("=", 1)[0].lstrip("+~") for a in rest}
    overrides = []
    for key, value in vars(args).items():
        if value is None or key in ("amp", "print_config"):
            continue
        if key in typed:
            p.error(f"{key} is set twice, by its flag and as an override: keep one")
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        overrides.append(f"{key}='{quoted}'" if key in STRINGS else f"{key}={value}")
    if args.amp:
        if "trainer.precision" in typed:
            p.error("trainer.precision is set twice, by --amp and as an override: keep one")
        overrides.append(f"trainer.precision={amp_precision()}")
    return overrides + rest, args.print_config


def amp_precision() -> str:
    """--amp: bf16 where the device does it natively, else fp16 with loss scaling (CONTRACT.md C10).
    torch.cuda.is_bf16_supported() also says yes on V100/T4, where bf16 is emulated and slow."""
    import torch  # here: only --amp needs it, and the command line is checked before the slow imports

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "16-mixed"
    return "bf16-mixed"


def compose(overrides: list[str]) -> DictConfig:
    """The config Hydra will build from conf/config.yaml and these overrides, checked before anything runs.
    Hydra's own errors (unknown key, bad syntax) are condensed to one line instead of its multi-line report."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        causes, cause = [], e
        while cause is not None:  # Hydra wraps OmegaConf's reason ("Key 'x' is not in struct")
            causes.append(" ".join(str(cause).split()))
            cause = cause.__cause__
        fail("invalid override: " + "; ".join(dict.fromkeys(c for c in causes if c)))
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Types and ranges of the composed config (Hydra itself accepts `trainer.max_epochs=abc`)."""
    flag_of = {key: flag for flag, key in FLAG_TO_KEY.items()}

    def name(key):
        return f"{key} ({flag_of[key]})" if key in flag_of else key

    defaults = OmegaConf.load(CONF_DIR / "config.yaml")
    for key, default in flatten(defaults):
        value = OmegaConf.select(cfg, key)
        if default is None or value is None:
            continue
        want = float if isinstance(default, float) else type(default)
        if not isinstance(value, want) or isinstance(value, bool) != isinstance(default, bool):
            if not (want is float and isinstance(value, int) and not isinstance(value, bool)):
                fail(f"{name(key)} must be of type {want.__name__}, got {value!r}")
    for key in POSITIVE_INT:
        value = OmegaConf.select(cfg, key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            fail(f"{name(key)} must be an integer >= 1, got {value!r}")
    checks = [
        ("trainer.max_steps", lambda v: isinstance(v, int) and (v == -1 or v >= 1), "an integer >= 1 (or -1: none)"),
        ("model.optim.lr", lambda v: v > 0, "a number > 0"),
        ("model.train_ds.num_workers", lambda v: v >= 0, "an integer >= 0"),
        *[(key, lambda v, c=choices: v in c, f"one of {', '.join(choices)}") for key, choices in CHOICES.items()],
        *[(key, lambda v: isinstance(v, str), "a path") for key in STRINGS],
    ]
    for key, ok, what in checks:
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            fail(f"{name(key)} must be {what}, got {value!r}")


def flatten(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, DictConfig):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def command_line(description: str, **script_flags) -> tuple[list[str], DictConfig]:
    """The Hydra overrides for this run and the config they compose to, checked: a bad flag, key or value ends
    here in one line and exit 2, in about a second, before the script's NeMo imports (which take several).
    --print-config prints the config and exits."""
    overrides, print_config = parse_command_line(description, **script_flags)
    cfg = compose(overrides)
    if print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        sys.exit(0)
    return overrides, cfg


def run(task, overrides: list[str]) -> None:
    """Run a @hydra_runner function as NeMo's scripts run: Hydra reads the overrides from sys.argv."""
    sys.argv = [sys.argv[0], *overrides]
    task()
