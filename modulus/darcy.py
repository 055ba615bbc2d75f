"""Darcy flow data: a finite-difference solver and the on-disk format PhysicsNeMo's Darcy examples read.

The problem (the FNO paper's benchmark, also PhysicsNeMo's `examples/cfd/darcy_*`):

    -div(a(x) grad u(x)) = 1  on the unit square,   u = 0 on its boundary,

with a piecewise-constant permeability a (12 where a smooth random field is positive, 3 elsewhere). The model
learns the operator a -> u. Files: one `.npz` per split with `coeff` (the permeability a) and `sol` (the
pressure u), float32 arrays of shape (samples, resolution, resolution) -- the keys and layout of the Darcy
numpy dataset PhysicsNeMo's `NumpyReader` reads (examples/cfd/darcy-multidataset, conf/datasets/numpy.yaml).

Write a data directory the recipes read with `--data darcy --data-dir DIR`:

    python darcy.py DIR [--train 512] [--val 64] [--resolution 32] [--seed 0]

recipe.py trains on these samples, normalised by `normalize`, and measures `relative_l2`.
"""

import argparse
import math
import os
import signal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from toolkit import PreemptionFlag, run

TRAIN_FILE, VAL_FILE = "train.npz", "val.npz"
# Mean and standard deviation of coeff and sol in PhysicsNeMo's Darcy numpy dataset config (numpy.yaml): the
# recipes normalise inputs and targets with them, so files from either source train the same way.
COEFF_MEAN, COEFF_STD = 7.5348, 4.49987
SOL_MEAN, SOL_STD = 0.00567372, 0.00377293


def permeability(n, resolution, generator, modes=5):
    """Random piecewise-constant fields: threshold a smooth random Fourier series at zero (values 12 and 3)."""
    x = torch.linspace(0, 1, resolution, dtype=torch.float64)
    k = torch.arange(1, modes + 1, dtype=torch.float64)
    decay = (k[:, None] ** 2 + k[None, :] ** 2) ** -1.0  # smooth: high frequencies carry less weight
    field = torch.zeros(n, resolution, resolution, dtype=torch.float64)
    for basis in (torch.sin, torch.cos):
        coeffs = torch.randn(n, modes, modes, generator=generator, dtype=torch.float64) * decay
        bx = basis(math.pi * k[:, None] * x[None, :])  # (modes, resolution)
        field += torch.einsum("nkl,ki,lj->nij", coeffs, bx, bx)
    return torch.where(field > 0, 12.0, 3.0)


def apply_operator(u, ax, ay, h):
    """-div(a grad u) on the interior nodes (5-point stencil, a averaged onto the cell faces); u is 0 outside."""
    p = torch.nn.functional.pad(u, (1, 1, 1, 1))
    flux_x = ax * (p[:, 1:, 1:-1] - p[:, :-1, 1:-1])  # a on the faces between rows
    flux_y = ay * (p[:, 1:-1, 1:] - p[:, 1:-1, :-1])
    return -((flux_x[:, 1:] - flux_x[:, :-1]) + (flux_y[:, :, 1:] - flux_y[:, :, :-1])) / h**2


def solve(a, tol=1e-8, max_iter=5000):
    """Solve -div(a grad u) = 1, u = 0 on the boundary, for a batch of fields a (n, R, R): Jacobi-preconditioned
    conjugate gradients on the symmetric positive definite finite-difference system, all samples at once."""
    n, r, _ = a.shape
    h = 1.0 / (r - 1)
    inner = a[:, 1:-1, 1:-1]
    # face coefficients of the interior nodes, arithmetic mean of the two nodes they join
    ax = 0.5 * (a[:, :-1, 1:-1] + a[:, 1:, 1:-1])  # (n, r-1, r-2): faces along rows
    ay = 0.5 * (a[:, 1:-1, :-1] + a[:, 1:-1, 1:])  # (n, r-2, r-1): faces along columns
    diag = (ax[:, 1:] + ax[:, :-1] + ay[:, :, 1:] + ay[:, :, :-1]) / h**2
    f = torch.ones_like(inner)
    u = torch.zeros_like(inner)
    res = f.clone()
    z = res / diag
    d = z.clone()
    rz = (res * z).sum((1, 2))
    norm_f = f.flatten(1).norm(dim=1)
    for _ in range(max_iter):
        q = apply_operator(d, ax, ay, h)
        alpha = rz / (d * q).sum((1, 2))
        u += alpha[:, None, None] * d
        res -= alpha[:, None, None] * q
        if (res.flatten(1).norm(dim=1) / norm_f).max() < tol:
            break
        z = res / diag
        rz_new = (res * z).sum((1, 2))
        d = z + (rz_new / rz)[:, None, None] * d
        rz = rz_new
    else:
        raise RuntimeError(f"the Darcy solver did not converge in {max_iter} iterations")
    return torch.nn.functional.pad(u, (1, 1, 1, 1))  # the boundary nodes are 0


def generate(n, resolution, seed):
    """n (coeff, sol) pairs as float32 numpy arrays (n, resolution, resolution), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    a = permeability(n, resolution, g)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small arrays: one thread is faster than many fighting over a busy machine
    try:
        return a.float().numpy(), solve(a).float().numpy()
    finally:
        torch.set_num_threads(threads)


def normalize(coeff, sol):
    """(coeff, sol) arrays -> (input, target) tensors (n, 1, R, R), scaled by the Darcy dataset's statistics."""
    x = (torch.from_numpy(coeff) - COEFF_MEAN) / COEFF_STD
    y = (torch.from_numpy(sol) - SOL_MEAN) / SOL_STD
    return TensorDataset(x.unsqueeze(1), y.unsqueeze(1))


def relative_l2(pred, target):
    """Per-sample ||u_pred - u|| / ||u|| on the physical (de-normalised) pressure: the Darcy benchmark's metric."""
    pred = pred.float() * SOL_STD + SOL_MEAN
    target = target.float() * SOL_STD + SOL_MEAN
    return (pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)


def write_split(path, coeff, sol):
    tmp = path + ".tmp.npz"  # np.savez adds .npz; write then rename, so a reader never sees half a file
    np.savez(tmp, coeff=coeff, sol=sol)
    os.replace(tmp, path)


def write_dataset(directory, train, val, resolution, seed):
    os.makedirs(directory, exist_ok=True)
    write_split(os.path.join(directory, TRAIN_FILE), *generate(train, resolution, seed))
    write_split(os.path.join(directory, VAL_FILE), *generate(val, resolution, seed + 1))


def parse_args(description):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("--train", type=int, default=512, help="training samples")
    p.add_argument("--val", type=int, default=64, help="validation samples")
    p.add_argument("--resolution", type=int, default=32, help="grid points per side")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main():
    for sig in PreemptionFlag.SIGNALS:  # nothing to save: SIGUSR1/SIGTERM end this job at once (run() caught them)
        signal.signal(sig, signal.SIG_DFL)
    args = parse_args(__doc__)
    write_dataset(args.directory, args.train, args.val, args.resolution, args.seed)
    print(f"wrote {args.train} + {args.val} Darcy samples at {args.resolution}x{args.resolution} to {args.directory}")


if __name__ == "__main__":
    run(main)
