#!/usr/bin/env python3
#SBATCH --job-name=py-job
#SBATCH --ntasks=1
#SBATCH --time=00:05:00
#SBATCH --output=%x-%j.out
"""A job script whose interpreter is Python: sbatch reads the #SBATCH lines above the first statement."""

print("hello from the batch step")
