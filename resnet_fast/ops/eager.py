"""Plain eager calls of the ``resnet_fast`` operators without the ``torch.library`` call.

A ``torch.library.custom_op`` call costs about 30 µs of host time before its
implementation runs (the dispatcher, then its Python autograd wrapper redispatching below
autograd). A fused-training block makes about ten such calls (a ``conv2d_stats`` and a
running-statistics update per convolution, a ``scale_shift_act``), which made it cost
3-4x torchvision's host time per call. Where nothing needs to see the operator, the
wrappers run the same implementation through an ``autograd.Function`` carrying the
operator's own autograd formula (:func:`operator_function`): the same kernels, the same
saved tensors and the same backward, so the results are bit-identical.

Something needs to see the operator (:func:`runs_eagerly` is False) while torch.compile
or torch.export traces (their graphs hold the operators), while a ``TorchDispatchMode``
is active (fake tensors, ``make_fx``, tests that record the operators called), while
``torch.profiler`` records (its traces name the operators), inside ``torch.func``
transforms (``grad``, ``vmap``: they meet the operators, as before), and for tensor
subclasses (which may define the operator for themselves).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils import _python_dispatch

_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def runs_eagerly(*tensors: Tensor | None) -> bool:
    """Whether an operator call on ``tensors`` may skip the ``torch.library`` call: no
    tracing, no dispatch mode, no profiler, no ``torch.func`` transform, and plain tensors
    (module docstring)."""
    if (torch.compiler.is_compiling() or _python_dispatch.is_in_torch_dispatch_mode()
            or torch.autograd._profiler_enabled() or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


def operator_function(name: str, forward: Callable, setup_context: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """An ``autograd.Function`` named ``name`` whose ``apply(*args)`` runs ``forward(*args)``
    (the operator's implementation, after the caller checked the arguments as the operator
    does) with the operator's ``setup_context(ctx, inputs, output)`` and ``backward``
    (those given to ``register_autograd``; gradients of unused outputs arrive as zeros, as
    they do through the operator). ``setup_context`` is called from ``forward`` rather than
    declared as the Function's own: a declared one makes every ``apply`` bind its arguments
    through ``inspect.signature`` (tens of microseconds)."""

    def run(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run),
        "backward": staticmethod(backward),
        "__doc__": f"The operator's implementation and autograd formula, called without the operator ({__name__}).",
    })
