#!/bin/bash
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --gres=gpu:1
#SBATCH --time=00:10:00
set -euo pipefail
python train.py
