#!/bin/bash
#SBATCH --job-name=llm
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
set -euo pipefail
GPUS_PER_NODE=8
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
LAUNCHER="python -u -m torch.distributed.run \
    --nproc_per_node $GPUS_PER_NODE \
    --nnodes $SLURM_NNODES \
    --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \
    --rdzv_backend c10d \
    --max_restarts 0 \
    --tee 3 \
    "
PROGRAM="train.py --model-size 7b"
export CMD="$LAUNCHER $PROGRAM"
SRUN_ARGS="--wait=60 --kill-on-bad-exit=1 --cpus-per-task=$SLURM_CPUS_PER_TASK"
# shellcheck disable=SC2086
srun $SRUN_ARGS --jobid "$SLURM_JOB_ID" bash -c "$CMD"
