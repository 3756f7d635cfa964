"""Backend selection for the ``resnet_fast`` operators.

Every operator has up to three implementations ("backends"):

* ``torch``  — plain PyTorch (:mod:`resnet_fast.ops.reference`); runs anywhere and is the
  test oracle.
* ``triton`` — Triton kernels (:mod:`resnet_fast.kernels`).
* ``cuda``   — CUDA C++ kernels compiled into ``resnet_fast._C``.

Each backend answers :meth:`Backend.not_supported_reasons` for a given operator and
input; ``auto`` picks the first backend (in the order ``cuda``, ``triton``, ``torch``)
that has no reason to refuse, and an explicitly chosen backend that cannot take a call
raises :class:`BackendUnavailableError` listing its reasons. A backend whose kernels
have not yet passed the GPU test suite carries an ``auto_gate`` reason: ``auto`` skips it
(correctness first) and an explicit choice still selects it. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) is a testing tool: only an explicit ``triton`` choice sends CPU
tensors to it, never ``auto``.

The choice is process-wide: :func:`set_backend`, or the environment variable
``RESNET_FAST_BACKEND`` read at import time.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKEND_NAMES = ("cuda", "triton", "torch")
_CHOICES = ("auto", *BACKEND_NAMES)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run an operator on the given input."""


@dataclass
class Backend:
    """One implementation family of the operators.

    ``kernels`` maps an operator name (``"batch_norm_act"``, ...) to the function that
    implements it; an operator missing from the map is reported as not implemented.
    ``availability`` returns the reasons the backend cannot run at all on this machine
    (empty when it can); ``device_check`` the reasons it cannot take a given tensor
    because of its device; ``input_check``, when set (see :func:`register_input_check`),
    the reasons it cannot take it otherwise (its dtype, say).
    """

    name: str
    availability: Callable[[], list[str]]
    device_check: Callable[[torch.Tensor], list[str]]
    kernels: dict[str, Callable] = field(default_factory=dict)
    input_check: Callable[[torch.Tensor], list[str]] | None = None
    auto_gate: str | None = None

    def not_supported_reasons(
        self, op: str, example: torch.Tensor | None = None, explicit: bool = True
    ) -> list[str]:
        """Why this backend cannot run ``op`` on ``example`` (empty list: it can).

        ``explicit=False`` (the ``auto`` choice) also refuses CPU tensors in a GPU backend
        that could only run them through an interpreter.
        """
        reasons = list(self.availability())
        if op not in self.kernels:
            reasons.append(f"operator '{op}' is not implemented in the {self.name} backend")
        if example is not None:
            reasons.extend(self.device_check(example))
            if self.input_check is not None:
                reasons.extend(self.input_check(example))
            if not explicit and self.name != "torch" and not example.is_cuda:
                reasons.append("auto sends only CUDA tensors to GPU backends")
        if not explicit and self.auto_gate is not None:
            reasons.append(self.auto_gate)
        return reasons


def _cuda_extension_reasons() -> list[str]:
    from resnet_fast._extension import extension_load_error

    error = extension_load_error()
    return [] if error is None else [error]


def _needs_cuda_tensor(x: torch.Tensor) -> list[str]:
    return [] if x.is_cuda else [f"input is on {x.device.type}, not on a CUDA device"]


def _triton_reasons() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    return []


def _triton_device_check(x: torch.Tensor) -> list[str]:
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"input is on {x.device.type}; Triton needs a CUDA device (or TRITON_INTERPRET=1)"]


# Lifted for a backend once scripts/gpu_check.sh has passed on a GPU with its kernels.
_NOT_YET_VALIDATED = (
    "auto skips the {} backend until its kernels have passed the GPU tests "
    "(scripts/gpu_check.sh); select it explicitly with set_backend('{}')"
)

BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", _cuda_extension_reasons, _needs_cuda_tensor,
                    auto_gate=_NOT_YET_VALIDATED.format("cuda", "cuda")),
    "triton": Backend("triton", _triton_reasons, _triton_device_check,
                      auto_gate=_NOT_YET_VALIDATED.format("triton", "triton")),
    "torch": Backend("torch", lambda: [], lambda x: []),
}

_state = {"choice": "auto"}


def _validate_choice(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown resnet_fast backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every ``resnet_fast`` operator in this process.

    Args:
        name: ``"auto"`` (the fastest backend that can take each call), ``"cuda"``,
            ``"triton"`` or ``"torch"``. An explicit backend that cannot take a call
            raises :class:`BackendUnavailableError` at that call, with the reasons.
    """
    _state["choice"] = _validate_choice(name)


def get_backend() -> str:
    """The current backend choice (``"auto"`` or a backend name)."""
    return _state["choice"]


def register_kernel(backend: str, op: str) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the implementation of ``op`` in ``backend``."""

    def decorate(fn: Callable) -> Callable:
        BACKENDS[backend].kernels[op] = fn
        return fn

    return decorate


def register_input_check(backend: str, check: Callable[[torch.Tensor], list[str]]) -> None:
    """Make ``check(example)`` (the reasons ``backend`` cannot take that input, such as an
    unsupported dtype) part of the backend's :meth:`Backend.not_supported_reasons`."""
    BACKENDS[backend].input_check = check


def select_kernel(op: str, example: torch.Tensor) -> Callable:
    """The implementation of ``op`` that the current choice gives for ``example``."""
    choice = _state["choice"]
    if choice != "auto":
        reasons = BACKENDS[choice].not_supported_reasons(op, example)
        if reasons:
            raise BackendUnavailableError(
                f"resnet_fast backend '{choice}' cannot run {op}: " + "; ".join(reasons)
            )
        return BACKENDS[choice].kernels[op]
    for name in BACKEND_NAMES:
        if not BACKENDS[name].not_supported_reasons(op, example, explicit=False):
            return BACKENDS[name].kernels[op]
    raise BackendUnavailableError(f"no resnet_fast backend implements {op}")  # torch always does


def backend_info() -> dict[str, dict]:
    """What each backend can do on this machine, and why not.

    Returns a dict keyed by backend name, each with ``available`` (the backend can run
    here at all), ``reasons`` (why not), ``operators`` (the operators it implements),
    ``auto`` (whether ``auto`` may choose it, and if not ``auto_gate`` says why),
    plus ``"selected"`` (the current choice) and ``"cuda_device"`` (the GPU, or None).
    """
    info: dict[str, dict] = {}
    for name in BACKEND_NAMES:
        backend = BACKENDS[name]
        reasons = list(backend.availability())
        interpreted = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
        if name != "torch" and not torch.cuda.is_available() and not interpreted:
            reasons.append("no CUDA device is visible to torch")
        info[name] = {
            "available": not reasons,
            "reasons": reasons,
            "operators": sorted(backend.kernels),
            "auto": backend.auto_gate is None,
            "auto_gate": backend.auto_gate,
        }
    info["selected"] = {"choice": _state["choice"]}
    info["cuda_device"] = {
        "name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "capability": torch.cuda.get_device_capability() if torch.cuda.is_available() else None,
    }
    return info


_state["choice"] = _validate_choice(os.environ.get("RESNET_FAST_BACKEND", "auto"))
