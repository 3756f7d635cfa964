"""``python -m resnet_fast.check``: the command itself (CPU, through Triton's interpreter),
its case list, its comparison failing a wrong kernel, and (GPU-marked) a passing check."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_gpu

from resnet_fast import validation
from resnet_fast.check import cases as case_lists
from resnet_fast.check.__main__ import EXIT_NO_GPU, select_dtypes
from resnet_fast.check.runner import FAIL, PASS, CaseRun, skip_reason
from resnet_fast.ops import dispatch, reference
from resnet_fast.validation import DeviceIdentity

ROOT = Path(__file__).resolve().parents[1]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPERATORS = {"batch_norm_act", "conv_bn_act", "batch_norm_stats", "scale_shift_act", "update_running_stats",
             "conv2d_bias_act", "conv2d_stats", "conv2d_tensor_core"}


def run_check(*args: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "resnet_fast.check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- the command on CPU
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_interpret_prints_the_table_and_writes_a_record_that_validates_no_gpu(tmp_path, monkeypatch):
    result = run_check("--interpret", "--json", str(tmp_path / "check.json"), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    out = result.stdout
    for column in ("operator", "backend", "dtype", "layout", "max error", "tolerance", "result"):
        assert column in out
    assert "triton: passed all" in out and "cuda: not checked" in out
    assert "An interpreter run validates no GPU" in out

    report = json.loads((tmp_path / "check.json").read_text())
    assert report["interpreted"] is True and report["gpu"] is None
    rows = [r for r in report["rows"] if r["result"] != "skipped"]
    assert rows and all(r["result"] == PASS and r["backend"] == "triton" for r in rows)
    assert {r["operator"] for r in rows} >= {"batch_norm_act", "batch_norm_act_backward", "conv2d_stats_backward"}
    assert all(r["max_error"] <= r["tolerance"] for r in rows)
    triton = report["backends"]["triton"]
    assert triton["passed"] and triton["record"]["interpreted"] is True
    cuda = report["backends"]["cuda"]
    assert cuda["checked"] is False and cuda["record_path"] is None
    assert cuda["reasons"] == ["the interpreter runs only the triton backend"]

    record_path = Path(triton["record_path"])
    assert record_path.parent == tmp_path / "cache" / "resnet_fast" / "validation_records"
    record = json.loads(record_path.read_text())
    assert record["capability"] is None and record["gpu_name"] == "Triton interpreter (CPU)"
    assert set(record["dtypes"]) == {"fp32", "fp16"}
    # ... and that record enables nothing on a GPU
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(validation, "device_identity", lambda device: DeviceIdentity("NVIDIA H100", (9, 0)))
    validation.clear_cache()
    with pytest.warns(validation.UnvalidatedGPUWarning):
        reason = validation.auto_reason("triton", torch.device("cuda", 0))
    assert "validates no GPU" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_check_says_so_with_its_own_exit_status(tmp_path):
    result = run_check(cache=tmp_path, timeout=300)
    assert result.returncode == EXIT_NO_GPU, result.stdout + result.stderr
    assert "No CUDA GPU is visible to torch, so there is nothing to check" in result.stdout
    assert "--interpret" in result.stdout
    assert not (tmp_path / "resnet_fast").exists()  # no record


# ----------------------------------------------------------------------------- what runs
def test_the_gpu_case_list_covers_what_the_check_promises():
    cases = case_lists.gpu_cases(ALL_DTYPES)
    assert {c.operator for c in cases} == OPERATORS
    backward = {c.operator for c in cases if c.backward}
    assert backward == {"batch_norm_act", "conv_bn_act", "scale_shift_act", "conv2d_bias_act", "conv2d_stats"}
    for operator in OPERATORS - {"update_running_stats", "conv2d_tensor_core"}:
        combos = {(c.dtype, c.channels_last) for c in cases if c.operator == operator}
        assert combos == {(d, cl) for d in ALL_DTYPES for cl in (False, True)}, operator
    bn = [c for c in cases if c.operator == "batch_norm_act"]
    shapes = [next(a.shape for a in c.args if a.name == "input") for c in bn]
    assert any(s[1] % 8 for s in shapes) and any(s[2] * s[3] == 1 for s in shapes)
    assert any(s[3] % 2 for s in shapes)  # a tail along the vectorised dimension
    assert {c.label.split(" ")[0] for c in cases if c.label.startswith("ResNet-50")} == {"ResNet-50"}
    assert {c.operator for c in cases if c.label.startswith("ResNet-50")} >= {"batch_norm_act", "conv2d_stats"}
    assert any(a.noncontiguous for c in bn for a in c.args)
    assert {c.operator for c in cases if any(a.noncontiguous for a in c.args)} >= {"scale_shift_act"}
    assert {training for c in bn for training in [c.label.split(" ")[1]]} >= {"train", "eval"}
    assert all(c.dtype == torch.float16 for c in cases if c.operator == "conv2d_tensor_core")


def test_a_gpu_without_bfloat16_is_checked_in_float32_and_float16():
    cases = case_lists.gpu_cases([torch.float32, torch.float16])
    assert {c.dtype for c in cases} == {torch.float32, torch.float16}


def test_dtype_selection_and_partial_checks():
    """--dtype narrows the check; leaving out a dtype the GPU has makes it partial (no record);
    asking for one it lacks is an error naming it."""
    h100, t4 = DeviceIdentity("NVIDIA H100", (9, 0)), DeviceIdentity("Tesla T4", (7, 5))
    assert select_dtypes(h100, None) == (ALL_DTYPES, False)
    assert select_dtypes(t4, None) == ([torch.float32, torch.float16], False)
    assert select_dtypes(h100, ["bf16"]) == ([torch.bfloat16], True)
    assert select_dtypes(t4, ["fp16", "fp32"]) == ([torch.float32, torch.float16], False)
    with pytest.raises(ValueError, match="--dtype bf16: Tesla T4 .* does not compute in it"):
        select_dtypes(t4, ["bf16"])
    assert select_dtypes(None, ["fp32"]) == ([], False)


def test_every_gpu_case_runs_under_the_reference_backend_on_cpu():
    """The case definitions themselves (calls, reference calls, masks, gradients) run and
    pass under the torch backend on the CPU (ResNet-50 shapes left to the GPU)."""
    cases = [c for c in case_lists.gpu_cases([torch.float32, torch.bfloat16]) if not c.label.startswith("ResNet-50")]
    for index, case in enumerate(cases):
        rows = CaseRun(case, torch.device("cpu"), index).rows("torch")
        assert [r.result for r in rows] == [PASS] * (2 if case.backward else 1), rows


def test_a_wrong_kernel_fails_its_case(monkeypatch):
    """A backend kernel whose output is off by one part in a thousand fails in float32."""
    def slightly_wrong(*args):
        out, mean, var = reference.batch_norm_act(*args)
        return out * 1.001, mean, var

    monkeypatch.setitem(dispatch.BACKENDS["triton"].kernels, "batch_norm_act", slightly_wrong)
    monkeypatch.setitem(dispatch.BACKENDS["triton"].kernels, "batch_norm_act_backward",
                        reference.batch_norm_act_backward)
    monkeypatch.setitem(dispatch.BACKENDS["triton"].kernels, "update_running_stats", reference.update_running_stats)
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "device_check", lambda x: [])
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "availability", lambda: [])
    case = case_lists.batch_norm_act_case((2, 5, 3, 3), torch.float32, False, training=True, residual=True, relu=True)
    forward, backward = CaseRun(case, torch.device("cpu"), 0).rows("triton")
    assert forward.result == FAIL and "out: relative error" in forward.detail
    assert forward.max_error > forward.tolerance
    assert backward.result == PASS  # the backward kernel is right


def test_a_crashing_kernel_is_a_failed_row_not_a_crash(monkeypatch):
    def broken(*args):
        raise RuntimeError("launch failed")

    monkeypatch.setitem(dispatch.BACKENDS["triton"].kernels, "conv2d_stats", broken)
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "device_check", lambda x: [])
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "availability", lambda: [])
    case = case_lists.conv2d_stats_case((1, 3, 5, 5), 4, 3, 1, torch.float32, True, prologue=True)
    rows = CaseRun(case, torch.device("cpu"), 0).rows("triton")
    assert [r.result for r in rows] == [FAIL] and "RuntimeError: launch failed" in rows[0].detail


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (9, 0)])
def test_kernels_auto_never_runs_on_a_gpu_are_skipped(monkeypatch, capability):
    """Triton's tl.dot convolutions below sm_80 and the WMMA convolution from sm_80 on are not
    what auto runs there: the check skips them, saying why; the rest runs."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    gpu = torch.device("cuda", 0)
    cases = {c.operator: c for c in case_lists.gpu_cases([torch.float16])}
    below_sm80 = capability < (8, 0)
    reason = skip_reason(cases["conv2d_stats"], "triton", gpu, interpreted=False)
    assert (reason is not None) == below_sm80
    if below_sm80:
        assert reason.startswith("auto never runs it here") and "needs compute capability 8.0" in reason
    reason = skip_reason(cases["conv2d_tensor_core"], "cuda", gpu, interpreted=False)
    assert (reason is None) == below_sm80
    assert skip_reason(cases["conv2d_tensor_core"], "triton", gpu, interpreted=False) == (
        "conv2d_tensor_core is not a triton kernel")
    assert skip_reason(cases["batch_norm_act"], "triton", gpu, interpreted=False) is None
    assert skip_reason(cases["conv2d_stats"], "cuda", gpu, interpreted=False) is None


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@requires_gpu
def test_the_check_passes_on_this_gpu(tmp_path):
    result = run_check("--json", str(tmp_path / "check.json"), "--record-dir", str(tmp_path / "records"),
                       cache=tmp_path / "cache", timeout=900)
    report = json.loads((tmp_path / "check.json").read_text())
    failures = [r for r in report["rows"] if r["result"] == FAIL]
    assert result.returncode == 0 and not failures, (failures[:20], result.stdout[-4000:], result.stderr[-3000:])
    checked = [name for name, b in report["backends"].items() if b["checked"]]
    assert checked, report["backends"]
    for name in checked:
        assert report["backends"][name]["passed"] and Path(report["backends"][name]["record_path"]).exists()
    print(f"self-check: {sum(b['checks'] for b in report['backends'].values())} checks in {report['seconds']:.0f} s")
