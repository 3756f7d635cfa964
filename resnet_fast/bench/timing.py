"""The timing harness of the pytest-benchmark suite (``benchmarks/``), and its arithmetic.

What one benchmark case is (:class:`Target`, :class:`BenchSpec`), how its calls are timed
(:class:`Timer`, :func:`measure`), the two ceilings of the device (:func:`copy_bandwidth`,
:func:`matmul_flop_rate`) and the floors derived from them (bytes a fused kernel must move,
floating-point operations a convolution must do).

Timing (as ``.library/device/METHOD.md`` asks):

* untimed warm-up calls first: ``torch.compile`` compiles, cuDNN autotunes
  (``cudnn.benchmark``) and the caching allocator grows during them;
* each timed call sits between two CUDA events on the current stream, and the end event
  is waited for before the next call, so the recorded time is the device time of that one
  call (launch gaps included); on the CPU ``time.perf_counter`` brackets the call;
* the calls rotate through several input sets (at least 3), so no call re-reads the
  previous call's data from the L2 cache; the inputs come from ``torch.randn``, never zeros;
* the peak memory is ``torch.cuda.max_memory_allocated`` over the timed calls, after
  ``torch.cuda.reset_peak_memory_stats`` at the end of the warm-up;
* the median of the per-call times is the result.

:func:`measure` drives the timed calls through ``benchmark.pedantic`` (one call per
round, ``setup`` hands over the next input set), so pytest-benchmark keeps its own
wall-clock statistics of the same calls; the event-timed median is what the suite reports.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

import torch

from resnet_fast.bench.profiler import median_ms
from resnet_fast.runtime import DTYPES, synchronize

FWD, TRAIN, INFER = "fwd", "train", "infer"
"""Passes: training-mode forward; a training step (forward and backward, for models also
the loss and the optimizer step); an eval-mode forward under ``torch.inference_mode``."""

LAYOUTS: dict[str, torch.memory_format] = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

T = TypeVar("T")
Step = Callable[[T], object]


# ---------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Target:
    """Where and in what precision a case runs.

    ``fp16`` / ``bf16`` mean mixed precision as in training: activations in that dtype,
    parameters in float32, the step under ``torch.autocast``.
    """

    device: str
    dtype: str
    layout: str

    @property
    def id(self) -> str:
        """``"bf16-nhwc"``."""
        return f"{self.dtype}-{self.layout}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def memory_format(self) -> torch.memory_format:
        return LAYOUTS[self.layout]

    def autocast(self) -> torch.autocast:
        """``torch.autocast`` to the target dtype (disabled for fp32)."""
        return torch.autocast(self.device, dtype=self.torch_dtype, enabled=self.dtype != "fp32")

    def randn(self, shape: Sequence[int], requires_grad: bool = False) -> torch.Tensor:
        """Random normal activations of ``shape`` in the target's dtype and layout."""
        x = torch.randn(tuple(shape), device=self.device, dtype=self.torch_dtype)
        if len(shape) == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x.requires_grad_(requires_grad)


@dataclass(frozen=True)
class BenchSpec(Generic[T]):
    """One benchmark: a case of a bench function, on a target, in a pass, for a variant.

    ``variant`` is ``"eager"``, ``"compile"`` or ``"resnet_fast:<backend>"``, the last
    optionally ``+fused`` (fused training: :func:`resnet_fast.nn.enable_fused_training`).
    """

    level: str  # "op", "block" or "model"
    bench: str  # the bench function without "test_": "bn_relu", "bottleneck", ...
    case: T  # the level's case object; its ``id`` names it
    target: Target
    pass_: str
    variant: str

    @property
    def backend(self) -> str | None:
        """The resnet_fast backend of a ``resnet_fast:<backend>`` variant, else None."""
        kind, _, backend = self.variant.removesuffix("+fused").partition(":")
        return backend if kind == "resnet_fast" else None

    @property
    def fused_training(self) -> bool:
        """Whether the variant trains with the convolution fusion (``+fused``)."""
        return self.variant.endswith("+fused")

    @property
    def key(self) -> str:
        """The case without the variant, shared by every variant compared with each other."""
        return f"{self.bench}[{self.target.id}-{self.case.id}-{self.pass_}]"

    @property
    def id(self) -> str:
        """The pytest id: ``bf16-nhwc-256x256x56x56-fwd-eager``; ``rf_<backend>`` for resnet_fast,
        ``rf_<backend>_fused`` with fused training."""
        variant = f"rf_{self.backend}{'_fused' if self.fused_training else ''}" if self.backend else self.variant
        return f"{self.target.id}-{self.case.id}-{self.pass_}-{variant}"


def shape_id(shape: Sequence[int]) -> str:
    """``(256, 64, 56, 56)`` -> ``"256x64x56x56"``."""
    return "x".join(str(size) for size in shape)


# ---------------------------------------------------------------------------------------
# Timing


class PedanticBenchmark(Protocol):
    """The part of pytest-benchmark's ``benchmark`` fixture that :func:`measure` uses."""

    def pedantic(self, target: Callable[..., Any], *, setup: Callable[[], Any], rounds: int,
                 iterations: int, warmup_rounds: int) -> Any: ...


@dataclass(frozen=True)
class TimingSettings:
    """How many untimed calls come first, and how many timed calls follow."""

    warmup: int
    rounds: int


@dataclass(frozen=True)
class Measurement:
    """The timed calls of one case."""

    times_ms: tuple[float, ...]
    timer: str  # "cuda_events" or "perf_counter"
    peak_memory_bytes: int | None  # max_memory_allocated over the timed calls; None on the CPU
    resident_bytes: int | None  # allocated when they began: parameters, inputs, optimizer state

    @property
    def median_ms(self) -> float:
        return median_ms(list(self.times_ms))


class Timer(Generic[T]):
    """Times ``step`` one call at a time, handing it the input sets in rotation."""

    def __init__(self, step: Step[T], inputs: Sequence[T], device: torch.device | str) -> None:
        if not inputs:
            raise ValueError("Timer needs at least one input set")
        self.step = step
        self.inputs = list(inputs)
        self.device = torch.device(device)
        self.times_ms: list[float] = []
        self._calls = 0

    @property
    def timer(self) -> str:
        """The clock in use: ``"cuda_events"`` or ``"perf_counter"``."""
        return "cuda_events" if self.device.type == "cuda" else "perf_counter"

    def next_inputs(self) -> tuple[tuple[T], dict[str, Any]]:
        """The next input set as ``(args, kwargs)``, the form ``benchmark.pedantic``'s setup returns."""
        inputs = self.inputs[self._calls % len(self.inputs)]
        self._calls += 1
        return (inputs,), {}

    def warm_up(self, count: int) -> None:
        """``count`` untimed calls, then wait for them to finish."""
        for _ in range(count):
            self.step(*self.next_inputs()[0])
        synchronize(self.device)

    def timed_call(self, inputs: T) -> None:
        """One call of ``step``, its time appended to :attr:`times_ms`."""
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.step(inputs)
            end.record(stream)
            end.synchronize()
            self.times_ms.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            self.step(inputs)
            self.times_ms.append((time.perf_counter() - start_s) * 1e3)

    def run(self, count: int) -> list[float]:
        """``count`` timed calls outside pytest-benchmark; returns their times in ms."""
        for _ in range(count):
            self.timed_call(*self.next_inputs()[0])
        return self.times_ms[-count:]


def reset_peak_memory(device: torch.device) -> int | None:
    """Start a new peak-memory window; returns the bytes allocated now (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device) -> int | None:
    """The most bytes allocated since :func:`reset_peak_memory` (None on the CPU)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure(benchmark: PedanticBenchmark, step: Step[T], inputs: Sequence[T], device: torch.device | str,
            settings: TimingSettings) -> Measurement:
    """Warm up, then time ``settings.rounds`` calls of ``step`` through ``benchmark.pedantic``."""
    timer = Timer(step, inputs, device)
    timer.warm_up(settings.warmup)
    resident = reset_peak_memory(timer.device)
    benchmark.pedantic(timer.timed_call, setup=timer.next_inputs, rounds=settings.rounds, iterations=1,
                       warmup_rounds=0)
    return Measurement(times_ms=tuple(timer.times_ms), timer=timer.timer,
                       peak_memory_bytes=peak_memory(timer.device), resident_bytes=resident)


# ---------------------------------------------------------------------------------------
# Ceilings, measured once per session and device


def copy_bandwidth(device: torch.device | str, nbytes: int, rounds: int = 10) -> float:
    """Bytes per second of a ``nbytes`` device-to-device copy, counting bytes read plus written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timer = Timer(lambda _: dst.copy_(src), [None], device)
    timer.warm_up(2)
    return 2 * src.nbytes / (median_ms(timer.run(rounds)) / 1e3)


@contextmanager
def convolution_float32_precision() -> Iterator[None]:
    """Run CUDA float32 matmuls in the precision cuDNN uses for float32 convolutions (TF32
    by default), so a float32 matmul rate bounds float32 convolutions fairly."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def matmul_flop_rate(device: torch.device | str, dtype: torch.dtype, size: int, rounds: int = 10) -> float:
    """Floating-point operations per second of a ``size``-square matrix product in ``dtype``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    with convolution_float32_precision():
        timer = Timer(lambda _: torch.mm(a, b), [None], device)
        timer.warm_up(2)
        times = timer.run(rounds)
    return 2 * size**3 / (median_ms(times) / 1e3)


# ---------------------------------------------------------------------------------------
# Floors: the fewest bytes moved and operations done, and what they cost at the ceilings

# Passes over the activation tensor (N*C*H*W elements) that a fused BatchNorm (+ residual
# add) + ReLU must make; per-channel vectors (C elements) are negligible and not counted.
#   infer: read x, [read r], write y                                          2 (3 with r)
#   fwd (training): read x for the statistics, read x again to normalise,
#        [read r], write y                                                    3 (4 with r)
#   train = fwd + backward. Without r the backward is a reduction pass reading dy and x
#        (the ReLU mask follows from x and the statistics) and an elementwise pass reading
#        dy and x and writing dx: 5, so 8 in all (DESIGN.md's count). With r the mask needs
#        y: the reduction reads dy, x and y and writes dr (the masked dy, which is the
#        residual's gradient), the elementwise pass reads dr and x and writes dx: 7, so 11.
BATCH_NORM_PASSES: dict[tuple[str, bool], int] = {
    (INFER, False): 2, (INFER, True): 3,
    (FWD, False): 3, (FWD, True): 4,
    (TRAIN, False): 8, (TRAIN, True): 11,
}


def batch_norm_act_bytes(elements: int, itemsize: int, pass_: str, residual: bool) -> int:
    """Bytes ``relu(batch_norm(x) [+ r])`` must move over an ``elements``-element tensor.

    ``BATCH_NORM_PASSES[pass_, residual] * elements * itemsize``: see the table above.
    """
    return BATCH_NORM_PASSES[pass_, residual] * elements * itemsize


def conv_bn_act_bytes(input_elements: int, weight_elements: int, output_elements: int, itemsize: int,
                      pass_: str, residual: bool) -> int:
    """Bytes ``relu(batch_norm(conv2d(x, w)) [+ r])`` must move, everything in one ``itemsize``.

    With x, w, z (the convolution's output, ``output_elements``) counted in elements:

    * infer: BatchNorm folds into the convolution, whose epilogue adds r and applies the
      ReLU: read x and w, [read r], write y: ``x + w + (1 [+1]) z``;
    * fwd: the convolution reads x and w and writes z, summing z's statistics in its
      epilogue; one pass reads z, [reads r] and writes y: ``x + w + (3 [+1]) z``;
    * train: fwd, then the BatchNorm + ReLU backward over z (the train-minus-fwd passes
      of :data:`BATCH_NORM_PASSES`, ending in dz), the data gradient (read dz and w, write
      dx) and the weight gradient (read dz and x, write dw): ``+ (5 [+2]) z + 2 (z + x + w)``.
    """
    x, w, z, r = input_elements, weight_elements, output_elements, int(residual)
    if pass_ == INFER:
        elements = x + w + (1 + r) * z
    else:
        elements = x + w + (3 + r) * z
        if pass_ == TRAIN:
            bn_backward = BATCH_NORM_PASSES[TRAIN, residual] - BATCH_NORM_PASSES[FWD, residual]
            elements += bn_backward * z + 2 * (z + x + w)
    return elements * itemsize


def conv2d_stats_bytes(input_elements: int, weight_elements: int, output_elements: int, itemsize: int) -> int:
    """Bytes ``conv2d(relu(x * scale + shift), w)`` with its per-channel statistics must move:
    read x and w, write y (``x + w + z`` elements); the prologue is applied while loading x,
    the statistics summed in the convolution's epilogue, the per-channel vectors not counted."""
    return (input_elements + weight_elements + output_elements) * itemsize


def conv_flops(output_shape: Sequence[int], in_channels: int, kernel_size: Sequence[int], groups: int,
               pass_: str) -> float:
    """Floating-point operations of a convolution: ``2 N C_out H_out W_out (C_in / groups) k_h k_w``
    forward, three times that for a training step (forward, data and weight gradients)."""
    forward = 2 * math.prod(output_shape) * (in_channels // groups) * math.prod(kernel_size)
    return float(3 * forward if pass_ == TRAIN else forward)


def gb_per_s(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``ms``."""
    if ms <= 0:
        raise ValueError(f"time must be positive, got {ms} ms")
    return nbytes / (ms / 1e3) / 1e9


def floor_ms(nbytes: float, bandwidth: float, flops: float = 0.0, flop_rate: float | None = None) -> float:
    """The larger of ``nbytes / bandwidth`` and ``flops / flop_rate`` (bytes/s, FLOP/s), in ms."""
    if bandwidth <= 0 or (flops and not flop_rate):
        raise ValueError("floor_ms needs a positive bandwidth, and a flop rate when there are flops")
    compute_ms = flops / flop_rate * 1e3 if flops else 0.0
    return max(nbytes / bandwidth * 1e3, compute_ms)


def floor_multiple(ms: float, floor: float) -> float:
    """How many times the floor a measured time is (1.0: at the floor)."""
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor} ms")
    return ms / floor
