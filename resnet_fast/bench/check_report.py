"""BENCHMARKS.md sections and plots from GPU-check results documents (:mod:`resnet_fast.bench.results`).

:mod:`resnet_fast.bench.report` calls :func:`document_section` once per document. Each
section names the device, the versions and the command before every table; a dry run's
section says in its heading and above every table that it is a CPU rehearsal and no
performance number. Plots (matplotlib, Agg canvas), one set per document: throughput per
variant, peak memory per variant, primitives against the bandwidth floor, and the
convergence curves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resnet_fast.bench.results import DRY_RUN_LABEL, skips_by_reason, slug

NO_MEASUREMENTS = """\
# Benchmarks

**No GPU measurement has been recorded yet.** `benchmarks/results/` holds no GPU-check
results document, so every number that would belong here is still to be measured.
Nothing below is a result of ours; the targets are the issues' and the reference figures
are `DESIGN.md`'s.

## How the numbers are produced

On a lent GPU, one call runs the whole check under its own deadline (see README, "On a
lent GPU"):

```bash
bash scripts/gpu_check.sh          # OUT=gpu-out, --deadline 480; device call timeout_s about 560
```

It builds the extension for that GPU, runs the kernel check, model parity (one training
step against float64 and eager, and ResNet-20 trained on scikit-learn's digits), the
headline throughput (ResNet-50 bf16: eager, the native default, triton, cuda, fused
training; then fp16; then ResNet-50 at batch 32 and ResNet-20 at batch 128 with and without
CUDA graphs; then torch.compile), BN+ReLU and BN+add+ReLU against the bandwidth floor, and
the remaining GPU tests, writing `results.jsonl`, `summary.md`, `check.log` and one results
document `<gpu>-<yyyymmdd>.json` into `$OUT` as it goes. The document is committed under
`benchmarks/results/`, and this file is regenerated from every document there:

```bash
python -m resnet_fast.bench.report benchmarks/results/*.json -o BENCHMARKS.md --plots benchmarks/results/
```

Method: warm-up (compilation and autotuning included) before timing, each step timed with
CUDA events, median reported, peak memory from `torch.cuda.max_memory_allocated`; eager
PyTorch, `torch.compile` and every available resnet_fast backend run in the same check
from the same weights, so ratios compare like with like.

## Targets (from the issues, to be checked against measurements)

| what (H100, bf16, channels_last, batch 256) | eager | torch.compile | target |
| --- | --- | --- | --- |
| BN+ReLU / BN+add+ReLU forward, per layer | — | — | ≤ 1.15 × bandwidth floor, faster than compile |
| BN+ReLU / BN+add+ReLU forward+backward | — | — | ≤ 1.25 × floor, faster than compile |
| ResNet-50 training, img/s (elementwise fusion) | ≈ 3,950 | ≈ 5,450 | ≥ 6,400, memory ≤ eager |
| ResNet-50 training, img/s (convolution fusion) | ≈ 3,950 | ≈ 5,450 | ≥ 8,500, memory ≤ 0.7 × eager |
| ResNet-50 inference, img/s | ≈ 12,700 | ≈ 20,600 | ≥ 25,000 |

The eager and torch.compile figures are `DESIGN.md`'s (one H100, torch 2.11); ours will be
measured side by side with both in one run, and this table replaced by the generated one.

## Devices

No V100 is lent to this project: V100-class claims will come from an H100/H200 running
the fp16 path and from sm_70/sm_75 builds, and each number here will say which device
produced it.
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 2) -> list[str]:
    """A Markdown table: the first ``text_columns`` left-aligned, the numbers after them right-aligned."""
    align = ["---" if index < text_columns else "---:" for index in range(len(headers))]
    return ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in (headers, align, *rows)]


def _value(value: Any) -> str:
    """A version or setting as text; n/a where it was not recorded."""
    return "n/a" if value is None else str(value)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def device_label(document: dict[str, Any]) -> str:
    env = document["environment"]
    if document["run"].get("dry_run") or not env.get("device_name"):
        return f"CPU: {env.get('cpu', 'n/a')}"
    return f"{env['device_name']} (sm {env.get('capability')})"


def provenance(document: dict[str, Any], name: str) -> str:
    """The line above every table: dry-run label, device, versions, command, document."""
    env, run = document["environment"], document["run"]
    label = f"**{DRY_RUN_LABEL}.** " if run.get("dry_run") else ""
    return (f"_{label}{device_label(document)}; torch {_value(env.get('torch'))}, CUDA {_value(env.get('cuda'))}, "
            f"cuDNN {_value(env.get('cudnn'))}, triton {_value(env.get('triton'))}; `{run.get('command', 'n/a')}` "
            f"→ `{name}`_")


def environment_table(document: dict[str, Any], name: str) -> list[str]:
    env, run = document["environment"], document["run"]
    rows = [
        ("date", str(run.get("started", "n/a"))),
        ("device", device_label(document)),
        ("nvidia-smi", str(env.get("nvidia_smi") or "n/a")),
        ("torch / CUDA / cuDNN", " / ".join(_value(env.get(k)) for k in ("torch", "cuda", "cudnn"))),
        ("triton / torchvision / python", " / ".join(_value(env.get(k)) for k in ("triton", "torchvision", "python"))),
        ("extension", str(env.get("extension", "n/a"))),
        ("command", f"`{run.get('command', 'n/a')}` (deadline {run.get('deadline_s', 'n/a')} s)"),
        ("results document", f"`{name}`"),
    ]
    return _table(["", ""], rows)


def stages_table(document: dict[str, Any]) -> list[str]:
    rows = [(s["stage"], s["status"], s.get("reason") or "", f"{s['seconds']:.0f}", f"{s['budget_s']:.0f}")
            for s in document["stages"] if "task" not in s]
    return _table(["stage", "status", "note", "seconds", "budget (s)"], rows, text_columns=3)


def throughput_tables(document: dict[str, Any]) -> list[str]:
    """Per group (model, batch, size, dtype, CUDA graphs): each variant and mode, speedup vs eager."""
    measured = [m for m in document["measurements"] if m.get("kind") == "throughput"]
    lines: list[str] = []
    for group in dict.fromkeys(m["group"] for m in measured):
        in_group = [m for m in measured if m["group"] == group]
        eager = {m["mode"]: m["median_ms"] for m in in_group if m["variant"] == "eager"}
        rows = [(m.get("label") or m["variant"], m["mode"], _num(m["images_per_s"], 4), f"{m['median_ms']:.2f}",
                 "n/a" if m["peak_memory_gib"] is None else f"{m['peak_memory_gib']:.2f} GiB",
                 f"{eager[m['mode']] / m['median_ms']:.2f}x" if m["mode"] in eager else "-")
                for m in in_group]
        lines += ["", f"#### {group}", "", *_table(["variant", "mode", "images/s", "ms/step (median)", "peak memory",
                                                    "vs eager"], rows)]
    return lines


def primitives_table(document: dict[str, Any]) -> list[str]:
    rows = [(f"{m['bench']} {m['case']}", m["variant"], f"{m['median_ms']:.3g}", _num(m.get("floor_ms")),
             "n/a" if m.get("floor_multiple") is None else f"{m['floor_multiple']:.2f}x", _num(m.get("gb_per_s")))
            for m in document["measurements"] if m.get("kind") == "primitive"]
    return _table(["case", "variant", "median ms", "floor ms", "x floor", "GB/s"], rows) if rows else []


def parity_table(document: dict[str, Any]) -> list[str]:
    rows = [(f"{c['model']} {c['dtype']}", c["variant"], c["quantity"], c["outcome"], f"{c['error']:.3g}",
             f"{c['eager_error']:.3g}", f"{c['tolerance']:.3g}")
            for c in document["checks"] if c.get("stage") == "model_parity" and "eager_error" in c]
    return _table(["model", "variant", "quantity", "result", "error", "eager error", "tolerance"], rows,
                  text_columns=4) if rows else []


def convergence_table(document: dict[str, Any]) -> list[str]:
    rows = [(f"{c['model']} {c['dtype']}", c["variant"], str(c["epochs"]), f"{c['final_heldout_accuracy']:.3f}",
             f"{c['train_loss'][-1]:.3f}") for c in document["curves"]]
    return _table(["model", "variant", "epochs", "held-out accuracy", "final training loss"], rows) if rows else []


def checks_summary(document: dict[str, Any]) -> list[str]:
    """Counts per stage and outcome, then every failure with its error and tolerance."""
    checks = document["checks"]
    if not checks:
        return []
    outcomes = ("passed", "failed", "error", "skipped")
    stages = list(dict.fromkeys(c.get("stage", "-") for c in checks))
    rows = [(stage, *(str(sum(c.get("stage", "-") == stage and c["outcome"] == o for c in checks)) for o in outcomes))
            for stage in stages]
    lines = _table(["stage", *outcomes], rows, text_columns=1)
    failures = [c for c in checks if c["outcome"] in ("failed", "error")]
    if failures:
        lines += ["", "Failures:", ""]
        for c in failures:
            bound = f" (error {c['error']:.3g}, tolerance {c['tolerance']:.3g})" if c.get("tolerance") is not None else ""
            lines.append(f"- `{c['name']}`{bound}: {c.get('message') or ''}")
    return lines


def skipped_list(document: dict[str, Any]) -> list[str]:
    return [f"- {', '.join(variants)}: {reason}" for reason, variants in skips_by_reason(document["skipped"]).items()]


# ---------------------------------------------------------------------------------------
# Plots


def _bars(path: Path, title: str, labels: list[str], values: list[float], xlabel: str,
          reference: float | None = None) -> Path:
    figure = Figure(figsize=(9, 1.5 + 0.3 * len(labels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.barh(range(len(labels)), values, color=[f"C{i % 10}" for i in range(len(labels))])
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.invert_yaxis()
    if reference is not None:
        axes.axvline(reference, color="black", linestyle="--", linewidth=1)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def write_document_plots(document: dict[str, Any], name: str, directory: Path) -> dict[str, Path]:
    """Throughput, memory, primitives-vs-floor and convergence plots of one document (those with data)."""
    stem = slug(Path(name).stem)
    title = f"{device_label(document)}" + (f" — {DRY_RUN_LABEL}" if document["run"].get("dry_run") else "")
    throughput = [m for m in document["measurements"] if m.get("kind") == "throughput"]
    plots: dict[str, Path] = {}
    if throughput:
        labels = [f"{m['group']}: {m.get('label') or m['variant']} {m['mode']}" for m in throughput]
        plots["throughput"] = _bars(directory / f"{stem}-throughput.png", f"throughput per variant, {title}", labels,
                                    [m["images_per_s"] for m in throughput], "images/s")
        with_memory = [m for m in throughput if m["peak_memory_gib"] is not None]
        if with_memory:
            plots["memory"] = _bars(directory / f"{stem}-memory.png", f"peak memory per variant, {title}",
                                    [f"{m['group']}: {m.get('label') or m['variant']} {m['mode']}" for m in with_memory],
                                    [m["peak_memory_gib"] for m in with_memory], "GiB")
    primitives = [m for m in document["measurements"] if m.get("kind") == "primitive" and m.get("floor_ms")]
    if primitives:
        plots["primitives"] = _bars(directory / f"{stem}-primitives.png", f"primitives vs the floor, {title}",
                                    [f"{m['bench']} {m['case']} {m['variant']}" for m in primitives],
                                    [m["floor_ms"] / m["median_ms"] for m in primitives],
                                    "fraction of the bandwidth floor (floor ms / median ms; 1 = at the floor)",
                                    reference=1.0)
    if document["curves"]:
        figure = Figure(figsize=(10, 4), layout="constrained")
        FigureCanvasAgg(figure)
        loss_axes, accuracy_axes = figure.subplots(1, 2)
        for curve in document["curves"]:
            epochs = range(1, len(curve["train_loss"]) + 1)
            loss_axes.plot(epochs, curve["train_loss"], marker="o", label=curve["variant"])
            accuracy_axes.plot(epochs, curve["heldout_accuracy"], marker="o", label=curve["variant"])
        loss_axes.set(xlabel="epoch", ylabel="training loss", title="digits: training loss")
        accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy", title="digits: held-out accuracy")
        accuracy_axes.legend(fontsize=8)
        figure.suptitle(title, fontsize=10)
        plots["convergence"] = directory / f"{stem}-convergence.png"
        directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(plots["convergence"], dpi=100)
    return plots


# ---------------------------------------------------------------------------------------
# Markdown


def document_section(document: dict[str, Any], name: str, plots: dict[str, Path], markdown_dir: Path) -> list[str]:
    """The Markdown of one results document: environment, stages, then each kind of result with its plot."""
    dry = document["run"].get("dry_run")
    heading = f"## {device_label(document)}, {str(document['run'].get('started', ''))[:10]}"
    lines = ["", heading + (f" — {DRY_RUN_LABEL}" if dry else ""), ""]
    if dry:
        lines += [f"**{DRY_RUN_LABEL}**: this document comes from `--dry-run`, which rehearses every stage on the "
                  "CPU at tiny shapes to prove the check works; its numbers measure nothing.", ""]
    lines += environment_table(document, name)

    def image(key: str) -> list[str]:
        if key not in plots:
            return []
        return ["", f"![{plots[key].stem}]({Path(os.path.relpath(plots[key], markdown_dir)).as_posix()})"]

    sections: list[tuple[str, Callable[[dict[str, Any]], list[str]], list[str]]] = [
        ("Stages", stages_table, []),
        ("Headline throughput", throughput_tables, ["throughput", "memory"]),
        ("Primitives vs the bandwidth floor", primitives_table, ["primitives"]),
        ("Model parity: one training step against float64", parity_table, []),
        ("Convergence: ResNet-20 on scikit-learn's digits", convergence_table, ["convergence"]),
        ("Checks", checks_summary, []),
    ]
    for title, render, keys in sections:
        body = render(document)
        if body:
            lines += ["", f"### {title}", "", provenance(document, name), *([""] if body[0] else []), *body]
            for key in keys:
                lines += image(key)
    for self_check in document["self_checks"]:
        lines += ["", "### Self-check verdicts and validation records", "",
                  *(f"- {backend.get('verdict')}" for backend in self_check["report"].get("backends", {}).values()),
                  *(f"- validation record `{name}` (in the results document under `self_checks`)"
                    for name in self_check["validation_records"])]
    skipped = skipped_list(document)
    if skipped:
        lines += ["", "### Not measured, and why", "", *skipped]
    return lines
