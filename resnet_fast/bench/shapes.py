"""The distinct convolutions of torchvision's ResNet-50, for the per-layer benchmarks
(``benchmarks/bench_conv2d.py``, ``benchmarks/bench_cudnn_fused.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

from resnet_fast.bench.timing import shape_id


@dataclass(frozen=True)
class ConvShape:
    """One distinct convolution of ResNet-50: ``names`` are its layers in torchvision's model."""

    names: tuple[str, ...]
    batch: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    size: int  # input height and width

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.in_channels, self.size, self.size)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    @property
    def output_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.output_size, self.output_size)

    @property
    def residual(self) -> bool:
        """Whether one of its layers is a bottleneck's closing 1x1 expansion (``conv3``),
        whose BatchNorm is followed by the shortcut's add."""
        return any(name.endswith("conv3") for name in self.names)

    @property
    def relu(self) -> bool:
        """Whether one of its layers is followed by a ReLU (all but the shortcut projections)."""
        return not all(name.endswith("downsample.0") for name in self.names)

    @property
    def id(self) -> str:
        return f"{self.names[0]}-{shape_id(self.input_shape)}-k{self.kernel}s{self.stride}-{self.out_channels}"


@lru_cache(maxsize=None)
def _resnet50_conv_keys(batch: int) -> tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]:
    model = torchvision.models.resnet50().to("meta")
    seen: dict[tuple, list[str]] = {}

    def record(name: str) -> Callable:
        def hook(conv: nn.Conv2d, args: tuple[Tensor, ...], _out: Tensor) -> None:
            key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                   args[0].shape[-1])
            seen.setdefault(key, []).append(name)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(batch, 3, 224, 224, device="meta"))
    for handle in handles:
        handle.remove()
    return tuple((tuple(names), key) for key, names in seen.items())


def resnet50_conv_shapes(batch: int) -> list[ConvShape]:
    """Every distinct convolution of torchvision's ResNet-50 at ``batch`` (224x224 input),
    in forward order, found by running the model on the meta device."""
    return [ConvShape(names, batch, *key) for names, key in _resnet50_conv_keys(batch)]
