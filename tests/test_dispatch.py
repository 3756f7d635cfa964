"""Backend selection: set_backend, RESNET_FAST_BACKEND, backend_info, reasons."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fast
from resnet_fast import validation
from resnet_fast.ops import dispatch


def test_unknown_backend_is_rejected_with_choices():
    with pytest.raises(ValueError, match="choose one of auto, cuda, triton, torch"):
        resnet_fast.set_backend("cudnn")


def test_auto_runs_on_cpu_through_torch_backend():
    resnet_fast.set_backend("auto")
    x = torch.randn(2, 3, 4, 4)
    assert dispatch.select_kernel("batch_norm_act", x) is dispatch.BACKENDS["torch"].kernels["batch_norm_act"]
    out = resnet_fast.ops.batch_norm_act(x)
    assert out.shape == x.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_explicit_backend_that_cannot_run_lists_reasons(name):
    resnet_fast.set_backend(name)
    with pytest.raises(resnet_fast.BackendUnavailableError) as info:
        resnet_fast.ops.batch_norm_act(torch.randn(2, 3, 4, 4))
    message = str(info.value)
    assert f"backend '{name}' cannot run batch_norm_act" in message
    assert "not implemented" in message or "not on a CUDA device" in message or "Triton needs" in message


def test_backend_info_reports_every_backend():
    info = resnet_fast.backend_info()
    assert set(info) >= {"cuda", "triton", "torch", "selected", "cuda_device"}
    assert info["torch"]["available"] and info["torch"]["reasons"] == []
    assert {"batch_norm_act", "batch_norm_act_backward", "conv_bn_act", "update_running_stats"} <= set(
        info["torch"]["operators"]
    )
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"]
        assert any("no CUDA device" in r for r in info["cuda"]["reasons"])


def test_not_supported_reasons_name_the_operator():
    reasons = dispatch.BACKENDS["cuda"].not_supported_reasons("no_such_op", torch.zeros(1))
    assert any("operator 'no_such_op' is not implemented in the cuda backend" in r for r in reasons)
    assert any("not on a CUDA device" in r for r in reasons)


def _backend_in_fresh_process(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_FAST_BACKEND": value}
    code = "import resnet_fast; print(resnet_fast.get_backend())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_environment_variable_sets_the_backend():
    result = _backend_in_fresh_process("torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


def test_environment_variable_with_bad_value_warns_naming_it_and_falls_back_to_auto():
    result = _backend_in_fresh_process("fastest")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "auto"
    assert "environment variable RESNET_FAST_BACKEND='fastest' is not a resnet_fast backend" in result.stderr
    assert "using 'auto'" in result.stderr


def test_auto_never_sends_cpu_tensors_to_the_triton_interpreter(monkeypatch):
    """Even with TRITON_INTERPRET=1 and a Triton kernel registered, auto keeps CPU on torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch.BACKENDS["triton"].kernels, "probe_op", lambda: "triton")
    monkeypatch.setitem(dispatch.BACKENDS["torch"].kernels, "probe_op", lambda: "torch")
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "availability", lambda: [])
    x = torch.zeros(1)
    resnet_fast.set_backend("auto")
    assert dispatch.select_kernel("probe_op", x)() == "torch"
    resnet_fast.set_backend("triton")
    assert dispatch.select_kernel("probe_op", x)() == "triton"


def test_input_check_reasons_join_the_backend_reasons(monkeypatch):
    """A backend's registered input check (e.g. a dtype it lacks) refuses with its reason."""
    monkeypatch.setattr(dispatch.BACKENDS["torch"], "input_check", None)
    dispatch.register_input_check("torch", lambda x: ["probe: no float16"] if x.dtype == torch.float16 else [])
    backend = dispatch.BACKENDS["torch"]
    assert backend.not_supported_reasons("batch_norm_act", torch.zeros(1)) == []
    assert backend.not_supported_reasons("batch_norm_act", torch.zeros(1, dtype=torch.float16)) == ["probe: no float16"]
    resnet_fast.set_backend("torch")
    with pytest.raises(resnet_fast.BackendUnavailableError, match="probe: no float16"):
        resnet_fast.ops.batch_norm_act(torch.randn(2, 3, 4, 4, dtype=torch.float16))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_backend_refuses_float64_with_a_reason():
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons("batch_norm_act", torch.zeros(1, dtype=torch.float64))
    assert any("torch.float64 input is not supported by the triton backend" in r for r in reasons)
    assert not any("float" in r for r in dispatch.BACKENDS["triton"].input_check(torch.zeros(1)))


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unvalidated_gpu_backends_are_explicit_only(name, monkeypatch):
    """auto skips a GPU backend whose validation lookup gives a reason; explicit choice works."""
    backend = dispatch.BACKENDS[name]
    monkeypatch.setattr(backend, "availability", lambda: [])
    monkeypatch.setattr(backend, "device_check", lambda x: [])
    monkeypatch.setitem(backend.kernels, "probe_op", lambda: name)
    asked = []

    def no_record(backend_name, device):
        asked.append((backend_name, device))
        return f"no validation record for the {backend_name} backend"

    monkeypatch.setattr(validation, "auto_reason", no_record)
    with FakeTensorMode():
        x = torch.empty(1, device="cuda")
    assert backend.not_supported_reasons("probe_op", x, explicit=False) == [
        f"no validation record for the {name} backend"]
    assert backend.not_supported_reasons("probe_op", x, explicit=True) == []
    assert asked == [(name, x.device)]
    # CPU tensors never reach the validation lookup (auto keeps them off GPU backends anyway)
    assert "auto sends only CUDA tensors to GPU backends" in backend.not_supported_reasons(
        "probe_op", torch.zeros(1), explicit=False)
    assert len(asked) == 1
