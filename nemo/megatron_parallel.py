"""Megatron-style model parallelism, the way NeMo's LLM training runs today (Megatron-Core, which NeMo 2.x and
Megatron-Bridge build on): one process per GPU, started by srun (or torchrun), and Megatron-Core's
parallel_state splitting the world into tensor x pipeline x data parallel groups.

    srun --ntasks-per-node 8 python megatron_parallel.py --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 2           # 16 GPUs on 2 nodes: TP 2 x PP 2 x DP 4
    torchrun --standalone --nproc_per_node 4 megatron_parallel.py --tensor-model-parallel-size 2

It prints (and with --layout-file writes) which ranks share each group, then trains a tiny GPTModel for
--steps steps with Megatron-Core's pipeline schedule. The training step needs CUDA (Megatron-Core's GPTModel
forward pass does); without CUDA the script sets up the groups on gloo, reports the layout and stops there --
where the job was given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) only with --backend gloo: else a torch
that cannot use them is one line and exit 2 (CONTRACT.md C12, no silent CPU).
This script has its own command line (not the contract's: it is a layout and launch example, not a recipe).
"""

import argparse
import json
import signal
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import toolkit
from cluster import launcher_ranks, local_device, run
from toolkit import OneLineParser, PreemptionFlag, RecipeError


def parse_args(description):
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks that split each layer")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: stages the layers are split into")
    p.add_argument("--steps", type=int, default=10, help="training steps (CUDA only)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto", help="auto: nccl with CUDA")
    p.add_argument("--timeout", type=int, default=300, help="seconds a rendezvous or collective may take")
    p.add_argument("--layout-file", help="rank 0 writes {rank: {tp, pp, dp: [ranks]}} here (JSON)")
    args = p.parse_args()
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "steps", "micro_batch_size",
                 "seq_length", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


def check_sizes(args, world: int) -> int:
    """The data-parallel size, or one line (from rank 0) and exit 2 when TP x PP does not fit the world."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp * pp > world:
        raise RecipeError(f"tensor {tp} x pipeline {pp} = {tp * pp} model-parallel ranks, but the world size is "
                          f"{world}: lower the sizes or start more processes", every_rank=False)
    if world % (tp * pp):
        raise RecipeError(f"the world size {world} is not a multiple of tensor {tp} x pipeline {pp} = {tp * pp}",
                          every_rank=False)
    return world // (tp * pp)


def group_layout() -> dict:
    """This rank's groups, as global ranks."""
    return {"tp": dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group()),
            "pp": dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()),
            "dp": dist.get_process_group_ranks(parallel_state.get_data_parallel_group())}


def train(args, rank: int, device: torch.device) -> None:
    """A tiny GPT trained with Megatron-Core's schedule (1F1B across pipeline stages, TP inside each layer)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(args.seed)  # TP ranks draw different weights for their shards
    config = TransformerConfig(num_layers=2 * args.pipeline_model_parallel_size, hidden_size=64,
                               num_attention_heads=4, use_cpu_initialization=True, pipeline_dtype=torch.float32)
    vocab = 128
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=vocab,
                     max_sequence_length=args.seq_length).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    def batches():
        # The same tokens on every rank of a data-parallel replica (its TP and PP ranks), different across replicas
        g = torch.Generator().manual_seed(args.seed * 1000 + parallel_state.get_data_parallel_rank())
        mask = torch.tril(torch.ones(args.seq_length, args.seq_length)).unsqueeze(0) < 0.5  # True: masked out
        while True:
            tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_length + 1), generator=g)
            yield {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "attention_mask": mask,
                   "position_ids": torch.arange(args.seq_length).expand(args.micro_batch_size, -1)}

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss}

    def forward_step(data_iterator, model):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
        return out, partial(loss_func)

    data, forward_backward = batches(), get_forward_backward_func()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=forward_step, data_iterator=data, model=model,
                                  num_microbatches=1, seq_length=args.seq_length,
                                  micro_batch_size=args.micro_batch_size, forward_only=False)
        # Gradients of the replicated parameters are averaged over the data-parallel group (what Megatron-Core's
        # DistributedDataParallel does with overlapped buckets; plain all-reduces keep the example short).
        dp_group = parallel_state.get_data_parallel_group()
        for param in model.parameters():
            if param.grad is not None and dist.get_world_size(dp_group) > 1:
                dist.all_reduce(param.grad, group=dp_group)
                param.grad /= dist.get_world_size(dp_group)
        optimizer.step()
        if losses and rank == dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())[-1]:
            print(f"[rank{rank}] step {step} | lm loss {losses[0]['lm loss'].item():.4f}", flush=True)


def setup(args):
    """How this process joins the others: its rank from the launcher (torchrun or srun), one process group over
    the world (rendezvous at MASTER_ADDR/MASTER_PORT), then Megatron-Core's tensor x pipeline x data-parallel
    groups inside it; rank 0 reports (and with --layout-file writes) which ranks share each group."""
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
    layouts = [None] * world
    dist.all_gather_object(layouts, group_layout())
    if rank == 0:
        print(f"[rank0] world size {world} = tensor {args.tensor_model_parallel_size} x pipeline "
              f"{args.pipeline_model_parallel_size} x data {dp} | backend {backend}", flush=True)
        for r, groups in enumerate(layouts):
            print(f"[rank0] rank {r}: tp {groups['tp']} | pp {groups['pp']} | dp {groups['dp']}", flush=True)
        if args.layout_file:
            with open(args.layout_file, "w") as f:
                json.dump(dict(enumerate(layouts)), f)
    return rank, device


def main():
    # This example saves nothing: SIGUSR1/SIGTERM end it at once (their default), as before run() caught them.
    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    args = parse_args(__doc__)
    rank, device = setup(args)
    if device.type == "cuda":
        train(args, rank, device)
    elif rank == 0:
        print("[rank0] no CUDA: the groups are set up and checked; Megatron-Core's GPTModel forward pass needs a "
              "GPU, so no training step runs here", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
