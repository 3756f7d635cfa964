"""timm's ResNet blocks (``timm.models.resnet.BasicBlock`` / ``Bottleneck``), fused.

:func:`resnet_fast.convert` swaps these in for timm's blocks. They hold timm's own
submodules under timm's names (``conv1, bn1, drop_block, act1, aa, conv2, bn2, ..., se,
drop_path, downsample``; parameters shared, state-dict keys unchanged) and run timm's
forward, fusing what the ``resnet_fast`` operators can run:

* each convolution and its BatchNorm run as one ``resnet_fast::conv_bn_act`` call
  (folded into one convolution in eval), whenever the pair qualifies
  (:func:`~resnet_fast.nn.conv_bn_act.is_fusable`);
* the activation (and, for the last BatchNorm, the residual add before it) joins that call
  when it is an ``nn.ReLU`` and nothing runs in between at that moment: ``drop_block``
  and ``drop_path`` let it through when they are ``None``, ``nn.Identity`` or inactive
  (eval mode or a drop probability of 0); an attention layer (``se``) never does;
* the shortcut ``downsample`` of timm's ``downsample_conv`` (conv, BatchNorm) and
  ``downsample_avg`` (pool, conv, BatchNorm) runs its pair fused after the pool.

Everything else runs as timm runs it, module by module: anti-aliasing (``aa``, after the
activation), attention, active drop-path / DropBlock, activations other than ReLU, norms
other than ``nn.BatchNorm2d``. The opt-in fused-training pattern of
:class:`resnet_fast.nn.BasicBlock` (``fused_training``) is not applied to these blocks.

The blocks are made from timm's (``from_timm``, which :func:`resnet_fast.convert` calls);
they have no constructor of their own: build the model with timm and convert it.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from resnet_fast.nn.conv_bn_act import conv_bn_act_forward, is_fusable


def is_pass_through(module: nn.Module | None) -> bool:
    """Whether ``module`` returns its input unchanged right now: None, ``nn.Identity``, or
    timm's ``DropPath`` / ``DropBlock2d`` in eval mode or with a drop probability of 0."""
    if module is None or type(module) is nn.Identity:
        return True
    return is_timm_dropper(module) and (not module.training or not module.drop_prob)


def is_timm_dropper(module: nn.Module) -> bool:
    """Whether ``module`` is timm's ``DropPath`` or ``DropBlock2d`` (identity in eval mode)."""
    layers = sys.modules.get("timm.layers")
    droppers = tuple(getattr(layers, name) for name in ("DropPath", "DropBlock2d") if hasattr(layers, name))
    return bool(droppers) and isinstance(module, droppers)


def conv_norm_act(
    x: Tensor,
    conv: nn.Module,
    norm: nn.Module,
    between: tuple[nn.Module | None, ...],
    act: nn.Module,
    residual: Tensor | None = None,
) -> Tensor:
    """``act(between(norm(conv(x))) + residual)`` as timm's blocks compute it, with as much
    of it as qualifies in one ``resnet_fast`` call (module docstring)."""
    act_fuses = type(act) is nn.ReLU and all(is_pass_through(m) for m in between)
    if not is_fusable(conv, norm):
        y = norm(conv(x))
    elif act_fuses:
        return conv_bn_act_forward(x, conv, norm, residual=residual, relu=True)
    else:
        y = conv_bn_act_forward(x, conv, norm, relu=False)
    for module in between:
        if module is not None:
            y = module(y)
    if residual is not None:
        y = y + residual
    return act(y)


def shortcut(downsample: nn.Module | None, x: Tensor) -> Tensor:
    """timm's shortcut path: ``x``, or ``downsample(x)`` with a trailing (conv, BatchNorm)
    pair fused after an optional pool (``downsample_conv`` / ``downsample_avg``)."""
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and type(downsample).forward is nn.Sequential.forward \
            and len(downsample) in (2, 3) and is_fusable(downsample[-2], downsample[-1]):
        if len(downsample) == 3:
            x = downsample[0](x)
        return conv_bn_act_forward(x, downsample[-2], downsample[-1], relu=False)
    return downsample(x)


def adopt(cls: type[nn.Module], source: nn.Module) -> nn.Module:
    """An instance of ``cls`` holding ``source``'s submodules and attributes (shared, not
    copied), in ``source``'s training mode."""
    block = cls.__new__(cls)
    nn.Module.__init__(block)
    for name, child in source.named_children():
        block.add_module(name, child)
    for name in ("se", "downsample", "drop_path"):  # None in timm is a plain attribute
        if name not in block._modules:
            setattr(block, name, getattr(source, name, None))
    for name in ("stride", "dilation"):
        setattr(block, name, getattr(source, name))
    block.train(source.training)
    return block


class TimmBasicBlock(nn.Module):
    """timm's ``BasicBlock`` (ResNet-18/34 and their -d, -t, SE, anti-aliased variants), fused."""

    expansion: int = 1

    @classmethod
    def from_timm(cls, block: nn.Module) -> "TimmBasicBlock":
        """This block type around timm ``block``'s own modules (parameters shared)."""
        return adopt(cls, block)

    def forward(self, x: Tensor) -> Tensor:
        identity = shortcut(self.downsample, x)
        out = conv_norm_act(x, self.conv1, self.bn1, (self.drop_block,), self.act1)
        out = self.aa(out)
        return conv_norm_act(out, self.conv2, self.bn2, (self.se, self.drop_path), self.act2, residual=identity)


class TimmBottleneck(nn.Module):
    """timm's ``Bottleneck`` (ResNet-50/101/152, ResNeXt and their -d, -t, SE, anti-aliased
    variants), fused."""

    expansion: int = 4

    @classmethod
    def from_timm(cls, block: nn.Module) -> "TimmBottleneck":
        """This block type around timm ``block``'s own modules (parameters shared)."""
        return adopt(cls, block)

    def forward(self, x: Tensor) -> Tensor:
        identity = shortcut(self.downsample, x)
        out = conv_norm_act(x, self.conv1, self.bn1, (), self.act1)
        out = conv_norm_act(out, self.conv2, self.bn2, (self.drop_block,), self.act2)
        out = self.aa(out)
        return conv_norm_act(out, self.conv3, self.bn3, (self.se, self.drop_path), self.act3, residual=identity)
