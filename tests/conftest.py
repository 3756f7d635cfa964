"""Shared test helpers: float64 references and the dtype-aware tolerance rule.

Tolerance (as flash-attention's tests): a result in a low-precision dtype passes when
    err(ours) <= 2 * err(torch_same_dtype) + floor[dtype],   err(t) = ||t - ref|| / ||ref||
where ref is computed in float64 from the same (upcast) inputs and torch_same_dtype is
stock PyTorch in the tested dtype (norm-wise, as the project's GPU method notes ask).
float64 results use a fixed tight max-abs tolerance.

ReLU: an element whose pre-activation lies within rounding error of zero may land on
either side in a low-precision dtype, and its gradient then differs by a whole
``dy``. :func:`relu_with_mask_of` builds the float64 reference with the tested
output's mask after asserting that the masks differ only at such elements.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
FLOAT64_ATOL = 1e-10
RELATIVE_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The CPU everywhere; CUDA as a marked test that skips here and runs in scripts/gpu_check.sh.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]


def assert_close_to_reference(ours: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor,
                              name: str = "output") -> None:
    """Check ``ours`` against the float64 ``ref`` using the rule in this module's docstring."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    ref = ref.double()
    if ours.dtype == torch.float64:
        error = (ours - ref).abs().max().item()
        bound = FLOAT64_ATOL * max(1.0, ref.abs().max().item())
        assert error <= bound, f"{name}: max error {error:.3g} exceeds {bound:.3g} (float64)"
        return
    scale = max(ref.norm().item(), 1e-30)
    error = (ours.double() - ref).norm().item() / scale
    torch_error = (same_dtype.double() - ref).norm().item() / scale
    bound = 2 * torch_error + RELATIVE_FLOOR[ours.dtype]
    assert error <= bound, (
        f"{name}: relative error {error:.3g} exceeds {bound:.3g} "
        f"(torch in {ours.dtype}: {torch_error:.3g})"
    )


KINK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def relu_with_mask_of(pre: torch.Tensor, tested_out: torch.Tensor) -> torch.Tensor:
    """float64 ``relu(pre)`` using the mask ``tested_out > 0``.

    Fails when the masks differ anywhere the float64 pre-activation is farther from zero
    than the tested dtype's rounding (relative to the largest pre-activation).
    """
    if tested_out.dtype == torch.float64:
        return torch.relu(pre)
    mask = tested_out.detach() > 0
    differ = mask != (pre.detach() > 0)
    if differ.any():
        limit = KINK_TOLERANCE[tested_out.dtype] * max(1.0, pre.detach().abs().max().item())
        worst = pre.detach()[differ].abs().max().item()
        assert worst <= limit, f"ReLU mask differs at a pre-activation of {worst:.3g} (limit {limit:.3g})"
    return pre * mask


def random_input(shape, dtype, channels_last: bool, *, scale: float = 1.0, shift: float = 0.0,
                 device: str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Random normal data (never zeros) in the requested dtype and memory format."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def stock_conv_bn_act(conv, bn, relu: bool, mask_of: torch.Tensor | None = None):
    """``fn(x, residual)``: stock torch ``relu(bn(conv(x)) + residual)``; with ``mask_of``
    (the tested output) the ReLU uses that output's mask (:func:`relu_with_mask_of`)."""
    def fn(x, residual):
        y = bn(conv(x))
        y = y if residual is None else y + residual
        if not relu:
            return y
        return torch.relu(y) if mask_of is None else relu_with_mask_of(y, mask_of)
    return fn


def conv_bn_parameters(conv, bn) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of a conv + BN pair under ``ConvBNAct2d``'s names (``conv.*``, ``bn.*``)."""
    return [(f"conv.{n}", p) for n, p in conv.named_parameters()] + [(f"bn.{n}", p) for n, p in bn.named_parameters()]


def strided_per_channel(t: torch.Tensor | None) -> torch.Tensor | None:
    """The values of the 1-D ``t`` as a non-contiguous view (stride 2) whose gaps hold NaN.

    A kernel that assumes stride 1 reads NaN or another channel's value and fails the
    comparison with contiguous arguments. Differentiable: the view keeps ``t``'s autograd
    history (make ``t`` a leaf first and take gradients with ``torch.autograd.grad``).
    ``None`` stays ``None``.
    """
    if t is None:
        return None
    gaps = torch.full_like(t, float("nan")).detach()
    view = torch.stack([t, gaps], dim=1)[:, 0]
    assert view.stride() == (2,) and not view.is_contiguous()
    return view


def strided_buffer(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, gaps): a copy of the 1-D buffer ``t`` as a stride-2 view of a larger storage, for
    operators that write into it in place, and the view of the storage between its elements
    (NaN; an operator that writes there is wrong)."""
    storage = torch.full((t.shape[0], 2), float("nan"), dtype=t.dtype, device=t.device)
    storage[:, 0] = t
    return storage[:, 0], storage[:, 1]


def poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` filled with NaN (floating point): a kernel that leaves any element
    of its output unwritten fails the comparison. Tests swap it in for a launcher's
    allocator."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


_in_interpreter_process = pytest.mark.skipif(
    not TRITON_INTERPRETER, reason="runs in a fresh TRITON_INTERPRET=1 process (test_interpreter_run)")
# Triton kernel tests: ``cpu`` only inside the interpreter process, ``cuda`` on a GPU.
TRITON_DEVICES = [pytest.param("cpu", marks=_in_interpreter_process),
                  pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]


def run_cpu_tests_in_triton_interpreter(test_file: str, min_passed: int) -> None:
    """Run the ``cpu`` tests of ``test_file`` in a fresh process with TRITON_INTERPRET=1
    (Triton reads it at import) and assert that at least ``min_passed`` passed, none failed."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    path = Path(test_file).resolve()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "-q", "-k", "cpu", "-m", "not gpu",
         "-p", "no:cacheprovider", "-rf", "--no-header"],
        cwd=path.parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= min_passed and "failed" not in summary, summary


def import_kernel_module(name: str):
    """A Triton kernel module, checked to be interpreted in the interpreter process."""
    module = importlib.import_module(name)
    if TRITON_INTERPRETER and not module.INTERPRETED:
        pytest.fail(f"{name}'s kernels are not interpreted although TRITON_INTERPRET=1")
    return module


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run by scripts/gpu_check.sh")
