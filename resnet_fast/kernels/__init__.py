"""Triton kernels and their launchers (the ``triton`` backend of :mod:`resnet_fast.ops`).

Importing this package registers the ``triton`` backend's operators with the dispatcher
when triton is installed (triton is optional: without it the dispatcher reports "triton
is not installed"). The kernel modules themselves load on the first call, so that
``import resnet_fast`` does not pay for importing triton and torch's Triton tracing
support; once loaded they register their functions directly.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

import torch

from resnet_fast.ops import reference
from resnet_fast.ops.dispatch import register_input_check, register_kernel

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# operator -> the module that implements it
OPERATORS = {
    "batch_norm_act": "resnet_fast.kernels.batch_norm_act",
    "batch_norm_act_backward": "resnet_fast.kernels.batch_norm_act",
    "conv_bn_act": "resnet_fast.kernels.batch_norm_act",
    "conv2d_bias_act": "resnet_fast.kernels.conv2d",
    "conv2d_stats": "resnet_fast.kernels.conv2d",
}


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
        register_kernel("triton", _op)(_on_first_call(_op, _module))
    # The running-statistics update is a C-element op with no Triton kernel worth writing:
    # the torch implementation serves, so an explicit "triton" choice runs whole modules.
    register_kernel("triton", "update_running_stats")(reference.update_running_stats)
