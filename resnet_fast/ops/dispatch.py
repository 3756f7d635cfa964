"""Backend selection for the ``resnet_fast`` operators.

Every operator has up to three implementations ("backends"):

* ``torch``  — plain PyTorch (:mod:`resnet_fast.ops.reference`); runs anywhere and is the
  test oracle.
* ``triton`` — Triton kernels (:mod:`resnet_fast.kernels`).
* ``cuda``   — CUDA C++ kernels compiled into ``resnet_fast._C``.

Each backend answers :meth:`Backend.not_supported_reasons` for a given operator and
input; ``auto`` picks the first backend (in the order ``cuda``, ``triton``, ``torch``)
that has no reason to refuse, and an explicitly chosen backend that cannot take a call
raises :class:`BackendUnavailableError` listing its reasons. ``auto`` takes a GPU backend
on a device only where a validation record proves its kernels there
(:func:`resnet_fast.validation.auto_reason`, from ``python -m resnet_fast.check``); an
explicit choice still selects it. Triton's CPU interpreter
(``TRITON_INTERPRET=1``) is a testing tool: only an explicit ``triton`` choice sends CPU
tensors to it, never ``auto``.

Compute capability: a kernel registration may declare the capability it needs to be fast
(:class:`CapabilityRequirement`, e.g. :data:`TENSOR_CORE_DOT` for Triton kernels built on
``tl.dot``, which Triton runs on tensor cores only from sm_80 and falls back to FMA below).
The capability comes from the input tensor's device (:func:`device_capability`, cached per
device). On a device below the requirement ``auto`` skips that backend for that operator
and takes the next (``cuda`` first, then ``torch``); an explicit choice still runs it,
since the result is correct, and warns once per operator and device with the reason
(:class:`CapabilityWarning`). :func:`backend_info` lists the requirements and which of
them the current GPU misses.

The choice is process-wide: :func:`set_backend`, or the environment variable
``RESNET_FAST_BACKEND`` read at import time. Choosing a backend this machine cannot run
at all warns right away (:class:`BackendUnavailableWarning`); an unknown value of the
variable warns, naming it, and leaves ``auto``.

Native path: where ``auto`` chooses no fused backend for a tensor (every CPU tensor; a CUDA
tensor whose device no validation allows a fused backend on), the modules of
:mod:`resnet_fast.nn` run exactly the aten operators torchvision's eager modules run, not
the ``torch`` backend's float32 re-composition (:func:`runs_native`). The one place that
says whether ``auto`` may use a fused backend on a device is :func:`auto_refusal`.

Decisions are cached: :func:`select_kernel` once per (choice, operator, device, dtype,
compute capability) and :func:`runs_native` once per (choice, device, dtype), until a
registration changes (``register_kernel``, ``register_input_check``, an attribute or table
of a :class:`Backend` being replaced or edited) or the validation records do
(:func:`resnet_fast.validation.clear_cache`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from resnet_fast import validation


def constant_under_compile(fn: Callable) -> Callable:
    """Mark ``fn`` so that torch.compile calls it at trace time and keeps its result as a
    constant (what ``torch.compiler.assume_constant_result`` does), without importing
    ``torch._dynamo`` here: that import takes about a second and imports triton, which
    must not happen in ``import resnet_fast`` (``TRITON_INTERPRET`` is read when triton is
    first imported). ``tests/test_import.py`` checks the mark equals torch's."""
    fn._dynamo_marked_constant = True
    return fn


BACKEND_NAMES = ("cuda", "triton", "torch")
_CHOICES = ("auto", *BACKEND_NAMES)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run an operator on the given input."""


class BackendUnavailableWarning(UserWarning):
    """:func:`set_backend` (or ``RESNET_FAST_BACKEND``) chose a backend this machine cannot run."""


class CapabilityWarning(UserWarning):
    """An explicitly chosen backend runs a kernel on a GPU below the capability it needs to be fast."""


@dataclass(frozen=True)
class CapabilityRequirement:
    """The compute capability a kernel needs to run as designed, and why.

    ``min_capability`` is (major, minor); ``why`` completes "needs compute capability
    X.Y or newer: ...".
    """

    min_capability: tuple[int, int]
    why: str

    def reason(self, backend: str, op: str, device: torch.device, capability: tuple[int, int]) -> str | None:
        """Why ``op`` in ``backend`` should not run on ``device`` (None: it may)."""
        if tuple(capability) >= tuple(self.min_capability):
            return None
        need = "%d.%d" % tuple(self.min_capability)
        have = "%d.%d" % tuple(capability)
        return (f"operator '{op}' in the {backend} backend needs compute capability {need} or newer "
                f"({self.why}); {device} has {have}")


TENSOR_CORE_DOT = CapabilityRequirement(
    (8, 0),
    "uses tl.dot, which Triton runs on tensor cores only from sm_80; below, it falls back to FMA, "
    "several times slower",
)
"""The requirement of a Triton kernel built on ``tl.dot`` (a convolution or matrix product)."""


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA ``device``, looked up once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


_SELECTION_CACHE: dict[tuple, tuple[Callable, str | None, str]] = {}
_NATIVE_CACHE: dict[tuple[str, torch.device, torch.dtype], bool] = {}


def clear_dispatch_cache() -> None:
    """Forget every cached dispatch decision (done automatically when the choice or a
    registration changes)."""
    _SELECTION_CACHE.clear()
    _NATIVE_CACHE.clear()


class _Table(dict):
    """A dict whose every change clears the dispatch caches (a backend's kernels,
    requirements and implementations)."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        clear_dispatch_cache()

    def __delitem__(self, key):
        super().__delitem__(key)
        clear_dispatch_cache()

    def pop(self, *args):
        clear_dispatch_cache()
        return super().pop(*args)

    def popitem(self):
        clear_dispatch_cache()
        return super().popitem()

    def clear(self):
        super().clear()
        clear_dispatch_cache()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        clear_dispatch_cache()

    def setdefault(self, key, default=None):
        clear_dispatch_cache()
        return super().setdefault(key, default)


@dataclass
class Backend:
    """One implementation family of the operators.

    ``kernels`` maps an operator name (``"batch_norm_act"``, ...) to the function that
    implements it; an operator missing from the map is reported as not implemented.
    ``availability`` returns the reasons the backend cannot run at all on this machine
    (empty when it can); ``device_check`` the reasons it cannot take a given tensor
    because of its device; ``input_check``, when set (see :func:`register_input_check`),
    the reasons it cannot take it otherwise (its dtype, say). ``implementations`` maps an
    operator whose kernel picks among implementations by GPU to a function of the compute
    capability (None: no GPU) that says which runs there (:func:`backend_info` reports it).

    The checks see an input's device and dtype only (``example.device``, ``.dtype``,
    ``.is_cuda``): decisions are cached on exactly those.
    """

    name: str
    availability: Callable[[], list[str]]
    device_check: Callable[[torch.Tensor], list[str]]
    kernels: dict[str, Callable] = field(default_factory=dict)
    input_check: Callable[[torch.Tensor], list[str]] | None = None
    requirements: dict[str, CapabilityRequirement] = field(default_factory=dict)
    implementations: dict[str, Callable[[tuple[int, int] | None], str]] = field(default_factory=dict)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, dict) and not isinstance(value, _Table):
            value = _Table(value)
        object.__setattr__(self, name, value)
        clear_dispatch_cache()

    def capability_reason(self, op: str, example: torch.Tensor) -> str | None:
        """Why ``op``'s kernel should not run on ``example``'s GPU (None: it may, or no GPU)."""
        requirement = self.requirements.get(op)
        if requirement is None or not example.is_cuda:
            return None
        return requirement.reason(self.name, op, example.device, device_capability(example.device))

    def not_supported_reasons(
        self, op: str, example: torch.Tensor | None = None, explicit: bool = True
    ) -> list[str]:
        """Why this backend cannot run ``op`` on ``example`` (empty list: it can).

        ``explicit=False`` (the ``auto`` choice) also refuses CPU tensors in a GPU backend
        that could only run them through an interpreter, a GPU backend without a validation
        record for the device (:func:`resnet_fast.validation.auto_reason`), and a kernel on a
        GPU below its declared capability (an explicit choice runs that one, see
        :func:`select_kernel`).
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
            capability = self.capability_reason(op, example)
            if not explicit and capability is not None:
                reasons.append(capability)
        if not explicit and not reasons and self.name != "torch" and example is not None and example.is_cuda:
            refusal = auto_refusal(self, example.device)
            if refusal is not None:
                reasons.append(refusal)
        return reasons


def auto_refusal(backend: Backend, device: torch.device) -> str | None:
    """Why ``auto`` may not use the fused ``backend`` on the CUDA ``device`` (None: a
    validation record lets it): the one place dispatch asks
    :func:`resnet_fast.validation.auto_reason`."""
    return validation.auto_reason(backend.name, device)


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


BACKENDS: dict[str, Backend] = {
    "cuda": Backend("cuda", _cuda_extension_reasons, _needs_cuda_tensor),
    "triton": Backend("triton", _triton_reasons, _triton_device_check),
    "torch": Backend("torch", lambda: [], lambda x: []),
}

_state = {"choice": "auto"}


def _validate_choice(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown resnet_fast backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name


def machine_reasons(name: str, device: torch.device | str | None = None) -> list[str]:
    """Why backend ``name`` cannot run anything on this machine (or on ``device``, when
    given); empty when it can. ``triton`` runs CPU tensors only under ``TRITON_INTERPRET=1``
    (Triton's interpreter, a testing tool)."""
    return list(BACKENDS[name].availability()) + _device_reasons(name, device)


def _device_reasons(name: str, device: torch.device | str | None) -> list[str]:
    """The part of :func:`machine_reasons` about devices (no extension import: safe while
    ``resnet_fast`` is still being imported)."""
    reasons: list[str] = []
    if name == "torch":
        return reasons
    device_type = None if device is None else torch.device(device).type
    interpreted = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if device_type == "cpu" and not interpreted:
        reasons.append("it needs a CUDA device" + (" (or TRITON_INTERPRET=1)" if name == "triton" else "")
                       + " and the device is cpu")
    elif device_type != "cpu" and not interpreted and not torch.cuda.is_available():
        reasons.append("no CUDA device is visible to torch")
    return reasons


def _warn_if_unavailable(name: str, source: str, reasons_of: Callable[[str], list[str]] | None = None) -> None:
    reasons = (reasons_of or machine_reasons)(name) if name in BACKENDS else []
    if reasons:
        warnings.warn(f"{source} chose the resnet_fast backend '{name}', which cannot run on this machine: "
                      + "; ".join(reasons) + ". Calls will raise BackendUnavailableError; "
                      "set_backend('auto') runs what this machine can", BackendUnavailableWarning, stacklevel=3)


def set_backend(name: str) -> None:
    """Choose the backend for every ``resnet_fast`` operator in this process.

    Args:
        name: ``"auto"`` (the fastest backend that can take each call), ``"cuda"``,
            ``"triton"`` or ``"torch"``. An explicit backend that cannot take a call
            raises :class:`BackendUnavailableError` at that call, with the reasons.

    Raises:
        ValueError: ``name`` is not one of the choices.

    Warns:
        BackendUnavailableWarning: right away when the backend cannot run on this machine
            at all (no CUDA device, extension not built, Triton missing;
            :func:`machine_reasons`). A warning, not an error: the choice is a process-wide
            preference that tests and tools set before the tensors exist (``triton`` with
            ``TRITON_INTERPRET=1`` runs CPU tensors and does not warn); the first operator
            call then raises :class:`BackendUnavailableError` with the full reasons.
    """
    _state["choice"] = _validate_choice(name)
    _warn_if_unavailable(name, f"set_backend({name!r})")
    clear_dispatch_cache()


def get_backend() -> str:
    """The current backend choice (``"auto"`` or a backend name)."""
    return _state["choice"]


def register_kernel(
    backend: str, op: str, *, requires: CapabilityRequirement | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` the implementation of ``op`` in ``backend``.

    ``requires`` declares the compute capability the kernel needs to be fast (e.g.
    :data:`TENSOR_CORE_DOT`); ``auto`` then skips it on older GPUs. A later registration
    without ``requires`` (a lazily loaded module replacing its loader) keeps the
    declaration.
    """

    def decorate(fn: Callable) -> Callable:
        BACKENDS[backend].kernels[op] = fn
        if requires is not None:
            BACKENDS[backend].requirements[op] = requires
        clear_dispatch_cache()
        return fn

    return decorate


def register_input_check(backend: str, check: Callable[[torch.Tensor], list[str]]) -> None:
    """Make ``check(example)`` (the reasons ``backend`` cannot take that input, such as an
    unsupported dtype) part of the backend's :meth:`Backend.not_supported_reasons`."""
    BACKENDS[backend].input_check = check


_warned: set[tuple[str, str, torch.device]] = set()


def _warn_once(backend: str, op: str, device: torch.device, reason: str) -> None:
    if (backend, op, device) not in _warned:
        _warned.add((backend, op, device))
        warnings.warn(f"resnet_fast backend '{backend}' was chosen explicitly and runs anyway: {reason}; "
                      "set_backend('auto') picks a faster backend here", CapabilityWarning, stacklevel=3)


class _Example(NamedTuple):
    """What a backend's checks may read of an input: its device and dtype (``is_cuda``
    too). Decisions depend on nothing else, which is what lets them be cached."""

    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def select_kernel(op: str, example: torch.Tensor) -> Callable:
    """The implementation of ``op`` that the current choice gives for ``example``.

    An explicit backend whose kernel declared a capability the device lacks still runs
    (its result is correct), with a one-time :class:`CapabilityWarning`. The decision is
    cached per (choice, operator, device, dtype, compute capability); a refusal is not
    cached (it raises each time, with its reasons).
    """
    choice = _state["choice"]
    kernel, warning, _ = _selection(op, example.device, example.dtype, choice)
    if warning is not None:
        _warn_once(choice, op, example.device, warning)
    return kernel


def chosen_backend(op: str, example: torch.Tensor) -> str | None:
    """The name of the backend the current choice runs ``op`` on ``example`` with (None:
    the choice refuses it; :func:`select_kernel` then raises, with the reasons). What tools
    report as "ran", e.g. ``torch`` for ``auto`` on a CPU (the wrappers ask it, through
    :func:`resnet_fast.ops.triton_ops.uses_triton_op`, whether to call the ``triton``
    backend's ``triton_op`` directly). Under torch.compile it is decided at trace time (the
    graph is guarded on the choice, the device and the dtype)."""
    return _chosen_backend(op, example.device, example.dtype, _state["choice"])


def chosen_backend_of(op: str, device: torch.device, dtype: torch.dtype, choice: str) -> str | None:
    """:func:`chosen_backend` for a (device, dtype) and an explicit choice."""
    try:
        return _selection(op, device, dtype, choice)[2]
    except BackendUnavailableError:
        return None


@constant_under_compile
def _chosen_backend(op: str, device: torch.device, dtype: torch.dtype, choice: str) -> str | None:
    return chosen_backend_of(op, device, dtype, choice)


def _selection(op: str, device: torch.device, dtype: torch.dtype, choice: str) -> tuple[Callable, str | None, str]:
    key = (choice, op, device, dtype, device_capability(device) if device.type == "cuda" else None)
    cached = _SELECTION_CACHE.get(key)
    if cached is None:
        cached = _SELECTION_CACHE[key] = _decide_kernel(op, _Example(device, dtype), choice)
    return cached


def _decide_kernel(op: str, example: _Example, choice: str) -> tuple[Callable, str | None, str]:
    """(kernel, capability warning or None, backend name) for :func:`select_kernel`."""
    if choice != "auto":
        backend = BACKENDS[choice]
        reasons = backend.not_supported_reasons(op, example)
        if reasons:
            raise BackendUnavailableError(
                f"resnet_fast backend '{choice}' cannot run {op}: " + "; ".join(reasons)
            )
        return backend.kernels[op], backend.capability_reason(op, example), choice
    for name in BACKEND_NAMES:
        if not BACKENDS[name].not_supported_reasons(op, example, explicit=False):
            return BACKENDS[name].kernels[op], None, name
    raise BackendUnavailableError(f"no resnet_fast backend implements {op}")  # torch always does


FUSED_BACKENDS = ("cuda", "triton")
_NATIVE_PROBE_OP = "batch_norm_act"  # every fused backend implements it; its reasons are the backend's


def runs_native(x: torch.Tensor) -> bool:
    """Whether the modules run ``x`` on the native path: exactly torchvision eager's aten ops.

    True when the choice is ``auto`` and ``auto`` takes no fused backend for ``x``'s
    (device, dtype): always on the CPU, and on a GPU whose device no validation allows a
    fused backend on (:func:`auto_refusal`). An explicit ``set_backend`` (``torch``
    included: the reference composition, the test oracle) never runs natively. Decided
    once per (choice, device, dtype) and cached; under torch.compile, at trace time.
    """
    return _runs_native(x.device, x.dtype, _state["choice"])


@constant_under_compile
def _runs_native(device: torch.device, dtype: torch.dtype, choice: str) -> bool:
    key = (choice, device, dtype)
    native = _NATIVE_CACHE.get(key)
    if native is None:
        example = _Example(device, dtype)
        native = _NATIVE_CACHE[key] = choice == "auto" and all(
            BACKENDS[name].not_supported_reasons(_NATIVE_PROBE_OP, example, explicit=False)
            for name in FUSED_BACKENDS)
    return native


def _validation_info(name: str) -> dict[str, dict]:
    """Per visible CUDA device, the record enabling backend ``name`` there or why none does."""
    if name == "torch" or not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": validation.describe(name, torch.device("cuda", i)) for i in range(torch.cuda.device_count())}


def backend_info() -> dict[str, dict]:
    """What each backend can do on this machine, and why not.

    Returns a dict keyed by backend name, each with ``available`` (the backend can run
    here at all), ``reasons`` (why not), ``operators`` (the operators it implements),
    ``auto`` (whether ``auto`` may choose it on the current GPU), ``validation`` (per CUDA
    device: ``record``, the validation record that enables it there, or ``reason``, why none
    does; see :mod:`resnet_fast.validation`),
    ``requirements`` (operator -> "needs compute capability X.Y or newer: why") and
    ``capability_reasons`` (operator -> why ``auto`` skips it on the current GPU, for the
    operators whose requirement that GPU misses), ``implementations`` (operator -> what runs
    it on the current GPU, for kernels that choose by capability), plus ``"selected"`` (the current
    choice) and ``"cuda_device"`` (the GPU's name and capability, or None).
    """
    gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else None
    capability = device_capability(device) if gpu else None
    info: dict[str, dict] = {}
    for name in BACKEND_NAMES:
        backend = BACKENDS[name]
        reasons = machine_reasons(name)
        info[name] = {
            "available": not reasons,
            "reasons": reasons,
            "operators": sorted(backend.kernels),
            "auto": name == "torch" or (gpu and validation.enabling_record(name, device) is not None),
            "validation": _validation_info(name),
            "requirements": {
                op: "needs compute capability %d.%d or newer: %s" % (*req.min_capability, req.why)
                for op, req in sorted(backend.requirements.items())
            },
            "capability_reasons": {
                op: reason for op, req in sorted(backend.requirements.items())
                if capability is not None and (reason := req.reason(name, op, device, capability)) is not None
            },
            "implementations": {op: describe(capability) for op, describe in sorted(backend.implementations.items())},
        }
    info["selected"] = {"choice": _state["choice"]}
    info["cuda_device"] = {
        "name": torch.cuda.get_device_name(device) if gpu else None,
        "capability": capability,
    }
    return info


def _choice_from_environment() -> str:
    """``RESNET_FAST_BACKEND``'s choice; an unknown value warns, naming the variable, and
    gives ``auto`` (a typo must not break ``import resnet_fast``)."""
    value = os.environ.get("RESNET_FAST_BACKEND", "auto")
    if value not in _CHOICES:
        warnings.warn(f"environment variable RESNET_FAST_BACKEND={value!r} is not a resnet_fast backend "
                      f"(choose one of {', '.join(_CHOICES)}); using 'auto'", UserWarning, stacklevel=2)
        return "auto"
    _warn_if_unavailable(value, f"RESNET_FAST_BACKEND={value!r}", lambda name: _device_reasons(name, None))
    return value


_state["choice"] = _choice_from_environment()
