"""Triton kernels and their launchers (the ``triton`` backend of :mod:`resnet_fast.ops`).

Importing this package registers the ``triton`` backend's operators with the dispatcher
when triton is installed (triton is optional: without it the dispatcher reports "triton
is not installed"). The kernel modules themselves load on the first call, so that
``import resnet_fast`` does not pay for importing triton and torch's Triton tracing
support; once loaded they register their functions directly.

Two registries describe the kernels without importing them:

* :data:`TENSOR_CORE_OPERATORS` — operators whose Triton implementation is built on
  ``tl.dot`` (its module says ``USES_TENSOR_CORES = True``). They are registered with
  :data:`resnet_fast.ops.dispatch.TENSOR_CORE_DOT`, so ``auto`` sends them elsewhere on
  GPUs below sm_80, where Triton has no tensor-core ``tl.dot``.
* :data:`COMPILE_EXAMPLES` — filled by each kernel module at import with
  :func:`register_compile_example`: one signature per ``@triton.jit`` kernel, which the
  ahead-of-time compile test builds for sm_70, sm_75, sm_80 and sm_90 without a GPU.
  ``@triton.jit`` device functions that only kernels call (they are compiled inside
  them) are listed with :func:`register_device_function` instead.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from resnet_fast.ops.dispatch import TENSOR_CORE_DOT, register_input_check, register_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# operator -> the module that implements it
OPERATORS = {
    "batch_norm_act": "resnet_fast.kernels.batch_norm_act",
    "batch_norm_act_backward": "resnet_fast.kernels.batch_norm_act",
    "conv_bn_act": "resnet_fast.kernels.batch_norm_act",
    "update_running_stats": "resnet_fast.kernels.batch_norm_act",
    "conv2d_bias_act": "resnet_fast.kernels.conv2d",
    "conv2d_stats": "resnet_fast.kernels.conv2d",
}
# Operators whose Triton kernels use tl.dot (their module sets USES_TENSOR_CORES = True).
TENSOR_CORE_OPERATORS: frozenset[str] = frozenset({"conv2d_bias_act", "conv2d_stats"})


@dataclass(frozen=True)
class CompileExample:
    """How to compile one ``@triton.jit`` kernel ahead of time.

    ``signature`` maps every parameter to its Triton type (``"*fp32"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``{data}`` in a type stands for the activations' dtype
    (``"*{data}"``), which the compile test sets per target (bf16 where it is native,
    fp16 on sm_70/sm_75). ``constexprs`` gives the value of every ``constexpr``.
    """

    name: str
    kernel: Any  # a triton.runtime.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)

    def signature_for(self, data: str) -> dict[str, str]:
        """The signature with ``{data}`` replaced by a Triton dtype (``"fp16"``, ``"bf16"``)."""
        return {name: kind.format(data=data) for name, kind in self.signature.items()}


COMPILE_EXAMPLES: dict[str, CompileExample] = {}
"""``"module.kernel"`` -> its :class:`CompileExample`, filled as kernel modules import."""


def register_compile_example(module: str, name: str, kernel: Any, signature: dict[str, str],
                             constexprs: dict[str, Any] | None = None) -> None:
    """Record how the ahead-of-time compile test builds ``kernel`` of ``module``."""
    key = f"{module.rsplit('.', 1)[-1]}.{name}"
    COMPILE_EXAMPLES[key] = CompileExample(key, kernel, dict(signature), dict(constexprs or {}))


DEVICE_FUNCTIONS: dict[str, Any] = {}
"""``"module.function"`` -> a ``@triton.jit`` device function (called by kernels, never
launched), filled as kernel modules import."""


def register_device_function(module: str, name: str, function: Any) -> None:
    """Record that ``function`` of ``module`` is a device function compiled inside kernels."""
    DEVICE_FUNCTIONS[f"{module.rsplit('.', 1)[-1]}.{name}"] = function


def input_reasons(x: torch.Tensor) -> list[str]:
    """Why the Triton kernels cannot take ``x`` (its dtype), empty when they can."""
    if x.dtype not in SUPPORTED_DTYPES:
        return [f"{x.dtype} input is not supported by the triton backend (float16, bfloat16 or float32)"]
    return []


def _on_first_call(op: str, module: str) -> Callable:
    def load_and_call(*args):
        return getattr(importlib.import_module(module), op)(*args)

    load_and_call.__name__ = op
    return load_and_call


if importlib.util.find_spec("triton") is not None:
    register_input_check("triton", input_reasons)
    for _op, _module in OPERATORS.items():
        register_kernel("triton", _op, requires=TENSOR_CORE_DOT if _op in TENSOR_CORE_OPERATORS else None)(
            _on_first_call(_op, _module))
