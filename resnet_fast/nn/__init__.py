"""Modules built on the ``resnet_fast`` operators, with torchvision's names and state dicts."""

from resnet_fast.nn.batch_norm_act import BatchNormAct2d
from resnet_fast.nn.blocks import BasicBlock, Bottleneck, enable_fused_training
from resnet_fast.nn.conv_bn_act import (
    ConvBNAct2d,
    clear_fold_cache,
    conv_bn_act_forward,
    fold_batch_norm,
    is_foldable,
    is_fusable,
)
from resnet_fast.nn.stem import stem_forward
from resnet_fast.nn.sync_batch_norm_act import SyncBatchNormAct2d, convert_sync_batchnorm
from resnet_fast.nn.timm_blocks import TimmBasicBlock, TimmBottleneck

__all__ = [
    "BasicBlock",
    "BatchNormAct2d",
    "Bottleneck",
    "ConvBNAct2d",
    "SyncBatchNormAct2d",
    "TimmBasicBlock",
    "TimmBottleneck",
    "clear_fold_cache",
    "conv_bn_act_forward",
    "convert_sync_batchnorm",
    "enable_fused_training",
    "fold_batch_norm",
    "is_foldable",
    "is_fusable",
    "stem_forward",
]
