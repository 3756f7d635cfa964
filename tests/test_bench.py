"""The throughput profiler (``python -m resnet_fast.bench``) on the CPU, with tiny settings."""

from __future__ import annotations

import json

import pytest
import torch

from resnet_fast.bench.__main__ import main
from resnet_fast.bench.profiler import (
    CPU_DEFAULTS,
    BenchConfigError,
    Measurement,
    Options,
    Variant,
    assign_speedups,
    check_device_support,
    images_per_second,
    median_ms,
    parse_variant,
    parse_variants,
    resolve_config,
    skip_reasons,
    speedup,
)

TINY = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "1"]


def _measurement(variant: str, mode: str, ms: float) -> Measurement:
    return Measurement(variant=variant, mode=mode, timings_ms=[ms], median_ms=ms,
                       images_per_s=images_per_second(8, ms), peak_memory_gib=None)


# --- pure functions ---------------------------------------------------------------------


def test_median_of_timings():
    assert median_ms([3.0, 1.0, 2.0]) == 2.0
    assert median_ms([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median_ms([])


def test_images_per_second_from_ms():
    assert images_per_second(256, 100.0) == pytest.approx(2560.0)
    assert images_per_second(8, 0.5) == pytest.approx(16000.0)
    with pytest.raises(ValueError):
        images_per_second(8, 0.0)


def test_speedup():
    assert speedup(10.0, 5.0) == pytest.approx(2.0)
    assert speedup(5.0, 10.0) == pytest.approx(0.5)


def test_speedups_against_eager_per_mode():
    results = [_measurement("resnet_fast", "train", 5.0), _measurement("eager", "train", 10.0),
               _measurement("resnet_fast", "infer", 2.0), _measurement("eager", "infer", 3.0)]
    assign_speedups(results)
    assert [(m.baseline, m.speedup) for m in results] == [
        ("eager", pytest.approx(2.0)), ("eager", pytest.approx(1.0)),
        ("eager", pytest.approx(1.5)), ("eager", pytest.approx(1.0))]


def test_speedups_against_first_variant_without_eager():
    results = [_measurement("compile", "train", 8.0), _measurement("resnet_fast", "train", 4.0)]
    assign_speedups(results)
    assert [(m.baseline, m.speedup) for m in results] == [("compile", 1.0), ("compile", 2.0)]


def test_parse_variants():
    assert parse_variant("resnet_fast") == Variant("resnet_fast", "resnet_fast", "auto")
    assert parse_variant("resnet_fast:auto") == Variant("resnet_fast", "resnet_fast", "auto")
    assert parse_variant("resnet_fast:triton") == Variant("resnet_fast:triton", "resnet_fast", "triton")
    assert [v.name for v in parse_variants("eager, compile,resnet_fast:torch")] == [
        "eager", "compile", "resnet_fast:torch"]
    for bad in ("bogus", "resnet_fast:nope", "eager:cuda", "eager,eager", ""):
        with pytest.raises(BenchConfigError):
            parse_variants(bad)


def test_small_cpu_defaults_without_gpu_and_overrides():
    config = resolve_config(Options(), cuda_available=False)
    assert (config.device, config.model, config.batch, config.image_size, config.dtype) == (
        "cpu", CPU_DEFAULTS.model, CPU_DEFAULTS.batch, CPU_DEFAULTS.image_size, CPU_DEFAULTS.dtype)
    assert (config.steps, config.warmup, config.channels_last) == (3, 1, False)
    assert [v.name for v in config.variants] == ["eager", "resnet_fast"]
    assert config.notice.startswith("No CUDA device: running a small CPU configuration (")
    assert config.notice.endswith("GPU numbers need a GPU.")

    config = resolve_config(Options(model="resnet50", batch=4, compare=parse_variants("compile")),
                            cuda_available=False)
    assert (config.model, config.batch, config.image_size) == ("resnet50", 4, 64)
    assert [v.name for v in config.variants] == ["compile"]
    assert resolve_config(Options(model="resnet20"), cuda_available=False).image_size == 32


def test_gpu_defaults():
    config = resolve_config(Options(), cuda_available=True)
    assert (config.device, config.model, config.image_size, config.dtype, config.channels_last) == (
        "cuda", "resnet50", 224, "bf16", True)
    assert [v.name for v in config.variants] == ["eager", "compile", "resnet_fast"]
    assert config.notice is None
    assert resolve_config(Options(), cuda_available=True, cuda_bf16=False).dtype == "fp16"
    assert resolve_config(Options(model="resnet110"), cuda_available=True).image_size == 32


@pytest.mark.parametrize("options, message", [
    (Options(batch=1), "BatchNorm"),
    (Options(batch=1, mode="train"), "BatchNorm"),
    (Options(steps=0), "at least 1"),
    (Options(image_size=0), "positive"),
    (Options(device="cuda"), "no CUDA device"),
    (Options(device="tpu"), "cpu or cuda"),
])
def test_invalid_configs(options, message):
    with pytest.raises(BenchConfigError, match=message):
        resolve_config(options, cuda_available=False)


def test_bf16_refused_on_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    config = resolve_config(Options(dtype="bf16"), cuda_available=True)
    with pytest.raises(BenchConfigError, match="V100-SXM2-32GB has no bf16 support"):
        check_device_support(config)
    check_device_support(resolve_config(Options(dtype="fp16"), cuda_available=True))


def test_batch_one_is_fine_for_inference():
    assert resolve_config(Options(batch=1, mode="infer"), cuda_available=False).batch == 1


def test_skip_reasons():
    info = {"cuda": {"available": False, "reasons": ["no CUDA device is visible to torch"]},
            "torch": {"available": True, "reasons": []}}
    assert skip_reasons(Variant("eager", "eager"), "resnet18", info) == []
    assert "CIFAR" in skip_reasons(Variant("compile", "compile"), "resnet56", info)[0]
    assert skip_reasons(Variant("resnet_fast:cuda", "resnet_fast", "cuda"), "resnet18", info) == [
        "no CUDA device is visible to torch"]
    assert skip_reasons(Variant("resnet_fast:torch", "resnet_fast", "torch"), "resnet18", info) == []


# --- the command line -------------------------------------------------------------------


def test_cli_small_cpu_run_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["--model", "resnet18", *TINY, "--mode", "both", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "eager" in out and "resnet_fast" in out and "images/s" in out
    assert "torch " in out and "batch 2" in out and "image 32" in out

    data = json.loads(path.read_text())
    measured = {(r["variant"], r["mode"]) for r in data["results"]}
    assert measured == {(v, m) for v in ("eager", "resnet_fast") for m in ("train", "infer")}
    assert all(r["images_per_s"] > 0 and r["median_ms"] > 0 for r in data["results"])
    assert all(r["peak_memory_gib"] is None for r in data["results"])
    env = data["environment"]
    for key in ("torch", "torchvision", "triton", "device_name", "capability", "cuda", "dtype",
                "batch", "command_line"):
        assert key in env
    assert env["batch"] == 2 and env["dtype"] == "fp32" and "--json" in env["command_line"]
    assert data["skipped"] == []


def test_cli_cifar_model_skips_eager_with_reason(tmp_path, capsys):
    path = tmp_path / "cifar.json"
    assert main(["--model", "resnet20", "--device", "cpu", "--batch", "4", "--steps", "1",
                 "--warmup", "1", "--mode", "train", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "skipped eager" in out and "CIFAR" in out
    data = json.loads(path.read_text())
    assert [(r["variant"], r["mode"]) for r in data["results"]] == [("resnet_fast", "train")]
    assert data["results"][0]["speedup"] == pytest.approx(1.0)
    assert data["config"]["image_size"] == 32
    [skipped] = data["skipped"]
    assert skipped["variant"] == "eager" and "CIFAR" in skipped["reasons"][0]


def test_cli_unavailable_backend_is_skipped_not_fatal(tmp_path, capsys):
    path = tmp_path / "cuda.json"
    code = main(["--model", "resnet18", *TINY, "--mode", "infer", "--compare", "resnet_fast:cuda",
                 "--json", str(path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "skipped resnet_fast:cuda" in out
    data = json.loads(path.read_text())
    assert data["results"] == []
    [skipped] = data["skipped"]
    assert skipped["variant"] == "resnet_fast:cuda" and skipped["reasons"]


@pytest.mark.parametrize("argv, message", [
    (["--batch", "1", "--mode", "train"], "BatchNorm"),
    (["--model", "resnet9000"], "invalid choice"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--compare", "eager,bogus"], "unknown variant"),
])
def test_cli_invalid_arguments_exit_nonzero(argv, message, capsys):
    assert main(argv) != 0
    assert message in capsys.readouterr().err
