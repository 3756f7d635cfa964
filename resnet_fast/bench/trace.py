"""Where a step's time goes: torch.profiler traces and a kernel-time breakdown by category.

:func:`profile_steps` runs a few already warmed-up steps under ``torch.profiler``,
optionally exports a Chrome / Perfetto trace, and sums the time by category
(:data:`CATEGORIES`):

* on a GPU, the device time of every kernel (``self_device_time_total`` of the profiler's
  device events: kernels, memcpy, memset) — host-side operator events and the GPU spans
  of annotations (``record_function`` ranges such as ``Optimizer.step``) are left out, so
  nothing is counted twice;
* on the CPU, the self CPU time of every ``aten::`` and ``resnet_fast::`` operator — an
  operator's time excluding the operators it calls, so nested operators (``aten::conv2d``
  → ``aten::convolution`` → ``aten::mkldnn_convolution``) count once. Python, autograd-engine
  and profiler-annotation time is not operator time and is left out.

:func:`categorize` sorts a kernel or operator name into a category; it is a pure function
of the name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch
from rich.table import Table
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

CATEGORIES = ("convolution", "normalisation", "elementwise", "pooling", "optimizer", "matmul", "other")
PROFILED_STEPS = 3  # at most this many steps are profiled per variant and mode
STEP_MARKER = "bench_step#"  # the trace's range around each profiled step, numbered from 0
CPU_OPERATOR_PREFIXES = ("aten::", "resnet_fast::")


def _words(*words: str) -> str:
    """A regex for any of ``words`` not inside a longer run of letters.

    ``add`` matches ``aten::add_`` and ``CUDAFunctor_add<float>`` but not ``addmm``;
    digits, underscores and punctuation count as boundaries.
    """
    return r"(?<![a-z])(?:" + "|".join(re.escape(word) for word in words) + r")(?![a-z])"


# First match wins, on the lower-cased name. The order settles the overlaps: cuDNN
# convolution kernels mention "relu" and "implicit_gemm", so convolution comes before
# elementwise and matmul; optimizer comes first because foreach kernels are elementwise.
CATEGORY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (category, re.compile(pattern)) for category, pattern in (
        ("optimizer", _words("sgd", "foreach", "_fused", "multi_tensor_apply", "optimizer")),
        ("convolution", _words("conv", "convolution", "implicit_gemm", "fprop", "dgrad", "wgrad",
                               "scudnn", "winograd")),
        ("normalisation", _words("batch_norm", "batchnorm", "bn", "running_stats")),
        ("pooling", r"pool"),
        ("matmul", r"gemm|gemv|nvjet|cublas|" + _words("mm", "addmm", "bmm", "matmul", "linear")),
        ("elementwise", _words("elementwise", "triton_poi", "add", "sub", "mul", "div", "neg", "relu",
                               "threshold_backward", "clamp", "clamp_min", "le", "where", "sqrt", "rsqrt",
                               "copy", "fill", "zero")),
    ))


def categorize(name: str) -> str:
    """The category (one of :data:`CATEGORIES`) of a kernel or operator name."""
    lowered = name.lower()
    return next((category for category, pattern in CATEGORY_RULES if pattern.search(lowered)), "other")


@dataclass(frozen=True)
class TimedName:
    """One kernel or operator name and its summed time (microseconds) over the profiled steps."""

    name: str
    time_us: float


@dataclass
class Breakdown:
    """Kernel time of one step by category."""

    source: str  # what was summed (device kernels or CPU operators)
    steps: int  # how many steps were profiled; times are per step
    total_ms: float  # all counted time per step
    ms_per_step: dict[str, float]  # category -> ms per step, every category of CATEGORIES
    trace_path: str | None = None

    def percent(self, category: str) -> float:
        """The share of ``category`` in the total, in percent (0 for an empty total)."""
        return 100.0 * self.ms_per_step[category] / self.total_ms if self.total_ms > 0 else 0.0


def counted_times(events: Iterable, on_gpu: bool) -> list[TimedName]:
    """The profiler's averaged events that a breakdown counts, with the time it counts.

    ``events`` are ``prof.key_averages()`` entries: on a GPU the device events that are not
    annotation spans, with their ``self_device_time_total``; on the CPU the operators with
    their ``self_cpu_time_total``.
    """
    if on_gpu:
        return [TimedName(e.key, e.self_device_time_total) for e in events
                if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    return [TimedName(e.key, e.self_cpu_time_total) for e in events
            if e.device_type == DeviceType.CPU and e.key.startswith(CPU_OPERATOR_PREFIXES)]


def summarize(times: list[TimedName], steps: int, source: str) -> Breakdown:
    """Sum ``times`` by category into milliseconds per step."""
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    for timed in times:
        per_category[categorize(timed.name)] += timed.time_us / 1e3 / steps
    total_ms = sum(timed.time_us for timed in times) / 1e3 / steps
    return Breakdown(source=source, steps=steps, total_ms=total_ms, ms_per_step=per_category)


def trace_file(directory: str, variant: str, mode: str) -> Path:
    """Where the trace of ``variant`` in ``mode`` goes (``resnet_fast:torch`` → ``resnet_fast-torch``)."""
    return Path(directory) / f"{variant.replace(':', '-')}_{mode}.json"


def profiler_activities(device: torch.device) -> list[ProfilerActivity]:
    """CPU always (operators, launches), CUDA kernels on a GPU."""
    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]


def prepare_for_graphs(device: torch.device) -> None:
    """Start and stop the profiler once before any CUDA graph is captured.

    The profiler misses the kernels of graphs captured before its first use; this is the
    workaround of ``torch.profiler._utils._init_for_cuda_graphs`` (pytorch/pytorch#100441).
    """
    with profile(activities=profiler_activities(device)):
        pass


def profile_steps(step: Callable[[int], None], device: torch.device, trace_path: Path | None,
                  steps: int) -> Breakdown:
    """Profile ``steps`` calls of ``step``; write a Chrome trace to ``trace_path`` if given.

    Each step is a ``bench_step#<i>`` range in the trace. The profiler synchronizes the
    device when it stops, so every kernel is recorded.
    """
    with profile(activities=profiler_activities(device)) as prof:
        for i in range(steps):
            with record_function(f"{STEP_MARKER}{i}"):
                step(i)
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))
    on_gpu = device.type == "cuda"
    source = ("device kernels: self_device_time_total" if on_gpu
              else "CPU operators: self time of aten::, resnet_fast:: ops")
    breakdown = summarize(counted_times(prof.key_averages(), on_gpu), steps, source)
    return breakdown if trace_path is None else replace(breakdown, trace_path=str(trace_path))


class ProfiledRun(Protocol):
    """What :func:`breakdown_tables` reads of a measurement (the profiler's ``Measurement``
    has these fields; this module does not import the profiler, which imports it)."""

    variant: str
    mode: str
    median_ms: float
    breakdown: Breakdown | None


def breakdown_tables(measurements: Sequence[ProfiledRun]) -> list[Table]:
    """One table per mode: a row per category, a column per variant with ms per step and share,
    then the breakdown's total and the timed steps' median for comparison."""
    profiled = [m for m in measurements if m.breakdown is not None]
    source = profiled[0].breakdown.source
    tables = []
    for mode in dict.fromkeys(m.mode for m in profiled):
        in_mode = [m for m in profiled if m.mode == mode]
        table = Table(title=f"{mode}: time per step by category", title_justify="left", caption=source,
                      caption_justify="left")
        table.add_column("category", no_wrap=True)
        for m in in_mode:
            table.add_column(f"{m.variant} (ms, %)", justify="right", no_wrap=True)
        for category in CATEGORIES:
            table.add_row(category, *(f"{m.breakdown.ms_per_step[category]:.2f} {m.breakdown.percent(category):3.0f}%"
                                      for m in in_mode))
        table.add_section()
        table.add_row("total", *(f"{m.breakdown.total_ms:.2f}     " for m in in_mode))
        table.add_row("step median", *(f"{m.median_ms:.2f}     " for m in in_mode))
        tables.append(table)
    return tables
