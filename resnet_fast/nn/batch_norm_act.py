"""``BatchNormAct2d``: ``nn.BatchNorm2d`` with a fused residual add and ReLU."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from resnet_fast.ops.batch_norm_act import batch_norm_act, check_batch_norm_act_args
from resnet_fast.ops.dispatch import runs_native


def native_batch_norm(bn: nn.BatchNorm2d, input: Tensor) -> Tensor:
    """``nn.BatchNorm2d.forward(bn, input)``: the aten ``batch_norm`` torchvision runs (and
    ``num_batches_tracked.add_`` in training), whatever ``bn``'s class."""
    return nn.BatchNorm2d.forward(bn, input)


def native_add_relu(out: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """torchvision's ``out += identity; out = relu(out)`` on a fresh ``out``: in-place
    ``add_`` and ``relu_``, so the result keeps ``out``'s dtype."""
    if residual is not None:
        out += residual
    return torch.relu_(out) if relu else out


def check_num_features(bn: nn.BatchNorm2d, input: Tensor) -> None:
    """A 4-D input whose channel count is not ``bn.num_features``: say both."""
    if isinstance(input, Tensor) and input.dim() == 4 and input.shape[1] != bn.num_features:
        raise ValueError(
            f"input has {input.shape[1]} channels but this {type(bn).__name__} has num_features="
            f"{bn.num_features} (its weight and running statistics have shape ({bn.num_features},)); "
            "pass an input with that many channels or build the module for the input's"
        )


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
    shape and is added before the ReLU, in place as torchvision's blocks add their
    shortcut (``out += identity``): the output keeps the input's dtype whatever the
    residual's floating dtype (a float64 residual with a float32 input gives float32, where
    ``out + residual`` would promote), on every path.

    Dtypes as ``nn.BatchNorm2d``: the parameters and running statistics have the input's
    dtype, or are float32 for a float16/bfloat16 input (mixed precision, what autocast
    runs); any other mix (a float64 input on a float32 module, say) is refused before
    anything is updated, with a message naming both dtypes, where torch says "mixed dtype".

    Which code runs: where ``auto`` chooses no fused backend (always on the CPU; on a GPU
    without a validation record) the native path runs exactly ``nn.BatchNorm2d``'s aten
    ``batch_norm`` then in-place ``add_`` and ``relu_``
    (:func:`~resnet_fast.ops.dispatch.runs_native`); otherwise the fused operator
    ``resnet_fast::batch_norm_act`` of the chosen backend. Arguments are checked the same
    way on both.
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
        check_num_features(self, input)
        args = batch_norm_call_args(self)
        if isinstance(input, Tensor) and runs_native(input):
            check_batch_norm_act_args(input, self.weight, self.bias, residual, args["running_mean"],
                                      args["running_var"], args["training"])
            return native_add_relu(native_batch_norm(self, input), residual, relu)
        return batch_norm_act(input, self.weight, self.bias, residual=residual, relu=relu, **args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, relu={self.relu}"
