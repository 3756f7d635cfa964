"""``python -m resnet_fast.info``: what this installation can run, and why not.

Prints, as readable tables: whether the CUDA extension ``resnet_fast._C`` is built (and,
when not, why — the load error and what the build needs), the architectures, CUDA and
torch versions it was built for; each backend's availability with its reasons and whether
``auto`` may choose it; the GPU and the versions of the pieces that matter.

    python -m resnet_fast.info           # the tables
    python -m resnet_fast.info --short   # three lines (scripts/setup.sh prints these)
    python -m resnet_fast.info --json    # everything, machine-readable
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import resnet_fast
from resnet_fast import _build, _extension

_PACKAGES = ("torch", "torchvision", "triton", "timm", "numpy")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def why_extension_is_missing() -> list[str]:
    """What stands between this environment and a built ``resnet_fast._C`` (the checks
    setup.py makes), most likely first; empty when nothing obvious does."""
    causes = []
    if os.environ.get("RESNET_FAST_BUILD_CUDA") == "0":
        causes.append("RESNET_FAST_BUILD_CUDA=0 is set, which skips the build")
    if torch.version.cuda is None:
        causes.append(f"torch {torch.__version__} is not a CUDA build")
    if _build.find_nvcc(os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) is None:
        causes.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if not causes:
        causes.append("the toolchain looks present: rebuild with "
                      "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)")
    return causes


def gather() -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    load_error = _extension.extension_load_error()
    built = _extension.build_info()
    gpu: dict[str, Any] | None = None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        arch = "%d.%d" % capability
        gpu = {"name": torch.cuda.get_device_name(index), "capability": arch,
               "count": torch.cuda.device_count(),
               "in_extension": None if built is None else arch in built.get("architectures", [])}
    backends = resnet_fast.backend_info()
    return {
        "resnet_fast": resnet_fast.__version__,
        "extension": {
            "loaded": load_error is None,
            "error": load_error,
            "causes": [] if load_error is None else why_extension_is_missing(),
            "build_info": built,
        },
        "backends": {name: backends[name] for name in ("cuda", "triton", "torch")},
        "selected": backends["selected"]["choice"],
        "gpu": gpu,
        "versions": {"python": platform.python_version(), "torch_cuda": torch.version.cuda,
                     **{package: _version(package) for package in _PACKAGES}},
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _extension_line(data: dict[str, Any]) -> str:
    ext = data["extension"]
    if not ext["loaded"]:
        return "CUDA extension: not built (" + "; ".join(ext["causes"]) + ")"
    built = ext["build_info"]
    if built is None:
        return "CUDA extension: built (this build does not report its architectures)"
    return (f"CUDA extension: built for sm {', '.join(built.get('architectures', []))} "
            f"with CUDA {built.get('cuda_version')}")


def _gpu_line(data: dict[str, Any]) -> str:
    gpu = data["gpu"]
    if gpu is None:
        return "GPU: none visible to torch"
    text = f"GPU: {gpu['name']} (sm {gpu['capability']}, {gpu['count']} device(s))"
    if gpu["in_extension"] is False:
        text += " - not among the extension's architectures: rebuild for it"
    return text


def short_lines(data: dict[str, Any]) -> list[str]:
    """The three-line summary: extension, GPU, backends (each with its first reason)."""
    backends = []
    for name, entry in data["backends"].items():
        if entry["available"]:
            backends.append(f"{name} yes" + ("" if entry["auto"] or name == "torch" else " (explicit only)"))
        else:
            backends.append(f"{name} no ({entry['reasons'][0]})")
    return [_extension_line(data), _gpu_line(data), "backends: " + ", ".join(backends)
            + f"; selected: {data['selected']}"]


def auto_text(entry: dict[str, Any]) -> str:
    """Whether ``auto`` may choose a backend here, and on what grounds: the validation record
    that enables it on each GPU, or why none does (``backend_info()``'s ``validation``)."""
    per_device = entry.get("validation") or {}
    if entry["auto"]:
        records = [f"{device}: {v['record']}" for device, v in per_device.items() if v.get("record")]
        return "yes" + (f" ({'; '.join(records)})" if records else "")
    if not per_device:
        return "no: only with a CUDA device and a validation record for it (python -m resnet_fast.check)"
    return "no: " + "; ".join(f"{device}: {v.get('reason')}" for device, v in per_device.items())


def _tables(data: dict[str, Any]) -> list[Table]:
    ext = data["extension"]
    extension = Table(title="CUDA extension resnet_fast._C", show_header=False, title_justify="left")
    extension.add_column(style="bold")
    extension.add_column(overflow="fold")
    extension.add_row("built", "yes" if ext["loaded"] else "no")
    if not ext["loaded"]:
        extension.add_row("load error", ext["error"])
        for cause in ext["causes"]:
            extension.add_row("why", cause)
    elif ext["build_info"] is None:
        extension.add_row("build info", "not reported by this build (older extension)")
    else:
        built = ext["build_info"]
        extension.add_row("architectures", ", ".join(built.get("architectures", [])))
        extension.add_row("CUDA", str(built.get("cuda_version")))
        extension.add_row("torch (built against)", str(built.get("torch_version")))
        extension.add_row("source fingerprint", str(built.get("source_fingerprint", ""))[:16])
        extension.add_row("build flags", " ".join(built.get("build_flags", [])))

    backends = Table(title="Backends", title_justify="left")
    for column in ("backend", "available", "auto may choose it", "reasons"):
        backends.add_column(column, overflow="fold")
    for name, entry in data["backends"].items():
        auto = auto_text(entry)
        reasons = "\n".join(entry["reasons"]) or "-"
        backends.add_row(name + (" (selected)" if data["selected"] == name else ""),
                         "[green]yes[/]" if entry["available"] else "[red]no[/]", auto, reasons)

    machine = Table(title="Machine and versions", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column(overflow="fold")
    machine.add_row("GPU", _gpu_line(data).removeprefix("GPU: "))
    machine.add_row("resnet_fast", data["resnet_fast"])
    versions = data["versions"]
    machine.add_row("python", versions["python"])
    for package in _PACKAGES:
        text = versions[package] or "not installed"
        if package == "torch":
            text += f" (CUDA {versions['torch_cuda']})" if versions["torch_cuda"] else " (CPU build)"
        machine.add_row(package, text)
    machine.add_row("TRITON_INTERPRET", "1 (Triton runs CPU tensors in its interpreter)"
                    if data["triton_interpret"] else "not set")
    return [extension, backends, machine]


def main(argv: list[str] | None = None) -> int:
    """Print the report; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m resnet_fast.info", description=__doc__.splitlines()[0])
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--short", action="store_true", help="three lines: extension, GPU, backends")
    form.add_argument("--json", action="store_true", help="everything as JSON")
    args = parser.parse_args(argv)
    data = gather()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    elif args.short:
        print("\n".join(short_lines(data)))
    else:
        console = Console()
        for table in _tables(data):
            console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
