#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=04:00:00
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
LAUNCHER="python -u -m torch.distributed.run --nproc_per_node 8 --nnodes $SLURM_NNODES \
  --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$((15000 + SLURM_JOB_ID % 15000))"
export CMD="$LAUNCHER train.py"
SRUN_ARGS="--kill-on-bad-exit=1 --wait=60"
# shellcheck disable=SC2086
srun $SRUN_ARGS bash -c "$CMD"
