"""``BatchNormAct2d``: ``nn.BatchNorm2d`` with a fused residual add and ReLU."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from resnet_fast.ops.batch_norm_act import batch_norm_act


def batch_norm_call_args(bn: nn.BatchNorm2d) -> dict[str, Any]:
    """The statistics keyword arguments ``nn.BatchNorm2d.forward`` would pass, for the
    wrappers :func:`resnet_fast.ops.batch_norm_act` and :func:`resnet_fast.ops.conv_bn_act`.

    Mirrors torch: batch statistics in training (or when there are no running
    statistics); running statistics updated only in training with
    ``track_running_stats``; ``num_batches_tracked`` incremented in that case.
    """
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return {
        "running_mean": bn.running_mean if use_running else None,
        "running_var": bn.running_var if use_running else None,
        "num_batches_tracked": bn.num_batches_tracked if tracking else None,
        "training": bn.training or (bn.running_mean is None and bn.running_var is None),
        "momentum": bn.momentum,
        "eps": bn.eps,
    }


class BatchNormAct2d(nn.BatchNorm2d):
    """``relu(BatchNorm2d(x) + residual)`` as one ``resnet_fast::batch_norm_act`` call.

    A subclass of :class:`torch.nn.BatchNorm2d` with the same constructor, parameters,
    buffers, state-dict keys and running-statistics semantics, plus:

    Args:
        bias: as ``nn.BatchNorm2d``'s keyword (``False``: a weight but no bias).
        relu: apply ReLU after the (optional) residual add.

    ``forward(input, residual=None)``: ``residual``, when given, must have the input's
    shape and is added before the ReLU.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        relu: bool = False,
    ) -> None:
        # ``bias=False`` (a weight but no bias) needs a torch whose BatchNorm2d has it.
        no_bias = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **no_bias)
        self.relu = relu

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, relu: bool) -> "BatchNormAct2d":
        """A ``BatchNormAct2d`` sharing ``bn``'s parameters and buffers (no copies)."""
        fused = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device="meta", bias=bn.bias is not None or not bn.affine, relu=relu)
        for name, param in bn.named_parameters(recurse=False):
            setattr(fused, name, param)
        for name, buffer in bn.named_buffers(recurse=False):
            setattr(fused, name, buffer)
        fused.train(bn.training)
        return fused

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.forward_act(input, residual, self.relu)

    def forward_act(self, input: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
        """``forward`` with the activation given by the caller (the blocks decide it)."""
        return batch_norm_act(input, self.weight, self.bias, residual=residual, relu=relu,
                              **batch_norm_call_args(self))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"
