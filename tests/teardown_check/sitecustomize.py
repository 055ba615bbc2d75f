"""Test-only: report, at every destroy_process_group(), whether a DistributedDataParallel model is still alive.

If one is, its C++ Reducer keeps the process group, and freeing the model afterwards runs gloo's destructor with
the GIL held: it joins gloo's threads while one may wait for the GIL -- a run that finished can hang at exit (seen
in CI: modulus under torchrun with one core per Slurm step). The recipes must free the model (and collect DDP's
reference cycles) first. gc.get_objects() also lists garbage not yet collected, so an uncollected cycle counts.
tests/helpers.with_teardown_check puts this folder on PYTHONPATH; each process prints one line per destroy.
"""

import gc
import os

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_destroy = dist.destroy_process_group


def destroy_process_group(*args, **kwargs):
    alive = sum(issubclass(type(o), DistributedDataParallel) for o in gc.get_objects())
    # one write: the ranks share the launcher's stderr, and their lines must not interleave
    os.write(2, f"teardown-check: {alive} DistributedDataParallel alive at destroy_process_group\n".encode())
    return _destroy(*args, **kwargs)


dist.destroy_process_group = destroy_process_group
