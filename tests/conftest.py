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


def poisoned_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` filled with NaN (floating point): a kernel that leaves any element
    of its output unwritten fails the comparison. Tests swap it in for a launcher's
    allocator."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


# Triton kernel tests: ``cpu`` only inside the interpreter process (elsewhere deselected, see
# pytest_collection_modifyitems: test_interpreter_run runs them), ``cuda`` on a GPU.
TRITON_DEVICES = [pytest.param("cpu", marks=pytest.mark.triton_interpreter),
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
    config.addinivalue_line("markers", "triton_interpreter: a Triton kernel case on the CPU; runs only in the "
                                       "TRITON_INTERPRET=1 process that its file's test_interpreter_run starts")
    # Tests select the triton/cuda backend on machines that cannot run it to test what does
    # not launch kernels; set_backend's warning is for users (test_backend_errors checks it).
    config.addinivalue_line("filterwarnings", "ignore::resnet_fast.ops.dispatch.BackendUnavailableWarning")


# ----------------------------------------------------------------------------- the summary
# One line per kind of skip instead of one per test, and each Triton CPU case listed once:
# outside the interpreter process it is deselected (its file's test_interpreter_run runs
# and checks it), not reported as a skip beside the same case's CUDA skip.

INTERPRETER_CASES_KEY = pytest.StashKey[int]()
GPU_SKIP_HINT = "run scripts/gpu_check.sh on a GPU"


def pytest_collection_modifyitems(config, items):
    if TRITON_INTERPRETER:
        return
    keep, interpreted = [], []
    for item in items:
        (interpreted if item.get_closest_marker("triton_interpreter") else keep).append(item)
    if interpreted:
        config.hook.pytest_deselected(items=interpreted)
        items[:] = keep
    config.stash[INTERPRETER_CASES_KEY] = len(interpreted)


def skip_reason(report) -> str:
    """The reason of a skipped test's report, without pytest's ``Skipped: `` prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def grouped_skip_lines(reports) -> list[str]:
    """``count kind skipped: reason`` per distinct reason, most frequent first; GPU-marked
    tests are counted as GPU tests and told where they run."""
    groups: dict[tuple[bool, str], int] = {}
    for report in reports:
        key = ("gpu" in getattr(report, "keywords", {}), skip_reason(report))
        groups[key] = groups.get(key, 0) + 1
    lines = []
    for (gpu, reason), count in sorted(groups.items(), key=lambda entry: -entry[1]):
        kind = "GPU test" if gpu else "test"
        hint = f"; {GPU_SKIP_HINT}" if gpu and GPU_SKIP_HINT not in reason else ""
        lines.append(f"{count:,} {kind}{'s' if count != 1 else ''} skipped: {reason}{hint}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = grouped_skip_lines(terminalreporter.stats.get("skipped", []))
    interpreted = config.stash.get(INTERPRETER_CASES_KEY, 0)
    if interpreted:
        lines.append(f"{interpreted:,} Triton CPU case{'s' if interpreted != 1 else ''} deselected here: each file's "
                     "test_interpreter_run runs them in a fresh TRITON_INTERPRET=1 process (on a GPU the kernels "
                     "run on it instead)")
    if lines:
        terminalreporter.section("skips, grouped by reason")
        for line in lines:
            terminalreporter.line(line)
