"""The accuracy rule every comparison in this project uses (the tests and ``python -m resnet_fast.check``).

Tolerance (as flash-attention's tests): a result in a low-precision dtype passes when

    err(ours) <= 2 * err(torch_same_dtype) + floor[dtype],   err(t) = ||t - ref|| / ||ref||

where ``ref`` is computed in float64 from the same (upcast) inputs and ``torch_same_dtype``
is PyTorch in the tested dtype (norm-wise). float64 results use a fixed tight max-abs
tolerance.

ReLU: an element whose pre-activation lies within rounding error of zero may land on
either side in a low-precision dtype, and its gradient then differs by a whole ``dy``.
:func:`relu_with_mask_of` builds the float64 reference with the tested output's mask after
checking that the masks differ only at such elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT64_ATOL = 1e-10
"""Max-abs tolerance of a float64 result, relative to max(1, max |ref|)."""
RELATIVE_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""The ``floor[dtype]`` of the rule: the relative error allowed even when torch's own is zero."""
KINK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
"""How far from zero (relative to the largest pre-activation) a ReLU mask may differ from float64's."""


@dataclass(frozen=True)
class Comparison:
    """One result measured against its float64 reference.

    ``error`` is the relative norm error (max-abs error for float64), ``bound`` what the
    rule allows, ``torch_error`` torch's own error in the same dtype (None for float64).
    """

    error: float
    bound: float
    torch_error: float | None
    finite: bool = True
    shape_matches: bool = True

    @property
    def passed(self) -> bool:
        return self.finite and self.shape_matches and self.error <= self.bound

    def describe(self, name: str) -> str:
        """A one-line account, e.g. for an assertion message."""
        if not self.shape_matches:
            return f"{name}: shape differs from the reference"
        if not self.finite:
            return f"{name}: non-finite values"
        if self.torch_error is None:
            return f"{name}: max error {self.error:.3g} vs {self.bound:.3g} (float64)"
        return (f"{name}: relative error {self.error:.3g} vs {self.bound:.3g} "
                f"(torch in the same dtype: {self.torch_error:.3g})")


def compare_to_reference(ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor | None) -> Comparison:
    """Measure ``ours`` against the float64 ``ref`` with the rule in this module's docstring.

    ``same_dtype`` is PyTorch's result in ``ours``'s dtype (ignored for float64 results).
    """
    if tuple(ours.shape) != tuple(ref.shape):
        return Comparison(float("inf"), 0.0, None, shape_matches=False)
    ref = ref.detach().double()
    ours = ours.detach()
    finite = bool(torch.isfinite(ours).all())
    if ours.dtype == torch.float64:
        error = (ours - ref).abs().max().item() if ours.numel() else 0.0
        bound = FLOAT64_ATOL * max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
        return Comparison(error, bound, None, finite)
    if same_dtype is None:
        raise ValueError("same_dtype (torch's result in the tested dtype) is required below float64")
    scale = max(ref.norm().item(), 1e-30)
    error = (ours.double() - ref).norm().item() / scale
    torch_error = (same_dtype.detach().double() - ref).norm().item() / scale
    return Comparison(error, 2 * torch_error + RELATIVE_FLOOR[ours.dtype], torch_error, finite)


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor,
                              name: str = "output") -> None:
    """Assert that ``ours`` passes :func:`compare_to_reference`."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    comparison = compare_to_reference(ours, ref, same_dtype)
    assert comparison.passed, comparison.describe(name) + " exceeds the bound"


def relu_mask_mismatch(pre: torch.Tensor, tested_out: torch.Tensor) -> str | None:
    """Why ``tested_out > 0`` is not an acceptable ReLU mask of the float64 pre-activation
    ``pre`` (None: the masks differ only within ``tested_out``'s rounding of zero)."""
    if tested_out.dtype == torch.float64:
        return None
    mask = tested_out.detach() > 0
    differ = mask != (pre.detach() > 0)
    if not differ.any():
        return None
    limit = KINK_TOLERANCE[tested_out.dtype] * max(1.0, pre.detach().abs().max().item())
    worst = pre.detach()[differ].abs().max().item()
    if worst <= limit:
        return None
    return f"ReLU mask differs at a pre-activation of {worst:.3g} (limit {limit:.3g})"


def relu_with_mask_of(pre: torch.Tensor, tested_out: torch.Tensor) -> torch.Tensor:
    """float64 ``relu(pre)`` using the mask ``tested_out > 0`` (differentiable in ``pre``).

    Fails when the masks differ anywhere the float64 pre-activation is farther from zero
    than the tested dtype's rounding (relative to the largest pre-activation).
    """
    if tested_out.dtype == torch.float64:
        return torch.relu(pre)
    mismatch = relu_mask_mismatch(pre, tested_out)
    assert mismatch is None, mismatch
    return pre * (tested_out.detach() > 0)


def random_input(shape, dtype, channels_last: bool, *, scale: float = 1.0, shift: float = 0.0,
                 device: str | torch.device = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random normal data (never zeros) in the requested dtype and memory format."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
