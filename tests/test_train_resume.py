"""Checkpoints: atomic writes, and a resumed run that is bit-identical to an uninterrupted one."""

from __future__ import annotations

import os

import pytest
import torch
from train_fixtures import train, write_cifar

from resnet_fast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resnet_fast.train.metrics import read_metrics

# 40 CIFAR images, batch 8: 5 iterations per epoch; 7 iterations cross an epoch boundary.
# The warm-up is on so that its state (and the meters it reads) must survive the interruption.
RUN = ("cifar10", "--model", "resnet8", "--batch-size", 8, "--iterations", 7, "--milestones", "3,6",
       "--workers", 0, "--log-every", 2, "--warmup")


def test_resumed_run_reproduces_the_uninterrupted_run_exactly(tmp_path):
    data = write_cifar(tmp_path / "data")
    assert train(*RUN, "--data", data, "--out", tmp_path / "whole") == 0
    # interrupted in the middle of a logging interval of the first epoch; the rest crosses into the second
    assert train(*RUN, "--data", data, "--out", tmp_path / "parts", "--stop-after", 3) == 0
    stopped = load_checkpoint(tmp_path / "parts")
    assert stopped["position"]["iteration"] == 3 and stopped["position"]["batch"] == 3
    assert stopped["meter"]["sums"][3] == 8  # one iteration's images counted toward the next log row
    assert train(*RUN, "--data", data, "--out", tmp_path / "parts", "--resume",
                 tmp_path / "parts" / "checkpoint.pt") == 0

    whole, parts = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts")
    assert whole["model"].keys() == parts["model"].keys()
    for name, value in whole["model"].items():  # parameters and running statistics, bit for bit
        assert torch.equal(parts["model"][name], value), name
    for a, b in zip(whole["optimizer"]["state"].values(), parts["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert whole["optimizer"]["param_groups"][0]["lr"] == parts["optimizer"]["param_groups"][0]["lr"]
    assert whole["scheduler"] == parts["scheduler"] and whole["warmup"] == parts["warmup"]
    assert torch.equal(whole["rng"]["torch"], parts["rng"]["torch"])
    # the metrics log continues where it stopped: same rows, same values
    columns = ("phase", "epoch", "iteration", "loss", "top1_error", "top5_error", "lr")
    rows = [[[row[c] for c in columns] for row in read_metrics(tmp_path / run / "metrics.csv")]
            for run in ("whole", "parts")]
    assert rows[0] == rows[1] and len(rows[0]) == 7  # train at 2, 4, 5; eval 5; train 6, 7; eval 7


def test_resume_refuses_a_different_run(tmp_path):
    data = write_cifar(tmp_path / "data")
    assert train(*RUN, "--data", data, "--out", tmp_path / "run", "--stop-after", 1) == 0
    assert train(*RUN, "--data", data, "--out", tmp_path / "run", "--resume", tmp_path / "run", "--lr", 0.05) == 2
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "elsewhere.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_resume_error_names_the_differing_setting(tmp_path, capsys):
    from resnet_fast.train.checkpoint import check_same_run

    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.1, now 0.05"):
        check_same_run({"lr": 0.1, "model": "resnet8"}, {"lr": 0.05, "model": "resnet8"}, tmp_path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"value": torch.tensor([1.0])}, path)

    def fail_midway(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"value": torch.tensor([2.0])}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.tensor([1.0]))  # the old file is intact
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # and no temporary file is left behind
