"""``resnet-fast-train`` end to end, one tiny run per recipe, and its configuration checks."""

from __future__ import annotations

import json
import math
import sys

import matplotlib.image
import pytest
import torch
from train_fixtures import train, write_cifar, write_image_folder

from resnet_fast.models import CifarResNet
from resnet_fast.runtime import ConfigError
from resnet_fast.train.config import Options, resolve_config
from resnet_fast.train.metrics import MetricsLog, read_metrics


def _outputs(out):
    rows = read_metrics(out / "metrics.csv")
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert matplotlib.image.imread(out / "curves.png").shape[2] == 4
    return rows, summary, checkpoint


def test_cifar10_recipe_end_to_end(tmp_path):
    write_cifar(tmp_path / "data", per_batch=8)  # 40 training images: 5 batches of 8 per epoch
    out = tmp_path / "run"
    assert train("cifar10", "--data", tmp_path / "data", "--model", "resnet8", "--batch-size", 8,
                 "--iterations", 7, "--workers", 0, "--log-every", 3, "--out", out, "--val-split", 8) == 0
    rows, summary, checkpoint = _outputs(out)
    # 32 training images after the split: 4 batches per epoch; 7 iterations = 2 epochs, the last partial
    assert [(r["phase"], r["epoch"], r["iteration"]) for r in rows] == [
        ("train", "1", "3"), ("train", "1", "4"), ("eval", "1", "4"),
        ("train", "2", "6"), ("train", "2", "7"), ("eval", "2", "7")]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert summary["iterations"] == 7 and summary["epochs"] == 2 and "8 held-out" in summary["evaluated_on"]
    assert checkpoint["position"]["iteration"] == 7
    # milestones scaled from 32k/48k of 64k to 7 iterations: 4 (3.5 rounds to 4) and 5
    assert checkpoint["scheduler"]["milestones"] == {4: 1, 5: 1}
    lrs = [float(r["lr"]) for r in rows if r["phase"] == "train"]
    assert lrs == pytest.approx([0.1, 0.1, 0.001, 0.001])  # logged after the step, before the decay
    assert set(checkpoint["model"]) == set(CifarResNet(8).state_dict())


def test_imagenet_recipe_end_to_end_with_ten_crops_and_workers(tmp_path):
    write_image_folder(tmp_path / "data")  # 2 classes x 4 images, JPEG and PNG
    out = tmp_path / "run"
    assert train("imagenet", "--data", tmp_path / "data", "--model", "resnet18", "--batch-size", 4,
                 "--image-size", 32, "--epochs", 1, "--workers", 2, "--ten-crop", "--log-every", 1,
                 "--out", out) == 0
    rows, summary, checkpoint = _outputs(out)
    assert [r["phase"] for r in rows] == ["train", "train", "eval"]
    assert summary["evaluated_on"] == "validation (ten crops)" and summary["epochs"] == 1
    assert checkpoint["model"]["fc.weight"].shape == (2, 512)  # the folder's two classes
    assert float(rows[-1]["top5_error"]) == 0.0  # two classes: the true one is always in the top 5


def test_synthetic_recipe_end_to_end(tmp_path):
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--batch-size", 8, "--image-size", 8, "--num-classes", 3,
                 "--synthetic-images", 16, "--iterations", 3, "--log-every", 1, "--out", out) == 0
    rows, summary, _ = _outputs(out)
    assert [r["phase"] for r in rows] == ["train", "train", "eval", "train", "eval"]
    assert summary["images_per_s"] > 0 and summary["iterations"] == 3
    assert all(float(r["images_per_s"]) > 0 for r in rows if r["phase"] == "train")


def test_bad_configurations_are_refused_with_the_option_named(tmp_path, capsys):
    assert train("cifar10", "--data", tmp_path / "missing", "--out", tmp_path / "o") == 2
    assert "--data" in capsys.readouterr().err
    cases = [
        (Options("cifar10", model="resnet9"), "--model 'resnet9' is not a ResNet"),
        (Options("cifar10", iterations=10, epochs=2), "give --iterations or --epochs, not both"),
        (Options("imagenet", iterations=100), "with --iterations give --milestones in iterations too"),
        (Options("cifar10", milestones=(5, 3)), "--milestones must be increasing"),
        (Options("cifar10", batch_size=6, accumulate=4), "divisible by processes x --accumulate"),
        (Options("cifar10", batch_size=4, accumulate=4), "fewer than 2 images per BatchNorm batch"),
        (Options("cifar10", image_size=64), "CIFAR-10 images are 32x32"),
        (Options("imagenet", val_split=10), "--val-split holds out CIFAR-10 training images"),
        (Options("synthetic", lr=-1.0), "--lr must be positive"),
        (Options("synthetic", device="cuda"), "torch sees no CUDA device"),
        (Options("synthetic", compile=True, deterministic=True), "--deterministic cannot be combined"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve_config(options, cuda_available=False, cuda_bf16=False)


def test_recipe_defaults_follow_the_paper():
    cifar = resolve_config(Options("cifar10"), cuda_available=False, cuda_bf16=False)
    assert (cifar.batch_size, cifar.lr, cifar.momentum, cifar.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (cifar.unit, cifar.length, cifar.milestones, cifar.warmup) == ("iterations", 64_000, (32_000, 48_000),
                                                                          False)
    assert resolve_config(Options("cifar10", model="resnet110"), False, False).warmup
    assert resolve_config(Options("cifar10", iterations=6400), False, False).milestones == (3200, 4800)
    imagenet = resolve_config(Options("imagenet"), cuda_available=False, cuda_bf16=False)
    assert (imagenet.batch_size, imagenet.unit, imagenet.length, imagenet.milestones) == (256, "epochs", 90, (30, 60))
    assert (imagenet.image_size, imagenet.dtype, imagenet.channels_last) == (224, "fp32", False)
    gpu = resolve_config(Options("imagenet"), cuda_available=True, cuda_bf16=False)
    assert (gpu.device, gpu.dtype, gpu.channels_last) == ("cuda", "fp16", True)
    ranked = resolve_config(Options("imagenet"), cuda_available=True, cuda_bf16=True, world_size=2, local_rank=1)
    assert (ranked.device, ranked.dtype) == ("cuda:1", "bf16")
    with pytest.raises(ConfigError, match="no bf16 support; use --dtype fp16"):
        resolve_config(Options("imagenet", dtype="bf16"), cuda_available=True, cuda_bf16=False)


def test_fp16_with_grad_scaler_and_channels_last(tmp_path):
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--batch-size", 4, "--image-size", 8, "--num-classes", 3,
                 "--synthetic-images", 8, "--iterations", 2, "--log-every", 1, "--dtype", "fp16",
                 "--channels-last", "--out", out) == 0
    rows, _, checkpoint = _outputs(out)
    assert checkpoint["scaler"]["scale"] > 0  # the GradScaler ran and its state was saved
    assert all(math.isfinite(float(r["loss"])) for r in rows)


def test_metrics_reach_tensorboard_and_match_the_csv(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--batch-size", 8, "--image-size", 8, "--num-classes", 3,
                 "--synthetic-images", 16, "--iterations", 3, "--log-every", 1, "--out", out) == 0
    events = event_accumulator.EventAccumulator(str(out))
    events.Reload()
    rows = [r for r in read_metrics(out / "metrics.csv") if r["phase"] == "train"]
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [int(r["iteration"]) for r in rows]
    assert [e.value for e in logged] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert {"train/lr", "train/top1_error", "eval/loss"} <= set(events.Tags()["scalars"])


def test_without_tensorboard_metrics_go_to_the_csv_and_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    log = MetricsLog(tmp_path, enabled=True)
    assert log.writer is None and "tensorboard is not installed" in log.note
    log.log({"phase": "train", "epoch": 1, "iteration": 1, "loss": 2.5})
    log.close()
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.csv")] == ["2.5"]
    assert not list(tmp_path.glob("events.out.tfevents*"))
