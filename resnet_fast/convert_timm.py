"""The timm part of :func:`resnet_fast.convert`: ``timm.models.resnet``'s blocks and stem.

timm is optional: nothing here imports it. A model can only hold timm's classes once
``timm.models.resnet`` has been imported, so the classes are looked up in ``sys.modules``.

* ``timm.models.resnet.BasicBlock`` / ``Bottleneck`` (the classes, or subclasses keeping
  timm's ``forward``) become :class:`~resnet_fast.nn.timm_blocks.TimmBasicBlock` /
  :class:`~resnet_fast.nn.timm_blocks.TimmBottleneck` around the same submodules (see
  :mod:`resnet_fast.nn.timm_blocks` for what then runs fused);
* the stem of a ``timm.models.resnet.ResNet`` (keeping timm's ``forward`` and
  ``forward_features``): ``bn1`` + ``act1`` become ``BatchNormAct2d(relu=True)`` +
  ``nn.Identity`` when ``act1`` is an ``nn.ReLU``; a deep stem (``resnet*d``, ``*c``,
  ``*s``, ``*t``) is an ``nn.Sequential`` whose BatchNorm + ReLU pairs the generic
  ``nn.Sequential`` rule converts.

Each piece of a converted block that runs unfused is reported once per BatchNorm with a
reason that names its kind (attention layer, drop-path, activation, norm type), so the
report groups them.
"""

from __future__ import annotations

import sys

from torch import nn

from resnet_fast.convert import (
    ConversionReport,
    _display,
    _path,
    _type_name,
    _unfused_reason,
)
from resnet_fast.nn.conv_bn_act import is_fusable
from resnet_fast.nn.timm_blocks import TimmBasicBlock, TimmBottleneck, is_timm_dropper

FUSED_TIMM_BLOCKS = (TimmBasicBlock, TimmBottleneck)


def _timm_resnet_module():
    return sys.modules.get("timm.models.resnet")


def timm_block_type(module: nn.Module) -> type[nn.Module] | None:
    """The fused class for a timm ResNet block (None: ``module`` is not one we convert)."""
    timm_resnet = _timm_resnet_module()
    if timm_resnet is None or isinstance(module, FUSED_TIMM_BLOCKS):
        return None
    for name, fused in (("BasicBlock", TimmBasicBlock), ("Bottleneck", TimmBottleneck)):
        timm_cls = getattr(timm_resnet, name, None)
        if timm_cls is not None and isinstance(module, timm_cls):
            return fused if type(module).forward is timm_cls.forward else None
    return None


def _sites(block: nn.Module) -> list[tuple[str, nn.Module, nn.Module, dict[str, nn.Module | None], nn.Module]]:
    """(norm name, conv, norm, {name: module between norm and activation}, activation) per
    convolution of a fused timm block, in order."""
    if isinstance(block, TimmBasicBlock):
        return [("bn1", block.conv1, block.bn1, {"drop_block": block.drop_block}, block.act1),
                ("bn2", block.conv2, block.bn2, {"se": block.se, "drop_path": block.drop_path}, block.act2)]
    return [("bn1", block.conv1, block.bn1, {}, block.act1),
            ("bn2", block.conv2, block.bn2, {"drop_block": block.drop_block}, block.act2),
            ("bn3", block.conv3, block.bn3, {"se": block.se, "drop_path": block.drop_path}, block.act3)]


def _site_reason(conv: nn.Module, norm: nn.Module, between: dict[str, nn.Module | None], act: nn.Module,
                 block_name: str) -> str | None:
    """Why part of ``act(between(norm(conv(x))))`` runs unfused in the block (None: all fused)."""
    if not is_fusable(conv, norm):
        return _unfused_reason(conv, norm, block_name)
    if type(act) is not nn.ReLU:
        return (f"inside {block_name}: the activation is {_type_name(act)}, not nn.ReLU; convolution + "
                "BatchNorm run fused, the activation unfused")
    for name, module in between.items():
        if module is None or type(module) is nn.Identity:
            continue
        if is_timm_dropper(module):
            if not module.drop_prob:
                continue
            return (f"inside {block_name}: {name} ({_type_name(module)}) runs between the BatchNorm and the ReLU "
                    "in training; convolution + BatchNorm run fused, the rest fused in eval only")
        if name == "se":
            return (f"inside {block_name}: the attention layer se ({_type_name(module)}) runs between the "
                    "BatchNorm and the residual add; convolution + BatchNorm run fused, the add and ReLU unfused")
        return (f"inside {block_name}: {name} ({_type_name(module)}) runs between the BatchNorm and the "
                "activation; convolution + BatchNorm run fused, the activation unfused")
    return None


def inspect_timm_block(block: nn.Module, prefix: str, report: ConversionReport) -> None:
    """List in ``report.skipped`` what a fused timm block runs unfused, one row per BatchNorm."""
    block_name = _type_name(block)
    for norm_name, conv, norm, between, act in _sites(block):
        reason = _site_reason(conv, norm, between, act, block_name)
        if reason is not None:
            report.skipped.append((_path(prefix, norm_name), _type_name(norm), reason))
    downsample = block.downsample
    if downsample is None:
        return
    pair_fuses = (isinstance(downsample, nn.Sequential) and type(downsample).forward is nn.Sequential.forward
                  and len(downsample) in (2, 3))
    if pair_fuses and is_fusable(downsample[-2], downsample[-1]):
        return
    for name, module in downsample.named_modules(prefix=_path(prefix, "downsample")):
        if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) or "Norm" in type(module).__name__:
            reason = (_unfused_reason(downsample[-2], module, block_name) if pair_fuses and module is downsample[-1]
                      else f"runs unfused inside {block_name}: the downsample is not timm's "
                           "(Conv2d, BatchNorm2d) or (pool, Conv2d, BatchNorm2d)")
            report.skipped.append((name, _type_name(module), reason))


def convert_timm_block(block: nn.Module, fused_type: type[nn.Module], path: str,
                       report: ConversionReport) -> nn.Module:
    """``block`` as ``fused_type`` (submodules shared), reported."""
    fused = fused_type.from_timm(block)
    report.converted.append((_display(path), _type_name(block), _type_name(fused)))
    inspect_timm_block(fused, path, report)
    return fused


def is_timm_resnet(module: nn.Module) -> bool:
    """Whether ``module`` is a ``timm.models.resnet.ResNet`` running timm's own forward."""
    timm_resnet = _timm_resnet_module()
    resnet = getattr(timm_resnet, "ResNet", None)
    return (resnet is not None and isinstance(module, resnet)
            and type(module).forward is resnet.forward
            and type(module).forward_features is resnet.forward_features)
