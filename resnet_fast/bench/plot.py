"""The profiler's figure (``--plot PATH.png``): throughput and peak memory per variant.

Two panels of bars grouped by mode (train, infer), one colour per variant (labelled with
the backend that ran, :func:`~resnet_fast.bench.profiler.variant_label`): images/s on the
left, peak GPU memory on the right (a note where it was not measured, as on the CPU). A
CPU run's figure says it is a harness check, not a performance result.
Drawn with matplotlib's object-oriented API on the Agg canvas, so no display and no
global pyplot state are involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from resnet_fast.bench.profiler import BenchReport, Measurement, harness_check_note

BAR_GROUP_WIDTH = 0.8  # of the unit distance between two modes


def figure_title(report: BenchReport) -> str:
    """Model, batch, dtype and device, e.g. ``resnet50 | batch 256 | bf16 | NVIDIA H100``."""
    config, env = report.config, report.environment
    title = f"{config.model} | batch {config.batch} | {config.dtype} | {config.device} ({env['device_name']})"
    return title + (" | CUDA graphs" if config.cuda_graphs else "")


def bar_number(value: float) -> str:
    """A bar's label: thousands separated from 100 up, three significant digits below."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def draw_grouped_bars(axes: Axes, measurements: list[Measurement], value: Callable[[Measurement], float],
                      label: str, colors: dict[str, str]) -> None:
    """Bars of ``value`` per variant (in its colour), grouped by mode; each bar labelled with its value."""
    modes = list(dict.fromkeys(m.mode for m in measurements))
    variants = list(dict.fromkeys(m.shown for m in measurements))
    width = BAR_GROUP_WIDTH / len(variants)
    for index, variant in enumerate(variants):
        offset = (index - (len(variants) - 1) / 2) * width
        mine = [m for m in measurements if m.shown == variant]
        bars = axes.bar([modes.index(m.mode) + offset for m in mine], [value(m) for m in mine],
                        width=width, label=variant, color=colors[variant])
        axes.bar_label(bars, fmt=bar_number, fontsize=8, padding=2)
    axes.set_xticks(range(len(modes)), modes)
    axes.set_ylabel(label)
    axes.margins(y=0.15)
    axes.legend(fontsize=8)


def draw_note(axes: Axes, text: str) -> None:
    """A panel that only says ``text`` (what could not be drawn, and why)."""
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, fontsize=11)
    axes.set_xticks([])
    axes.set_yticks([])


def build_figure(report: BenchReport) -> Figure:
    """The two-panel figure of ``report``."""
    figure = Figure(figsize=(12, 5), layout="constrained")
    throughput_axes, memory_axes = figure.subplots(1, 2)
    throughput_axes.set_title("throughput")
    memory_axes.set_title("peak memory")
    measured = report.measurements
    with_memory = [m for m in measured if m.peak_memory_gib is not None]
    colors = {variant: f"C{i}" for i, variant in enumerate(dict.fromkeys(m.shown for m in measured))}
    if measured:
        draw_grouped_bars(throughput_axes, measured, lambda m: m.images_per_s, "images/s", colors)
    else:
        draw_note(throughput_axes, "no variant could be measured")
    if with_memory:
        draw_grouped_bars(memory_axes, with_memory, lambda m: m.peak_memory_gib, "GiB", colors)
    else:
        draw_note(memory_axes, "peak memory: n/a\n(measured on a CUDA device only)")
    figure.suptitle(figure_title(report))
    footer = [note] if (note := harness_check_note(report)) else []
    if report.skipped:
        skipped = "; ".join(f"{s.variant} ({', '.join(s.modes)})" for s in report.skipped)
        footer.append(f"skipped: {skipped}")
    if footer:
        figure.supxlabel("\n".join(footer), fontsize=8)
    return figure


def write_plot(report: BenchReport, path: str) -> Path:
    """Draw ``report`` and save it as a PNG at ``path``; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    build_figure(report).savefig(target, format="png", dpi=110)
    return target
