"""The command lines say what actually ran and will run: the profiler labels resnet_fast
with the backend that ran and calls a CPU run a harness check; the training progress bar
counts the batches that will run; ``--resume`` with a longer run extends it."""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import train, write_cifar

from resnet_fast.bench import profiler
from resnet_fast.bench.__main__ import main as bench_main
from resnet_fast.bench.plot import build_figure
from resnet_fast.bench.profiler import BenchReport, Measurement, Options, Variant, variant_label
from resnet_fast.train.checkpoint import load_checkpoint
from resnet_fast.train.config import Options as TrainOptions
from resnet_fast.train.config import resolve_config as resolve_train_config
from resnet_fast.train.loop import Trainer
from resnet_fast.train.metrics import read_metrics

TINY = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--steps", "2", "--warmup", "1"]


# --------------------------------------------------------------------------- the profiler


def test_variant_label_names_the_backend_that_ran():
    auto = Variant("resnet_fast", "resnet_fast", "auto")
    assert variant_label(auto, ["torch"]) == "resnet_fast (torch)"
    assert variant_label(auto, ["triton", "torch"]) == "resnet_fast (triton+torch)"
    assert variant_label(Variant("resnet_fast:triton", "resnet_fast", "triton"), ["triton"]) == "resnet_fast:triton"
    assert variant_label(Variant("eager", "eager"), ["torch"]) == "eager"


def test_backends_that_run_ask_the_dispatcher(monkeypatch):
    config = profiler.resolve_config(Options(device="cpu", batch=4), cuda_available=False)
    asked = []

    def chosen(op, example):
        asked.append((op, example.device.type, example.dtype))
        return {"conv_bn_act": "cuda", "batch_norm_act": "triton"}.get(op, "torch")

    monkeypatch.setattr(profiler, "chosen_backend", chosen)
    monkeypatch.setattr(profiler, "runs_native", lambda example: False)  # as on a GPU with a record
    assert profiler.backends_that_run(config, "train") == ["cuda", "triton"]
    assert ("conv_bn_act", "cpu", torch.float32) in asked
    assert profiler.backends_that_run(config, "infer") == ["torch", "triton"]
    monkeypatch.setattr(profiler, "runs_native", lambda example: True)  # no fused backend chosen
    assert profiler.backends_that_run(config, "train") == ["native"]
    assert profiler.backends_that_run(config, "train", fused_training=True) == ["torch"]


def test_cpu_run_is_labelled_and_called_a_harness_check(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert bench_main(["--model", "resnet18", *TINY, "--mode", "infer", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    [result] = [r for r in json.loads(path.read_text())["results"] if r["variant"] == "resnet_fast"]
    ran = profiler.backends_that_run(profiler.resolve_config(Options(device="cpu"), False), "infer")
    assert ran == ["native"]  # auto on a CPU: torchvision's own aten operators, not the torch reference
    assert result["label"] == f"resnet_fast ({'+'.join(ran)})" and result["label"] in out
    assert 0 <= result["spread"] and "spread" in out
    assert "CPU run: a harness check" in out and "not a performance" in out


def test_plot_legend_uses_the_labels_and_the_cpu_note():
    config = profiler.resolve_config(Options(device="cpu", batch=4), cuda_available=False)
    measurements = [Measurement("eager", "train", [2.0, 3.0], 2.5, 1.0, None, spread=0.4),
                    Measurement("resnet_fast", "train", [2.0], 2.0, 1.0, None, label="resnet_fast (torch)")]
    figure = build_figure(BenchReport(config=config, environment={"device_name": "Test CPU"},
                                      measurements=measurements))
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert legend == ["eager", "resnet_fast (torch)"]
    assert "harness check" in figure._supxlabel.get_text()


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("iterations, stop_after, expected", [(6, None, 6), (60, None, 10), (60, 3, 3)])
def test_progress_bar_counts_the_batches_that_will_run(tmp_path, iterations, stop_after, expected):
    options = TrainOptions("synthetic", model="resnet8", batch_size=4, image_size=8, num_classes=4,
                           synthetic_images=40, iterations=iterations, stop_after=stop_after, workers=0,
                           progress=False, out=str(tmp_path / "run"))
    trainer = Trainer(resolve_train_config(options, cuda_available=False, cuda_bf16=False))
    assert trainer.batches_per_epoch == 10
    assert trainer.batches_this_epoch() == expected


CIFAR = ("cifar10", "--model", "resnet8", "--batch-size", 8, "--workers", 0, "--log-every", 1)


def _train_lrs(out) -> dict[int, float]:
    return {int(row["iteration"]): float(row["lr"]) for row in read_metrics(out / "metrics.csv")
            if row["phase"] == "train"}


def test_resume_with_more_iterations_extends_a_finished_run(tmp_path, capsys):
    data = write_cifar(tmp_path / "data")  # 40 images: 5 batches of 8 per epoch
    assert train(*CIFAR, "--data", data, "--iterations", 5, "--out", tmp_path / "short") == 0
    assert load_checkpoint(tmp_path / "short")["scheduler"]["milestones"] == {2: 1, 4: 1}
    assert train(*CIFAR, "--data", data, "--iterations", 10, "--out", tmp_path / "short",
                 "--resume", tmp_path / "short") == 0
    assert "extending the run from 5 to 10 iterations: milestones now at 5, 8 iterations, learning rate 0.01" \
        in capsys.readouterr().out
    extended = load_checkpoint(tmp_path / "short")
    assert extended["position"]["iteration"] == 10
    assert extended["scheduler"]["milestones"] == {5: 1, 8: 1}
    assert extended["run"]["length"] == 10
    # from the checkpoint on, the learning rate is the longer schedule's, as in a run that was 10 long
    assert train(*CIFAR, "--data", data, "--iterations", 10, "--out", tmp_path / "long") == 0
    lrs, whole = _train_lrs(tmp_path / "short"), _train_lrs(tmp_path / "long")
    assert [lrs[i] for i in range(6, 11)] == [whole[i] for i in range(6, 11)] == [0.01, 0.01, 0.01, 0.001, 0.001]


def test_resume_with_fewer_iterations_says_how_to_continue(tmp_path, capsys):
    data = write_cifar(tmp_path / "data")
    assert train(*CIFAR, "--data", data, "--iterations", 5, "--out", tmp_path / "run", "--stop-after", 2) == 0
    assert train(*CIFAR, "--data", data, "--iterations", 3, "--out", tmp_path / "run",
                 "--resume", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "cannot be shortened to 3; give --iterations 5 to continue it, or more to extend it" in err
