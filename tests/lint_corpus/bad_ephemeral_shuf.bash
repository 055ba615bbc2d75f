#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
set -euo pipefail
MASTER_PORT=$(shuf -i 20000-65000 -n 1)
torchrun --nproc-per-node 4 --master_port "$MASTER_PORT" train.py
