"""The Markdown report (BENCHMARKS.md), with plots, from GPU-check results and the benchmark suite.

    python -m resnet_fast.bench.report benchmarks/results/*.json -o BENCHMARKS.md --plots benchmarks/results/
    python -m resnet_fast.bench.report RESULTS.json [MORE.json ...] -o BENCHMARKS.md --plots DIR

Each argument is a file, a folder (its ``*.json`` and ``*.jsonl`` files) or a pattern that
the shell left unexpanded because nothing matched. GPU-check results documents
(:mod:`resnet_fast.bench.results`, the ``.json`` document or the ``results.jsonl`` it was
assembled from) get a section each (:mod:`resnet_fast.bench.check_report`). When no file
is given or matched at all, the report says that no GPU measurement exists yet.

For the benchmark suite it reads the ``--benchmark-json`` files of ``python -m pytest benchmarks`` (pytest-benchmark)
and writes the environment of each run (device, driver, torch / CUDA / cuDNN / Triton
versions, date, the exact command), one table per bench function under a section per
level (operators, blocks, models) — median ms, GB/s and the floor (operators) or
images/s (blocks, models), peak memory, speedup against eager and against
``torch.compile`` — and one PNG per bench function and target (matplotlib, Agg canvas).

The speedups are recomputed here from the medians of each case (``baseline ms / ms``), so
the order in which the suite ran does not matter; where several files hold the same case
and variant, the later file's result is used.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resnet_fast.bench import check_report
from resnet_fast.bench.profiler import speedup
from resnet_fast.bench.results import load_document

LEVELS = {"op": "Operators", "block": "Blocks", "model": "Models"}
VARIANT_ORDER = ("eager", "compile", "resnet_fast:cuda", "resnet_fast:triton", "resnet_fast:torch")
BASELINES = ("eager", "compile")


@dataclass
class Result:
    """One measured benchmark (the suite's ``extra_info``)."""

    level: str
    bench: str
    case: str  # "bn_relu[bf16-nhwc-256x64x112x112-fwd]": the same for every variant compared
    variant: str
    device: str
    dtype: str
    layout: str
    median_ms: float
    peak_memory_bytes: int | None = None
    images_per_s: float | None = None
    gb_per_s: float | None = None
    floor_ms: float | None = None
    floor_multiple: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)  # baseline variant -> speedup

    @classmethod
    def from_extra_info(cls, info: dict[str, Any]) -> Result:
        """The fields of ``info`` this report uses (the others are ignored)."""
        names = [name for name in cls.__dataclass_fields__ if name != "speedups"]
        return cls(**{name: info[name] for name in names if name in info})

    @property
    def label(self) -> str:
        """The case without the bench name: ``bf16-nhwc-256x64x112x112-fwd``."""
        return self.case.partition("[")[2].rstrip("]")

    @property
    def target(self) -> str:
        return f"{self.dtype}-{self.layout}"

    @property
    def short_label(self) -> str:
        """The label without the target: ``256x64x112x112-fwd``."""
        return self.label.removeprefix(f"{self.target}-")

    @property
    def floor_fraction(self) -> float | None:
        """floor ms / median ms: 1 at the floor (operators only)."""
        return self.floor_ms / self.median_ms if self.floor_ms else None


@dataclass
class Run:
    """One results file: when, where and how it was measured."""

    path: str
    date: str | None
    environment: dict[str, Any]  # the suite's machine_info["resnet_fast"]
    commit: dict[str, Any]


def load(paths: Sequence[str]) -> tuple[list[Result], list[Run]]:
    """The suite's results and runs in ``paths`` (entries of other suites are skipped)."""
    results: dict[tuple[str, str], Result] = {}
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append(Run(path=path, date=data.get("datetime"),
                        environment=data.get("machine_info", {}).get("resnet_fast", {}),
                        commit=data.get("commit_info", {})))
        for entry in data.get("benchmarks", []):
            info = entry.get("extra_info", {})
            if "level" in info and "median_ms" in info:
                result = Result.from_extra_info(info)
                results.pop((result.case, result.variant), None)  # the later file's, in its order
                results[result.case, result.variant] = result
    return list(results.values()), runs


def assign_speedups(results: list[Result]) -> None:
    """Each result's speedup against the eager and compile results of its case."""
    medians: dict[str, dict[str, float]] = {}
    for result in results:
        medians.setdefault(result.case, {})[result.variant] = result.median_ms
    for result in results:
        baselines = medians[result.case]
        result.speedups = {base: speedup(baselines[base], result.median_ms) for base in BASELINES if base in baselines}


def variant_rank(variant: str) -> tuple[int, str]:
    """Sort key: eager, compile, then the resnet_fast backends (unknown names last)."""
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def ordered(results: Iterable[Result]) -> list[Result]:
    """Sorted by bench, target and case (each in the order first seen, i.e. the suite's), then variant."""
    results = list(results)
    first_seen: dict[str, int] = {}
    for index, result in enumerate(results):
        for key in (result.bench, result.target, result.case):
            first_seen.setdefault(key, index)
    return sorted(results, key=lambda r: (first_seen[r.bench], first_seen[r.target], first_seen[r.case],
                                          variant_rank(r.variant)))


# ---------------------------------------------------------------------------------------
# Formatting


def number(value: float | None) -> str:
    """Readable at any magnitude: ``12,345``, ``123.4``, ``1.23``, ``0.0123``; n/a for None."""
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3g}"


def memory(nbytes: int | None) -> str:
    """Bytes in MiB or GiB; n/a where not measured (the CPU)."""
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def milliseconds(value: float | None) -> str:
    """``12.345``, ``0.412``, ``0.00213``; n/a for None."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value >= 0.1 else f"{value:.3g}"


def times(value: float | None) -> str:
    """A ratio as ``1.52x``; a dash where there is none."""
    return "-" if value is None else f"{value:.2f}x"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table, numbers right-aligned (every column after the first two)."""
    align = ["---" if index < 2 else "---:" for index in range(len(headers))]
    return ["| " + " | ".join(row) + " |" for row in (headers, align, *rows)]


def result_row(result: Result) -> list[str]:
    """One table row; the columns follow :func:`result_headers`."""
    row = [result.label, result.variant, milliseconds(result.median_ms)]
    if result.level == "op":
        row += [number(result.gb_per_s), milliseconds(result.floor_ms), times(result.floor_multiple)]
    else:
        row.append(number(result.images_per_s))
    return [*row, memory(result.peak_memory_bytes), *(times(result.speedups.get(base)) for base in BASELINES)]


def result_headers(level: str) -> list[str]:
    throughput = ["GB/s", "floor ms", "x floor"] if level == "op" else ["images/s"]
    return ["case", "variant", "median ms", *throughput, "peak memory", "vs eager", "vs compile"]


# ---------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class Metric:
    """What a plot shows: a label and how to read it from a result."""

    label: str
    value: Callable[[Result], float | None]


METRICS = {
    "op": Metric("fraction of the floor (floor ms / median ms; 1 = at the floor)", lambda r: r.floor_fraction),
    "block": Metric("images/s", lambda r: r.images_per_s),
    "model": Metric("images/s", lambda r: r.images_per_s),
}


def plot(results: list[Result], title: str, path: Path) -> None:
    """Horizontal bars of the level's metric, one group per case and one bar per variant."""
    labels = list(dict.fromkeys(r.short_label for r in results))
    variants = sorted({r.variant for r in results}, key=variant_rank)
    metric = METRICS[results[0].level]
    values = {(r.short_label, r.variant): metric.value(r) for r in results}
    bar = 0.8 / len(variants)
    figure = Figure(figsize=(9, 1.5 + 0.3 * len(labels) * len(variants)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, variant in enumerate(variants):
        ys = [row + index * bar for row in range(len(labels))]
        axes.barh(ys, [values.get((label, variant)) or 0.0 for label in labels], height=bar, label=variant)
    axes.set_yticks([row + 0.4 - bar / 2 for row in range(len(labels))], labels)
    axes.invert_yaxis()
    axes.set_xlabel(metric.label)
    axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def write_plots(results: list[Result], directory: Path) -> dict[tuple[str, str], list[Path]]:
    """One PNG per bench function and target; returns them by (level, bench)."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for result in results:
        groups.setdefault((result.level, result.bench, result.target), []).append(result)
    paths: dict[tuple[str, str], list[Path]] = {}
    for (level, bench, target), group in groups.items():
        path = directory / f"{level}-{bench}-{target}.png"
        plot(group, f"{bench}, {target}, {group[0].device}", path)
        paths.setdefault((level, bench), []).append(path)
    return paths


# ---------------------------------------------------------------------------------------
# Markdown


def _get(run: Run, name: str) -> str:
    value = run.environment.get(name)
    return "n/a" if value is None else str(value)


def _device(env: dict[str, Any]) -> str:
    if env.get("gpu"):
        return f"{env['gpu']} (sm {env.get('capability')})"
    return f"CPU: {env.get('cpu', 'n/a')}"


def _ceilings(env: dict[str, Any]) -> str:
    parts = []
    for device, values in env.get("ceilings", {}).items():
        for name, value in values.items():
            unit = "GB/s copy" if name == "copy_gb_per_s" else f"TFLOP/s {name.removeprefix('matmul_tflops_')} matmul"
            parts.append(f"{device}: {number(value)} {unit}")
    return "; ".join(parts) or "n/a"


def _backends(env: dict[str, Any]) -> str:
    parts = []
    for name, info in env.get("backends", {}).items():
        state = "available" if info.get("available") else "unavailable (" + "; ".join(info.get("reasons", [])) + ")"
        parts.append(f"{name}: {state}")
    return "; ".join(parts) or "n/a"


def _settings(env: dict[str, Any]) -> str:
    s = env.get("settings", {})
    if not s:
        return "n/a"
    return (f"GPU batch {s.get('batch')}, {s.get('cuda_warmup')} warm-up + {s.get('cuda_rounds')} timed calls; "
            f"CPU {s.get('cpu_warmup')} + {s.get('cpu_rounds')}; {s.get('input_sets')} input sets rotated")


ENVIRONMENT_ROWS: list[tuple[str, Callable[[Run], str]]] = [
    ("date", lambda run: run.date or "n/a"),
    ("device", lambda run: _device(run.environment)),
    ("driver", lambda run: _get(run, "driver")),
    ("torch", lambda run: _get(run, "torch")),
    ("CUDA / cuDNN", lambda run: f"{_get(run, 'cuda')} / {_get(run, 'cudnn')}"),
    ("triton", lambda run: _get(run, "triton")),
    ("torchvision / python", lambda run: f"{_get(run, 'torchvision')} / {_get(run, 'python')}"),
    ("commit", lambda run: f"{run.commit.get('id', 'n/a')}{' (dirty)' if run.commit.get('dirty') else ''}"),
    ("command", lambda run: f"`{_get(run, 'command')}`"),
    ("environment", lambda run: " ".join(f"{k}={v}" for k, v in run.environment.get("bench_env", {}).items()) or "-"),
    ("settings", lambda run: _settings(run.environment)),
    ("ceilings", lambda run: _ceilings(run.environment)),
    ("resnet_fast backends", lambda run: _backends(run.environment)),
]


def environment_section(runs: list[Run]) -> list[str]:
    """One column per results file; then what was not measured, and why."""
    lines = ["## Environment", ""]
    lines += table(["", *(f"`{Path(run.path).name}`" for run in runs)],
                   ([name, *(cell(run).replace("|", "\\|") for run in runs)] for name, cell in ENVIRONMENT_ROWS))
    skipped: dict[str, int] = {}
    for run in runs:
        for reason, count in run.environment.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + count
    if skipped:
        lines += ["", "Not measured (benchmarks skipped, by reason):", ""]
        lines += [f"- {count} x {reason}" for reason, count in sorted(skipped.items(), key=lambda item: -item[1])]
    return lines


def level_section(level: str, results: list[Result], plots: dict[tuple[str, str], list[Path]],
                  markdown_dir: Path) -> list[str]:
    """The section of one level: per bench function its plots and its table."""
    lines = ["", f"## {LEVELS[level]}"]
    for bench in dict.fromkeys(r.bench for r in results):
        lines += ["", f"### {bench}", ""]
        for path in plots.get((level, bench), []):
            lines += [f"![{path.stem}]({Path(os.path.relpath(path, markdown_dir)).as_posix()})", ""]
        lines += table(result_headers(level), (result_row(r) for r in results if r.bench == bench))
    return lines


INTRODUCTION = """\
Each time is the median of timed calls after untimed warm-up calls: CUDA events around
each call on a GPU (`time.perf_counter` on the CPU), input sets rotated, inputs random.
`vs eager` / `vs compile` = that baseline's median / this median (above 1: faster), from
the same run. Operators: GB/s counts the bytes a fully fused implementation must move
(`resnet_fast.bench.timing`); the floor is those bytes at the measured copy bandwidth (for
convolutions, or their FLOPs at the measured matmul rate, whichever is longer) and
`x floor` how far above it the time is. Peak memory is `torch.cuda.max_memory_allocated`
over the timed calls, inputs and weights included. CPU numbers come from the smoke run and
say nothing about GPU speed."""


def suite_lines(results: list[Result], runs: list[Run], plots: dict[tuple[str, str], list[Path]],
                markdown_dir: Path) -> list[str]:
    """The benchmark suite's part: method, environment, a section per level."""
    lines = [INTRODUCTION, ""]
    lines += environment_section(runs)
    for level in LEVELS:
        in_level = [r for r in results if r.level == level]
        if in_level:
            lines += level_section(level, in_level, plots, markdown_dir)
    return lines


def render(results: list[Result], runs: list[Run], plots: dict[tuple[str, str], list[Path]],
           markdown_dir: Path, command: str) -> str:
    """The whole Markdown document of the benchmark suite's results."""
    lines = ["# resnet_fast benchmarks", "", f"Generated by `{command}`.", ""]
    return "\n".join(lines + suite_lines(results, runs, plots, markdown_dir)) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_fast.bench.report",
        description="Markdown report (and PNG plots) of GPU-check results documents and of the benchmark suite's "
                    "pytest-benchmark JSON files.")
    parser.add_argument("results", nargs="*", metavar="RESULTS",
                        help="results documents (.json, .jsonl), --benchmark-json files of the suite, or folders")
    parser.add_argument("-o", "--output", default="BENCHMARKS.md",
                        help="Markdown file to write (default BENCHMARKS.md)")
    parser.add_argument("--plots", metavar="DIR", help="directory for the PNG plots (default: none drawn)")
    return parser


def expand(arguments: Sequence[str]) -> list[Path]:
    """Files named by ``arguments``: files as given, a folder's ``*.json`` / ``*.jsonl``, and the
    matches of a pattern the shell did not expand (none when nothing matches)."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            paths += sorted([*path.glob("*.json"), *path.glob("*.jsonl")])
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(argument):
            paths += [Path(match) for match in sorted(glob.glob(argument))]
        else:
            raise FileNotFoundError(f"no such results file: {argument}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; returns the exit status (1 when the suite's files hold no results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        paths = expand(args.results)
    except FileNotFoundError as error:
        parser.error(str(error))
    documents = {}
    suite_files = []
    for path in paths:
        document = load_document(path)
        if document is None:
            suite_files.append(str(path))
        else:
            documents[path.name] = document
    results, runs = load(suite_files)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not paths:
        output.write_text(check_report.NO_MEASUREMENTS)
        print(f"wrote {output} (no results: no GPU measurement recorded yet)")
        return 0
    if not results and not documents:
        print(f"no resnet_fast benchmark results in {', '.join(map(str, paths))}", file=sys.stderr)
        return 1
    assign_speedups(results)
    results = ordered(results)
    plots = write_plots(results, Path(args.plots)) if args.plots and results else {}
    document_plots = {name: check_report.write_document_plots(document, name, Path(args.plots)) if args.plots else {}
                      for name, document in documents.items()}
    command = shlex.join(["python", "-m", "resnet_fast.bench.report", *argv])
    if not documents:
        output.write_text(render(results, runs, plots, output.parent, command))
        print(f"wrote {output} ({len(results)} results" + (f", {sum(map(len, plots.values()))} plots)" if plots else ")"))
        return 0
    lines = ["# resnet_fast benchmarks", "", f"Generated by `{command}`."]
    if any(not d["run"].get("dry_run") for d in documents.values()):
        lines += ["", "Measured by the GPU check (`python -m resnet_fast.bench.gpu_check`); every table names the "
                      "device, versions and command that produced it."]
    elif documents:
        lines += ["", f"**No GPU measurement is recorded here: every document below is a {check_report.DRY_RUN_LABEL}.**"]
    for name, document in documents.items():
        lines += check_report.document_section(document, name, document_plots[name], output.parent)
    if results:
        lines += ["", "## Benchmark suite", "", *suite_lines(results, runs, plots, output.parent)]
    output.write_text("\n".join(lines) + "\n")
    plotted = sum(map(len, plots.values())) + sum(map(len, document_plots.values()))
    print(f"wrote {output} ({len(documents)} check documents, {len(results)} suite results, {plotted} plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
