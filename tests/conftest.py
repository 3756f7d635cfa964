"""Shared test helpers: float64 references and the dtype-aware tolerance rule.

The rule itself (and the ReLU-mask handling) lives in :mod:`resnet_fast.testing`, which
``python -m resnet_fast.check`` uses too: the tests and the self-check share one rule.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fast.testing import (  # noqa: F401  re-exported for the tests
    FLOAT64_ATOL,
    KINK_TOLERANCE,
    RELATIVE_FLOOR,
    assert_close_to_reference,
    random_input,
    relu_with_mask_of,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# The CPU everywhere; CUDA as a marked test that skips here and runs in scripts/gpu_check.sh.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])]


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


@pytest.fixture
def reference_backend():
    """``set_backend("torch")`` for the test, restored afterwards: the modules then run the
    fused operators' reference composition (what the fused kernels are tested against)
    instead of the default native path, which runs torchvision's own aten operators and is
    tested in test_native_path.py."""
    import resnet_fast

    before = resnet_fast.get_backend()
    resnet_fast.set_backend("torch")
    yield
    resnet_fast.set_backend(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; run by scripts/gpu_check.sh")
    config.addinivalue_line("markers", "triton_interpreter: a Triton kernel case on the CPU; runs only in the "
                                       "TRITON_INTERPRET=1 process that its file's test_interpreter_run starts")
    # Tests select the triton/cuda backend on machines that cannot run it to test what does
    # not launch kernels; set_backend's warning is for users (test_backend_errors checks it).
    config.addinivalue_line("filterwarnings", "ignore::resnet_fast.ops.dispatch.BackendUnavailableWarning")


@pytest.fixture(autouse=True)
def restore_backend():
    """Tests and the command-line tools they run select backends for the whole process:
    every test gives the next one the choice it found."""
    import warnings

    import resnet_fast
    from resnet_fast.ops.dispatch import BackendUnavailableWarning

    before = resnet_fast.get_backend()
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendUnavailableWarning)
        resnet_fast.set_backend(before)


@pytest.fixture(autouse=True)
def isolated_validation_records(tmp_path_factory, monkeypatch):
    """Every test sees an empty user cache of validation records (never the machine's own)
    and a fresh record lookup; the once-per-process warning may fire again."""
    from resnet_fast import validation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    validation.clear_cache()
    validation._warned_unvalidated.clear()
    yield
    validation.clear_cache()


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


def cuda_kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels that ``fn()`` launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
