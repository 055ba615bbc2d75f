"""Megatron-style model parallelism, the way NeMo's LLM training runs today (Megatron-Core, which NeMo 2.x and
Megatron-Bridge build on): one process per GPU, started by srun (or torchrun), and Megatron-Core's
parallel_state splitting the world into tensor x pipeline x data parallel groups.

    srun --ntasks-per-node 8 python megatron_parallel.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2           # 16 GPUs on 2 nodes: TP 2 x PP 2 x DP 4
    torchrun --standalone --nproc_per_node 4 megatron_parallel.py --tensor-model-parallel-size 2

It prints (and with --layout-file writes) which ranks share each group and what each pipeline stage holds, then
trains a tiny GPTModel for --steps steps the Megatron way: each stage builds only its own layers (the first the
embedding, the last the output layer and the loss), Megatron's pipeline schedule runs --micro-batches micro-batches
through the stages (1F1B), its DistributedDataParallel and finalize_model_grads reduce the gradients, its
optimizer steps. With --checkpoint-dir it resumes from, and saves, a dist_checkpointing checkpoint (each rank
writes its own shards); SIGUSR1/SIGTERM save one and exit 75.

Training needs CUDA: Megatron-Core allocates its pipeline buffers, gradient buffers and attention scratch on the
GPU. Without CUDA the script builds the groups and each stage's model on gloo, reports them and stops -- where the
job was given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) only with --backend gloo: else a torch that cannot
use them is one line and exit 2 (CONTRACT.md C12, no silent CPU).
This script has its own command line (not the contract's: it is a layout and launch example, not a recipe).
"""

import argparse
import json
import os
import shutil
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

import toolkit
from cluster import launcher_ranks, local_device, run
from toolkit import PREEMPTION, OneLineParser, PreemptionFlag, RecipeError, log

HEADS, HIDDEN, VOCAB, LAYERS_PER_STAGE = 4, 64, 128, 2
TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's name: the step of the last complete checkpoint


def parse_args(description):
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks that split each layer")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: stages the layers are split into")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps in all, a resumed run included (CUDA)")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step, pipelined across the stages")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="resume from the newest checkpoint here; save one at the end and on "
                                            "SIGUSR1/SIGTERM (then exit 75)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto", help="auto: nccl with CUDA")
    p.add_argument("--timeout", type=int, default=300, help="seconds a rendezvous or collective may take")
    p.add_argument("--layout-file", help="rank 0 writes {rank: {tp, pp, dp: [ranks], stage: {...}}} here (JSON)")
    args = p.parse_args()
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "steps", "micro_batches",
                 "micro_batch_size", "seq_length", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


def check_sizes(args, world: int) -> int:
    """The data-parallel size, or one line (from rank 0) and exit 2 when TP x PP does not fit the world or TP
    cannot split the model's heads."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp * pp > world:
        raise RecipeError(f"tensor {tp} x pipeline {pp} = {tp * pp} model-parallel ranks, but the world size is "
                          f"{world}: lower the sizes or start more processes", every_rank=False)
    if world % (tp * pp):
        raise RecipeError(f"the world size {world} is not a multiple of tensor {tp} x pipeline {pp} = {tp * pp}",
                          every_rank=False)
    if HEADS % tp:
        raise RecipeError(f"--tensor-model-parallel-size {tp} must divide the model's {HEADS} attention heads "
                          f"(each TP rank computes whole heads)", every_rank=False)
    return world // (tp * pp)


# ------------------------------------------------------------------------------------------ the model, per stage


def build_model(args):
    """This rank's part of the GPT: its pipeline stage's layers (LAYERS_PER_STAGE), the embedding only on the first
    stage, the final norm, output layer and loss only on the last, each weight split TP ways. The weights are drawn
    on the CPU from one seed (use_cpu_initialization): the same model at any TP."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(args.seed)
    config = TransformerConfig(
        num_layers=LAYERS_PER_STAGE * args.pipeline_model_parallel_size, hidden_size=HIDDEN,
        num_attention_heads=HEADS, hidden_dropout=0.0, attention_dropout=0.0,  # no dropout: a resume is exact
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,  # without it every stage builds every layer
        use_cpu_initialization=True, pipeline_dtype=torch.float32)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                    max_sequence_length=args.seq_length, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage())


def stage_contents(model) -> dict:
    """What this rank's stage holds, for the report."""
    return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "layers": len(model.decoder.layers),
            "embedding": hasattr(model, "embedding"), "output_layer": hasattr(model, "output_layer"),
            "params": sum(p.numel() for p in model.parameters())}


def batch(args, step: int, micro: int) -> dict:
    """Micro-batch `micro` of step `step`: the same tokens on every rank of a data-parallel replica (its TP and PP
    ranks), other tokens on each replica; drawn from (seed, replica, step, micro), so a resumed run reads on where
    the cut one stopped."""
    g = torch.Generator().manual_seed(((args.seed * 1000 + parallel_state.get_data_parallel_rank()) * 1_000_003 + step)
                                      * 1000 + micro)
    tokens = torch.randint(0, VOCAB, (args.micro_batch_size, args.seq_length + 1), generator=g)
    mask = torch.tril(torch.ones(args.seq_length, args.seq_length)).unsqueeze(0) < 0.5  # True: masked out
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "attention_mask": mask,
            "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1)}


# ------------------------------------------------------------------------------------------ the training step


def megatron_training(args, model, device):
    """(the model as Megatron's DistributedDataParallel, its optimizer, one optimizer step) on CUDA.

    The DDP wrapper keeps the gradients in one contiguous buffer and all-reduces it over the data-parallel group;
    finalize_model_grads (called by the schedule after the last micro-batch) does that and the other reductions
    a pipeline needs (the embedding gradient shared by the first and last stage)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(args.seed)  # Megatron's CUDA RNG states for the TP regions
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  model.to(device))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync  # no gradient all-reduce until the last micro-batch
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=args.lr, clip_grad=1.0), [ddp])
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, model):
        b = {k: v.to(device) for k, v in next(data_iterator).items()}
        # A middle or last stage ignores the tokens: its input is the previous stage's activations, set by the
        # schedule. The last stage returns the loss per token.
        out = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        return out, lambda loss: (loss.float().mean(), {"lm loss": loss.float().mean()})

    def train_step(step: int) -> float | None:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(
            forward_step_func=forward_step, model=[ddp], num_microbatches=args.micro_batches,
            data_iterator=iter([batch(args, step, m) for m in range(args.micro_batches)]),
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
        optimizer.step()
        return sum(x["lm loss"].item() for x in losses) / len(losses) if losses else None  # last stage only

    return ddp, optimizer, train_step


# ------------------------------------------------------------------------------------------ checkpoints


def sharded_state(module, optimizer, step: int, is_loading=False) -> dict:
    """What a checkpoint holds: each rank's shards of the model (and of the optimizer's state), keyed by their
    place in the whole model, so any TP x PP layout can read them; the step."""
    model = module.sharded_state_dict()
    state = {"model": model, "step": step}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model, is_loading=is_loading)
    return state


def newest_checkpoint(ckpt_dir: str) -> int:
    """The step the tracker names, 0 without one. A directory the tracker does not name is a save that did not
    finish (Megatron-LM's scheme: the tracker is written last)."""
    try:
        with open(os.path.join(ckpt_dir, TRACKER)) as f:
            return int(f.read())
    except FileNotFoundError:
        return 0


def step_dir(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"iter_{step:07d}")


def save_checkpoint(ckpt_dir: str, step: int, module, optimizer) -> None:
    """Every rank writes its shards into iter_<step>/; once all have, rank 0 names it in the tracker (one atomic
    rename) and removes the older ones. A crash before that leaves the last complete checkpoint the newest."""
    path, rank = step_dir(ckpt_dir, step), dist.get_rank()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # a save of this step that did not finish
        os.makedirs(path)
    dist.barrier()
    # dist_checkpointing's writer starts a helper process (a multiprocessing Manager) at its first save. Slurm
    # signals every process of the step: it starts with SIGUSR1/SIGTERM blocked (the mask survives exec), so it
    # lives on; a signal to this process meanwhile waits until the mask is lifted.
    signal.pthread_sigmask(signal.SIG_BLOCK, PreemptionFlag.SIGNALS)
    try:
        dist_checkpointing.save(sharded_state(module, optimizer, step), path)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PreemptionFlag.SIGNALS)
    dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        toolkit.atomic_write(os.path.join(ckpt_dir, TRACKER), lambda f: f.write(str(step).encode()))
        for name in os.listdir(ckpt_dir):
            if name.startswith("iter_") and name != os.path.basename(path):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    dist.barrier()


def load_checkpoint(ckpt_dir: str, module, optimizer) -> int:
    """The newest complete checkpoint into the model (and optimizer); its step, 0 when there is none."""
    step = newest_checkpoint(ckpt_dir)
    if step:
        state = dist_checkpointing.load(sharded_state(module, optimizer, step, is_loading=True), step_dir(ckpt_dir,
                                                                                                      step))
        module.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    return step


# ------------------------------------------------------------------------------------------ the loop


def train(args, module, optimizer, train_step, device) -> None:
    """Steps up to --steps, resuming from --checkpoint-dir; a preemption signal (every rank agrees on the step,
    toolkit.PreemptionFlag) saves a checkpoint and exits 75; the last step saves one."""
    rank, ckpt = dist.get_rank(), args.checkpoint_dir
    start = load_checkpoint(ckpt, module, optimizer) if ckpt else 0
    if start:
        log(rank, f"resumed from {step_dir(ckpt, start)}: step {start}")

    def reduce_max(value):  # a float: inf where the signal came, else seconds per step
        t = torch.tensor(float(value), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    for step in range(start + 1, args.steps + 1):
        loss = train_step(step)
        if loss is not None and parallel_state.get_data_parallel_rank() == 0 \
                and parallel_state.get_tensor_model_parallel_rank() == 0:
            log(rank, f"step {step} | lm loss {loss:.4f}")
        if step < args.steps and PREEMPTION.agreed(step, reduce_max):
            if ckpt:
                save_checkpoint(ckpt, step, module, optimizer)
            if rank == 0:
                log(rank, f"preempted at step {step}: " + ("checkpoint saved; " if ckpt else "") + "exiting with 75")
            sys.exit(toolkit.PREEMPTED_EXIT_CODE)
    if ckpt and args.steps > start:
        save_checkpoint(ckpt, args.steps, module, optimizer)
    if rank == 0:
        log(rank, f"done: {args.steps} steps")


# ------------------------------------------------------------------------------------------ set-up


def group_layout() -> dict:
    """This rank's groups, as global ranks."""
    return {"tp": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
            "pp": dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()),
            "dp": dist.get_process_group_ranks(parallel_state.get_data_parallel_group())}


def setup(args):
    """How this process joins the others: its rank from the launcher (torchrun or srun), one process group over
    the world (rendezvous at MASTER_ADDR/MASTER_PORT), then Megatron-Core's tensor x pipeline x data-parallel
    groups inside it."""
    rank, world, local_rank = launcher_ranks()
    dp = check_sizes(args, world)  # before any rendezvous
    cuda = torch.cuda.is_available()
    backend = args.backend if args.backend != "auto" else "nccl" if cuda else "gloo"
    device = local_device(local_rank) if cuda else torch.device("cpu")  # one GPU per task: cuda:0
    if cuda:
        torch.cuda.set_device(device)  # before the group: NCCL's communicator is bound to it (device_id)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=args.timeout),
                            init_method="env://", device_id=device if backend == "nccl" else None)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size,
                                             pipeline_model_parallel_size=args.pipeline_model_parallel_size)
    if rank == 0:
        log(rank, f"world size {world} = tensor {args.tensor_model_parallel_size} x pipeline "
                  f"{args.pipeline_model_parallel_size} x data {dp} | backend {backend}")
    return rank, device


def report(args, rank: int, model) -> None:
    """Rank 0 prints (and with --layout-file writes) which ranks share each group and what each stage holds."""
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, {**group_layout(), "stage": stage_contents(model)})
    if rank == 0:
        for r, g in enumerate(layouts):
            s = g["stage"]
            log(rank, f"rank {r}: tp {g['tp']} | pp {g['pp']} | dp {g['dp']} | stage {s['stage']}: {s['layers']} "
                      f"layers" + " + embedding" * s["embedding"] + " + output layer and loss" * s["output_layer"])
        if args.layout_file:
            with open(args.layout_file, "w") as f:
                json.dump(dict(enumerate(layouts)), f)


def main():
    args = parse_args(__doc__)
    rank, device = setup(args)
    model = build_model(args)
    report(args, rank, model)
    if device.type == "cuda":
        ddp, optimizer, train_step = megatron_training(args, model, device)
        train(args, ddp.module, optimizer, train_step, device)
    elif rank == 0:
        log(rank, "no CUDA: the groups and each stage's model are built and checked; Megatron-Core's pipeline "
                  "schedule, DistributedDataParallel and attention allocate on the GPU, so no training step runs here")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
