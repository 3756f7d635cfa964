"""Tiny data sets in the real on-disk formats, and helpers to run the trainer in tests."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnet_fast.train.cli import main
from resnet_fast.train.data import CIFAR_TEST_FILE, CIFAR_TRAIN_FILES

REPO = Path(__file__).resolve().parents[1]


def write_cifar(root: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with five training batches and a test batch of
    ``per_batch`` random images each, pickled as CIFAR-10's python version is."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE):
        entry = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file)
    return folder


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4,
                       size: tuple[int, int] = (40, 48)) -> Path:
    """``root/{train,val}/<class>/`` with ``per_class`` random images per class, JPEG and PNG mixed."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def train(*args: object) -> int:
    """Run ``resnet-fast-train`` in this process without progress bars; its exit status."""
    return main([*map(str, args), "--no-progress"])


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model parameters (not buffers) of a checkpoint."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {name: value for name, value in state.items()
            if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node processes -m resnet_fast.train ...`` on 127.0.0.1 (gloo on the CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "resnet_fast.train",
               *map(str, args), "--no-progress", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
