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
