"""Validation records: ``auto`` uses a fused backend on a GPU only where it has been proved.

A record says that ``python -m resnet_fast.check`` passed for one backend's kernels on one
kind of GPU. It holds the backend, the fingerprint of exactly the code that ran (the
backend's kernel sources and code-generation flags), the GPU's name and compute
capability, the torch / Triton / CUDA versions, the dtypes and operators covered and the
date. Records live in two places:

* inside the package, ``resnet_fast/validation_records/*.json``: the project's own GPU
  runs (committed only for the code that actually ran);
* in the user's cache, ``$XDG_CACHE_HOME/resnet_fast/validation_records`` (default
  ``~/.cache/resnet_fast/...``): written by the user's own check.

A record enables a backend on a device (:func:`auto_reason` returns None) when all of
these hold: same backend; the same kernel fingerprint (any kernel change needs a new
check); the same compute capability; the same Triton version exactly, the same torch
major.minor and the same CUDA major.minor; for the ``cuda`` backend, the device's
architecture among those the extension was compiled for (``build_info()``). A record from
the Triton interpreter on CPU never validates a GPU.

Without a record for any fused backend on a GPU, the first CUDA tensor that meets ``auto``
there raises one :class:`UnvalidatedGPUWarning` per process naming the GPU and the command
that would enable the kernels. A corrupt record or an unreadable / unwritable cache gives a
:class:`RecordWarning`, never an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from resnet_fast import _build, _extension

RECORD_FORMAT = 1
FUSED_BACKENDS = ("cuda", "triton")
CHECK_COMMAND = "python -m resnet_fast.check"
RECORDS_SUBDIRECTORY = "validation_records"

_PACKAGE = Path(__file__).resolve().parent
PACKAGED_RECORDS = _PACKAGE / RECORDS_SUBDIRECTORY
"""The project's own records, committed with the code they validate."""

# The Python sources each fused backend's kernels consist of (relative to the package),
# beside its compiled code: the triton backend is all Python; the cuda backend's Python
# files choose which CUDA kernel (or cuDNN call) runs.
_TRITON_SOURCES = ("kernels/*.py",)
_CUDA_PYTHON_SOURCES = ("ops/batch_norm_act_stages.py", "ops/conv2d_cuda.py", "ops/conv2d_tensor_core.py")
# Environment variables that change the code Triton generates for our kernels.
_TRITON_CODEGEN_VARIABLES = ("TRITON_F32_DEFAULT",)


class RecordWarning(UserWarning):
    """A validation record could not be read or written (the message says which and why)."""


class UnvalidatedGPUWarning(UserWarning):
    """``auto`` met a GPU on which no fused backend has a validation record."""


@dataclass(frozen=True)
class DeviceIdentity:
    """What a record is matched on: the GPU's name and compute capability."""

    name: str
    capability: tuple[int, int]

    @property
    def architecture(self) -> str:
        """``"major.minor"``, as ``build_info()["architectures"]`` lists them."""
        return "%d.%d" % self.capability

    def describe(self) -> str:
        return f"{self.name} (compute capability {self.architecture})"


def device_identity(device: torch.device) -> DeviceIdentity:
    """The name and compute capability of a CUDA ``device``."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DeviceIdentity(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def triton_version() -> str | None:
    """The installed Triton's version (from its package metadata, without importing it),
    None without Triton."""
    import importlib.metadata

    for distribution in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def current_versions() -> dict[str, str | None]:
    """The versions a record is matched on: torch, triton, CUDA (torch's build)."""
    return {"torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda}


def _major_minor(version: str | None) -> str | None:
    if version is None:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return match.group(0) if match else version


def _hash_files(digest, root: Path, patterns: tuple[str, ...]) -> int:
    """Feed every file under ``root`` matching ``patterns`` (name and bytes) to ``digest``."""
    files = sorted({path for pattern in patterns for path in root.glob(pattern) if path.is_file()})
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return len(files)


def _cuda_compiled_identity() -> tuple[str, list[str]] | None:
    """(fingerprint of the compiled sources, build flags): from the extension's own
    ``build_info()`` (so an installed wheel knows what it carries), else by hashing
    ``csrc/`` of a source checkout."""
    info = _extension.build_info()
    if info is not None and info.get("source_fingerprint"):
        return info["source_fingerprint"], list(info.get("build_flags", []))
    csrc = _PACKAGE.parent / "csrc"
    return (_build.source_fingerprint(csrc), []) if csrc.is_dir() else None


@functools.lru_cache(maxsize=None)
def backend_fingerprint(backend: str) -> str | None:
    """sha256 of ``backend``'s kernel sources and code-generation flags (None: unknown,
    e.g. the cuda backend without its extension)."""
    digest = hashlib.sha256(f"{backend}\0".encode())
    if backend == "triton":
        _hash_files(digest, _PACKAGE, _TRITON_SOURCES)
        flags = {name: os.environ.get(name) for name in _TRITON_CODEGEN_VARIABLES}
    elif backend == "cuda":
        compiled = _cuda_compiled_identity()
        if compiled is None:
            return None
        fingerprint, build_flags = compiled
        digest.update(fingerprint.encode() + b"\0")
        _hash_files(digest, _PACKAGE, _CUDA_PYTHON_SOURCES)
        flags = {"build_flags": build_flags}
    else:
        raise ValueError(f"validation records cover the fused backends {FUSED_BACKENDS}, not {backend!r}")
    digest.update(json.dumps(flags, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class ValidationRecord:
    """One passing ``python -m resnet_fast.check`` of one backend on one GPU (or the interpreter).

    ``capability`` is None and ``interpreted`` True for a Triton-interpreter run on CPU.
    ``source`` is where the record was read from (not stored in the file).
    """

    backend: str
    fingerprint: str
    gpu_name: str
    capability: tuple[int, int] | None
    torch: str
    triton: str | None
    cuda: str | None
    dtypes: list[str]
    operators: list[str]
    cases: int
    date: str
    interpreted: bool = False
    format: int = RECORD_FORMAT
    source: str | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        data["capability"] = None if self.capability is None else list(self.capability)
        return data

    @classmethod
    def from_json(cls, data: dict, source: str | None = None) -> ValidationRecord:
        """Parse a record; ValueError (naming the field) when it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this resnet_fast reads format {RECORD_FORMAT}")
        strings = ("backend", "fingerprint", "gpu_name", "torch", "date")
        for name in strings:
            if not isinstance(data.get(name), str):
                raise ValueError(f"field {name!r} is missing or not a string")
        capability = data.get("capability")
        if capability is not None:
            if not (isinstance(capability, list) and len(capability) == 2
                    and all(isinstance(v, int) for v in capability)):
                raise ValueError(f"field 'capability' must be [major, minor], got {capability!r}")
            capability = tuple(capability)
        for name in ("dtypes", "operators"):
            if not isinstance(data.get(name), list):
                raise ValueError(f"field {name!r} is missing or not a list")
        return cls(
            backend=data["backend"], fingerprint=data["fingerprint"], gpu_name=data["gpu_name"],
            capability=capability, torch=data["torch"], triton=data.get("triton"), cuda=data.get("cuda"),
            dtypes=list(data["dtypes"]), operators=list(data["operators"]), cases=int(data.get("cases", 0)),
            date=data["date"], interpreted=bool(data.get("interpreted", False)), source=source,
        )

    def file_name(self) -> str:
        """One record per backend and kind of GPU: a new check replaces the old one."""
        if self.capability is None:
            return f"{self.backend}-interpreter.json"
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower() or "gpu"
        return f"{self.backend}-sm%d%d-{gpu}.json" % self.capability

    def mismatch(self, backend: str, identity: DeviceIdentity, fingerprint: str | None,
                 versions: dict[str, str | None]) -> str | None:
        """Why this record does not enable ``backend`` on a GPU of ``identity`` (None: it does)."""
        name = Path(self.source).name if self.source else "record"
        if self.backend != backend:
            return f"{name} is for the {self.backend} backend"
        if self.interpreted or self.capability is None:
            return f"{name} comes from the Triton interpreter on CPU, which validates no GPU"
        if tuple(self.capability) != identity.capability:
            return (f"{name} is for compute capability %d.%d ({self.gpu_name}), this GPU has "
                    f"{identity.architecture}" % tuple(self.capability))
        if fingerprint is None:
            return f"the {backend} backend's kernel fingerprint is unknown here"
        if self.fingerprint != fingerprint:
            return (f"{name} validated other {backend} kernel sources (fingerprint {self.fingerprint[:12]}, "
                    f"these are {fingerprint[:12]}): the kernels changed since the check")
        if backend == "triton" and self.triton != versions["triton"]:
            return f"{name} was made with Triton {self.triton}, this is Triton {versions['triton']}"
        if _major_minor(self.torch) != _major_minor(versions["torch"]):
            return f"{name} was made with torch {self.torch}, this is torch {versions['torch']}"
        if _major_minor(self.cuda) != _major_minor(versions["cuda"]):
            return f"{name} was made with CUDA {self.cuda}, this torch uses CUDA {versions['cuda']}"
        return None


def user_records_directory() -> Path:
    """``$XDG_CACHE_HOME/resnet_fast/validation_records`` (default ``~/.cache/...``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "resnet_fast" / RECORDS_SUBDIRECTORY


def record_directories() -> list[Path]:
    """Where records are read from: the package's own, then the user's cache."""
    return [PACKAGED_RECORDS, user_records_directory()]


def load_records() -> list[ValidationRecord]:
    """Every readable record; a corrupt file or an unreadable directory warns and is skipped."""
    records = []
    for directory in record_directories():
        try:
            paths = sorted(directory.glob("*.json")) if directory.is_dir() else []
        except OSError as error:
            warnings.warn(f"resnet_fast: cannot list validation records in {directory}: {error}", RecordWarning,
                          stacklevel=2)
            continue
        for path in paths:
            try:
                records.append(ValidationRecord.from_json(json.loads(path.read_text()), source=str(path)))
            except (OSError, ValueError, TypeError) as error:
                warnings.warn(f"resnet_fast: ignoring the validation record {path}: {error}", RecordWarning,
                              stacklevel=2)
    return records


def write_record(record: ValidationRecord, directory: Path | None = None) -> Path | None:
    """Write ``record`` (default: into the user's cache); warn and return None when that fails."""
    directory = user_records_directory() if directory is None else Path(directory)
    path = directory / record.file_name()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
        temporary.replace(path)
    except OSError as error:
        warnings.warn(f"resnet_fast: cannot write the validation record {path}: {error}", RecordWarning, stacklevel=2)
        return None
    clear_cache()
    record.source = str(path)
    return path


def new_record(backend: str, identity: DeviceIdentity | None, dtypes: list[str], operators: list[str],
               cases: int) -> ValidationRecord:
    """A record of a passing check of ``backend`` on ``identity`` (None: the Triton interpreter on CPU)."""
    versions = current_versions()
    return ValidationRecord(
        backend=backend, fingerprint=backend_fingerprint(backend) or "unknown",
        gpu_name="Triton interpreter (CPU)" if identity is None else identity.name,
        capability=None if identity is None else identity.capability,
        torch=versions["torch"], triton=versions["triton"], cuda=versions["cuda"],
        dtypes=sorted(dtypes), operators=sorted(operators), cases=cases,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), interpreted=identity is None,
    )


# ----------------------------------------------------------------------------- lookup

@functools.lru_cache(maxsize=1)
def _records() -> tuple[ValidationRecord, ...]:
    return tuple(load_records())


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _architecture_reason(backend: str, identity: DeviceIdentity) -> str | None:
    """Why the cuda extension cannot be trusted on this GPU's architecture (None: it was built for it)."""
    if backend != "cuda":
        return None
    info = _extension.build_info()
    if info is None:
        return ("the CUDA extension does not report the architectures it was built for "
                "(resnet_fast._C.build_info() is unavailable)")
    built = [arch.split("+")[0] for arch in info.get("architectures", [])]
    if identity.architecture not in built:
        return (f"the CUDA extension was built for compute capabilities {', '.join(built) or 'none'}, "
                f"not {identity.architecture}")
    return None


@functools.lru_cache(maxsize=None)
def _lookup(backend: str, device: torch.device) -> tuple[ValidationRecord | None, str | None]:
    """(the record that enables ``backend`` on ``device``, None) or (None, why none does)."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"validation records cover the fused backends {FUSED_BACKENDS}, not {backend!r}")
    if device.type != "cuda":
        return None, "validation records enable fused backends on CUDA devices only"
    identity = device_identity(device)
    architecture = _architecture_reason(backend, identity)
    if architecture is not None:
        return None, architecture
    fingerprint, versions = backend_fingerprint(backend), current_versions()
    candidates = [r for r in _records() if r.backend == backend]
    mismatches = []
    for record in candidates:
        why = record.mismatch(backend, identity, fingerprint, versions)
        if why is None:
            return record, None
        mismatches.append((record.capability == identity.capability, why))
    if not candidates:
        return None, (f"no validation record for the {backend} backend on {identity.describe()}; "
                      f"`{CHECK_COMMAND}` (about a minute) makes one")
    mismatches.sort(key=lambda item: not item[0])  # a record for this very GPU explains best
    return None, f"no matching validation record for the {backend} backend: {mismatches[0][1]}"


_warned_unvalidated: set[str] = set()


def unvalidated_warning_text(identity: DeviceIdentity, device: torch.device) -> str:
    """The once-per-process warning for a GPU on which no fused backend is validated."""
    return (f"resnet_fast: no validation record enables the fused kernels on {device} ({identity.describe()}), "
            f"so set_backend('auto') runs plain PyTorch there. Run `{CHECK_COMMAND}` (about a minute) to test the "
            f"kernels on this GPU and enable them; set_backend('cuda') or set_backend('triton') forces a backend "
            f"without a record.")


def _warn_if_nothing_validated(device: torch.device) -> None:
    if _warned_unvalidated or any(_lookup(name, device)[0] is not None for name in FUSED_BACKENDS):
        return
    _warned_unvalidated.add(str(device))
    warnings.warn(unvalidated_warning_text(device_identity(device), device), UnvalidatedGPUWarning, stacklevel=4)


def auto_reason(backend: str, device: torch.device) -> str | None:
    """None when a validation record lets ``auto`` use ``backend`` on ``device``, else why not.

    Cached per backend and device. On a CUDA device where no fused backend has a record,
    the first call warns (:class:`UnvalidatedGPUWarning`, once per process).
    """
    device = _device_key(device)
    record, reason = _lookup(backend, device)
    if record is None and device.type == "cuda":
        _warn_if_nothing_validated(device)
    return reason


def enabling_record(backend: str, device: torch.device) -> ValidationRecord | None:
    """The record that enables ``backend`` on ``device``, or None."""
    return _lookup(backend, _device_key(device))[0]


def describe(backend: str, device: torch.device) -> dict[str, str | None]:
    """For ``backend_info()``: ``{"record": path of the enabling record or None, "reason": why none}``."""
    record, reason = _lookup(backend, _device_key(device))
    return {"record": None if record is None else record.source, "reason": reason}


def clear_cache() -> None:
    """Forget the loaded records and decisions (after writing a record, or in tests)."""
    _records.cache_clear()
    _lookup.cache_clear()
    backend_fingerprint.cache_clear()
    from resnet_fast.ops.dispatch import clear_dispatch_cache  # decisions made from the old records

    clear_dispatch_cache()
