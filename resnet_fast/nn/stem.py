"""A ResNet's stem: convolution, BatchNorm, ReLU (and torchvision's max-pool), fused.

:func:`stem_forward` is what :class:`resnet_fast.models.ResNet` and
:class:`~resnet_fast.models.CifarResNet` run first, and what a torchvision ResNet runs
after :func:`resnet_fast.convert`. The modules stay the model's own ``conv1``, ``bn1``
(and ``maxpool``), so state-dict keys are torchvision's.

* Evaluation (running statistics): the BatchNorm is folded into the convolution, one
  ``resnet_fast::conv2d_bias_act`` with the ReLU in its epilogue
  (:func:`~resnet_fast.nn.conv_bn_act.conv_bn_act_forward`).
* Training, default: one ``resnet_fast::conv_bn_act``.
* Training with ``fused_training`` (:func:`~resnet_fast.nn.enable_fused_training`; by
  default, None, only where measured faster, as the blocks:
  :mod:`resnet_fast.nn.fused_training_defaults`): the
  convolution runs as ``resnet_fast::conv2d_stats``, whose epilogue gives the batch
  statistics (and updates the running ones), then ``resnet_fast::scale_shift_act`` applies
  the BatchNorm and ReLU in one pass. No aten convolution or batch_norm runs (with the
  ``triton`` backend; the ``cuda`` backend's ``conv2d_stats`` uses cuDNN's convolution on
  sm_80+ by design).

The max-pool stays an ``aten.max_pool2d`` after the activation. Pooling before the
normalisation (so only a quarter of the activation is normalised) is exact only for
channels whose BatchNorm scale is positive; a negative scale turns the max into a min, and
choosing per channel would need a pooling kernel that reads both, or a host sync on the
scales' signs, which no step that a CUDA graph captures may have. So it does not pay here.
"""

from __future__ import annotations

from torch import Tensor, nn

from resnet_fast.nn.conv_bn_act import conv_bn_act_forward, conv_stats_forward, is_stats_fusable
from resnet_fast.nn.fused_training_defaults import trains_fused
from resnet_fast.ops.scale_shift_act import scale_shift_act


def stem_forward(x: Tensor, conv: nn.Module, bn: nn.Module, maxpool: nn.Module | None = None,
                 fused_training: bool | None = None) -> Tensor:
    """``maxpool(relu(bn(conv(x))))`` (no max-pool when ``maxpool`` is None), fused.

    ``fused_training`` (True, False, or None: where measured faster) selects the
    ``conv2d_stats`` + ``scale_shift_act`` pattern when ``bn`` is in training mode and the
    pair qualifies (:func:`~resnet_fast.nn.conv_bn_act.is_stats_fusable`); otherwise
    (evaluation, frozen statistics, a conv with a bias ...) the stem runs as without it.
    """
    if is_stats_fusable(conv, bn) and trains_fused(fused_training, x):
        x = scale_shift_act(*conv_stats_forward(x, conv, bn), relu=True)
    else:
        x = conv_bn_act_forward(x, conv, bn, relu=True)
    return x if maxpool is None else maxpool(x)
