#!/bin/bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --time=08:00:00
set -euo pipefail
PORT=$(( (SLURM_JOB_ID % 10000) + 10000 ))
srun --kill-on-bad-exit=1 --label python train.py --distributed-port "$PORT"
