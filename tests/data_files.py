"""Small MNIST and CIFAR-10 files in the datasets' real on-disk formats, so the tests exercise torchvision's
real loaders without the internet."""

import hashlib
import json
import pickle
import struct
from pathlib import Path

import numpy as np


def write_mnist(root: Path, n_train=256, n_test=32, seed=0) -> Path:
    """MNIST's raw IDX files (what torchvision downloads and then reads): root/MNIST/raw/*-ubyte."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_cifar10(root: Path, per_batch=64, seed=0) -> tuple[Path, dict]:
    """CIFAR-10's python pickles: root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    Returns the md5 of each file: torchvision verifies the official files' checksums, which generated files
    cannot match, so the tests hand it these (see tests/shim/sitecustomize.py).
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, size=per_batch).tolist(),
                 "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": labels, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    md5 = {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in [*names, "batches.meta"]}
    return root, md5


def cifar_md5_env(md5: dict) -> dict:
    return {"TEST_CIFAR10_MD5": json.dumps(md5)}
