"""Fused training in the profiler (``resnet_fast[:<backend>]+fused`` variants) and in the
training CLI (``--fused-training``; ``--cuda-graphs`` refused where it cannot capture),
on the CPU with the reference backend. The triton backend's runs of both, interpreted,
are in ``test_fused_training_models.py``; the CUDA-graph training check is GPU-marked.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_fixtures import train

import resnet_fast
from resnet_fast.bench.__main__ import main as bench_main
from resnet_fast.bench.plot import build_figure
from resnet_fast.bench.profiler import (
    FUSED_INFERENCE_SKIP,
    BenchConfigError,
    BenchReport,
    Measurement,
    Options,
    Variant,
    backends_that_run,
    build_model,
    parse_variant,
    parse_variants,
    resolve_config,
    results_table,
)
from resnet_fast.nn import BasicBlock
from resnet_fast.runtime import ConfigError
from resnet_fast.train.config import Options as TrainOptions
from resnet_fast.train.config import resolve_config as resolve_train_config

TINY = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "1"]
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _measurement(variant: str, label: str) -> Measurement:
    return Measurement(variant=variant, mode="train", timings_ms=[5.0], median_ms=5.0, images_per_s=800.0,
                       peak_memory_gib=None, label=label, speedup=1.0)


# --- variants ---------------------------------------------------------------------------


def test_fused_variant_names():
    assert parse_variant("resnet_fast:triton+fused") == Variant("resnet_fast:triton+fused", "resnet_fast", "triton",
                                                                fused_training=True)
    assert parse_variant("resnet_fast:cuda+fused").name == "resnet_fast:cuda+fused"
    assert parse_variant("resnet_fast+fused") == Variant("resnet_fast+fused", "resnet_fast", "auto", True)
    assert parse_variant("resnet_fast:auto+fused").name == "resnet_fast+fused"
    assert not parse_variant("resnet_fast:triton").fused_training
    names = [v.name for v in parse_variants("resnet_fast:triton,resnet_fast:triton+fused")]
    assert names == ["resnet_fast:triton", "resnet_fast:triton+fused"]  # two variants, not a duplicate


@pytest.mark.parametrize("text, message", [
    ("eager+fused", "'eager' has none"),
    ("compile+fused", "'compile' has none"),
    ("resnet_fast+slow", "unknown variant option '\\+slow'"),
    ("resnet_fast:nope+fused", "unknown resnet_fast backend 'nope'"),
    ("resnet_fast+fused,resnet_fast:auto+fused", "listed twice"),
])
def test_bad_fused_variants_are_refused(text, message):
    with pytest.raises(BenchConfigError, match=message):
        parse_variants(text)


def test_fused_variant_model_has_fused_training_on_every_block_and_the_stem():
    config = resolve_config(Options(device="cpu", batch=2, image_size=32), cuda_available=False)
    state = resnet_fast.resnet18().state_dict()
    model = build_model(config, parse_variant("resnet_fast:torch+fused"), state)
    assert model.fused_training and all(b.fused_training for b in model.modules() if isinstance(b, BasicBlock))
    plain = build_model(config, parse_variant("resnet_fast:torch"), state)
    assert not plain.fused_training


def test_fused_training_labels_name_the_backend_of_its_convolutions(monkeypatch):
    """A +fused variant's label reports the backend of conv2d_stats (what fused training runs)."""
    config = resolve_config(Options(device="cpu", batch=2), cuda_available=False)
    asked = []
    monkeypatch.setattr("resnet_fast.bench.profiler.chosen_backend", lambda op, example: asked.append(op) or "torch")
    assert backends_that_run(config, "train", fused_training=True) == ["torch"] and asked == ["conv2d_stats"]


def test_table_never_shortens_a_label(capsys):
    from rich.console import Console

    config = resolve_config(Options(device="cpu", batch=2), cuda_available=False)
    report = BenchReport(config, {"device_name": "Test CPU"},
                         [_measurement("resnet_fast+fused", "resnet_fast+fused (triton+torch)")])
    Console(width=100).print(results_table(report))
    assert "resnet_fast+fused (triton+torch)" in capsys.readouterr().out
    figure = build_figure(report)
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["resnet_fast+fused (triton+torch)"]


def test_cli_runs_fused_training_variants_and_records_the_backend(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert bench_main(["--model", "resnet18", *TINY, "--mode", "both", "--compare",
                       "resnet_fast:torch,resnet_fast+fused,resnet_fast:torch+fused", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "resnet_fast:torch+fused" in out and "resnet_fast+fused (torch)" in out
    data = json.loads(path.read_text())
    labels = {(r["variant"], r["mode"]): r["label"] for r in data["results"]}
    assert labels == {("resnet_fast:torch", "train"): "resnet_fast:torch",
                      ("resnet_fast:torch", "infer"): "resnet_fast:torch",
                      ("resnet_fast+fused", "train"): "resnet_fast+fused (torch)",  # auto says what it chose
                      ("resnet_fast:torch+fused", "train"): "resnet_fast:torch+fused"}
    assert {(s["variant"], tuple(s["modes"])) for s in data["skipped"]} == {
        ("resnet_fast+fused", ("infer",)), ("resnet_fast:torch+fused", ("infer",))}
    assert all(s["reasons"] == [FUSED_INFERENCE_SKIP] for s in data["skipped"])
    assert data["config"]["variants"] == ["resnet_fast:torch", "resnet_fast+fused", "resnet_fast:torch+fused"]


# --- the training CLI -------------------------------------------------------------------


def test_train_cli_with_fused_training(tmp_path, monkeypatch):
    switched = []
    original = resnet_fast.nn.enable_fused_training
    monkeypatch.setattr(resnet_fast.nn, "enable_fused_training",
                        lambda model, enabled: switched.append((original(model, enabled), enabled)))
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--batch-size", 8, "--image-size", 8, "--num-classes", 3,
                 "--synthetic-images", 16, "--iterations", 2, "--log-every", 1, "--backend", "torch",
                 "--fused-training", "--out", out) == 0
    assert switched == [(4, True)]  # resnet8's three blocks and its stem
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fused_training"] is True and summary["cuda_graphs"] is False


@pytest.mark.parametrize("argv, setting", [([], None), (["--fused-training"], True), (["--no-fused-training"], False)])
def test_train_cli_fused_training_is_three_way(argv, setting):
    from resnet_fast.train.cli import build_parser

    options = TrainOptions(**vars(build_parser().parse_args(["synthetic", *argv])))
    config = resolve_train_config(options, cuda_available=False, cuda_bf16=False)
    assert config.fused_training is setting
    assert ("fused training" in config.describe()) == (setting is not None)


@pytest.mark.parametrize("argv, message", [
    (["--cuda-graphs"], "--cuda-graphs needs a CUDA device, but this run is on cpu"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    (["--fused-training", "--eager"], "--fused-training is resnet_fast's convolution fusion"),
])
def test_train_cli_refuses_in_one_line_and_creates_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert train("synthetic", "--model", "resnet8", "--out", out, *argv) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0]
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (TrainOptions("synthetic", cuda_graphs=True, compile=True), "cannot be combined with --compile"),
    (TrainOptions("synthetic", cuda_graphs=True), "--cuda-graphs with 2 processes"),
])
def test_cuda_graph_combinations_that_cannot_capture_are_refused_on_a_gpu(options, message):
    """As a GPU would see them (the device is not used to decide)."""
    with pytest.raises(ConfigError, match=message):
        resolve_train_config(options, cuda_available=True, cuda_bf16=True, world_size=2)


# --- CUDA graphs in training (GPU) ------------------------------------------------------


def _train_on_gpu(tmp_path, name: str, dtype: str, backend: str, fused: bool, graphs: bool):
    from resnet_fast.train.loop import Trainer

    options = TrainOptions("synthetic", model="resnet20", batch_size=32, iterations=8, milestones=(6,),
                           num_classes=10, synthetic_images=128, dtype=dtype, backend=backend,
                           fused_training=fused, cuda_graphs=graphs, deterministic=True, log_every=4,
                           progress=False, out=str(tmp_path / name))
    cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        trainer = Trainer(resolve_train_config(options, cuda_available=True, cuda_bf16=cuda_bf16))
        trainer.run()
    finally:
        torch.use_deterministic_algorithms(False)  # --deterministic set it for the process
    return trainer


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend, fused", [("torch", False), ("triton", True), ("cuda", True)])
def test_cuda_graph_training_matches_uncaptured_steps(tmp_path, dtype, backend, fused):
    """8 steps of ResNet-20 (3 eager warm-up steps, then capture and replays; the learning
    rate decays at step 6, inside the replays) against the same 8 steps uncaptured."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    graphed = _train_on_gpu(tmp_path, "graphed", dtype, backend, fused, graphs=True)
    eager = _train_on_gpu(tmp_path, "eager", dtype, backend, fused, graphs=False)
    assert graphed.graph is not None and graphed.graph.graph is not None  # captured and replayed
    assert graphed.lr == pytest.approx(eager.lr) == pytest.approx(0.01)
    tolerance = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}[dtype]
    ours, reference = graphed.module.state_dict(), eager.module.state_dict()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key].float(), value.float(), rtol=tolerance, atol=tolerance, msg=key)
    assert graphed.scaler.get_scale() == eager.scaler.get_scale()


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_profiler_cuda_graphs_capture_fused_training(tmp_path, dtype):
    """The headline's fused-training variants, captured whole (fp16: GradScaler and fused SGD inside)."""
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this GPU")
    path = tmp_path / "fused.json"
    assert bench_main(["--device", "cuda", "--model", "resnet18", "--batch", "8", "--image-size", "64",
                       "--steps", "3", "--warmup", "2", "--dtype", dtype, "--mode", "train", "--cuda-graphs",
                       "--compare", "eager,resnet_fast:triton+fused,resnet_fast:cuda+fused",
                       "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    measured = {r["variant"]: r for r in data["results"]}
    assert set(measured) | {s["variant"] for s in data["skipped"]} >= {"resnet_fast:triton+fused",
                                                                         "resnet_fast:cuda+fused"}
    for name in ("resnet_fast:triton+fused", "resnet_fast:cuda+fused"):
        if name in measured:  # a backend this GPU lacks is skipped with its reason
            assert measured[name]["label"] == name  # the backend named is the one that ran
            assert "fused SGD step" in measured[name]["graph"] and measured[name]["images_per_s"] > 0
    assert "resnet_fast:triton+fused" in measured  # every GPU the project supports runs Triton


def test_capturable_optimizer_sees_every_learning_rate_change_in_place():
    """Under --cuda-graphs a replayed optimizer step reads the learning-rate tensor captured
    once: the milestone scheduler and the error-gated warm-up must change that very tensor."""
    from types import SimpleNamespace

    from resnet_fast.train.loop import ErrorGatedWarmup, build_optimizer

    model = torch.nn.Linear(3, 2)
    config = SimpleNamespace(cuda_graphs=True, lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer = build_optimizer(model, config, torch.device("cpu"))
    group = optimizer.param_groups[0]
    captured = group["lr"]
    assert isinstance(captured, torch.Tensor) and group["fused"]
    warmup = ErrorGatedWarmup(optimizer, enabled=True)
    warmup.start()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [2], gamma=0.1)
    assert captured.item() == pytest.approx(0.01)
    assert warmup.observe(50.0)  # the warm-up ends: back to 0.1
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    assert group["lr"] is captured and captured.item() == pytest.approx(0.01)
    eager = build_optimizer(model, SimpleNamespace(**{**vars(config), "cuda_graphs": False}), torch.device("cpu"))
    assert eager.param_groups[0]["lr"] == 0.1 and not eager.param_groups[0]["fused"]
