"""The ``triton`` backend's ``torch.library.triton_op`` operators, reached directly.

A ``triton_op`` called from inside an opaque ``custom_op`` is invisible to torch.compile:
Inductor sees only the outer operator. So when the ``triton`` backend serves a call with its
shipped kernel (:func:`uses_triton_op`), the wrappers (:func:`resnet_fast.ops.batch_norm_act`,
``conv_bn_act``, ``conv2d_bias_act``, ``conv2d_stats``) check the arguments as the
operator would and call the ``triton_op`` itself — ``resnet_fast::triton_batch_norm_act_forward``
and ``_backward``, ``triton_conv2d_bias_act``, ``triton_conv2d_stats`` — with the
operator's own autograd formula registered on it (its backward calls the Triton backward
``triton_op`` too). Compiled code then traces through ``wrap_triton`` to the kernels, which
Inductor schedules and names in its output code; eager calls run the same kernels as the
custom operator would.

The kernel modules load on first use (importing triton is slow), and the autograd
registration happens then, once per operator — also when that first use is inside
torch.compile's tracing (the loader runs at trace time, see :func:`triton_op`).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from resnet_fast.kernels import OPERATORS
from resnet_fast.ops import dispatch

TRITON_OPS = {
    "batch_norm_act": "triton_batch_norm_act_forward",
    "batch_norm_act_backward": "triton_batch_norm_act_backward",
    "conv2d_bias_act": "triton_conv2d_bias_act",
    "conv2d_stats": "triton_conv2d_stats",
}
"""Operator -> the name of the ``triton_op`` that implements it in the triton backend."""

AUTOGRAD: dict[str, tuple[Callable, Callable]] = {}
"""Operator -> (backward, setup_context): the operator's autograd formula, which its
``triton_op`` gets too (each operator's module adds its own with :func:`share_autograd`)."""

_LOADED: set[str] = set()


def share_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    """Give ``op``'s ``triton_op`` the operator's autograd formula when it loads."""
    AUTOGRAD[op] = (backward, setup_context)


@dispatch.constant_under_compile
def _load(op: str) -> str:
    """Import ``op``'s kernel module and register its autograd formula (once); the name of
    its ``triton_op``. torch.compile runs this at trace time (a constant result), so the
    import and registration never enter a graph."""
    if op not in _LOADED:
        importlib.import_module(OPERATORS[op])
        if op in AUTOGRAD:
            backward, setup_context = AUTOGRAD[op]
            torch.library.register_autograd(f"resnet_fast::{TRITON_OPS[op]}", backward, setup_context=setup_context)
        _LOADED.add(op)
    return TRITON_OPS[op]


def triton_op(op: str) -> torch._ops.OpOverload:
    """``torch.ops.resnet_fast.<triton_op of op>.default``, its module loaded and the
    operator's autograd formula registered on it."""
    return getattr(torch.ops.resnet_fast, _load(op)).default


def uses_triton_op(op: str, example: torch.Tensor) -> bool:
    """Whether a call of ``op`` on ``example`` goes to the triton backend's ``triton_op``:
    the choice gives it to the triton backend (:func:`~resnet_fast.ops.dispatch.chosen_backend`)
    and the kernel registered there is the shipped one (its loader or the kernel module's
    function), not a replacement registered since (which then runs through the operator).
    Under torch.compile, decided at trace time."""
    return _uses_triton_op(op, example.device, example.dtype, dispatch.get_backend())


@dispatch.constant_under_compile
def _uses_triton_op(op: str, device: torch.device, dtype: torch.dtype, choice: str) -> bool:
    if dispatch.chosen_backend_of(op, device, dtype, choice) != "triton":
        return False
    kernel = dispatch.BACKENDS["triton"].kernels.get(op)
    shipped_modules = (OPERATORS[op], "resnet_fast.kernels")
    return getattr(kernel, "__name__", None) == op and getattr(kernel, "__module__", None) in shipped_modules
