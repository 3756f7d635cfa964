"""The cases ``python -m resnet_fast.check`` runs: every operator, forward and backward.

A :class:`Case` is one operator call on one input configuration (shape, dtype, layout,
training or eval, residual / ReLU, a non-contiguous per-channel vector). Its inputs are
described by :class:`Arg` and drawn once in float64; the runner casts them to the tested
dtype and layout (per-channel parameters and running statistics stay float32, as
``nn.BatchNorm2d``'s under autocast), calls the operator under the backend being checked,
under ``torch`` in the same dtype and under ``torch`` in float64, and compares.

:func:`gpu_cases` is the full list for a GPU, :func:`interpreter_cases` a short list of
tiny shapes for the Triton interpreter on CPU (how CI tests the command itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import resnet_fast.ops as ops
from resnet_fast.ops import reference
from resnet_fast.ops.conv2d_cuda import TENSOR_CORE_KERNEL_BELOW

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# kinds of argument
ACTIVATION = "activation"  # 4-D, in the tested dtype and layout
CONV_WEIGHT = "conv_weight"  # 4-D, in the tested dtype and layout
PER_CHANNEL = "per_channel"  # 1-D, float32 (float64 in the reference)
RUNNING = "running"  # 1-D running statistics: float32, mutated, never differentiated


@dataclass(frozen=True)
class Arg:
    """One input tensor: its shape, kind, how it is drawn and whether gradients flow to it.

    ``positive`` draws from U(0.5, 1.5) (scales, variances) instead of N(0, 1);
    ``noncontiguous`` gives a per-channel vector as every other element of a longer one.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    grad: bool = False
    positive: bool = False
    noncontiguous: bool = False


@dataclass(frozen=True)
class Case:
    """One operator call to check.

    ``call(tensors, relu)`` runs the operator on the materialised ``tensors`` (name ->
    tensor) and returns its named outputs; ``"out"`` is the one a ReLU applies to when
    ``relu``. Running statistics are compared after the call (``RUNNING`` args). With
    ``backward``, the outputs in ``grad_outputs`` get random upstream gradients and the
    gradients of every ``grad=True`` input are compared as the ``<operator>_backward`` row.
    """

    operator: str
    label: str
    dtype: torch.dtype
    channels_last: bool
    args: tuple[Arg, ...]
    call: Callable[[dict[str, Tensor], bool], dict[str, Tensor]]
    relu: bool = False
    backward: bool = True
    grad_outputs: tuple[str, ...] = ("out",)
    reference_call: Callable[[dict[str, Tensor], bool], dict[str, Tensor]] | None = None  # float64, when
    # the operator itself takes only low-precision input
    backends: tuple[str, ...] | None = None  # None: every backend that implements ``operator``
    capability_below: tuple[int, int] | None = None  # the backend runs this kernel only below this capability

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "NCHW"

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def _pair(kernel: int) -> tuple[int, int]:
    return (kernel, kernel)


# ----------------------------------------------------------------------------- operator calls

def _batch_norm_act_call(training: bool, residual: bool):
    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        out = ops.batch_norm_act(t["input"], t["weight"], t["bias"], t["running_mean"], t["running_var"],
                                 t.get("residual"), training=training, momentum=0.1, relu=relu)
        return {"out": out}
    return call


def batch_norm_act_case(shape, dtype, channels_last, *, training: bool, residual: bool, relu: bool,
                        noncontiguous: bool = False, label: str = "") -> Case:
    """``relu(batch_norm(input) + residual)``, with running statistics (updated in training)."""
    channels = shape[1]
    args = [Arg("input", shape, ACTIVATION, grad=True),
            Arg("weight", (channels,), PER_CHANNEL, grad=True, positive=True, noncontiguous=noncontiguous),
            Arg("bias", (channels,), PER_CHANNEL, grad=True, noncontiguous=noncontiguous),
            Arg("running_mean", (channels,), RUNNING), Arg("running_var", (channels,), RUNNING, positive=True)]
    if residual:
        args.append(Arg("residual", shape, ACTIVATION, grad=True))
    return Case("batch_norm_act", label or _describe(shape, training, residual, relu, noncontiguous), dtype,
                channels_last, tuple(args), _batch_norm_act_call(training, residual), relu=relu)


def conv_bn_act_case(shape, out_channels, kernel, stride, dtype, channels_last, *, training: bool, residual: bool,
                     relu: bool, label: str = "") -> Case:
    """``relu(batch_norm(conv2d(input)) + residual)`` (the training form of a ResNet layer)."""
    n, c, h, w = shape
    padding = kernel // 2
    out_shape = (n, out_channels, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    args = [Arg("input", shape, ACTIVATION, grad=True),
            Arg("conv_weight", (out_channels, c, *_pair(kernel)), CONV_WEIGHT, grad=True),
            Arg("weight", (out_channels,), PER_CHANNEL, grad=True, positive=True),
            Arg("bias", (out_channels,), PER_CHANNEL, grad=True),
            Arg("running_mean", (out_channels,), RUNNING), Arg("running_var", (out_channels,), RUNNING, positive=True)]
    if residual:
        args.append(Arg("residual", out_shape, ACTIVATION, grad=True))

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        out = ops.conv_bn_act(t["input"], t["conv_weight"], None, t["weight"], t["bias"], t["running_mean"],
                              t["running_var"], t.get("residual"), stride=stride, padding=padding,
                              training=training, relu=relu)
        return {"out": out}

    conv = f"{c}->{out_channels} {kernel}x{kernel}/{stride}"
    return Case("conv_bn_act", label or f"{_shape(shape)} {conv} {_mode(training, residual, relu)}", dtype,
                channels_last, tuple(args), call, relu=relu)


def conv2d_bias_act_case(shape, out_channels, kernel, stride, dtype, channels_last, *, residual: bool, relu: bool,
                         label: str = "") -> Case:
    """``relu(conv2d(input) + bias + residual)`` (the inference form, BatchNorm folded)."""
    n, c, h, w = shape
    padding = kernel // 2
    out_shape = (n, out_channels, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    args = [Arg("input", shape, ACTIVATION, grad=True),
            Arg("weight", (out_channels, c, *_pair(kernel)), CONV_WEIGHT, grad=True),
            Arg("bias", (out_channels,), PER_CHANNEL, grad=True)]
    if residual:
        args.append(Arg("residual", out_shape, ACTIVATION, grad=True))

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        return {"out": ops.conv2d_bias_act(t["input"], t["weight"], t["bias"], t.get("residual"), stride=stride,
                                           padding=padding, relu=relu)}

    conv = f"{c}->{out_channels} {kernel}x{kernel}/{stride}"
    return Case("conv2d_bias_act", label or f"{_shape(shape)} {conv} {_mode(None, residual, relu)}", dtype,
                channels_last, tuple(args), call, relu=relu)


def conv2d_stats_case(shape, out_channels, kernel, stride, dtype, channels_last, *, prologue: bool,
                      label: str = "") -> Case:
    """``conv2d(relu(input * scale + shift))`` and its per-channel statistics (fused training)."""
    c = shape[1]
    padding = kernel // 2
    args = [Arg("input", shape, ACTIVATION, grad=True),
            Arg("weight", (out_channels, c, *_pair(kernel)), CONV_WEIGHT, grad=True)]
    if prologue:
        args += [Arg("prologue_scale", (c,), PER_CHANNEL, grad=True, positive=True),
                 Arg("prologue_shift", (c,), PER_CHANNEL, grad=True)]

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        out, mean, var = ops.conv2d_stats(t["input"], t["weight"], stride=stride, padding=padding,
                                          prologue_scale=t.get("prologue_scale"),
                                          prologue_shift=t.get("prologue_shift"), prologue_relu=True)
        return {"out": out, "mean": mean, "var": var}

    conv = f"{c}->{out_channels} {kernel}x{kernel}/{stride}"
    what = "BN+ReLU prologue" if prologue else "no prologue"
    return Case("conv2d_stats", label or f"{_shape(shape)} {conv} {what}", dtype, channels_last, tuple(args), call,
                grad_outputs=("out", "mean", "var"))


def batch_norm_stats_case(shape, dtype, channels_last) -> Case:
    """Per-channel mean and biased variance (the cuda backend's statistics kernel)."""
    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        mean, var = ops.batch_norm_stats(t["input"])
        return {"mean": mean, "var": var}

    return Case("batch_norm_stats", _shape(shape), dtype, channels_last, (Arg("input", shape, ACTIVATION),), call,
                backward=False, backends=("cuda",))


def scale_shift_act_case(shape, dtype, channels_last, *, residual: bool, relu: bool, noncontiguous: bool) -> Case:
    """``relu(input * scale + shift + residual)`` (the cuda backend's BatchNorm stage kernels)."""
    channels = shape[1]
    args = [Arg("input", shape, ACTIVATION, grad=True),
            Arg("scale", (channels,), PER_CHANNEL, grad=True, positive=True, noncontiguous=noncontiguous),
            Arg("shift", (channels,), PER_CHANNEL, grad=True, noncontiguous=noncontiguous)]
    if residual:
        args.append(Arg("residual", shape, ACTIVATION, grad=True))

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        return {"out": ops.scale_shift_act(t["input"], t["scale"], t["shift"], t.get("residual"), relu=relu)}

    return Case("scale_shift_act", _describe(shape, None, residual, relu, noncontiguous), dtype, channels_last,
                tuple(args), call, relu=relu, backends=("cuda",))


def update_running_stats_case(channels: int, momentum: float | None, dtype: torch.dtype) -> Case:
    """``nn.BatchNorm2d``'s running-statistics update (momentum, or the cumulative average)."""
    args = (Arg("running_mean", (channels,), RUNNING), Arg("running_var", (channels,), RUNNING, positive=True),
            Arg("mean", (channels,), PER_CHANNEL), Arg("var", (channels,), PER_CHANNEL, positive=True))

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        tracked = torch.tensor(3, dtype=torch.long, device=t["mean"].device)
        torch.ops.resnet_fast.update_running_stats(t["running_mean"], t["running_var"], tracked, t["mean"],
                                                   t["var"], 64, momentum)
        return {}

    label = f"C={channels} momentum={'None' if momentum is None else momentum}"
    return Case("update_running_stats", label, dtype, False, args, call, backward=False)


def conv2d_tensor_core_case(shape, out_channels, kernel, stride, channels_last, *, stats: bool) -> Case:
    """The cuda backend's own WMMA convolution (float16): statistics form or inference epilogue.
    ``conv2d_stats`` runs it on compute capability 7.x only, so only there is it checked."""
    n, c, h, w = shape
    padding = kernel // 2
    out_shape = (n, out_channels, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
    args = [Arg("input", shape, ACTIVATION), Arg("weight", (out_channels, c, *_pair(kernel)), CONV_WEIGHT),
            Arg("prologue_scale", (c,), PER_CHANNEL, positive=True), Arg("prologue_shift", (c,), PER_CHANNEL)]
    if not stats:
        args += [Arg("bias", (out_channels,), PER_CHANNEL), Arg("residual", out_shape, ACTIVATION)]

    def call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        out, mean, var = torch.ops.resnet_fast.conv2d_tensor_core(
            t["input"], t["weight"], t.get("bias"), t.get("residual"), t["prologue_scale"], t["prologue_shift"],
            [stride] * 2, [padding] * 2, [1, 1], True, relu, stats)
        return {"out": out, "mean": mean, "var": var} if stats else {"out": out}

    def reference_call(t: dict[str, Tensor], relu: bool) -> dict[str, Tensor]:
        """The same math in float64 (the operator takes float16 only)."""
        a = reference.prologue_activation(t["input"], t["prologue_scale"], t["prologue_shift"], True)
        if stats:
            out, mean, var = reference.conv2d_stats(a, t["weight"], [stride] * 2, [padding] * 2, [1, 1], None, None,
                                                    False)
            return {"out": out, "mean": mean, "var": var}
        return {"out": reference.conv2d_bias_act(a, t["weight"], t["bias"], t["residual"], [stride] * 2,
                                                 [padding] * 2, [1, 1], relu)}

    what = "statistics" if stats else "bias+residual+ReLU epilogue"
    return Case("conv2d_tensor_core", f"{_shape(shape)} {c}->{out_channels} {kernel}x{kernel}/{stride} {what}",
                torch.float16, channels_last, tuple(args), call, relu=not stats, backward=False,
                reference_call=reference_call, backends=("cuda",), capability_below=TENSOR_CORE_KERNEL_BELOW)


# ----------------------------------------------------------------------------- labels

def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _mode(training: bool | None, residual: bool, relu: bool) -> str:
    parts = [] if training is None else ["train" if training else "eval"]
    if residual:
        parts.append("+residual")
    if relu:
        parts.append("ReLU")
    return " ".join(parts)


def _describe(shape, training, residual, relu, noncontiguous) -> str:
    text = f"{_shape(shape)} {_mode(training, residual, relu)}".rstrip()
    return text + (" strided per-channel" if noncontiguous else "")


# ----------------------------------------------------------------------------- case lists

# Odd shapes: a C that is not a multiple of 8 with odd planes (vector tails), H x W = 1.
ODD = (3, 20, 9, 11)
POINT = (16, 24, 1, 1)
# ResNet-50 at batch 32: layer1's bottleneck output (BatchNorm) and layer3's 3x3 convolution.
RESNET50_BN = (32, 256, 56, 56)
RESNET50_CONV = (32, 256, 14, 14)


def gpu_cases(dtypes: list[torch.dtype]) -> list[Case]:
    """Every operator on a GPU: each dtype in ``dtypes`` x NCHW / channels_last, odd shapes,
    training and eval, and one ResNet-50 shape per operator (in the lowest-precision dtype)."""
    cases: list[Case] = []
    for dtype in dtypes:
        for cl in (False, True):
            cases += [
                batch_norm_act_case(ODD, dtype, cl, training=True, residual=True, relu=True),
                batch_norm_act_case(ODD, dtype, cl, training=False, residual=False, relu=True),
                batch_norm_act_case(POINT, dtype, cl, training=True, residual=False, relu=False, noncontiguous=True),
                conv_bn_act_case((2, 12, 9, 9), 20, 3, 2, dtype, cl, training=True, residual=True, relu=True),
                conv_bn_act_case((2, 12, 9, 9), 20, 1, 1, dtype, cl, training=False, residual=False, relu=True),
                conv2d_bias_act_case((2, 12, 9, 9), 20, 3, 1, dtype, cl, residual=True, relu=True),
                conv2d_bias_act_case((2, 12, 9, 9), 20, 1, 2, dtype, cl, residual=False, relu=False),
                conv2d_stats_case((2, 12, 9, 9), 20, 3, 1, dtype, cl, prologue=True),
                conv2d_stats_case((2, 12, 9, 9), 20, 1, 2, dtype, cl, prologue=False),
                batch_norm_stats_case(ODD, dtype, cl),
                batch_norm_stats_case(POINT, dtype, cl),
                scale_shift_act_case(ODD, dtype, cl, residual=True, relu=True, noncontiguous=True),
            ]
    cases += [update_running_stats_case(20, 0.1, torch.float32), update_running_stats_case(20, None, torch.float32)]
    for cl in (False, True):
        cases += [conv2d_tensor_core_case((2, 16, 9, 9), 24, 3, 1, cl, stats=True),
                  conv2d_tensor_core_case((2, 16, 9, 9), 24, 1, 2, cl, stats=False)]
    low = dtypes[-1]
    cases += [
        batch_norm_act_case(RESNET50_BN, low, True, training=True, residual=True, relu=True, label="ResNet-50 layer1"),
        conv_bn_act_case(RESNET50_CONV, 256, 3, 1, low, True, training=True, residual=False, relu=True,
                         label="ResNet-50 layer3 3x3"),
        conv2d_bias_act_case(RESNET50_CONV, 256, 3, 1, low, True, residual=True, relu=True,
                             label="ResNet-50 layer3 3x3"),
        conv2d_stats_case(RESNET50_CONV, 256, 3, 1, low, True, prologue=True, label="ResNet-50 layer3 3x3"),
    ]
    return _unique(cases)


def interpreter_cases() -> list[Case]:
    """A short list of tiny shapes for the Triton interpreter on CPU (float32 and float16;
    the interpreter has no bfloat16 arithmetic)."""
    return [
        batch_norm_act_case((2, 5, 3, 3), torch.float32, False, training=True, residual=True, relu=True),
        batch_norm_act_case((2, 5, 3, 3), torch.float16, True, training=False, residual=False, relu=True),
        batch_norm_act_case((4, 3, 1, 1), torch.float32, True, training=True, residual=False, relu=False,
                            noncontiguous=True),
        conv_bn_act_case((1, 3, 5, 5), 4, 3, 2, torch.float32, True, training=True, residual=True, relu=True),
        conv2d_bias_act_case((1, 3, 5, 5), 4, 3, 1, torch.float32, True, residual=True, relu=True),
        conv2d_stats_case((1, 3, 5, 5), 4, 3, 1, torch.float32, True, prologue=True),
        conv2d_stats_case((2, 3, 4, 4), 4, 1, 2, torch.float16, False, prologue=False),
        update_running_stats_case(5, 0.1, torch.float32),
    ]


def _unique(cases: list[Case]) -> list[Case]:
    seen, unique = set(), []
    for case in cases:
        key = (case.operator, case.label, case.dtype, case.channels_last)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique
