"""``SyncBatchNormAct2d``: :class:`BatchNormAct2d` with statistics synchronized over a process group."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from resnet_fast.nn.batch_norm_act import BatchNormAct2d, batch_norm_call_args
from resnet_fast.ops.sync_batch_norm_act import sync_batch_norm_act


class SyncBatchNormAct2d(BatchNormAct2d):
    """``relu(BatchNorm2d(x) + residual)`` with batch statistics over a process group.

    As :class:`torch.nn.SyncBatchNorm` (same parameters, buffers and state-dict keys as
    ``nn.BatchNorm2d``), plus the fused residual add and ReLU of :class:`BatchNormAct2d`.
    When batch statistics are used (training, or no running statistics) and
    ``torch.distributed`` is initialised with more than one rank in the group, every rank
    normalises with the statistics of the whole group's batch
    (:func:`resnet_fast.ops.sync_batch_norm_act`); otherwise it is a ``BatchNormAct2d``.
    Unlike ``nn.SyncBatchNorm`` it also runs on CPU tensors (the gloo backend).

    Args:
        process_group: the group to synchronize over (``None``: the default group).
        Others: as :class:`BatchNormAct2d`.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward_act(self, input: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
        args = batch_norm_call_args(self)
        if not (args.pop("training") and _group_size(self.process_group) > 1):
            return super().forward_act(input, residual, relu)
        return sync_batch_norm_act(input, self.weight, self.bias, residual=residual, relu=relu,
                                   process_group=self.process_group, **args)


def _group_size(process_group: dist.ProcessGroup | None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` and :class:`BatchNormAct2d` in ``module`` by a
    :class:`SyncBatchNormAct2d` sharing its parameters and buffers (keys unchanged).

    Works in place on ``module``'s children and returns ``module`` (or the replacement,
    when ``module`` itself is a BatchNorm). The counterpart of
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` for resnet_fast models; call it
    before wrapping the model in ``DistributedDataParallel``.
    """
    if type(module) in (nn.BatchNorm2d, BatchNormAct2d):
        synced = SyncBatchNormAct2d.from_batch_norm(module, relu=getattr(module, "relu", False))
        synced.process_group = process_group
        return synced
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
