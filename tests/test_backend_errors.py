"""Backend choices that cannot work here are reported when they are made, not at the first call."""

from __future__ import annotations

import warnings

import pytest
import torch
from train_fixtures import train

import resnet_fast
from resnet_fast.ops import dispatch
from resnet_fast.ops.dispatch import BackendUnavailableWarning


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without a CUDA device, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_set_backend_warns_at_once_when_the_machine_cannot_run_it(name, no_gpu):
    with pytest.warns(BackendUnavailableWarning) as caught:
        resnet_fast.set_backend(name)
    message = str(caught[0].message)
    assert f"set_backend('{name}') chose the resnet_fast backend '{name}', which cannot run on this machine" in message
    assert "no CUDA device is visible to torch" in message
    assert "set_backend('auto')" in message
    assert resnet_fast.get_backend() == name  # still chosen: the call then raises with every reason
    with pytest.raises(resnet_fast.BackendUnavailableError, match=f"backend '{name}' cannot run batch_norm_act"):
        resnet_fast.ops.batch_norm_act(torch.randn(2, 3, 4, 4))


def test_set_backend_triton_under_the_interpreter_does_not_warn(no_gpu, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "availability", lambda: [])  # triton installed or not
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendUnavailableWarning)
        resnet_fast.set_backend("triton")


@pytest.mark.parametrize("name", ["auto", "torch"])
def test_set_backend_that_runs_everywhere_never_warns(name, no_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendUnavailableWarning)
        resnet_fast.set_backend(name)


def test_machine_reasons_for_a_device():
    assert dispatch.machine_reasons("torch", "cpu") == []
    reasons = dispatch.machine_reasons("cuda", "cpu")
    assert "it needs a CUDA device and the device is cpu" in reasons


def test_train_backend_cuda_on_the_cpu_is_a_usage_error_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "run"
    status = train("synthetic", "--model", "resnet8", "--device", "cpu", "--backend", "cuda", "--out", out)
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("resnet-fast-train: error: --backend cuda cannot run on cpu: it needs a CUDA device")
    assert not any("Traceback" in line for line in err)
    assert not out.exists()  # no tfevents, no metrics.csv
