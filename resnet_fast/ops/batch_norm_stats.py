"""``resnet_fast::batch_norm_stats`` — per-channel mean and biased variance.

The first pass of a training BatchNorm: one read of a 4-D (N, C, H, W) tensor (NCHW or
channels_last, float16/bfloat16/float32/float64), accumulated in float32 (float64 for
float64 input). Returns (mean, var), each of shape (C,).

The default implementation is the ``torch`` reference; ``resnet_fast._C`` registers a
CUDA kernel for the CUDA dispatch key (``csrc/batch_norm_stats.cu``), which then serves
CUDA tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fast.ops import reference
from resnet_fast.ops.common import accumulation_dtype, check_input_4d


@torch.library.custom_op("resnet_fast::batch_norm_stats", mutates_args=())
def batch_norm_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of ``input``."""
    check_input_4d("input", input)
    return reference.batch_norm_stats(input)


@batch_norm_stats.register_fake
def _(input):
    check_input_4d("input", input)
    channels = input.shape[1]
    stats_dtype = accumulation_dtype(input.dtype)
    return input.new_empty(channels, dtype=stats_dtype), input.new_empty(channels, dtype=stats_dtype)
