"""The GPU check: one call on a lent GPU proves the kernels and measures the headline.

    python -m resnet_fast.bench.gpu_check --deadline 480 --out DIR [--dry-run]

(``scripts/gpu_check.sh`` wraps it.) A lent GPU gives 15 minutes of device time, the
machine's start included, and one command at most 10 minutes; so the check runs under a
deadline it never overruns, its stages in order of value, each with a budget (a share of
the deadline; the shares add up to one):

1. ``environment``: device, driver, versions (a worker process);
2. ``build``: the extension for this GPU's architecture only, all cores, timed; then the
   environment again, with the extension's ``build_info()``;
3. ``kernel_check``: ``python -m resnet_fast.check --json`` where that command exists (a
   check record per case with its error and tolerance; the validation records it writes
   are kept in the document), else the GPU-marked kernel tests; fixed tile configurations
   (``RESNET_FAST_AUTOTUNE=0``);
4. ``model_parity``: one training step of ResNet-50 and ResNet-20 in bf16 and fp16 on every
   backend, default and fused training, against float64 and eager
   (:mod:`resnet_fast.bench.parity`), and ResNet-20 trained on scikit-learn's digits, fused
   and eager from the same seed (curves and held-out accuracy);
5. ``headline``: the profiler on ResNet-50 bf16 (eager, the default native path, triton,
   cuda, fused training on each), then fp16, then small batches (ResNet-50 at 32,
   ResNet-20 at 128) with and without CUDA graphs, then ``torch.compile`` of torchvision
   and of resnet_fast's Triton model (``resnet_fast:triton+compile``; same group, so their
   ratios come from one run), then ResNet-18 and ResNet-56 if time remains; autotuning on;
6. ``primitives``: BN+ReLU and BN+add+ReLU at 256x256x56x56 bf16 NHWC against the copy
   bandwidth floor, eager and compile beside (the benchmark suite);
7. ``gpu_tests``: the rest of the GPU-marked tests, with whatever time is left.

The schedule is cumulative: stage *i* must end by ``start + (share_1 + ... + share_i) *
(deadline - reserve)``, so time a stage leaves unused passes to the next, and the last ends
by the deadline less a reserve for writing the results. A stage that would get less than
its minimum is skipped and recorded with why. Heavy work runs in subprocesses under a
timeout (a worker, :mod:`resnet_fast.bench.gpu_check_worker`, for rows that may fail one by
one: a dead or overrunning worker costs its row, and a new one takes the rest).

Everything lands in ``DIR`` as it happens (the device tool returns at most 8 files):

- ``results.jsonl``: one record per line (:mod:`resnet_fast.bench.results`), appended the
  moment each result exists;
- ``summary.md``: a readable account, appended per stage;
- ``check.log``: the output of every process, written as it grows;
- ``<gpu>-<yyyymmdd>.json`` (``cpu-dry-run-<date>.json`` for ``--dry-run``): the one results
  document, rewritten after each stage; commit it as ``benchmarks/results/<name>``;
- ``BENCHMARKS.md`` and ``plots.tar.gz``: the report generated from that document.

``--dry-run`` runs every stage end to end on the CPU and writes the same files in the same
format, labelled as a dry run; CI runs it (``tests/test_gpu_check.py``). What differs: fp32
(the CPU's fast path) instead of bf16/fp16; ResNet-20 at 8-16 pixels stands in for every
network; the build runs setup.py with the build switched off; the kernel check runs the
self-check through the Triton interpreter (``--interpret``) or a few CPU kernel
tests; no CUDA graphs and no ``torch.compile`` row; the GPU tests of one file, which skip.
Backends the CPU cannot run are recorded as skipped with their reasons, as on a GPU where
one is unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from resnet_fast.bench.gpu_check_worker import EXIT_RESTART, ROW_DONE
from resnet_fast.bench.results import (
    DRY_RUN_LABEL,
    append_record,
    assemble,
    document_name,
    read_records,
    skips_by_reason,
    write_document,
)

DEFAULT_DEADLINE_S = 480.0
FINISH_RESERVE_FRACTION = 0.05  # of the deadline, kept for the document, the report and the plots
KILL_GRACE_S = 3.0  # between SIGTERM and SIGKILL of a process group
POLL_S = 0.2
# Correctness stages use one fixed tile configuration per shape (no autotuning); timing stages autotune.
CORRECTNESS_ENV = {"RESNET_FAST_AUTOTUNE": "0"}
REPOSITORY = Path(__file__).resolve().parents[2]

KERNEL_TEST_FILES = (
    "tests/test_batch_norm_act.py", "tests/test_batch_norm_stats.py", "tests/test_scale_shift_act.py",
    "tests/test_conv_bn_act.py", "tests/test_conv2d_ops.py", "tests/test_triton_batch_norm_act.py",
    "tests/test_triton_conv2d.py", "tests/test_cuda_batch_norm_act.py", "tests/test_cuda_conv2d.py",
    "tests/test_cuda_conv2d_tensor_core.py",
)


# ---------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class Task:
    """One process of a stage.

    A worker task (``rows`` given, each naming its ``kind``) runs them through
    :mod:`resnet_fast.bench.gpu_check_worker`; each row may take at most ``row_timeout_s``.
    A command task runs ``argv``; ``ingest`` turns what it wrote into records afterwards.
    """

    name: str
    argv: tuple[str, ...] = ()
    rows: tuple[dict[str, Any], ...] = ()
    row_timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    ingest: Callable[[], list[dict[str, Any]]] | None = None
    min_s: float = 1.0  # skipped when less time than this is left


@dataclass(frozen=True)
class Stage:
    """A step of the check: its share of the deadline and the tasks it runs (planned when it starts,
    so it can use what earlier stages found)."""

    name: str
    title: str
    share: float
    min_s: float
    plan: Callable[[CheckContext], list[Task]]


@dataclass
class CheckContext:
    """Where the check writes and what it has learnt so far."""

    out: Path
    work: Path
    dry_run: bool
    python: str = sys.executable
    environment: dict[str, Any] = field(default_factory=dict)
    kernel_tests_ran: bool = False  # the kernel-check stage fell back to the GPU-marked kernel tests
    document_path: Path | None = None  # the results document as last written

    @property
    def results(self) -> Path:
        return self.out / "results.jsonl"

    @property
    def log(self) -> Path:
        return self.out / "check.log"

    @property
    def summary(self) -> Path:
        return self.out / "summary.md"

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def low_precision_dtypes(self) -> list[str]:
        """bf16 where the device has it, then fp16 (a dry run: fp32 only, the CPU's fast path)."""
        if self.dry_run:
            return ["fp32"]
        return (["bf16"] if self.environment.get("bf16") else []) + ["fp16"]

    def python_module(self, module: str, *args: str) -> tuple[str, ...]:
        return (self.python, "-m", module, *args)


def self_check_available() -> bool:
    """Whether ``python -m resnet_fast.check`` exists in this tree (the self-check command)."""
    import importlib.util

    return importlib.util.find_spec("resnet_fast.check") is not None


# --- stages -------------------------------------------------------------------------------


def plan_environment(ctx: CheckContext) -> list[Task]:
    return [Task("environment", rows=({"kind": "environment", "name": "probe"},), row_timeout_s=60)]


def plan_build(ctx: CheckContext) -> list[Task]:
    """The extension for this GPU's architecture (a dry run: setup.py with the build switched off)."""
    if ctx.dry_run:
        env = {"RESNET_FAST_BUILD_CUDA": "0"}
    else:
        env = {"RESNET_FAST_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 1),
               "TORCH_CUDA_ARCH_LIST": ctx.environment.get("capability") or ""}
        # This process has the old library mapped (importing resnet_fast loads it): unlink it, so the
        # build writes a new file instead of truncating the mapped one under this process.
        for library in (REPOSITORY / "resnet_fast").glob("_C*.so"):
            library.unlink()
    argv = (ctx.python, "setup.py", "build_ext", "--inplace")
    started = time.monotonic()

    def ingest() -> list[dict[str, Any]]:
        return [{"type": "measurement", "kind": "build", "seconds": time.monotonic() - started,
                 "architectures": env.get("TORCH_CUDA_ARCH_LIST") or None, "command": shlex.join(argv),
                 "environment": env}]

    # The environment once more, from a fresh process: the extension as built (its build_info()).
    probe = Task("environment_after_build", rows=({"kind": "environment", "name": "after the build"},),
                 row_timeout_s=60)
    return [Task("build", argv=argv, env=env, ingest=ingest, min_s=20 if not ctx.dry_run else 1), probe]


def junit_records(path: Path) -> list[dict[str, Any]]:
    """A check record per test case of a pytest ``--junitxml`` file (none if it was not written)."""
    import xml.etree.ElementTree as ElementTree

    if not path.exists():
        return []
    records = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", None
        for tag, kind in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            element = case.find(tag)
            if element is not None:
                outcome, message = kind, (element.get("message") or element.text or "").strip()[:2000]
                break
        records.append({"type": "check", "name": name, "outcome": outcome,
                        "passed": None if outcome == "skipped" else outcome == "passed",
                        "seconds": float(case.get("time") or 0.0), "message": message})
    return records


SELF_CHECK_OUTCOMES = {"pass": "passed", "FAIL": "failed", "skipped": "skipped"}


def self_check_records(report: Path, record_dir: Path) -> list[dict[str, Any]]:
    """A check record per row of ``python -m resnet_fast.check --json`` (operator, backend, dtype,
    layout, case, max error, tolerance), then the report's verdicts with the validation records
    the check wrote into ``record_dir`` (none where it wrote no JSON)."""
    if not report.exists():
        return []
    data = json.loads(report.read_text())
    records: list[dict[str, Any]] = []
    for row in data.get("rows", []):
        outcome = SELF_CHECK_OUTCOMES.get(row.get("result"), "error")
        records.append({"type": "check", "name": " ".join(str(row.get(k, "")) for k in
                                                          ("backend", "operator", "dtype", "layout", "case")),
                        "outcome": outcome, "passed": None if outcome == "skipped" else outcome == "passed",
                        "error": row.get("max_error"), "tolerance": row.get("tolerance"),
                        "message": row.get("detail") or None, "seconds": row.get("seconds"),
                        **{k: row.get(k) for k in ("backend", "operator", "dtype", "layout", "case")}})
    written = {p.name: json.loads(p.read_text()) for p in sorted(record_dir.rglob("*.json"))} \
        if record_dir.exists() else {}
    summary = {k: v for k, v in data.items() if k != "rows"}
    records.append({"type": "self_check", "report": summary, "validation_records": written})
    return records


def plan_kernel_check(ctx: CheckContext) -> list[Task]:
    """The self-check command where it exists, else the GPU-marked kernel tests (fixed tiles)."""
    env = dict(CORRECTNESS_ENV)
    if self_check_available():
        report, record_dir = ctx.work / "self-check.json", ctx.work / "validation-records"
        args = ["--json", str(report), "--record-dir", str(record_dir)] + (["--interpret"] if ctx.dry_run else [])
        if ctx.dry_run:  # Triton reads it when first imported, which importing resnet_fast already does
            env["TRITON_INTERPRET"] = "1"
        return [Task("self_check", argv=ctx.python_module("resnet_fast.check", *args), env=env,
                     ingest=lambda: self_check_records(report, record_dir))]
    ctx.kernel_tests_ran = True
    junit = ctx.work / "kernel-tests.xml"
    if ctx.dry_run:  # the CPU cases of two kernel files: the same command line, the CPU's share of the cases
        selection = ["tests/test_batch_norm_act.py", "-m", "not gpu", "-k", "test_matches_float64_reference and shape0"]
    else:
        selection = [*KERNEL_TEST_FILES, "-m", "gpu"]
    argv = ctx.python_module("pytest", *selection, "-q", "-rf", "-p", "no:cacheprovider",
                             f"--junitxml={junit}", "-o", "faulthandler_timeout=120")
    return [Task("kernel_tests", argv=argv, env={**env, "RESNET_FAST_EXPECT_CUDA_EXT": "0" if ctx.dry_run else "1"},
                 ingest=lambda: junit_records(junit))]


def plan_model_parity(ctx: CheckContext) -> list[Task]:
    """One training step per model, dtype, backend and training mode; then the digits runs."""
    backends = [("auto", False), ("triton", False), ("triton", True), ("cuda", False), ("cuda", True),
                ("torch", False), ("torch", True)]
    models = ([("resnet20", 4, 8)] if ctx.dry_run
              else [("resnet50", 8, 64), ("resnet20", 32, 32)])
    rows = [{"kind": "parity", "name": f"{model} {dtype} {backend}{'+fused' if fused else ''}", "model": model,
             "dtype": dtype,
             "backend": backend, "fused": fused, "batch": batch, "image_size": size, "device": ctx.device,
             "channels_last": not ctx.dry_run, "seed": 0}
            for model, batch, size in models for dtype in ctx.low_precision_dtypes for backend, fused in backends]
    fused_backends = ["torch"] if ctx.dry_run else ["triton", "cuda"]
    convergence = [{"kind": "convergence", "name": f"digits {backend or 'eager'}", "model": "resnet20",
                    "dtype": ctx.low_precision_dtypes[0],
                    "backend": backend, "fused": backend is not None, "epochs": 1 if ctx.dry_run else 8,
                    "batch": 32 if ctx.dry_run else 64, "lr": 0.05, "limit": 160 if ctx.dry_run else None, "seed": 0,
                    "device": ctx.device, "channels_last": not ctx.dry_run, "accuracy_tolerance": 0.03}
                   for backend in [None, *fused_backends]]
    return [Task("parity_and_convergence", rows=tuple(rows + convergence), row_timeout_s=60 if ctx.dry_run else 90,
                 env=dict(CORRECTNESS_ENV))]


# resnet_fast under torch.compile in the headline: the Triton backend, whose operators
# torch.compile sees into (triton_op), beside torchvision's compile row
HEADLINE_COMPILED_RESNET_FAST = "resnet_fast:triton+compile"


def headline_rows(ctx: CheckContext) -> list[dict[str, Any]]:
    """The profiler runs in order of value, one variant each."""
    fused = ["resnet_fast:triton+fused", "resnet_fast:cuda+fused"]
    native = ["eager", "resnet_fast", "resnet_fast:triton", "resnet_fast:cuda"]
    if ctx.dry_run:
        big, small, cifar = ("resnet20", 4, 16), ("resnet20", 2, 16), ("resnet20", 4, 8)
        steps, warmup = 1, 1
        fused = [*fused, "resnet_fast:torch+fused"]  # the CPU's fused training
    else:
        big, small, cifar = ("resnet50", 256, 224), ("resnet50", 32, 224), ("resnet20", 128, 32)
        steps, warmup = 20, 5
    first, second = ctx.low_precision_dtypes[0], ctx.low_precision_dtypes[-1]
    plan: list[tuple[tuple[str, int, int], str, str, str, bool]] = []  # (model, dtype, variant, mode, graphs)
    plan += [(big, first, v, "both", False) for v in native] + [(big, first, v, "train", False) for v in fused]
    if second != first:
        plan += [(big, second, v, "both", False) for v in ("eager", "resnet_fast:triton", "resnet_fast:cuda")]
        plan += [(big, second, v, "train", False) for v in fused]
    graph_modes = [False] if ctx.dry_run else [False, True]  # CUDA graphs need a GPU
    for shape in (small, cifar):
        for graphs in graph_modes:
            plan += [(shape, first, v, "train", graphs) for v in ("eager", native[2], native[3], *fused)]
    if not ctx.dry_run:  # on the CPU the compilation alone would take minutes
        # torch.compile of torchvision, then of resnet_fast's Triton model, in the same group
        plan += [(big, first, v, "both", False) for v in ("compile", HEADLINE_COMPILED_RESNET_FAST)]
        # if time remains: ResNet-18 and the CIFAR ResNet-56
        plan += [(shape, first, v, "both", False) for shape in (("resnet18", 256, 224), ("resnet56", 128, 32))
                 for v in ("eager", "resnet_fast:triton", "resnet_fast:cuda")]
    rows = []
    for (model, batch, size), dtype, variant, mode, graphs in plan:
        args = (f"--model {model} --batch {batch} --image-size {size} --dtype {dtype} --mode {mode} "
                f"--compare {variant} --steps {steps} --warmup {warmup} --device {ctx.device}"
                f"{' --channels-last' if not ctx.dry_run else ''}{' --cuda-graphs' if graphs else ''}")
        rows.append({"kind": "headline", "name": f"{model} b{batch} {dtype} {variant} {mode}{' graphs' if graphs else ''}",
                     "group": f"{model}, batch {batch}, {size}x{size}, {dtype}{', CUDA graphs' if graphs else ''}",
                     "model": model, "batch": batch, "image_size": size, "dtype": dtype, "variant": variant,
                     "mode": mode, "cuda_graphs": graphs, "steps": steps, "warmup": warmup,
                     "channels_last": not ctx.dry_run, "device": ctx.device, "profiler_args": args})
    return rows


def plan_headline(ctx: CheckContext) -> list[Task]:
    return [Task("profiler", rows=tuple(headline_rows(ctx)),
                 row_timeout_s=60 if ctx.dry_run else 150, min_s=5)]


def primitive_records(path: Path) -> list[dict[str, Any]]:
    """A ``primitive`` measurement per benchmark of a pytest-benchmark JSON file from the suite."""
    from resnet_fast.bench.report import load

    if not path.exists():
        return []
    results, _ = load([str(path)])
    return [{"type": "measurement", "kind": "primitive", "bench": r.bench, "case": r.label, "variant": r.variant,
             "dtype": r.dtype, "layout": r.layout, "median_ms": r.median_ms, "floor_ms": r.floor_ms,
             "floor_multiple": r.floor_multiple, "gb_per_s": r.gb_per_s, "peak_memory_bytes": r.peak_memory_bytes,
             "device": r.device} for r in results]


def plan_primitives(ctx: CheckContext) -> list[Task]:
    """BN+ReLU and BN+add+ReLU at ResNet-50's 256x56x56 activation (fwd and fwd+bwd) against the floor:
    eager and resnet_fast's fused backends first, then torch.compile (its compiles are the slow part)."""
    if ctx.dry_run:  # the suite's CPU smoke cases (it times no compile on the CPU)
        selections = [("bn_act_vs_floor", "not gpu", "")]
    else:
        case = "bf16-nhwc and 256x256x56x56 and (fwd or train)"
        selections = [("bn_act_vs_floor", "gpu", f"{case} and not compile and not rf_torch"),
                      ("bn_act_compile", "gpu", f"{case} and compile")]
    tasks = []
    for name, marker, keyword in selections:
        output = ctx.work / f"{name}.json"
        argv = ctx.python_module("pytest", "benchmarks/bench_batch_norm_act.py", "-m", marker,
                                 *(["-k", keyword] if keyword else []), "-q", "-rs", "-p", "no:cacheprovider",
                                 "--benchmark-quiet", f"--benchmark-json={output}")
        tasks.append(Task(name, argv=argv, ingest=lambda output=output: primitive_records(output), min_s=5))
    return tasks


def host_overhead_records(path: Path) -> list[dict[str, Any]]:
    """A measurement per benchmark of ``benchmarks/bench_host_overhead.py``'s pytest-benchmark
    JSON: host time per call (or per step, with the GPU time beside it) and the ratio to
    torchvision, as its ``extra_info`` records them."""
    if not path.exists():
        return []
    return [{"type": "measurement", "kind": "host_overhead", "name": bench["name"],
             "median_s": bench["stats"]["median"], **bench.get("extra_info", {})}
            for bench in json.loads(path.read_text()).get("benchmarks", [])]


def plan_gpu_tests(ctx: CheckContext) -> list[Task]:
    """The host-overhead benchmark (per-call host time of the blocks against torchvision, and
    host vs GPU time per step of ResNet-50 at batch 32 and ResNet-20 at batch 128), then the
    GPU-marked tests not already run (a dry run: the benchmark's CPU rows, and one test file's,
    which skip on the CPU)."""
    host_json = ctx.work / "host-overhead.json"
    host_argv = ctx.python_module("pytest", "benchmarks/bench_host_overhead.py", "-m", "not gpu" if ctx.dry_run else "gpu",
                                  "-q", "-p", "no:cacheprovider", "--benchmark-quiet", f"--benchmark-json={host_json}")
    host_env = {"RESNET_FAST_BENCH_HOST_ROUNDS": "2"} if ctx.dry_run else {}
    host = Task("host_overhead", argv=host_argv, env=host_env, ingest=lambda: host_overhead_records(host_json),
                min_s=10 if not ctx.dry_run else 1)
    junit = ctx.work / "gpu-tests.xml"
    if ctx.dry_run:
        selection = ["tests/test_fp16_grad_scaler.py"]
    else:
        selection = ["tests", *(f"--ignore={path}" for path in KERNEL_TEST_FILES if ctx.kernel_tests_ran)]
    argv = ctx.python_module("pytest", *selection, "-m", "gpu", "-q", "-rf", "-p", "no:cacheprovider",
                             f"--junitxml={junit}", "-o", "faulthandler_timeout=60")
    return [host, Task("gpu_tests", argv=argv, env={**CORRECTNESS_ENV, "RESNET_FAST_EXPECT_CUDA_EXT": "0" if ctx.dry_run else "1"},
                       ingest=lambda: junit_records(junit), min_s=10 if not ctx.dry_run else 1)]


STAGES: tuple[Stage, ...] = (
    Stage("environment", "Environment", 0.05, 5, plan_environment),
    Stage("build", "Build", 0.23, 20, plan_build),
    Stage("kernel_check", "Kernel check", 0.19, 20, plan_kernel_check),
    Stage("model_parity", "Model parity", 0.12, 15, plan_model_parity),
    Stage("headline", "Headline throughput", 0.25, 15, plan_headline),
    Stage("primitives", "Primitives vs the bandwidth floor", 0.06, 10, plan_primitives),
    Stage("gpu_tests", "Remaining GPU tests", 0.10, 10, plan_gpu_tests),
)


# ---------------------------------------------------------------------------------------
# Running


class Clock:
    """Seconds since the check started (monotonic), and the deadline."""

    def __init__(self, deadline_s: float) -> None:
        self.start = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self, until_s: float) -> float:
        return until_s - self.elapsed()


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, then SIGKILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


class Runner:
    """Runs tasks for one check, forwarding records and output into ``ctx.out`` as they come."""

    def __init__(self, ctx: CheckContext, clock: Clock) -> None:
        self.ctx, self.clock = ctx, clock

    def record(self, record: dict[str, Any]) -> None:
        append_record(self.ctx.results, record)

    def log(self, text: str) -> None:
        with self.ctx.log.open("a") as stream:
            stream.write(text)

    def start(self, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        self.log(f"\n===== {datetime.now(timezone.utc):%H:%M:%S} {' '.join(f'{k}={v}' for k, v in env.items())} "
                 f"{shlex.join(argv)}\n")
        stream = self.ctx.log.open("a")
        try:
            return subprocess.Popen(argv, cwd=REPOSITORY, stdout=stream, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
        finally:
            stream.close()

    def run_command(self, task: Task, stage: str, until_s: float) -> tuple[str, str | None]:
        """Run a command task until it ends or ``until_s``; its status and why."""
        process = self.start(task.argv, task.env)
        try:
            rc = process.wait(timeout=max(self.clock.left(until_s), 0.0))
        except subprocess.TimeoutExpired:
            stop_process_group(process)
            status, why = "timed out", f"stopped at the stage's time limit ({self.clock.elapsed():.0f} s into the check)"
        else:
            status, why = ("ok", None) if rc == 0 else ("failed", f"exit status {rc}")
        for record in task.ingest() if task.ingest else []:
            self.record({**record, "stage": stage, "task": task.name})
        return status, why

    def run_worker(self, task: Task, stage: str, until_s: float) -> tuple[str, str | None]:
        """Run a worker task's rows, a new worker after each death or overrunning row, until ``until_s``."""
        remaining = list(task.rows)
        problems: list[str] = []
        attempt = 0
        while remaining:
            left = self.clock.left(until_s)
            if left < task.min_s:
                for row in remaining:
                    self.record({"type": "stage", "stage": stage, "task": task.name, "row_name": row["name"],
                                 "status": "skipped", "reason": f"no time left in the stage ({left:.0f} s)"})
                problems.append(f"{len(remaining)} row(s) skipped: no time left")
                return "timed out", "; ".join(problems)
            attempt += 1
            rows_path = self.ctx.work / f"{stage}-{task.name}-{attempt}.rows.json"
            out_path = self.ctx.work / f"{stage}-{task.name}-{attempt}.jsonl"
            rows_path.write_text(json.dumps(remaining))
            out_path.touch()
            process = self.start(self.ctx.python_module("resnet_fast.bench.gpu_check_worker", "--rows", str(rows_path),
                                                        "--out", str(out_path)), task.env)
            seen, row_started = 0, time.monotonic()
            ended_by: str | None = None
            while True:
                rc = process.poll()
                records = read_records(out_path)
                for record in records[seen:]:
                    if record["type"] == ROW_DONE:
                        remaining = [r for r in remaining if r["row"] != record["row"]]
                        row_started = time.monotonic()
                    else:
                        self.record({**record, "stage": stage, "task": task.name})
                seen = len(records)
                if rc is not None:
                    break
                if self.clock.left(until_s) <= 0:
                    ended_by = "the stage's time limit"
                elif task.row_timeout_s is not None and time.monotonic() - row_started > task.row_timeout_s:
                    ended_by = f"the row time limit ({task.row_timeout_s:.0f} s)"
                if ended_by:
                    stop_process_group(process)
                    rc = process.returncode
                    break
                time.sleep(POLL_S)
            if not remaining:
                break
            if ended_by is None and rc == EXIT_RESTART:  # the failing row was recorded; the others need a new worker
                continue
            row = remaining.pop(0)
            why = (f"stopped at {ended_by}" if ended_by else f"the worker exited with status {rc}") + \
                  " during this row; see check.log"
            self.record({"type": "check", "stage": stage, "task": task.name, "row": row["row"],
                         "name": f"{row['kind']} {row['name']}", "outcome": "error", "passed": False,
                         "message": why})
            problems.append(f"{row['name']}: {why}")
        return ("ok", None) if not problems else ("failed", "; ".join(problems))

    def run_task(self, task: Task, stage: str, until_s: float) -> tuple[str, str | None]:
        if task.rows:
            numbered = Task(**{**task.__dict__, "rows": tuple({**row, "row": index} for index, row in enumerate(task.rows))})
            return self.run_worker(numbered, stage, until_s)
        return self.run_command(task, stage, until_s)


def stage_schedule(stages: Sequence[Stage], deadline_s: float) -> list[float]:
    """The time (seconds from the start) by which each stage must end: cumulative shares of the
    deadline less the finishing reserve."""
    usable = deadline_s * (1 - FINISH_RESERVE_FRACTION)
    total = sum(stage.share for stage in stages)
    if total > 1 + 1e-9:
        raise ValueError(f"stage shares add up to {total:.3f}, more than the whole deadline")
    ends, cumulative = [], 0.0
    for stage in stages:
        cumulative += stage.share
        ends.append(usable * cumulative)
    return ends


def run_stage(runner: Runner, stage: Stage, until_s: float) -> dict[str, Any]:
    """Plan and run one stage's tasks by ``until_s``; its stage record."""
    ctx, clock = runner.ctx, runner.clock
    started = clock.elapsed()
    left = until_s - started
    budget = {"budget_s": round(left, 1)}
    if left < stage.min_s:
        return {"type": "stage", "stage": stage.name, "status": "skipped", "seconds": 0.0, **budget,
                "reason": f"needs at least {stage.min_s:.0f} s, {max(left, 0):.0f} s left in its budget"}
    statuses, reasons = [], []
    for task in stage.plan(ctx):
        left = clock.left(until_s)
        if left < task.min_s:
            statuses.append("skipped")
            reasons.append(f"{task.name}: needs at least {task.min_s:.0f} s, {max(left, 0):.0f} s left")
            continue
        status, why = runner.run_task(task, stage.name, until_s)
        statuses.append(status)
        if why:
            reasons.append(f"{task.name}: {why}")
    overall = next((s for s in ("timed out", "failed", "skipped") if s in statuses), "ok")
    return {"type": "stage", "stage": stage.name, "status": overall, "seconds": round(clock.elapsed() - started, 1),
            **budget, "reason": "; ".join(reasons) or None}


def absorb(ctx: CheckContext, stage: Stage, records: list[dict[str, Any]]) -> None:
    """What later stages need from this one's records (the environment)."""
    for record in records:
        if record["type"] == "environment":
            ctx.environment = record


def summary_lines(stage: Stage, stage_record: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """The stage's part of summary.md: its status, its numbers, its failures."""
    lines = [f"## {stage.title}: {stage_record['status']} ({stage_record['seconds']:.0f} s of "
             f"{stage_record['budget_s']:.0f} s)", ""]
    if stage_record.get("reason"):
        lines += [f"- {stage_record['reason']}"]
    checks = [r for r in records if r["type"] == "check"]
    if checks:
        counts = {outcome: sum(r["outcome"] == outcome for r in checks) for outcome in ("passed", "failed", "error",
                                                                                         "skipped")}
        lines.append("- checks: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        lines += [f"  - {r['outcome']}: {r['name']}: {r.get('message') or ''}".rstrip(": ")
                  for r in checks if r["outcome"] in ("failed", "error")]
    for r in records:
        if r["type"] == "measurement" and r["kind"] == "throughput":
            memory = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
            lines.append(f"- {r['group']}: {r.get('label') or r['variant']} {r['mode']}: {r['images_per_s']:,.1f} img/s, "
                         f"{r['median_ms']:.2f} ms, {memory}")
        elif r["type"] == "measurement" and r["kind"] == "primitive":
            multiple = "n/a" if r["floor_multiple"] is None else f"{r['floor_multiple']:.2f}x floor"
            lines.append(f"- {r['bench']} {r['case']} {r['variant']}: {r['median_ms']:.3f} ms, {multiple}")
        elif r["type"] == "measurement" and r["kind"] == "host_overhead":
            if "gpu_ms" in r:  # a training step: host time against the GPU's
                lines.append(f"- step of {r['name']}: host {r['host_ms']:.1f} ms, GPU {r['gpu_ms']:.1f} ms")
            else:
                ratio = f", {r['x_torchvision']:.2f}x torchvision" if r.get("x_torchvision") is not None else ""
                lines.append(f"- host time {r['name']}: {r['median_s'] * 1e6:,.0f} us per call{ratio}")
        elif r["type"] == "measurement" and r["kind"] == "build":
            lines.append(f"- build: {r['seconds']:.0f} s ({r['command']})")
        elif r["type"] == "curve":
            lines.append(f"- digits {r['variant']}: held-out accuracy per epoch "
                         + ", ".join(f"{a:.3f}" for a in r["heldout_accuracy"]))
        elif r["type"] == "environment":
            lines.append(f"- {r.get('device_name') or r.get('cpu')} (capability {r.get('capability')}), torch "
                         f"{r['torch']}, CUDA {r['cuda']}, triton {r['triton']}; extension: {r['extension']}")
        elif r["type"] == "self_check":
            lines += [f"- self-check: {backend.get('verdict')}" for backend in r["report"].get("backends", {}).values()]
            lines.append(f"- {len(r['validation_records'])} validation record(s) kept in the results document: "
                         + (", ".join(r["validation_records"]) or "none"))
    lines += [f"- skipped {', '.join(variants)}: {reason}" for reason, variants in skips_by_reason(records).items()]
    return lines + [""]


def write_current_document(ctx: CheckContext) -> Path:
    """(Re)write the results document from every record so far; its name follows the device,
    so a name learnt later replaces the earlier file."""
    document = assemble(read_records(ctx.results))
    path = ctx.out / document_name(document)
    write_document(document, path)
    if ctx.document_path is not None and ctx.document_path != path:
        ctx.document_path.unlink(missing_ok=True)
    ctx.document_path = path
    return path


def finish(ctx: CheckContext, clock: Clock) -> Path:
    """The results document, and BENCHMARKS.md with its plots generated from it."""
    path = write_current_document(ctx)
    plots = ctx.out / "plots"  # archived below, so BENCHMARKS.md's links work where plots.tar.gz is unpacked
    left = clock.deadline_s - clock.elapsed()
    report_argv = ctx.python_module("resnet_fast.bench.report", str(path), "-o", str(ctx.out / "BENCHMARKS.md"),
                                    "--plots", str(plots))
    try:
        if left < 1:
            raise subprocess.TimeoutExpired(report_argv, 0)
        with ctx.log.open("a") as log:
            subprocess.run(report_argv, cwd=REPOSITORY, stdout=log, stderr=subprocess.STDOUT, timeout=left,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        with ctx.summary.open("a") as stream:
            stream.write(f"- no time left for the report: run `{shlex.join(report_argv[1:])}` on the results document\n")
    if plots.exists():
        with tarfile.open(ctx.out / "plots.tar.gz", "w:gz") as archive:
            archive.add(plots, arcname="plots")
        shutil.rmtree(plots)
    return path


def run_check(ctx: CheckContext, deadline_s: float, stages: Sequence[Stage] = STAGES,
              command: str = "") -> int:
    """Run ``stages`` under ``deadline_s``; 0 when every stage ran and every check passed."""
    clock = Clock(deadline_s)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ends = stage_schedule(stages, deadline_s)
    append_record(ctx.results, {
        "type": "run", "command": command, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "deadline_s": deadline_s, "dry_run": ctx.dry_run,
        "stages": [{"stage": s.name, "share": s.share, "budget_s": round(deadline_s * (1 - FINISH_RESERVE_FRACTION)
                                                                          * s.share, 1), "min_s": s.min_s}
                   for s in stages]})
    with ctx.summary.open("a") as stream:
        stream.write(f"# GPU check{' (' + DRY_RUN_LABEL + ')' if ctx.dry_run else ''}\n\n`{command}`, "
                     f"deadline {deadline_s:.0f} s\n\n")
    runner = Runner(ctx, clock)
    for stage, until in zip(stages, ends):
        before = len(read_records(ctx.results))
        stage_record = run_stage(runner, stage, until)
        append_record(ctx.results, stage_record)
        records = read_records(ctx.results)[before:]
        absorb(ctx, stage, records)
        with ctx.summary.open("a") as stream:
            stream.write("\n".join(summary_lines(stage, stage_record, records[:-1])) + "\n")
        write_current_document(ctx)
    document_path = finish(ctx, clock)
    document = json.loads(document_path.read_text())
    bad_checks = [c for c in document["checks"] if c["outcome"] in ("failed", "error")]
    bad_stages = [s for s in document["stages"] if "task" not in s and s["status"] != "ok"]
    verdict = "ok" if not bad_checks and not bad_stages else (
        f"{len(bad_checks)} check(s) failed, {len(bad_stages)} stage(s) not ok")
    with ctx.summary.open("a") as stream:
        stream.write(f"**Overall: {verdict}** ({clock.elapsed():.0f} s of {deadline_s:.0f} s); "
                     f"results document `{document_path.name}`\n")
    return 0 if verdict == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_fast.bench.gpu_check",
        description="One deadline-bound GPU check: build, kernel check, model parity, headline throughput, "
                    "primitives, remaining GPU tests; results written into --out as they come.")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, metavar="S",
                        help=f"seconds the whole check may take (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--out", type=Path, default=Path("gpu-out"), help="results folder (default gpu-out)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every stage on the CPU at tiny shapes (what CI runs); no number is a measurement")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.deadline <= 0:
        build_parser().error(f"--deadline must be positive, got {args.deadline}")
    if args.out.exists() and any(args.out.iterdir()):
        build_parser().error(f"--out {args.out} is not empty: give a new folder (results are appended, never mixed)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = CheckContext(out=args.out, work=Path(work), dry_run=args.dry_run)
        return run_check(ctx, args.deadline, command=shlex.join(["python", "-m", "resnet_fast.bench.gpu_check", *argv]))


if __name__ == "__main__":
    sys.exit(main())
