"""Checkpoints: written atomically, and complete enough that a resumed run is bit-identical.

A checkpoint holds the model (without DDP or ``torch.compile`` wrappers, so its keys are
the plain model's), optimizer, GradScaler, learning-rate scheduler and warm-up state,
the position (epoch, next global batch, iteration), the partly filled training meters,
the random-number-generator states (torch CPU and CUDA, Python ``random``, numpy) and
the run settings that fix the trajectory, which must match on ``--resume``. The data
order needs no state of its own: it is a function of (seed, epoch, position), see
:mod:`resnet_fast.train.data`.

Everything is stored as tensors and plain Python values, so :func:`load_checkpoint`
uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_fast.runtime import ConfigError

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed from (the message says why)."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder,
    flushed and fsynced, then ``os.replace`` d over ``path`` (a crash leaves the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save({"format": FORMAT_VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (onto the CPU)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"--resume {path} is not a readable checkpoint: {type(error).__name__}: "
                              f"{error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"--resume {path} is not a resnet_fast.train checkpoint of format {FORMAT_VERSION}")
    return state


# Settings a resumed run may change: a longer run continues a shorter one (its milestones
# as for the new length), see :func:`check_same_run`.
EXTENDABLE = ("length", "milestones")


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> bool:
    """Refuse to resume when a setting that shapes the trajectory differs from the checkpoint's.

    A longer ``length`` (``--iterations`` / ``--epochs``), with the milestones that go with
    it, extends the checkpoint's run instead: returns True then (False for the same run).
    A shorter one is refused.
    """
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
                   for key, value in current.items() if key not in EXTENDABLE and saved.get(key) != value]
    old_length, new_length = saved.get("length"), current.get("length")
    if old_length == new_length:
        differences += [f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
                        for key in EXTENDABLE if key in current and saved.get(key) != current[key]]
    if differences:
        raise CheckpointError(f"--resume {path} was written by a different run ({'; '.join(differences)}); "
                              "resume with the same settings or start a new run")
    if old_length is not None and new_length is not None and new_length < old_length:
        unit = current.get("unit", "iterations")
        raise CheckpointError(f"--resume {path}: the checkpoint's run is {old_length} {unit} long and cannot be "
                              f"shortened to {new_length}; give --{unit} {old_length} to continue it, or more to "
                              "extend it")
    return old_length != new_length


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generators' states: torch CPU (and the device's CUDA one), Python ``random``, numpy."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), position, has_gauss, cached],
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the generators to ``state`` (from :func:`rng_state`)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
