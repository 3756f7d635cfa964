"""The GPU check's worker process: ``python -m resnet_fast.bench.gpu_check_worker --rows ROWS.json --out OUT.jsonl``.

:mod:`resnet_fast.bench.gpu_check` starts one worker per task and keeps the heavy work
out of its own process, so a hung kernel or a poisoned CUDA context costs one row, not the
check. A worker runs its rows in order and, after each, appends that row's records to
``OUT.jsonl`` followed by ``{"type": "row_done", "row": ID}``; the driver forwards them into
the results as they appear and, when a worker dies or a row overruns its time, records
that row as failed and starts a new worker on the rows left.

Each row names its ``kind`` (what else it holds):

``environment``
    nothing: device, versions, driver, the extension's build information, backend availability;
``headline``
    one profiler run (:mod:`resnet_fast.bench.profiler`): model, batch, image size, dtype,
    one variant, modes, CUDA graphs, steps; a variant the profiler does not know is recorded
    as skipped, ``variant not available``;
``parity``
    one training step of a model in a dtype on a backend, default or fused training
    (:func:`resnet_fast.bench.parity.step_parity`);
``convergence``
    one training run on the digits (:func:`resnet_fast.bench.parity.convergence_curve`):
    eager, or resnet_fast on a backend, default or fused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROW_DONE = "row_done"
EXIT_RESTART = 3  # a row hit a CUDA error: its records are written; start a new worker for the rows left


def nvidia_smi() -> str | None:
    """Name, driver and memory of each GPU as ``nvidia-smi`` reports them, or None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or result.stderr.strip()


def environment_records(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The device, versions and what each backend can run."""
    import importlib.metadata

    import torchvision

    import resnet_fast
    from resnet_fast import _extension
    from resnet_fast.bench.profiler import cpu_name

    on_gpu = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if on_gpu else None
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    yield {
        "type": "environment",
        "device": "cuda" if on_gpu else "cpu",
        "device_name": torch.cuda.get_device_name() if on_gpu else None,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "capability": f"{capability[0]}.{capability[1]}" if capability else None,
        "bf16": bool(on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)),
        "nvidia_smi": nvidia_smi(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "triton": triton,
        "torchvision": torchvision.__version__,
        "resnet_fast": resnet_fast.__version__,
        "extension": _extension.extension_load_error() or "loaded",
        "build_info": _extension.build_info(),
        "backends": resnet_fast.backend_info(),
    }


def headline_records(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One profiler run of one variant; its measurements, or why it was skipped."""
    from resnet_fast.bench.profiler import BenchConfigError, Options, parse_variant, resolve_config, run_benchmark

    conditions = {key: row[key] for key in ("group", "model", "batch", "image_size", "dtype", "channels_last",
                                            "cuda_graphs")}
    try:
        variant = parse_variant(row["variant"])
    except BenchConfigError as error:
        yield {"type": "skip", **conditions, "variant": row["variant"],
               "reason": f"variant not available ({error})"}
        return
    options = Options(model=row["model"], batch=row["batch"], image_size=row["image_size"], dtype=row["dtype"],
                      mode=row["mode"], compare=(variant,), steps=row["steps"], warmup=row["warmup"],
                      channels_last=row["channels_last"], device=row["device"], cuda_graphs=row["cuda_graphs"])
    cuda = torch.cuda.is_available()
    config = resolve_config(options, cuda, cuda and torch.cuda.is_bf16_supported(including_emulation=False))
    report = run_benchmark(config, "python -m resnet_fast.bench " + row["profiler_args"])
    for m in report.measurements:
        yield {"type": "measurement", "kind": "throughput", **conditions, "variant": m.variant, "mode": m.mode,
               "images_per_s": m.images_per_s, "median_ms": m.median_ms, "peak_memory_gib": m.peak_memory_gib,
               "compile_s": m.compile_s, "graph": m.graph, "steps": len(m.timings_ms), "label": m.shown,
               "spread": m.spread}
    for skipped in report.skipped:
        yield {"type": "skip", **conditions, "variant": skipped.variant, "modes": list(skipped.modes),
               "reason": "; ".join(skipped.reasons)}


STEP_BASELINES: dict[tuple, Any] = {}  # (model, dtype) -> parity.StepBaseline, shared by a worker's rows


def backend_unavailable(backend: str) -> list[str] | None:
    """Why ``backend`` cannot run here (None: it can; ``auto`` always can)."""
    import resnet_fast

    if backend == "auto":
        return None
    info = resnet_fast.backend_info()[backend]
    return None if info["available"] else (list(info["reasons"]) or [f"backend {backend} is not available"])


def variant_name(backend: str, fused: bool) -> str:
    """``resnet_fast`` (auto), ``resnet_fast:triton``, ``resnet_fast:cuda+fused``, ..."""
    return ("resnet_fast" if backend == "auto" else f"resnet_fast:{backend}") + ("+fused" if fused else "")


def parity_records(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One training step of resnet_fast against the float64 reference and eager in the same dtype."""
    from resnet_fast.bench import parity

    setting = {key: row[key] for key in ("batch", "image_size", "device", "channels_last", "seed")}
    variant = variant_name(row["backend"], row["fused"])
    conditions = {"model": row["model"], "dtype": row["dtype"], "variant": variant, "batch": row["batch"],
                  "image_size": row["image_size"]}
    reasons = backend_unavailable(row["backend"])
    if reasons:
        yield {"type": "skip", **conditions, "reason": "; ".join(reasons)}
        return
    key = (row["model"], row["dtype"])
    if key not in STEP_BASELINES:
        STEP_BASELINES[key] = parity.step_baseline(row["model"], row["dtype"], **setting)
    comparisons = parity.step_parity(row["model"], row["dtype"], row["backend"], row["fused"], STEP_BASELINES[key],
                                     **setting)
    for c in comparisons:
        yield {"type": "check", "name": f"{row['model']} {row['dtype']} {variant}: {c['quantity']}",
               "outcome": "passed" if c["passed"] else "failed", **conditions, **c,
               "message": None if c["passed"] else
               f"relative error {c['error']:.3g} exceeds {c['tolerance']:.3g} (eager in {row['dtype']}: "
               f"{c['eager_error']:.3g})"}


CONVERGENCE_RUNS: dict[str, dict[str, list[float]]] = {}  # variant -> curve, shared by a worker's rows


def convergence_records(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One training run on the digits; for resnet_fast, a check of its final held-out accuracy
    against eager's from the same start (eager is run first when this worker has not yet)."""
    variant = "eager" if row["backend"] is None else variant_name(row["backend"], row["fused"])
    conditions = {"model": row["model"], "dtype": row["dtype"], "variant": variant, "epochs": row["epochs"],
                  "batch": row["batch"]}
    if row["backend"] is not None:
        reasons = backend_unavailable(row["backend"])
        if reasons:
            yield {"type": "skip", **conditions, "reason": "; ".join(reasons)}
            return
    curve = convergence_run(row, variant)
    yield {"type": "curve", **conditions, **curve, "final_heldout_accuracy": curve["heldout_accuracy"][-1]}
    if variant == "eager":
        return
    eager = CONVERGENCE_RUNS.get("eager") or convergence_run({**row, "backend": None, "fused": False}, "eager")
    difference = abs(curve["heldout_accuracy"][-1] - eager["heldout_accuracy"][-1])
    passed = difference <= row["accuracy_tolerance"]
    yield {"type": "check", "name": f"{row['model']} {row['dtype']} {variant}: held-out accuracy vs eager",
           "outcome": "passed" if passed else "failed", **conditions, "quantity": "held-out accuracy",
           "error": difference, "tolerance": row["accuracy_tolerance"], "passed": passed,
           "accuracy": curve["heldout_accuracy"][-1], "eager_accuracy": eager["heldout_accuracy"][-1],
           "message": None if passed else f"held-out accuracy {curve['heldout_accuracy'][-1]:.3f} vs eager "
                                          f"{eager['heldout_accuracy'][-1]:.3f} (allowed difference "
                                          f"{row['accuracy_tolerance']})"}


def convergence_run(row: dict[str, Any], variant: str) -> dict[str, list[float]]:
    import resnet_fast
    from resnet_fast.bench import parity

    digits = parity.load_digits_split(row["seed"], limit=row["limit"])
    eager, fused = parity.fresh_models(row["model"], row["seed"])
    model = eager if row["backend"] is None else fused
    if row["fused"]:
        resnet_fast.nn.enable_fused_training(model)
    previous = resnet_fast.get_backend()
    if row["backend"] is not None:
        resnet_fast.set_backend(row["backend"])
    try:
        curve = parity.convergence_curve(
            parity.place(model, row["device"], row["channels_last"]), digits, epochs=row["epochs"],
            batch=row["batch"], lr=row["lr"], device=row["device"], dtype=row["dtype"],
            channels_last=row["channels_last"], seed=row["seed"])
    finally:
        resnet_fast.set_backend(previous)
    CONVERGENCE_RUNS[variant] = curve
    return curve


KINDS: dict[str, Callable[[dict[str, Any]], Iterator[dict[str, Any]]]] = {
    "environment": environment_records,
    "headline": headline_records,
    "parity": parity_records,
    "convergence": convergence_records,
}


def run_rows(rows: list[dict[str, Any]], out: Path) -> None:
    """Run every row, appending its records and then its ``row_done`` line to ``out``.

    An exception in a row (other than an interrupt) becomes an ``error`` check record naming
    it; a CUDA error also ends the worker (the context cannot be trusted afterwards), and
    the driver starts a new one for the rows left (exit status :data:`EXIT_RESTART`).
    """
    for row in rows:
        records: list[dict[str, Any]] = []
        fatal = False
        try:
            records.extend(KINDS[row["kind"]](row))
        except Exception as error:  # one row's failure is recorded, the others still run
            from resnet_fast.bench.profiler import describe_error

            message = describe_error(error)
            records.append({"type": "check", "name": f"{row['kind']} {row.get('name', row['row'])}", "outcome": "error",
                            "passed": False, "message": message})
            fatal = "CUDA error" in message or "cudaError" in message
        with out.open("a") as stream:
            for record in records:
                stream.write(json.dumps({**record, "row": row["row"]}, default=str) + "\n")
            stream.write(json.dumps({"type": ROW_DONE, "row": row["row"]}) + "\n")
        if fatal:
            sys.exit(EXIT_RESTART)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet_fast.bench.gpu_check_worker",
                                     description="Run rows of one GPU-check task (started by resnet_fast.bench.gpu_check).")
    parser.add_argument("--rows", required=True, type=Path,
                        help=f"JSON list of rows, each with a 'row' id and a 'kind' ({', '.join(KINDS)})")
    parser.add_argument("--out", required=True, type=Path, help="JSON-lines file the records are appended to")
    args = parser.parse_args(argv)
    run_rows(json.loads(args.rows.read_text()), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
