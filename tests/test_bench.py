"""The throughput profiler (``python -m resnet_fast.bench``) on the CPU, with tiny settings.

GPU paths (CUDA graph capture, device-time breakdown) are ``gpu``-marked and skip here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from torch import nn
from torch.autograd import DeviceType

from resnet_fast.bench.__main__ import main
from resnet_fast.bench.plot import build_figure, write_plot
from resnet_fast.bench.profiler import (
    CPU_DEFAULTS,
    BenchConfigError,
    BenchReport,
    CaptureError,
    Measurement,
    Options,
    Skipped,
    StepPlan,
    Variant,
    assign_speedups,
    build_model,
    check_device_support,
    describe_error,
    graphed_step,
    images_per_second,
    initial_state,
    make_infer_plan,
    make_train_plan,
    median_ms,
    parse_variant,
    parse_variants,
    resolve_config,
    skip_reasons,
    speedup,
)
from resnet_fast.bench.trace import CATEGORIES, STEP_MARKER, TimedName, categorize, counted_times, summarize

TINY = ["--device", "cpu", "--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
    no_bf16 = resolve_config(Options(), cuda_available=True, cuda_bf16=False)
    assert no_bf16.dtype == "fp16" and "no bf16 support" in no_bf16.notice and "GradScaler" in no_bf16.notice
    assert resolve_config(Options(dtype="fp32"), cuda_available=True, cuda_bf16=False).notice is None
    assert resolve_config(Options(model="resnet110"), cuda_available=True).image_size == 32


@pytest.mark.parametrize("options, message", [
    (Options(batch=1), "BatchNorm"),
    (Options(batch=1, mode="train"), "BatchNorm"),
    (Options(steps=0), "at least 1"),
    (Options(image_size=0), "positive"),
    (Options(device="cuda"), "no CUDA device"),
    (Options(device="tpu"), "cpu or cuda"),
    (Options(cuda_graphs=True), "--cuda-graphs needs a CUDA device"),
    (Options(plot="figure.jpg"), "ending in .png"),
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
    assert skip_reasons(Variant("compile", "compile"), "resnet56", info) == []
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


def test_cli_cifar_model_has_an_eager_baseline_from_the_same_weights(tmp_path, capsys):
    path = tmp_path / "cifar.json"
    assert main(["--model", "resnet20", "--device", "cpu", "--batch", "4", "--steps", "1",
                 "--warmup", "1", "--mode", "train", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert [(r["variant"], r["mode"]) for r in data["results"]] == [("eager", "train"), ("resnet_fast", "train")]
    assert all(r["baseline"] == "eager" for r in data["results"])
    assert data["config"]["image_size"] == 32
    assert data["skipped"] == []


def test_cifar_eager_model_is_plain_pytorch_with_the_fused_models_weights():
    config = resolve_config(Options(model="resnet20", batch=2), cuda_available=False)
    state = initial_state(config)
    eager = build_model(config, Variant("eager", "eager"), state)
    assert not any(type(m).__module__.startswith("resnet_fast.nn") for m in eager.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in eager.modules())
    assert all(torch.equal(eager.state_dict()[k], v) for k, v in state.items())


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
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device, but this run is on the CPU"),
])
def test_cli_invalid_arguments_exit_nonzero(argv, message, capsys):
    assert main(argv) != 0
    assert message in capsys.readouterr().err


# --- breakdown categories -----------------------------------------------------------------

CATEGORY_TABLE = [
    # GPU kernels (cuDNN, cuBLAS, ATen, inductor's Triton)
    ("void cudnn::engines_precompiled::convolution_fprop_kernel<float>", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm80_xmma_dgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm80_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_implicit_gemm_nhwc", "convolution"),
    ("ampere_scudnn_128x64_relu_interior_nn_v1", "convolution"),
    ("triton_tem_fused_convolution_0", "convolution"),
    ("void cudnn::bn_fw_tr_1C11_singleread_spec<__nv_bfloat16, float, float, 512, true, 1, 2, false>",
     "normalisation"),
    ("void cudnn::bn_bw_1C11_singleread_spec<__nv_bfloat16, float, float, 512, true, 1, 2, false>", "normalisation"),
    ("void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, float, float, 4>",
     "normalisation"),
    ("void at::native::batch_norm_backward_reduce_channels_last_kernel<4, float, float, float>", "normalisation"),
    ("triton_red_fused__native_batch_norm_legit_functional_threshold_backward_12", "normalisation"),
    ("triton_poi_fused__native_batch_norm_legit_functional_relu_3", "normalisation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
     "std::array<char*, 3ul>>(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
     "elementwise"),
    ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<"
     "at::native::threshold_kernel_impl<float>>>", "elementwise"),
    ("triton_poi_fused_add_relu_threshold_backward_5", "elementwise"),
    ("void at::native::(anonymous namespace)::max_pool_forward_nhwc<c10::BFloat16, float>", "pooling"),
    ("void at::native::(anonymous namespace)::max_pool_backward_nhwc<c10::BFloat16, float>", "pooling"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<2>, at::native::(anonymous namespace)::BinaryOpListAlphaFunctor<float, 2, 2, 0>, "
     "std::plus<float>, float>", "optimizer"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
     "matmul"),
    ("ampere_bf16_s16816gemm_bf16_64x64_ldg8_f2f_stages_64x5_tn", "matmul"),
    ("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT", "matmul"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, "
     "float, float>, unsigned int, float, 4>>", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    # CPU operators, ours included
    ("aten::cudnn_convolution", "convolution"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::convolution_backward", "convolution"),
    ("aten::conv2d", "convolution"),
    ("resnet_fast::conv_bn_act", "convolution"),
    ("aten::cudnn_batch_norm", "normalisation"),
    ("aten::native_batch_norm_backward", "normalisation"),
    ("resnet_fast::batch_norm_act", "normalisation"),
    ("resnet_fast::batch_norm_act_backward", "normalisation"),
    ("resnet_fast::update_running_stats", "normalisation"),
    ("aten::add_", "elementwise"),
    ("aten::relu_", "elementwise"),
    ("aten::threshold_backward", "elementwise"),
    ("aten::mul", "elementwise"),
    ("aten::copy_", "elementwise"),
    ("aten::max_pool2d_with_indices", "pooling"),
    ("aten::max_pool2d_with_indices_backward", "pooling"),
    ("aten::adaptive_avg_pool2d", "pooling"),
    ("aten::_foreach_add_", "optimizer"),
    ("aten::_foreach_mul_", "optimizer"),
    ("aten::_fused_sgd_", "optimizer"),
    ("aten::_amp_foreach_non_finite_check_and_unscale_", "optimizer"),
    ("aten::addmm", "matmul"),
    ("aten::mm", "matmul"),
    ("aten::linear", "matmul"),
    ("aten::empty", "other"),
    ("aten::nll_loss_forward", "other"),
    ("aten::_log_softmax", "other"),
]


@pytest.mark.parametrize("name, category", CATEGORY_TABLE)
def test_categorize_real_names(name, category):
    assert categorize(name) == category


def test_every_category_is_reachable():
    assert {category for _, category in CATEGORY_TABLE} == set(CATEGORIES)


def test_summarize_per_step_and_sums_to_total():
    times = [TimedName("aten::mkldnn_convolution", 3000.0), TimedName("aten::add_", 1000.0),
             TimedName("aten::native_batch_norm", 1500.0), TimedName("aten::empty", 500.0)]
    breakdown = summarize(times, steps=2, source="test")
    assert list(breakdown.ms_per_step) == list(CATEGORIES)
    assert breakdown.ms_per_step["convolution"] == pytest.approx(1.5)
    assert breakdown.ms_per_step["normalisation"] == pytest.approx(0.75)
    assert breakdown.ms_per_step["other"] == pytest.approx(0.25)
    assert breakdown.total_ms == pytest.approx(3.0)
    assert breakdown.percent("convolution") == pytest.approx(50.0)


def _event(key, device_type, self_cpu, self_device, annotation=False):
    return SimpleNamespace(key=key, device_type=device_type, self_cpu_time_total=self_cpu,
                           self_device_time_total=self_device, is_user_annotation=annotation)


def test_counted_times_avoid_double_counting():
    events = [_event("bench_step#0", DeviceType.CPU, 50.0, 0.0, annotation=True),
              _event("bench_step#0", DeviceType.CUDA, 0.0, 1300.0, annotation=True),  # its GPU span
              _event("Optimizer.step#SGD.step", DeviceType.CPU, 30.0, 0.0, annotation=True),
              _event("aten::conv2d", DeviceType.CPU, 5.0, 900.0),  # host op: device time is its kernels'
              _event("aten::cudnn_convolution", DeviceType.CPU, 10.0, 900.0),
              _event("resnet_fast::batch_norm_act", DeviceType.CPU, 7.0, 400.0),
              _event("sm90_xmma_fprop_implicit_gemm_bf16", DeviceType.CUDA, 0.0, 900.0),
              _event("void cudnn::bn_fw_tr_1C11_kernel_NCHW", DeviceType.CUDA, 0.0, 400.0)]
    assert counted_times(events, on_gpu=True) == [TimedName("sm90_xmma_fprop_implicit_gemm_bf16", 900.0),
                                                  TimedName("void cudnn::bn_fw_tr_1C11_kernel_NCHW", 400.0)]
    assert counted_times(events, on_gpu=False) == [TimedName("aten::conv2d", 5.0),
                                                   TimedName("aten::cudnn_convolution", 10.0),
                                                   TimedName("resnet_fast::batch_norm_act", 7.0)]


# --- steps and CUDA graph plumbing that runs anywhere -------------------------------------


def test_describe_error_names_the_first_cause_first():
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as error:
        assert describe_error(error) == "RuntimeError: operation failed due to a previous error during capture"
    try:
        try:
            raise ValueError("sync in capture\nmore detail")
        except ValueError:
            raise RuntimeError("capture invalidated")  # noqa: B904 - the implicit context is the point
    except RuntimeError as error:
        assert describe_error(error) == "ValueError: sync in capture -> RuntimeError: capture invalidated"


@pytest.mark.parametrize("dtype, graphs, tail_runs_optimizer", [
    ("fp32", False, False), ("fp16", False, True), ("fp16", True, False), ("fp32", True, False)])
def test_train_plan_captures_the_grad_scaler_step_only_with_the_fused_optimizer(dtype, graphs,
                                                                                tail_runs_optimizer):
    config = resolve_config(Options(device="cpu", dtype=dtype), cuda_available=False)
    config = dataclasses.replace(config, cuda_graphs=graphs)  # what the plan looks like for a GPU
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(2, 3, 8, 8))
    plan = make_train_plan(model, config)
    assert ("SGD step runs eagerly" in plan.captured) == tail_runs_optimizer
    assert ("backward and" in plan.captured) != tail_runs_optimizer
    assert ("fused SGD" in plan.captured) == graphs
    assert ("inf check and update" in plan.captured) == (graphs and dtype == "fp16")
    assert make_infer_plan(model, config).captured == "forward"


# --- the figure ---------------------------------------------------------------------------


def _report(measurements, skipped=()):
    config = resolve_config(Options(device="cpu", batch=4), cuda_available=False)
    return BenchReport(config=config, environment={"device_name": "Test CPU"},
                       measurements=list(measurements), skipped=list(skipped))


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_with_peak_memory_and_skips(tmp_path):
    measurements = [_measurement("eager", "train", 10.0), _measurement("resnet_fast", "train", 6.0),
                    _measurement("eager", "infer", 3.0)]
    for m, gib in zip(measurements, (11.0, 7.5, 2.0)):
        m.peak_memory_gib = gib
    report = _report(measurements, [Skipped("resnet_fast", ("infer",), ["backend refused"])])
    figure = build_figure(report)
    throughput, memory = figure.axes[:2]
    assert len(throughput.patches) == 3 and len(memory.patches) == 3
    assert "resnet18 | batch 4 | fp32 | cpu (Test CPU)" in figure._suptitle.get_text()
    _assert_png(write_plot(report, str(tmp_path / "sub" / "plot.png")))


def test_plot_without_measurements(tmp_path):
    _assert_png(write_plot(_report([]), str(tmp_path / "empty.png")))


# --- the command line: plot, trace, breakdown ---------------------------------------------


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """One tiny CPU run with --plot, --trace and --json, shared by the tests below."""
    root = tmp_path_factory.mktemp("traced")
    paths = {"plot": root / "bench.png", "trace": root / "traces", "json": root / "bench.json"}
    argv = ["--model", "resnet18", *TINY, "--mode", "both", "--plot", str(paths["plot"]),
            "--trace", str(paths["trace"]), "--json", str(paths["json"])]
    assert main(argv) == 0
    return paths, json.loads(paths["json"].read_text())


def test_cli_plot_writes_a_readable_png(traced_run):
    paths, data = traced_run
    _assert_png(paths["plot"])
    assert data["config"]["plot_path"] == str(paths["plot"])


def test_cli_trace_writes_a_chrome_trace_per_variant_and_mode(traced_run):
    paths, data = traced_run
    assert data["config"]["trace_dir"] == str(paths["trace"]) and data["config"]["breakdown"] is True
    assert data["config"]["cuda_graphs"] is False
    expected = {f"{variant}_{mode}.json" for variant in ("eager", "resnet_fast") for mode in ("train", "infer")}
    assert {path.name for path in paths["trace"].iterdir()} == expected
    for result in data["results"]:
        trace = json.loads(Path(result["breakdown"]["trace_path"]).read_text())
        names = [event.get("name", "") for event in trace["traceEvents"]]
        assert any(name.startswith("aten::") for name in names)
        assert sum(name.startswith(STEP_MARKER) for name in names) == result["breakdown"]["steps"]


def test_cli_breakdown_sums_to_total_without_double_counting(traced_run):
    _, data = traced_run
    for result in data["results"]:
        breakdown = result["breakdown"]
        assert list(breakdown["ms_per_step"]) == list(CATEGORIES)
        assert sum(breakdown["ms_per_step"].values()) == pytest.approx(breakdown["total_ms"], rel=1e-6)
        assert breakdown["total_ms"] > 0 and breakdown["ms_per_step"]["convolution"] > 0
        # operator self times are disjoint, so they fit inside the steps' wall time
        trace = json.loads(Path(breakdown["trace_path"]).read_text())
        wall_us = sum(event["dur"] for event in trace["traceEvents"]
                      if event.get("name", "").startswith(STEP_MARKER))
        assert breakdown["total_ms"] * breakdown["steps"] * 1e3 <= wall_us * 1.01
    train = {r["variant"]: r["breakdown"]["ms_per_step"] for r in data["results"] if r["mode"] == "train"}
    assert all(per_category["optimizer"] > 0 for per_category in train.values())


def test_cli_breakdown_alone_prints_tables_and_writes_no_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "breakdown.json"
    assert main(["--model", "resnet18", *TINY, "--mode", "infer", "--compare", "eager", "--breakdown",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "infer: time per step by category" in out and "convolution" in out and "step median" in out
    [result] = json.loads(path.read_text())["results"]
    assert result["breakdown"]["trace_path"] is None and result["graph"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["breakdown.json"]


# --- GPU only: CUDA graphs and the device-time breakdown ----------------------------------

GPU_TINY = ["--device", "cuda", "--model", "resnet18", "--batch", "8", "--image-size", "64", "--steps", "3",
            "--warmup", "3"]


@pytest.mark.gpu
@requires_gpu
def test_gpu_cli_cuda_graphs_with_trace(tmp_path, capsys):
    path = tmp_path / "graphs.json"
    assert main([*GPU_TINY, "--dtype", "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16",
                 "--compare", "eager,resnet_fast", "--cuda-graphs", "--trace", str(tmp_path / "traces"),
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "CUDA graphs" in out and "CUDA graph (train)" in out
    data = json.loads(path.read_text())
    assert data["config"]["cuda_graphs"] is True
    assert {r["mode"] for r in data["results"] if r["variant"] == "eager"} == {"train", "infer"}
    for result in data["results"]:
        assert result["graph"] and result["peak_memory_gib"] > 0
        breakdown = result["breakdown"]
        assert breakdown["source"].startswith("device kernels")
        assert breakdown["ms_per_step"]["convolution"] > 0
        assert sum(breakdown["ms_per_step"].values()) == pytest.approx(breakdown["total_ms"], rel=1e-6)
        json.loads(Path(breakdown["trace_path"]).read_text())
    for skipped in data["skipped"]:
        assert skipped["reasons"]


@pytest.mark.gpu
@requires_gpu
def test_gpu_cli_cuda_graphs_fp16_captures_the_scaler_and_fused_sgd_step(tmp_path, capsys):
    path = tmp_path / "fp16.json"
    assert main([*GPU_TINY, "--dtype", "fp16", "--mode", "train", "--compare", "eager", "--cuda-graphs",
                 "--json", str(path)]) == 0
    [result] = json.loads(path.read_text())["results"]
    assert "fused SGD step" in result["graph"] and "inf check and update" in result["graph"]


@pytest.mark.gpu
@requires_gpu
def test_gpu_cli_breakdown_of_eager_steps(tmp_path):
    path = tmp_path / "eager.json"
    assert main([*GPU_TINY, "--mode", "train", "--compare", "eager", "--breakdown", "--json", str(path)]) == 0
    [result] = json.loads(path.read_text())["results"]
    per_category = result["breakdown"]["ms_per_step"]
    assert per_category["convolution"] > 0 and per_category["normalisation"] > 0
    assert per_category["optimizer"] > 0
    assert result["breakdown"]["total_ms"] <= result["median_ms"] * 1.5


@pytest.mark.gpu
@requires_gpu
def test_gpu_capture_failure_is_a_capture_error():
    device = torch.device("cuda")
    batches = [(torch.randn(4, 3, device=device), torch.zeros(4, dtype=torch.long, device=device))]

    def syncs(images, labels):
        (images.sum() > 0).item()  # a host sync: not allowed while capturing

    plan = StepPlan(body=syncs, tail=lambda: None, reset=lambda: None, captured="forward")
    with pytest.raises(CaptureError, match="CUDA graph capture failed"):
        with torch.cuda.device(device):
            graphed_step(plan, batches, warmup=1, device=device, progress=SimpleNamespace(update=lambda: None))
    torch.cuda.synchronize()
    assert (torch.ones(3, device=device) * 2).sum().item() == 6.0  # the device still works
