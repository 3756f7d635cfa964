"""Modules built on the ``resnet_fast`` operators, with torchvision's names and state dicts."""

from resnet_fast.nn.batch_norm_act import BatchNormAct2d
from resnet_fast.nn.blocks import BasicBlock, Bottleneck
from resnet_fast.nn.conv_bn_act import ConvBNAct2d, conv_bn_act_forward, is_fusable
from resnet_fast.nn.sync_batch_norm_act import SyncBatchNormAct2d, convert_sync_batchnorm

__all__ = [
    "BasicBlock",
    "BatchNormAct2d",
    "Bottleneck",
    "ConvBNAct2d",
    "SyncBatchNormAct2d",
    "conv_bn_act_forward",
    "convert_sync_batchnorm",
    "is_fusable",
]
