"""``python -m resnet_fast.check``: test the fused kernels on this GPU and record the result.

    python -m resnet_fast.check                   # the current GPU
    python -m resnet_fast.check --device cuda:1 --json check.json
    python -m resnet_fast.check --interpret       # Triton interpreter on CPU (tests the command)

For every fused backend that can run on the device (``cuda``, ``triton``) it runs every
operator forward and backward, training and eval, in float32, float16 and bfloat16 (where
the GPU has it), NCHW and channels_last, on odd shapes and one ResNet-50 shape, against a
float64 reference with the project's tolerance rule (:mod:`resnet_fast.testing`), plus one
training step of ResNet-18 against torchvision's. It prints a table and one verdict line
per backend. A backend whose every case passed gets a validation record
(:mod:`resnet_fast.validation`), after which ``set_backend("auto")`` uses it on this kind
of GPU.

Exit status: 0 every case passed; 1 a case failed; 3 no GPU (nothing checked).
``--interpret`` runs a short list of tiny cases through Triton's interpreter on the CPU;
its record is marked as such and validates no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

EXIT_PASSED, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3
FUSED_BACKENDS = ("cuda", "triton")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_fast.check",
        description="Test resnet_fast's fused kernels on this GPU against float64 and record the result, "
                    "so that set_backend('auto') uses them here.")
    parser.add_argument("--device", default=None, help="the GPU to check, cuda or cuda:N (default: the current one)")
    parser.add_argument("--backend", action="append", choices=FUSED_BACKENDS,
                        help="check only this backend (repeatable; default: every backend that can run here)")
    parser.add_argument("--interpret", action="store_true",
                        help="run the triton backend through Triton's interpreter on the CPU (tiny shapes); "
                             "tests the command, validates no GPU")
    parser.add_argument("--dtype", action="append", choices=("fp32", "fp16", "bf16"),
                        help="check only this dtype (repeatable; default: every dtype the GPU has). A check that "
                             "leaves out a dtype the GPU has writes no record")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every result and verdict as JSON")
    parser.add_argument("--record-dir", type=Path, metavar="DIR",
                        help="write validation records here instead of the user cache "
                             "($XDG_CACHE_HOME/resnet_fast/validation_records)")
    parser.add_argument("--no-record", action="store_true", help="write no validation record")
    return parser.parse_args(argv)


@dataclass
class BackendResult:
    """What the check found for one backend."""

    name: str
    reasons: list[str] = field(default_factory=list)  # why it was not checked
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    record_path: str | None = None
    record: dict | None = None
    record_note: str | None = None

    @property
    def checked(self) -> bool:
        return not self.reasons

    @property
    def ran(self) -> list:
        return [r for r in self.rows if r.result != "skipped"]

    @property
    def failures(self) -> list:
        return [r for r in self.rows if r.result == "FAIL"]

    @property
    def passed(self) -> bool:
        return self.checked and bool(self.ran) and not self.failures

    def verdict(self) -> str:
        if not self.checked:
            return f"{self.name}: not checked ({'; '.join(self.reasons)})"
        dtypes = sorted({r.dtype for r in self.ran})
        if self.failures:
            return (f"{self.name}: FAILED {len(self.failures)} of {len(self.ran)} checks ({', '.join(dtypes)}) in "
                    f"{self.seconds:.0f} s; auto will not use it here")
        where = f"; record {self.record_path}" if self.record_path else (f"; {self.record_note}"
                                                                         if self.record_note else "")
        return f"{self.name}: passed all {len(self.ran)} checks ({', '.join(dtypes)}) in {self.seconds:.0f} s{where}"

    def to_json(self) -> dict:
        return {"checked": self.checked, "reasons": self.reasons, "passed": self.passed,
                "checks": len(self.ran), "failures": len(self.failures), "seconds": self.seconds,
                "verdict": self.verdict(), "record_path": self.record_path, "record": self.record,
                "record_note": self.record_note}


def _backend_reasons(name: str, device, interpreted: bool) -> list[str]:
    import torch

    from resnet_fast.ops.dispatch import BACKENDS

    if interpreted and name != "triton":
        return ["the interpreter runs only the triton backend"]
    backend = BACKENDS[name]
    return list(backend.availability()) + list(backend.device_check(torch.empty(0, device=device)))


def gpu_dtypes(identity) -> list:
    """The dtypes a GPU computes in: float32, float16, and bfloat16 from compute capability 8.0."""
    import torch

    return [torch.float32, torch.float16] + ([torch.bfloat16] if identity.capability >= (8, 0) else [])


def select_dtypes(identity, requested: list[str] | None) -> tuple[list, bool]:
    """(the dtypes to check, whether that leaves out one the GPU has) for ``--dtype``
    ``requested`` (None: all); ValueError naming a requested dtype the GPU lacks. No
    dtypes for the interpreter (``identity`` None): its short list fixes them."""
    if identity is None:
        return [], False
    from resnet_fast.check.cases import DTYPE_NAMES

    available = gpu_dtypes(identity)
    if not requested:
        return available, False
    unsupported = sorted(set(requested) - {DTYPE_NAMES[d] for d in available})
    if unsupported:
        raise ValueError(f"--dtype {', '.join(unsupported)}: {identity.describe()} does not compute in it")
    chosen = [d for d in available if DTYPE_NAMES[d] in requested]
    return chosen, len(chosen) < len(available)


def _work(interpreted: bool, dtypes: list) -> list[tuple]:
    """("case", case, seed) and ("model", dtype, fused_training) items in the order they run."""
    from resnet_fast.check import cases as case_lists

    if interpreted:
        cases = case_lists.interpreter_cases()
        dtypes = []
    else:
        cases = case_lists.gpu_cases(dtypes)
    items = [("case", case, index) for index, case in enumerate(cases)]
    for dtype in dtypes[:1] + dtypes[-1:]:
        items += [("model", dtype, False), ("model", dtype, True)]
    return items


def _print_table(console, results: list[BackendResult]) -> None:
    from rich.table import Table

    table = Table(title="resnet_fast self-check", show_lines=False)
    for column in ("operator", "backend", "dtype", "layout", "case", "max error", "tolerance", "result"):
        table.add_column(column, justify="right" if column in ("max error", "tolerance") else "left")
    for result in results:
        for row in result.ran:
            style = "red" if row.result == "FAIL" else None
            error = "-" if row.max_error is None else f"{row.max_error:.2e}"
            bound = "-" if row.tolerance is None else f"{row.tolerance:.2e}"
            outcome = row.result if row.result != "FAIL" else f"FAIL: {row.detail}"
            table.add_row(row.operator, row.backend, row.dtype, row.layout, row.case, error, bound, outcome,
                          style=style)
    console.print(table)
    skipped = [r for result in results for r in result.rows if r.result == "skipped"]
    if skipped:
        reasons = sorted({f"{r.backend}: {r.operator} ({r.detail})" for r in skipped})
        console.print(f"{len(skipped)} cases skipped where auto never runs them: " + "; ".join(reasons))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--interpret must be set before triton is imported: run `python -m resnet_fast.check --interpret` "
                  "in a fresh process", file=sys.stderr)
            return EXIT_FAILED
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton at import, before any kernel loads

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from resnet_fast import validation
    from resnet_fast.check.runner import SKIPPED, CaseRun, ModelStep, Row, skip_reason

    console = Console(width=None if sys.stdout.isatty() else 200)  # a log keeps whole rows
    if args.interpret:
        device, identity = torch.device("cpu"), None
    else:
        if not torch.cuda.is_available():
            console.print("No CUDA GPU is visible to torch, so there is nothing to check: the fused kernels run only "
                          "on NVIDIA GPUs, and without one resnet_fast runs plain PyTorch. "
                          "(`--interpret` runs the Triton kernels through the interpreter on the CPU: a test of this "
                          "command, which validates no GPU.)")
            return EXIT_NO_GPU
        device = torch.device(args.device or "cuda")
        if device.type != "cuda":
            console.print(f"--device must be cuda or cuda:N, got {args.device!r}")
            return EXIT_FAILED
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            console.print(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
            return EXIT_FAILED
        torch.cuda.set_device(device)
        identity = validation.device_identity(device)
    where = "the Triton interpreter on the CPU" if identity is None else f"{device}: {identity.describe()}"
    console.print(f"resnet_fast self-check on {where}")

    results = [BackendResult(name, _backend_reasons(name, device, args.interpret))
               for name in (args.backend or FUSED_BACKENDS)]
    active = [r for r in results if r.checked]
    try:
        dtypes, partial = select_dtypes(identity, args.dtype)
    except ValueError as error:
        console.print(str(error))
        return EXIT_FAILED
    items = _work(args.interpret, dtypes)
    model_step = ModelStep(device)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("checking", total=len(items) * len(active))
        for kind, what, extra in items:
            run = CaseRun(what, device, seed=extra) if kind == "case" else None
            for result in active:
                item_start = time.perf_counter()
                if kind == "case":
                    progress.update(task, description=f"{result.name}: {what.operator} {what.dtype_name}")
                    reason = skip_reason(what, result.name, device, args.interpret)
                    if reason is not None:
                        result.rows.append(Row(what.operator, result.name, what.dtype_name, what.layout, what.label,
                                               None, None, SKIPPED, reason))
                    else:
                        result.rows += run.rows(result.name)
                else:
                    progress.update(task, description=f"{result.name}: resnet18 training step")
                    result.rows += model_step.rows(result.name, what, extra)
                result.seconds += time.perf_counter() - item_start
                progress.advance(task)
    seconds = time.perf_counter() - start

    for result in results:
        if result.passed and partial:
            result.record_note = "no record: the check left out a dtype this GPU has"
        elif result.passed and not args.no_record:
            record = validation.new_record(result.name, identity, sorted({r.dtype for r in result.ran}),
                                           sorted({r.operator for r in result.ran}), len(result.ran))
            path = validation.write_record(record, args.record_dir)
            result.record_path = None if path is None else str(path)
            result.record = record.to_json()

    _print_table(console, results)
    for result in results:
        console.print(result.verdict(), style="green" if result.passed else ("red" if result.checked else None))
    if identity is None:
        console.print("An interpreter run validates no GPU: on a GPU, run `python -m resnet_fast.check`.")
    console.print(f"{sum(len(r.ran) for r in results)} checks in {seconds:.0f} s")

    if args.json is not None:
        report = {
            "device": str(device), "gpu": None if identity is None else identity.name,
            "capability": None if identity is None else list(identity.capability),
            "interpreted": args.interpret, "versions": validation.current_versions(), "seconds": seconds,
            "backends": {r.name: r.to_json() for r in results},
            "rows": [row.to_json() for r in results for row in r.rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = any(r.failures for r in results)
    nothing = not any(r.ran for r in results)
    return EXIT_FAILED if failed or nothing else EXIT_PASSED


if __name__ == "__main__":
    sys.exit(main())
