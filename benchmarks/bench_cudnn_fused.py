"""The fp16 race: cuDNN's fused ConvBN engine against ours, on every ResNet-50 convolution.

cuDNN's graph API (``nvidia-cudnn-frontend``, the ``bench`` extra) has fused engines for
fp16 NHWC on sm_80+ that run, in one kernel, the MLPerf ResNet pattern

    y = conv2d(relu(x * scale + bias), w);   sum_c = sum(y),  sumsq_c = sum(y^2)

(the previous BatchNorm's apply and ReLU in the prologue, the next BatchNorm's statistics
in the epilogue). Per distinct ResNet-50 convolution (batch ``RESNET_FAST_BENCH_BATCH``,
default 256, NHWC) this file times, in fp16 and bf16:

* ``cudnn_fused`` — that graph: scale -> bias -> relu -> conv_fprop -> genstats. The plan
  is built once, outside the timing; the engine that built is logged in ``extra_info``.
  Where cuDNN has no engine (bf16: cuDNN fuses no statistics epilogue there) the case is
  skipped with cuDNN's own reason, and the bf16 rows are ours alone.
* ``cudnn_conv_then_stats`` — the same work unfused: the prologue in torch, the cuDNN
  convolution through ``F.conv2d``, then ``torch.batch_norm_stats`` (mean and invstd).
* ``resnet_fast:<backend>`` — ``resnet_fast.ops.conv2d_stats``: the same pattern as the
  fused graph, prologue scale/bias/relu -> convolution -> per-channel statistics (mean and
  biased variance instead of the sums; the ``triton`` backend applies the prologue while
  loading and sums in the convolution's epilogue, the ``cuda`` backend runs a prologue
  kernel, cuDNN and a statistics kernel). A backend that cannot run it is skipped with
  its reasons.
* ``resnet_fast:conv2d_tensor_core`` — our CUDA C++ kernel itself
  (``torch.ops.resnet_fast.conv2d_tensor_core``, WMMA, the one the ``cuda`` backend runs on
  sm_7x), called directly so that it races on any GPU; fp16 only (skipped for bf16).

Everything is forward only, no autograd. Each case runs through the suite's timer
(:func:`resnet_fast.bench.timing.measure`: CUDA events, warm-up calls untimed, input sets
rotated) and records ``extra_info`` with the suite's common fields plus ``engine``
(``cudnn_fused``), ``conv`` (the layer in torchvision's ResNet-50) and ``speedup_vs_cudnn_fused``.

    python -m pytest benchmarks/bench_cudnn_fused.py -m gpu --benchmark-json=cudnn.json

Without the package, a GPU, or capability 8.0, the ``cudnn_fused`` cases skip with the
reason (:func:`cudnn_skip_reason`); the shapes themselves come from tracing torchvision's
ResNet-50 on the meta device
(:func:`resnet_fast.bench.shapes.resnet50_conv_shapes`), so they need no GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import resnet_fast
from resnet_fast.bench.shapes import ConvShape, resnet50_conv_shapes
from resnet_fast.bench.timing import DTYPES, TimingSettings, measure, shape_id
from resnet_fast.ops.dispatch import BACKEND_NAMES

# The suite's settings (benchmarks/conftest.py reads the same variables).
BATCH = int(os.environ.get("RESNET_FAST_BENCH_BATCH", 256))
TIMING = TimingSettings(warmup=int(os.environ.get("RESNET_FAST_BENCH_WARMUP", 5)),
                        rounds=int(os.environ.get("RESNET_FAST_BENCH_ROUNDS", 20)))
INPUT_SETS = 3

CUDNN_FUSED = "cudnn_fused"
CUDNN_UNFUSED = "cudnn_conv_then_stats"
TENSOR_CORE = "resnet_fast:conv2d_tensor_core"
VARIANTS = (CUDNN_FUSED, CUDNN_UNFUSED, *(f"resnet_fast:{b}" for b in BACKEND_NAMES if b != "torch"), TENSOR_CORE)
RACE_DTYPES = ("fp16", "bf16")
GENSTATS_MIN_CUDNN = 8800  # cudnn backend version that added the statistics-generation node
FUSED_ENGINE_CAPABILITY = (8, 0)  # cuDNN documents its fused ConvBN engines for sm_80+


def cudnn_skip_reason(dtype: str) -> str | None:
    """Why the cuDNN fused graph cannot be timed here (None: try it; the graph's own
    support check may still refuse, e.g. for bf16)."""
    if importlib.util.find_spec("cudnn") is None:
        return ("nvidia-cudnn-frontend is not installed (pip install 'resnet_fast[bench]', or carry its wheel: "
                "scripts/gpu_check.sh)")
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    capability = torch.cuda.get_device_capability()
    if capability < FUSED_ENGINE_CAPABILITY:
        return "cuDNN's fused ConvBN engines need compute capability 8.0 or newer, this GPU has %d.%d" % capability
    cudnn = importlib.import_module("cudnn")
    if cudnn.backend_version() < GENSTATS_MIN_CUDNN:
        return f"cuDNN {cudnn.backend_version()} has no genstats node (needs {GENSTATS_MIN_CUDNN} or newer)"
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16 needs a GPU with native bf16"
    return None


class FusedConvGenstats:
    """cuDNN graph ``relu(x * scale + bias) -> conv -> (y, sum, sum of squares)``, planned once.

    ``x``, ``w``, ``y`` NHWC in ``dtype``; ``scale``/``bias`` (1, C, 1, 1) in ``dtype``;
    the sums (1, K, 1, 1) float32. :attr:`engine` names the plan that built. Raises
    ``RuntimeError`` with cuDNN's reasons when no plan supports the graph.
    """

    def __init__(self, shape: ConvShape, x: Tensor, w: Tensor, scale: Tensor, bias: Tensor, y: Tensor,
                 sums: Tensor, squares: Tensor) -> None:
        cudnn = importlib.import_module("cudnn")
        io_type = {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[x.dtype]
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=io_type,
                              compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        self.tensors = {}
        for name, t in (("x", x), ("w", w), ("scale", scale), ("bias", bias)):
            self.tensors[name] = graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=io_type)
        activated = graph.relu(name="relu", input=graph.bias(
            name="bias", input=graph.scale(name="scale", input=self.tensors["x"], scale=self.tensors["scale"]),
            bias=self.tensors["bias"]))
        out = graph.conv_fprop(image=activated, weight=self.tensors["w"], padding=[shape.padding] * 2,
                               stride=[shape.stride] * 2, dilation=[1, 1])
        out.set_output(True).set_data_type(io_type)
        total, total_sq = graph.genstats(name="genstats", input=out)
        total.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        total_sq.set_output(True).set_data_type(cudnn.data_type.FLOAT)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        declined = []
        for index in range(graph.get_execution_plan_count()):
            try:
                graph.build_plan_at_index(index)
            except Exception as error:  # a declined plan: cuDNN raises its own not-supported errors
                declined.append(f"{graph.get_plan_name_at_index(index)}: {error}")
                continue
            self.index, self.engine = index, graph.get_plan_name_at_index(index)
            break
        else:
            raise RuntimeError("no cuDNN plan builds: " + ("; ".join(declined) or "no plans"))
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size_plan_at_index(self.index), device=x.device,
                                     dtype=torch.uint8)
        self.outputs = {out: y, total: sums, total_sq: squares}

    def __call__(self, x: Tensor, w: Tensor, scale: Tensor, bias: Tensor) -> None:
        pack = {self.tensors["x"]: x, self.tensors["w"]: w, self.tensors["scale"]: scale,
                self.tensors["bias"]: bias, **self.outputs}
        self.graph.execute_plan_at_index(pack, self.workspace, index=self.index, handle=self.handle)


def make_inputs(shape: ConvShape, dtype: torch.dtype) -> list[dict[str, Tensor]]:
    """``INPUT_SETS`` sets of x, w, scale, bias (NHWC, on the GPU)."""
    sets = []
    for _ in range(INPUT_SETS):
        x = torch.randn(shape.input_shape, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(shape.weight_shape, device="cuda") / (shape.in_channels * shape.kernel**2) ** 0.5).to(dtype)
        scale = (torch.rand(1, shape.in_channels, 1, 1, device="cuda") + 0.5).to(dtype)
        bias = (torch.randn(1, shape.in_channels, 1, 1, device="cuda") * 0.1).to(dtype)
        sets.append({"x": x, "w": w.contiguous(memory_format=torch.channels_last), "scale": scale, "bias": bias})
    return sets


def race_step(variant: str, shape: ConvShape, inputs: dict[str, Tensor]) -> tuple[Callable[[dict], None], dict]:
    """The timed call for ``variant`` and what to log about it (the engine)."""
    x = inputs["x"]
    out_size = (shape.size + 2 * shape.padding - shape.kernel) // shape.stride + 1
    if variant == CUDNN_FUSED:
        y = torch.empty(shape.batch, shape.out_channels, out_size, out_size, device="cuda", dtype=x.dtype)
        y = y.contiguous(memory_format=torch.channels_last)
        stats = [torch.empty(1, shape.out_channels, 1, 1, device="cuda") for _ in range(2)]
        fused = FusedConvGenstats(shape, x, inputs["w"], inputs["scale"], inputs["bias"], y, *stats)
        return (lambda i: fused(i["x"], i["w"], i["scale"], i["bias"])), {"engine": fused.engine}
    if variant == CUDNN_UNFUSED:
        def unfused(i: dict) -> None:
            y = F.conv2d(torch.relu(i["x"] * i["scale"] + i["bias"]), i["w"], None, shape.stride, shape.padding)
            torch.batch_norm_stats(y, 1e-5)
        return unfused, {"engine": "F.conv2d (cuDNN) + torch.batch_norm_stats"}

    if variant == TENSOR_CORE:
        if x.dtype != torch.float16:
            pytest.skip("conv2d_tensor_core is float16 only (the sm_7x tensor cores have no bfloat16)")

        def tensor_core(i: dict) -> None:
            torch.ops.resnet_fast.conv2d_tensor_core(
                i["x"], i["w"], None, None, i["scale"].view(-1), i["bias"].view(-1), [shape.stride] * 2,
                [shape.padding] * 2, [1, 1], True, False, True)
        return tensor_core, {"engine": "resnet_fast::conv2d_tensor_core (WMMA)"}

    def ours(i: dict) -> None:
        resnet_fast.ops.conv2d_stats(i["x"], i["w"], stride=shape.stride, padding=shape.padding,
                                     prologue_scale=i["scale"].view(-1), prologue_shift=i["bias"].view(-1),
                                     prologue_relu=True)
    return ours, {"engine": "resnet_fast.ops.conv2d_stats"}


SHAPES = resnet50_conv_shapes(BATCH)
GPU = (pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [pytest.param(s, id=s.id) for s in SHAPES])
@pytest.mark.parametrize("dtype", [pytest.param(d, marks=GPU) for d in RACE_DTYPES])
def test_conv_genstats(benchmark: Any, dtype: str, shape: ConvShape, variant: str, race_medians: dict) -> None:
    """One (dtype, convolution, variant) of the race; see the module docstring."""
    if variant == CUDNN_FUSED and (reason := cudnn_skip_reason(dtype)):
        pytest.skip(reason)
    backend = variant.split(":")[1] if variant.startswith("resnet_fast:") and variant != TENSOR_CORE else None
    torch.manual_seed(0)
    inputs = make_inputs(shape, DTYPES[dtype])
    previous = resnet_fast.get_backend()
    try:
        resnet_fast.set_backend(backend or previous)
        with torch.no_grad():
            step, logged = race_step(variant, shape, inputs[0])
            m = measure(benchmark, step, inputs, "cuda", TIMING)
    except (RuntimeError, resnet_fast.BackendUnavailableError) as error:
        pytest.skip(f"{variant} ({dtype}): {type(error).__name__}: {error}"[:500])
    finally:
        resnet_fast.set_backend(previous)
    key = f"conv_genstats[{dtype}-{shape.id}]"
    race_medians.setdefault(key, {})[variant] = m.median_ms
    fused = race_medians[key].get(CUDNN_FUSED)
    benchmark.group = key
    benchmark.extra_info.update({
        "level": "op", "bench": "conv_genstats", "case": key, "variant": variant,
        "device": torch.cuda.get_device_name(), "dtype": dtype, "layout": "nhwc",
        "shape": shape_id(shape.input_shape), "conv": ",".join(shape.names), "pass": "fwd",
        "median_ms": m.median_ms, "times_ms": list(m.times_ms), "timer": m.timer, "rounds": len(m.times_ms),
        "input_sets": INPUT_SETS, "peak_memory_bytes": m.peak_memory_bytes, "resident_bytes": m.resident_bytes,
        **logged, **({"speedup_vs_cudnn_fused": fused / m.median_ms} if fused else {}),
    })


@pytest.fixture(scope="module")
def race_medians() -> dict[str, dict[str, float]]:
    """Medians per case and variant, so each row can say how it compares with cuDNN's fused engine."""
    return {}
