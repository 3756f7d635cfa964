"""The benchmark suite's harness, on the CPU: the smoke benchmarks run through pytest, the
report on their JSON, and the arithmetic of bytes, floors and speedups."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fast.bench import report
from resnet_fast.bench.timing import (
    FWD,
    INFER,
    TRAIN,
    BenchSpec,
    Target,
    Timer,
    TimingSettings,
    batch_norm_act_bytes,
    conv2d_stats_bytes,
    conv_bn_act_bytes,
    conv_flops,
    copy_bandwidth,
    floor_ms,
    floor_multiple,
    gb_per_s,
    measure,
    shape_id,
)

REPO = Path(__file__).resolve().parents[1]
BENCHES = {"op": {"bn_relu", "bn_add_relu", "conv_bn_relu", "conv_bn_add_relu", "conv2d_bias_act", "conv2d_stats"},
           "block": {"basic_block", "bottleneck"}, "model": {"model"}}
COMMON_FIELDS = {"level", "bench", "case", "variant", "device", "dtype", "layout", "shape", "pass", "median_ms",
                 "times_ms", "timer", "rounds", "input_sets", "peak_memory_bytes", "resident_bytes",
                 "speedup_vs_eager"}
LEVEL_FIELDS = {"op": {"bytes_moved", "gb_per_s", "copy_gb_per_s", "floor_ms", "floor_multiple"},
                "block": {"images_per_s"}, "model": {"images_per_s"}}


def run_python(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m ...`` in the repository, without the suite's environment overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_FAST_", "PYTEST_ADDOPTS"))}
    result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{output}"
    return result


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The suite's CPU smoke run (``-m "not gpu"``), as pytest-benchmark JSON."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    run_python("pytest", "benchmarks", "-q", "-m", "not gpu and not host_overhead", "-p", "no:cacheprovider",
               "--benchmark-quiet",
               f"--benchmark-json={path}")
    return {"path": path, **json.loads(path.read_text())}


# --- the smoke run ----------------------------------------------------------------------


def test_smoke_run_measures_every_bench_with_its_extra_info(smoke_json):
    entries = smoke_json["benchmarks"]
    by_level: dict[str, set[str]] = {}
    for entry in entries:
        info = entry["extra_info"]
        by_level.setdefault(info["level"], set()).add(info["bench"])
        missing = (COMMON_FIELDS | LEVEL_FIELDS[info["level"]]) - set(info)
        assert not missing, f"{entry['name']} lacks {sorted(missing)}"
        assert info["device"] and info["dtype"] == "fp32" and info["layout"] == "nchw"
        assert info["timer"] == "perf_counter" and len(info["times_ms"]) == info["rounds"] == 3
        assert info["input_sets"] >= 3 and info["median_ms"] > 0
        assert entry["group"] == info["case"]
    assert by_level == BENCHES
    assert {e["extra_info"]["variant"] for e in entries} == {"eager", "resnet_fast:torch", "resnet_fast:torch+fused"}
    fused = {(e["extra_info"]["level"], e["extra_info"]["pass"]) for e in entries
             if e["extra_info"]["variant"] == "resnet_fast:torch+fused"}
    assert fused == {("block", "train"), ("model", "train")}  # fused training: training only


def test_smoke_run_ids_are_readable(smoke_json):
    names = {entry["name"] for entry in smoke_json["benchmarks"]}
    assert "test_bn_relu[fp32-nchw-2x8x8x8-fwd-eager]" in names
    assert "test_bn_add_relu[fp32-nchw-2x8x8x8-train-rf_torch]" in names
    assert "test_bottleneck[fp32-nchw-downsample-2x32x8x8-infer-rf_torch]" in names
    assert "test_model[fp32-nchw-resnet20-2x3x32x32-train-eager]" in names
    assert "test_model[fp32-nchw-resnet18-2x3x32x32-train-rf_torch_fused]" in names
    assert "test_bottleneck[fp32-nchw-downsample-2x32x8x8-train-rf_torch_fused]" in names


def test_smoke_run_speedups_come_from_the_eager_median_of_the_same_case(smoke_json):
    infos = [entry["extra_info"] for entry in smoke_json["benchmarks"]]
    eager = {info["case"]: info["median_ms"] for info in infos if info["variant"] == "eager"}
    for info in infos:
        assert info["speedup_vs_eager"] == pytest.approx(eager[info["case"]] / info["median_ms"])


def test_smoke_run_bytes_and_floor_follow_the_formulas(smoke_json):
    info = next(e["extra_info"] for e in smoke_json["benchmarks"]
                if e["name"] == "test_bn_relu[fp32-nchw-2x8x8x8-fwd-eager]")
    assert info["bytes_moved"] == 3 * (2 * 8 * 8 * 8) * 4
    assert info["floor_ms"] == pytest.approx(info["bytes_moved"] / (info["copy_gb_per_s"] * 1e9) * 1e3)
    assert info["floor_multiple"] == pytest.approx(info["median_ms"] / info["floor_ms"])
    assert info["gb_per_s"] == pytest.approx(info["bytes_moved"] / info["median_ms"] / 1e6)


def test_smoke_run_records_environment_and_skip_reasons(smoke_json):
    env = smoke_json["machine_info"]["resnet_fast"]
    assert env["command"].startswith("python -m pytest benchmarks")
    assert env["torch"] == torch.__version__ and "cpu" in env["ceilings"]
    assert env["backends"]["torch"]["available"]
    reasons = " ".join(env["skipped"])
    assert "torch.compile is not timed in the CPU smoke run" in reasons
    for backend in ("cuda", "triton"):
        if not env["backends"][backend]["available"]:
            assert f"resnet_fast backend '{backend}' is unavailable" in reasons


def test_report_writes_markdown_tables_and_plots(smoke_json, tmp_path):
    markdown, plots = tmp_path / "BENCHMARKS.md", tmp_path / "plots"
    run_python("resnet_fast.bench.report", str(smoke_json["path"]), "-o", str(markdown), "--plots", str(plots))
    text = markdown.read_text()
    for heading in ("## Environment", "## Operators", "## Blocks", "## Models", "### bn_add_relu", "### bottleneck"):
        assert heading in text
    assert "| case | variant | median ms | GB/s | floor ms | x floor | peak memory | vs eager | vs compile |" in text
    assert "| case | variant | median ms | images/s | peak memory | vs eager | vs compile |" in text
    assert "| fp32-nchw-2x8x8x8-fwd | resnet_fast:torch |" in text
    assert "python -m pytest benchmarks" in text and torch.__version__ in text
    pngs = sorted(plots.glob("*.png"))
    assert {p.name for p in pngs} == {f"{level}-{bench}-fp32-nchw.png"
                                      for level, benches in BENCHES.items() for bench in benches}
    for png in pngs:
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{png.name})" in text


# --- report: loading, speedups, formatting ----------------------------------------------


def _entry(case: str, variant: str, median_ms: float, level: str = "block", **extra) -> dict:
    bench, _, rest = case.partition("[")
    dtype, layout = rest.split("-")[:2]
    info = {"level": level, "bench": bench, "case": case, "variant": variant, "device": "GPU", "dtype": dtype,
            "layout": layout, "median_ms": median_ms, "peak_memory_bytes": 3 * 2**30, **extra}
    return {"name": f"test_{case}", "extra_info": info}


def _write(path: Path, entries: list[dict], command: str = "python -m pytest benchmarks") -> str:
    path.write_text(json.dumps({"benchmarks": entries, "datetime": "2026-01-01T00:00:00",
                                "machine_info": {"resnet_fast": {"command": command, "gpu": "H100",
                                                                 "capability": "9.0", "driver": "580.1"}},
                                "commit_info": {"id": "abc", "dirty": False}}))
    return str(path)


def test_speedups_are_recomputed_whatever_the_order():
    results = [report.Result.from_extra_info(e["extra_info"]) for e in (
        _entry("bottleneck[bf16-nhwc-x-train]", "resnet_fast:triton", 2.0),
        _entry("bottleneck[bf16-nhwc-x-train]", "compile", 3.0),
        _entry("bottleneck[bf16-nhwc-x-train]", "eager", 4.0),
        _entry("bottleneck[bf16-nhwc-y-train]", "resnet_fast:torch", 5.0),
    )]
    report.assign_speedups(results)
    assert results[0].speedups == {"eager": pytest.approx(2.0), "compile": pytest.approx(1.5)}
    assert results[2].speedups == {"eager": 1.0, "compile": pytest.approx(0.75)}
    assert results[3].speedups == {}  # no baseline measured for that case
    assert [r.variant for r in report.ordered(results)] == ["eager", "compile", "resnet_fast:triton",
                                                            "resnet_fast:torch"]


def test_report_merges_files_the_later_one_winning(tmp_path):
    first = _write(tmp_path / "a.json", [_entry("model[bf16-nhwc-resnet50-train]", "eager", 100.0, level="model",
                                                images_per_s=2560.0),
                                         _entry("model[bf16-nhwc-resnet50-train]", "compile", 80.0, level="model",
                                                images_per_s=3200.0)])
    second = _write(tmp_path / "b.json", [_entry("model[bf16-nhwc-resnet50-train]", "compile", 50.0, level="model",
                                                 images_per_s=5120.0),
                                          {"name": "test_other", "extra_info": {}}])  # not the suite's: ignored
    markdown = tmp_path / "out" / "BENCHMARKS.md"
    assert report.main([first, second, "-o", str(markdown)]) == 0
    text = markdown.read_text()
    assert "| bf16-nhwc-resnet50-train | compile | 50.000 | 5,120 | 3.00 GiB | 2.00x | 1.00x |" in text
    assert "80.000" not in text
    assert "H100 (sm 9.0)" in text and "580.1" in text and "`a.json`" in text and "`b.json`" in text


def test_report_without_results_fails(tmp_path):
    assert report.main([_write(tmp_path / "empty.json", []), "-o", str(tmp_path / "x.md")]) == 1


def test_report_number_formats():
    assert report.number(12345.6) == "12,346" and report.number(123.45) == "123.5"
    assert report.number(1.2345) == "1.23" and report.number(None) == "n/a"
    assert report.memory(3 * 2**30) == "3.00 GiB" and report.memory(5 * 2**20) == "5.0 MiB"
    assert report.memory(None) == "n/a" and report.times(1.5) == "1.50x" and report.times(None) == "-"
    assert report.milliseconds(12.3456) == "12.346" and report.milliseconds(0.0012345) == "0.00123"


# --- timing: bytes, floors, the timer ---------------------------------------------------


def test_batch_norm_bytes_count_passes_over_the_tensor():
    elements, itemsize = 1000, 2
    expected = {(FWD, False): 3, (FWD, True): 4, (TRAIN, False): 8, (TRAIN, True): 11,
                (INFER, False): 2, (INFER, True): 3}
    for (pass_, residual), passes in expected.items():
        assert batch_norm_act_bytes(elements, itemsize, pass_, residual) == passes * elements * itemsize


def test_conv_bn_act_bytes():
    x, w, z, itemsize = 100, 10, 50, 2
    assert conv_bn_act_bytes(x, w, z, itemsize, INFER, False) == (x + w + z) * itemsize
    assert conv_bn_act_bytes(x, w, z, itemsize, INFER, True) == (x + w + 2 * z) * itemsize
    assert conv_bn_act_bytes(x, w, z, itemsize, FWD, False) == (x + w + 3 * z) * itemsize
    assert conv_bn_act_bytes(x, w, z, itemsize, FWD, True) == (x + w + 4 * z) * itemsize
    # forward, BatchNorm+ReLU backward (5 or 7 passes over z), data and weight gradients
    assert conv_bn_act_bytes(x, w, z, itemsize, TRAIN, False) == (x + w + 3 * z + 5 * z + 2 * (z + x + w)) * itemsize
    assert conv_bn_act_bytes(x, w, z, itemsize, TRAIN, True) == (x + w + 4 * z + 7 * z + 2 * (z + x + w)) * itemsize


def test_conv2d_stats_bytes_read_input_and_weight_and_write_output():
    assert conv2d_stats_bytes(100, 10, 50, 2) == (100 + 10 + 50) * 2


def test_smoke_run_times_the_convolution_operators(smoke_json):
    infos = {e["name"]: e["extra_info"] for e in smoke_json["benchmarks"]}
    info = infos["test_conv2d_bias_act[fp32-nchw-block.conv3-2x8x8x8-k1s1-16-infer-rf_torch]"]
    assert info["bytes_moved"] == (2 * 8 * 8 * 8 + 16 * 8 + 2 * (2 * 16 * 8 * 8)) * 4  # x, w, residual, y
    assert info["flops"] == 2 * (2 * 16 * 8 * 8) * 8 and info["tflops"] > 0
    info = infos["test_conv2d_stats[fp32-nchw-conv3x3-2x8x8x8-k3s1-8-fwd-eager]"]
    assert info["bytes_moved"] == (2 * 8 * 8 * 8 + 8 * 8 * 9 + 2 * 8 * 8 * 8) * 4
    assert info["flops"] == 2 * (2 * 8 * 8 * 8) * 8 * 9


def test_conv_flops():
    forward = 2 * (2 * 4 * 3 * 3) * 8 * 9
    assert conv_flops((2, 4, 3, 3), 8, (3, 3), 1, FWD) == forward
    assert conv_flops((2, 4, 3, 3), 8, (3, 3), 1, INFER) == forward
    assert conv_flops((2, 4, 3, 3), 8, (3, 3), 1, TRAIN) == 3 * forward
    assert conv_flops((2, 4, 3, 3), 8, (3, 3), 2, FWD) == forward / 2


def test_floor_bandwidth_and_multiple():
    assert floor_ms(3e9, 3e12) == pytest.approx(1.0)  # 3 GB at 3 TB/s
    assert floor_ms(3e9, 3e12, flops=2e12, flop_rate=1e15) == pytest.approx(2.0)  # compute-bound
    assert floor_ms(3e9, 3e12, flops=2e11, flop_rate=1e15) == pytest.approx(1.0)  # memory-bound
    assert gb_per_s(1.5e9, 1.0) == pytest.approx(1500.0)
    assert floor_multiple(3.0, 1.5) == pytest.approx(2.0)
    for call in (lambda: floor_ms(1.0, 0.0), lambda: floor_ms(1.0, 1.0, flops=1.0), lambda: gb_per_s(1.0, 0.0),
                 lambda: floor_multiple(1.0, 0.0)):
        with pytest.raises(ValueError):
            call()


class FakeBenchmark:
    """pytest-benchmark's pedantic mode: ``rounds`` calls of ``target(*setup()[0])``."""

    def __init__(self) -> None:
        self.rounds = 0

    def pedantic(self, target, *, setup, rounds, iterations, warmup_rounds):
        assert iterations == 1 and warmup_rounds == 0
        self.rounds = rounds
        for _ in range(rounds):
            args, kwargs = setup()
            target(*args, **kwargs)


def test_measure_warms_up_then_times_each_call_rotating_the_inputs():
    seen = []
    benchmark = FakeBenchmark()
    m = measure(benchmark, seen.append, ["a", "b", "c"], "cpu", TimingSettings(warmup=2, rounds=4))
    assert seen == ["a", "b", "c", "a", "b", "c"]  # 2 warm-up calls, then 4 timed ones, in rotation
    assert benchmark.rounds == 4 and len(m.times_ms) == 4 and all(t >= 0 for t in m.times_ms)
    assert m.timer == "perf_counter" and m.peak_memory_bytes is None
    assert m.median_ms == pytest.approx(statistics.median(m.times_ms))


def test_timer_needs_inputs():
    with pytest.raises(ValueError):
        Timer(lambda _: None, [], "cpu")


def test_copy_bandwidth_on_the_cpu():
    assert copy_bandwidth("cpu", 1 << 20, rounds=3) > 0


def test_bench_spec_ids():
    class Case:
        id = shape_id((256, 256, 56, 56))

    spec = BenchSpec("op", "bn_relu", Case(), Target("cuda", "bf16", "nhwc"), FWD, "resnet_fast:triton")
    assert spec.id == "bf16-nhwc-256x256x56x56-fwd-rf_triton" and spec.backend == "triton"
    assert spec.key == "bn_relu[bf16-nhwc-256x256x56x56-fwd]"
    eager = BenchSpec("op", "bn_relu", Case(), Target("cpu", "fp32", "nchw"), INFER, "eager")
    assert eager.id == "fp32-nchw-256x256x56x56-infer-eager" and eager.backend is None
    fused = BenchSpec("model", "model", Case(), Target("cuda", "bf16", "nhwc"), TRAIN, "resnet_fast:triton+fused")
    assert fused.id == "bf16-nhwc-256x256x56x56-train-rf_triton_fused"
    assert fused.backend == "triton" and fused.fused_training and not spec.fused_training


def test_target_random_activations():
    x = Target("cpu", "bf16", "nhwc").randn((2, 3, 4, 5), requires_grad=True)
    assert x.dtype == torch.bfloat16 and x.requires_grad and x.is_contiguous(memory_format=torch.channels_last)
    assert x.abs().sum() > 0 and math.isfinite(x.float().sum().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_with_cuda_events_records_device_time_and_peak_memory():
    a = torch.randn(2048, 2048, device="cuda")
    inputs = [torch.randn(2048, 2048, device="cuda") for _ in range(3)]
    m = measure(FakeBenchmark(), lambda b: a @ b, inputs, "cuda", TimingSettings(warmup=2, rounds=5))
    assert m.timer == "cuda_events" and len(m.times_ms) == 5 and m.median_ms > 0
    assert m.peak_memory_bytes >= m.resident_bytes >= 4 * 2048 * 2048 * 4
