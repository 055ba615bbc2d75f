#!/bin/bash
#SBATCH --gres=gpu:1
#SBATCH --time=00:30:00
set -euo pipefail
if [ -f train.py ]; then
  python train.py
