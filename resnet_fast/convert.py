"""Swap fused ``resnet_fast`` modules into an existing model, in place.

:func:`convert` rewrites a model built from torchvision's ResNet pieces (or plain
``nn.Sequential`` stacks) so its BatchNorms run fused with the work around them, while
keeping every parameter and buffer *object* (nothing is copied: optimizers, EMA copies and
``state_dict()`` keys stay valid) and the training/eval mode of every module.

What is converted:

* every torchvision ``BasicBlock`` / ``Bottleneck`` (the exact classes, subclasses that
  keep torchvision's ``forward``, and any class of those names with exactly torchvision's
  submodules ``conv1, bn1, relu, conv2, bn2[, conv3, bn3][, downsample]``) becomes
  :class:`resnet_fast.nn.BasicBlock` / :class:`~resnet_fast.nn.Bottleneck` holding the same
  submodules: each convolution + BatchNorm (+ residual add) (+ ReLU) runs as one
  operator, and so does a ``downsample`` that is ``nn.Sequential(Conv2d, BatchNorm2d)``;
* the stem of a torchvision ``ResNet`` (one that keeps torchvision's ``forward``):
  ``bn1`` becomes a :class:`~resnet_fast.nn.BatchNormAct2d` with ``relu=True`` and
  ``relu`` becomes ``nn.Identity`` (``model.relu`` is used only there); and a model of
  exactly torchvision's ``ResNet`` class becomes, in place (the same object: its class is
  switched, its modules and attributes stay), a :class:`resnet_fast.models.ResNet`, whose
  stem runs :func:`~resnet_fast.nn.stem.stem_forward`: the 7x7 convolution with its
  BatchNorm folded in eval, as one ``conv_bn_act`` in training, and as ``conv2d_stats`` +
  ``scale_shift_act`` under :func:`~resnet_fast.nn.enable_fused_training`. State-dict keys
  stay torchvision's; ``isinstance(model, torchvision.models.ResNet)`` no longer holds.
  A subclass of torchvision's ``ResNet`` keeps its class (and its stem convolution runs
  unfused, listed in the skipped modules), and so does a ResNet whose stem norm cannot be
  fused (e.g. a ``SyncBatchNorm``);
* inside any ``nn.Sequential`` (subclasses included when they keep ``Sequential``'s
  ``forward``, such as torchvision's ``Conv2dNormActivation``): an ``nn.BatchNorm2d``
  directly followed by an ``nn.ReLU`` — typically ``Conv2d → BatchNorm2d → ReLU`` —
  becomes ``BatchNormAct2d(relu=True) → nn.Identity``, so indices and state-dict keys
  stay the same.
* timm's ResNet family (``timm.models.resnet``: ResNet/ResNeXt/SE-ResNet and their
  -c/-d/-s/-t stems and avg-pool downsamples): each ``BasicBlock`` / ``Bottleneck``
  becomes :class:`~resnet_fast.nn.timm_blocks.TimmBasicBlock` /
  :class:`~resnet_fast.nn.timm_blocks.TimmBottleneck` around the same submodules, and the
  stem's ``bn1`` + ``act1`` become ``BatchNormAct2d(relu=True)`` + ``nn.Identity``
  (details in :mod:`resnet_fast.convert_timm`). What such a block must run unfused —
  attention layers, active drop-path / DropBlock, activations other than ReLU, other
  norms — runs exactly as in timm and is reported, one reason per kind.

:func:`str` of the report groups identical changes and reasons (``53 x ...``).

What is not (and is listed in :attr:`ConversionReport.skipped` with the reason):
BatchNorms not followed by a ReLU, torch's ``SyncBatchNorm`` (for synchronized
statistics call :func:`resnet_fast.nn.convert_sync_batchnorm` after :func:`convert`), subclasses of ``BatchNorm2d`` (their behaviour may differ), BatchNorms whose
parent module has a ``forward`` we cannot see into, and norms inside converted blocks
that the block must run unfused (e.g. a ``SyncBatchNorm``, ``FrozenBatchNorm2d`` or a
convolution with non-zero padding mode). Blocks that look like torchvision's but have
other submodules are left alone. Forward/backward hooks registered on a replaced module
do not move to its replacement. Converting an already converted model changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from resnet_fast.nn.batch_norm_act import BatchNormAct2d
from resnet_fast.nn.blocks import BasicBlock, Bottleneck
from resnet_fast.nn.conv_bn_act import is_fusable

__all__ = ["ConversionReport", "convert"]

# Submodule names of torchvision's blocks (``downsample`` is a child only when not None).
_BLOCK_CHILDREN = {
    "BasicBlock": {"conv1", "bn1", "relu", "conv2", "bn2"},
    "Bottleneck": {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"},
}
_FUSED_BLOCKS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    Attributes:
        converted: ``(module path, old type, new type)`` for each replaced module.
        skipped: ``(module path, type, reason)`` for each BatchNorm (or norm inside a
            converted block) that still runs unfused, and the stem convolution of a
            subclass of torchvision's ResNet.

    ``len(report)`` and ``bool(report)`` count the converted modules.
    """

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.converted)

    def __bool__(self) -> bool:
        return bool(self.converted)

    def __str__(self) -> str:
        """A summary with one entry per kind of change or reason: ``count x type  detail``,
        then the module paths it applies to (the first few when there are many)."""
        lines = [f"resnet_fast.convert: {len(self.converted)} module(s) converted, "
                 f"{len(self.skipped)} skipped"]
        for title, rows, arrow in (("converted", self.converted, "-> "), ("skipped", self.skipped, "")):
            if not rows:
                continue
            lines.append(f"{title}:")
            groups: dict[tuple[str, str], list[str]] = {}
            for path, kind, detail in rows:
                groups.setdefault((kind, detail), []).append(path)
            width_count = max(len(str(len(paths))) for paths in groups.values())
            width_type = max(len(kind) for kind, _ in groups)
            for (kind, detail), paths in groups.items():
                lines.append(f"  {len(paths):>{width_count}} x {kind:<{width_type}}  {arrow}{detail}")
                shown = ", ".join(paths[:_PATHS_SHOWN])
                more = f", ... ({len(paths) - _PATHS_SHOWN} more)" if len(paths) > _PATHS_SHOWN else ""
                lines.append(f"  {'':>{width_count}}   at {shown}{more}")
        return "\n".join(lines)


_PATHS_SHOWN = 4  # module paths listed per group in ConversionReport's summary


def _type_name(module_or_cls: nn.Module | type) -> str:
    cls = module_or_cls if isinstance(module_or_cls, type) else type(module_or_cls)
    module = cls.__module__
    if module.startswith("torch.nn.modules"):
        module = "torch.nn"
    elif module.startswith("resnet_fast.nn."):
        module = "resnet_fast.nn"
    elif module.startswith("resnet_fast.models."):
        module = "resnet_fast.models"
    return f"{module}.{cls.__qualname__}"


def _torchvision_resnet_module():
    try:
        from torchvision.models import resnet
    except ImportError:
        return None
    return resnet


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _display(path: str) -> str:
    return path or "<root>"


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm))


def _batch_norm_type_reason(bn: nn.Module) -> str | None:
    """Why a BatchNorm cannot become a ``BatchNormAct2d`` whatever surrounds it (None: it can)."""
    if isinstance(bn, nn.SyncBatchNorm):
        return ("torch's SyncBatchNorm is not fused; convert first, then call "
                "resnet_fast.nn.convert_sync_batchnorm for fused synchronized statistics")
    if type(bn) is not nn.BatchNorm2d:
        return f"subclass of nn.BatchNorm2d ({type(bn).__name__}) whose behaviour may differ"
    return None


def _block_kind(module: nn.Module) -> str | None:
    """``"BasicBlock"`` / ``"Bottleneck"`` when ``module`` is a torchvision-style block to convert."""
    if isinstance(module, (BasicBlock, Bottleneck)):
        return None
    tv = _torchvision_resnet_module()
    kind = None
    for name in _BLOCK_CHILDREN:
        tv_cls = getattr(tv, name, None) if tv is not None else None
        if tv_cls is not None and isinstance(module, tv_cls):
            if type(module).forward is not tv_cls.forward:
                return None  # a subclass with its own forward (e.g. a quantizable block)
            kind = name
        elif type(module).__name__ == name:
            kind = name
    if kind is None:
        return None
    children = dict(module.named_children())
    expected = _BLOCK_CHILDREN[kind] | ({"downsample"} if "downsample" in children else set())
    if set(children) != expected or not hasattr(module, "stride"):
        return None
    if not isinstance(children["relu"], nn.ReLU):
        return None
    if not all(isinstance(children[f"conv{i}"], nn.Conv2d) for i in (1, 2, 3) if f"conv{i}" in children):
        return None
    return kind


def _unfused_reason(conv: nn.Module, norm: nn.Module, block: str) -> str:
    if type(norm) not in (nn.BatchNorm2d, BatchNormAct2d):
        why = _batch_norm_type_reason(norm) if _is_batch_norm(norm) else f"{type(norm).__name__} is not a BatchNorm2d"
    else:
        why = f"its convolution ({_type_name(conv)}) is not a plain zero-padded nn.Conv2d"
    return f"runs unfused inside {block}: {why}"


def _inspect_fused_block(block: nn.Module, prefix: str, report: ConversionReport) -> None:
    """List the norms a ``resnet_fast`` block has to run module by module."""
    block_name = _type_name(block)
    for i in (1, 2, 3):
        conv, norm = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if conv is None or norm is None or is_fusable(conv, norm):
            continue
        report.skipped.append((_path(prefix, f"bn{i}"), _type_name(norm), _unfused_reason(conv, norm, block_name)))
    downsample = getattr(block, "downsample", None)
    if downsample is None:
        return
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
        if is_fusable(*downsample):
            return
        conv, norm = downsample
        if _is_batch_norm(norm) or "Norm" in type(norm).__name__:
            report.skipped.append((_path(prefix, "downsample.1"), _type_name(norm),
                                   _unfused_reason(conv, norm, block_name)))
            return
    for name, module in downsample.named_modules(prefix=_path(prefix, "downsample")):
        if _is_batch_norm(module) and not isinstance(module, BatchNormAct2d):
            report.skipped.append((name, _type_name(module),
                                   "runs unfused: the block's downsample is not nn.Sequential(Conv2d, BatchNorm2d)"))


def _is_torchvision_resnet(module: nn.Module) -> bool:
    tv = _torchvision_resnet_module()
    return (
        tv is not None
        and isinstance(module, tv.ResNet)
        and type(module).forward is tv.ResNet.forward
        and type(module)._forward_impl is tv.ResNet._forward_impl
    )


def _fuse_stem_convolution(model: nn.Module, prefix: str, report: ConversionReport) -> None:
    """torchvision's exact ``ResNet`` → :class:`resnet_fast.models.ResNet` in place, so the
    stem convolution runs with its BatchNorm (``stem_forward``)."""
    from resnet_fast.models.imagenet import ResNet

    tv = _torchvision_resnet_module()
    if not is_fusable(model.conv1, model.bn1):
        return  # the stem's norm is listed in the skipped modules with the reason
    if type(model) is not tv.ResNet:
        report.skipped.append((_path(prefix, "conv1"), _type_name(model.conv1),
                               f"the stem convolution runs unfused: {_type_name(model)} is a subclass of "
                               "torchvision's ResNet, and only that exact class becomes resnet_fast.models.ResNet"))
        return
    old = _type_name(model)
    model.__class__ = ResNet  # same attributes (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc, ...)
    report.converted.append((_display(prefix), old, _type_name(ResNet)))


def _convert_stem(model: nn.Module, prefix: str, report: ConversionReport, handled: set[str],
                  act_name: str = "relu") -> None:
    """A ResNet stem's ``bn1`` + its ReLU (torchvision's ``relu``, timm's ``act1``: ``act_name``)
    → ``BatchNormAct2d(relu=True)`` + ``Identity``."""
    bn, act = getattr(model, "bn1", None), getattr(model, act_name, None)
    if not isinstance(bn, nn.Module) or not _is_batch_norm(bn) or isinstance(bn, BatchNormAct2d):
        return
    handled.add("bn1")
    reason = _batch_norm_type_reason(bn)
    if reason is None and type(act) is not nn.ReLU:
        reason = f"the stem's activation {act_name} is {_type_name(act)}, not nn.ReLU"
    if reason is not None:
        report.skipped.append((_path(prefix, "bn1"), _type_name(bn), reason))
        return
    model.bn1 = BatchNormAct2d.from_batch_norm(bn, relu=True)
    identity = nn.Identity()
    identity.train(act.training)
    setattr(model, act_name, identity)
    report.converted.append((_path(prefix, "bn1"), _type_name(bn), "resnet_fast.nn.BatchNormAct2d(relu=True)"))
    report.converted.append((_path(prefix, act_name), _type_name(act), _type_name(nn.Identity)))


def _convert_sequential(seq: nn.Sequential, prefix: str, report: ConversionReport, handled: set[str]) -> None:
    """``BatchNorm2d → ReLU`` runs inside ``seq`` → ``BatchNormAct2d(relu=True) → Identity``."""
    names = list(seq._modules)
    for i, name in enumerate(names):
        bn = seq._modules[name]
        if bn is None or not _is_batch_norm(bn) or isinstance(bn, BatchNormAct2d):
            continue
        handled.add(name)
        path = _path(prefix, name)
        following = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        reason = _batch_norm_type_reason(bn)
        if reason is None:
            if following is None:
                reason = "last module of its nn.Sequential: no ReLU follows"
            elif type(following) is not nn.ReLU:
                reason = f"followed by {_type_name(following)}, not nn.ReLU"
        if reason is not None:
            report.skipped.append((path, _type_name(bn), reason))
            continue
        relu_name = names[i + 1]
        setattr(seq, name, BatchNormAct2d.from_batch_norm(bn, relu=True))
        identity = nn.Identity()
        identity.train(following.training)
        setattr(seq, relu_name, identity)
        report.converted.append((path, _type_name(bn), "resnet_fast.nn.BatchNormAct2d(relu=True)"))
        report.converted.append((_path(prefix, relu_name), _type_name(following), _type_name(nn.Identity)))


def _convert_block(block: nn.Module, kind: str, path: str, report: ConversionReport) -> nn.Module:
    fused = _FUSED_BLOCKS[kind].from_torchvision(block)
    report.converted.append((_display(path), _type_name(block), _type_name(fused)))
    _inspect_fused_block(fused, path, report)
    return fused


def _convert_children(module: nn.Module, prefix: str, report: ConversionReport, seen: set[int]) -> None:
    if id(module) in seen:  # a module shared by several parents is visited once
        return
    seen.add(id(module))
    handled: set[str] = set()
    if _is_torchvision_resnet(module):
        _convert_stem(module, prefix, report, handled)
        _fuse_stem_convolution(module, prefix, report)
    elif convert_timm.is_timm_resnet(module):
        _convert_stem(module, prefix, report, handled, act_name="act1")
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        _convert_sequential(module, prefix, report, handled)
    for name, child in list(module._modules.items()):
        if child is None or name in handled:
            continue
        path = _path(prefix, name)
        kind = _block_kind(child)
        timm_type = convert_timm.timm_block_type(child)
        if kind is not None:
            setattr(module, name, _convert_block(child, kind, path, report))
        elif timm_type is not None:
            setattr(module, name, convert_timm.convert_timm_block(child, timm_type, path, report))
        elif isinstance(child, convert_timm.FUSED_TIMM_BLOCKS):
            if id(child) not in seen:
                seen.add(id(child))
                convert_timm.inspect_timm_block(child, path, report)
        elif isinstance(child, (BasicBlock, Bottleneck)):
            if id(child) not in seen:
                seen.add(id(child))
                _inspect_fused_block(child, path, report)
        elif _is_batch_norm(child) and not isinstance(child, BatchNormAct2d):
            reason = _batch_norm_type_reason(child) or (
                f"its parent {_type_name(module)} is not an nn.Sequential, a torchvision ResNet "
                "stem or a BasicBlock/Bottleneck: what follows it is unknown"
            )
            report.skipped.append((path, _type_name(child), reason))
        else:
            _convert_children(child, path, report, seen)


def convert(model: nn.Module) -> tuple[nn.Module, ConversionReport]:
    """Swap fused ``resnet_fast`` modules into ``model`` in place; see the module docstring.

    Parameters and buffers are shared, not copied (the same tensor objects), and the
    ``state_dict`` keys are exactly unchanged, so checkpoints load both ways. Idempotent:
    a second call converts nothing.

    Returns:
        ``(model, report)``: the converted model — ``model`` itself, except when ``model``
        is itself a torchvision block, which is replaced by its fused counterpart — and a
        :class:`ConversionReport` of what was converted and what was skipped and why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    kind = _block_kind(model)
    if kind is not None:
        return _convert_block(model, kind, "", report), report
    timm_type = convert_timm.timm_block_type(model)
    if timm_type is not None:
        return convert_timm.convert_timm_block(model, timm_type, "", report), report
    if isinstance(model, convert_timm.FUSED_TIMM_BLOCKS):
        convert_timm.inspect_timm_block(model, "", report)
    elif isinstance(model, (BasicBlock, Bottleneck)):
        _inspect_fused_block(model, "", report)
    elif _is_batch_norm(model) and not isinstance(model, BatchNormAct2d):
        report.skipped.append((_display(""), _type_name(model), "a lone BatchNorm: nothing to fuse it with"))
    else:
        _convert_children(model, "", report, set())
    return model, report


# timm's part of the conversion uses the helpers above, so it is imported after them.
from resnet_fast import convert_timm  # noqa: E402
