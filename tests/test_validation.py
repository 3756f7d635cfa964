"""Validation records end to end with a fake GPU identity (no GPU needed).

A record written by the self-check enables its backend on a GPU of the same kind, with the
same kernels and compatible versions; anything else gives ``auto`` a reason to stay off it.
The conftest gives every test an empty user cache (``XDG_CACHE_HOME``).
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fast
from resnet_fast import _extension, validation
from resnet_fast.ops import dispatch
from resnet_fast.validation import DeviceIdentity, RecordWarning, UnvalidatedGPUWarning

H100 = DeviceIdentity("NVIDIA H100 80GB HBM3", (9, 0))
A100 = DeviceIdentity("NVIDIA A100-SXM4-80GB", (8, 0))
CUDA0 = torch.device("cuda", 0)
BUILD = {"architectures": ["8.0", "9.0"], "cuda_version": "12.8", "torch_version": "2.14.1",
         "source_fingerprint": "f" * 64, "build_flags": ["-O3"]}


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(identity)``: pretend every CUDA device is that GPU (for the record lookup and
    for torch.cuda as dispatch and backend_info ask it)."""
    def pretend(identity: DeviceIdentity) -> None:
        monkeypatch.setattr(validation, "device_identity", lambda device: identity)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: identity.name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: identity.capability)
        dispatch._capability_of.cache_clear()
        validation.clear_cache()
    yield pretend
    dispatch._capability_of.cache_clear()


@pytest.fixture
def built_extension(monkeypatch):
    """The CUDA extension as built for sm_80 and sm_90 (``build_info()``), loaded."""
    monkeypatch.setattr(_extension, "build_info", lambda: dict(BUILD))
    monkeypatch.setattr(dispatch.BACKENDS["cuda"], "availability", lambda: [])
    validation.clear_cache()


def record_for(backend: str, identity: DeviceIdentity | None = H100) -> validation.ValidationRecord:
    return validation.new_record(backend, identity, ["bf16", "fp16", "fp32"], ["batch_norm_act"], 10)


# ----------------------------------------------------------------------------- matching
def test_a_written_record_enables_its_backend_on_that_gpu(gpu):
    gpu(H100)
    path = validation.write_record(record_for("triton"))
    assert path.parent == validation.user_records_directory()
    assert path.parent.parent.name == "resnet_fast"
    assert validation.auto_reason("triton", CUDA0) is None
    assert validation.enabling_record("triton", CUDA0).source == str(path)
    assert validation.describe("triton", CUDA0) == {"record": str(path), "reason": None}


def test_the_record_file_holds_what_the_issue_lists(gpu):
    gpu(H100)
    data = json.loads(validation.write_record(record_for("triton")).read_text())
    assert data["backend"] == "triton" and data["gpu_name"] == H100.name and data["capability"] == [9, 0]
    assert data["fingerprint"] == validation.backend_fingerprint("triton")
    assert data["torch"] == torch.__version__ and data["cuda"] == torch.version.cuda
    assert data["triton"] == validation.triton_version()
    assert data["dtypes"] == ["bf16", "fp16", "fp32"] and data["date"] and data["interpreted"] is False


def test_a_changed_kernel_fingerprint_needs_a_new_check(gpu):
    gpu(H100)
    record = record_for("triton")
    record.fingerprint = "0" * 64
    validation.write_record(record)
    reason = validation.auto_reason("triton", CUDA0)
    assert "kernels changed since the check" in reason and "000000000000" in reason


def test_the_fingerprint_follows_the_kernel_sources(monkeypatch, tmp_path):
    """Editing any Triton kernel file changes the triton fingerprint (and not the others')."""
    shutil.copytree(validation._PACKAGE / "kernels", tmp_path / "kernels")
    monkeypatch.setattr(validation, "_PACKAGE", tmp_path)
    validation.clear_cache()
    before = validation.backend_fingerprint("triton")
    with open(tmp_path / "kernels" / "batch_norm_act.py", "a") as f:
        f.write("\n# a changed kernel\n")
    validation.clear_cache()
    assert validation.backend_fingerprint("triton") != before


def test_a_codegen_flag_is_part_of_the_fingerprint(monkeypatch):
    before = validation.backend_fingerprint("triton")
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    validation.clear_cache()
    assert validation.backend_fingerprint("triton") != before


def test_the_cuda_fingerprint_comes_from_build_info(built_extension, monkeypatch):
    first = validation.backend_fingerprint("cuda")
    monkeypatch.setattr(_extension, "build_info", lambda: {**BUILD, "source_fingerprint": "e" * 64})
    validation.clear_cache()
    assert validation.backend_fingerprint("cuda") != first
    monkeypatch.setattr(_extension, "build_info", lambda: {**BUILD, "build_flags": ["-O2"]})
    validation.clear_cache()
    assert validation.backend_fingerprint("cuda") not in (first, None)


def test_without_build_info_the_cuda_fingerprint_hashes_csrc(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "build_info", lambda: None)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "kernel.cu").write_text("__global__ void k() {}\n")
    package = tmp_path / "resnet_fast"
    shutil.copytree(validation._PACKAGE / "ops", package / "ops")
    monkeypatch.setattr(validation, "_PACKAGE", package)
    validation.clear_cache()
    first = validation.backend_fingerprint("cuda")
    (tmp_path / "csrc" / "kernel.cu").write_text("__global__ void k() { /* changed */ }\n")
    validation.clear_cache()
    assert first is not None and validation.backend_fingerprint("cuda") != first
    shutil.rmtree(tmp_path / "csrc")
    validation.clear_cache()
    assert validation.backend_fingerprint("cuda") is None  # neither build_info nor sources: unknown


def test_another_compute_capability_is_not_validated(gpu):
    gpu(A100)
    validation.write_record(record_for("triton", H100))
    reason = validation.auto_reason("triton", CUDA0)
    assert "is for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU has 8.0" in reason


@pytest.mark.parametrize("versions,matches,why", [
    ({"triton": "0.0.1"}, False, "made with Triton 0.0.1"),
    ({"torch": "1.0.0"}, False, "made with torch 1.0.0"),
    ({"cuda": "10.2"}, False, "made with CUDA 10.2"),
    ({"torch": ".".join(torch.__version__.split(".")[:2]) + ".99"}, True, None),  # a patch release matches
])
def test_versions_must_be_compatible(gpu, versions, matches, why):
    gpu(H100)
    record = record_for("triton")
    for key, value in versions.items():
        setattr(record, key, value)
    validation.write_record(record)
    reason = validation.auto_reason("triton", CUDA0)
    assert (reason is None) == matches
    if why:
        assert why in reason


def test_an_interpreter_record_never_validates_a_gpu(gpu):
    gpu(H100)
    validation.write_record(record_for("triton", None))
    reason = validation.auto_reason("triton", CUDA0)
    assert "Triton interpreter on CPU, which validates no GPU" in reason


def test_the_cuda_backend_needs_the_gpu_architecture_in_its_build(gpu, built_extension, monkeypatch):
    gpu(H100)
    validation.write_record(record_for("cuda"))
    assert validation.auto_reason("cuda", CUDA0) is None
    monkeypatch.setattr(_extension, "build_info", lambda: {**BUILD, "architectures": ["7.5", "8.0+PTX"]})
    validation.clear_cache()
    reason = validation.auto_reason("cuda", CUDA0)
    assert "built for compute capabilities 7.5, 8.0, not 9.0" in reason
    monkeypatch.setattr(_extension, "build_info", lambda: None)
    validation.clear_cache()
    assert "build_info() is unavailable" in validation.auto_reason("cuda", CUDA0)


def test_records_committed_in_the_package_count(gpu, monkeypatch, tmp_path):
    gpu(H100)
    monkeypatch.setattr(validation, "PACKAGED_RECORDS", tmp_path)
    path = validation.write_record(record_for("triton"), tmp_path)
    assert validation.enabling_record("triton", CUDA0).source == str(path)


def test_the_package_ships_no_record_yet():
    """No GPU run of the check has been made with these kernels: nothing may claim one."""
    assert list(validation.PACKAGED_RECORDS.glob("*.json")) == []


# ----------------------------------------------------------------------------- broken caches
def test_a_corrupt_record_warns_and_is_ignored(gpu):
    gpu(H100)
    directory = validation.user_records_directory()
    directory.mkdir(parents=True)
    (directory / "broken.json").write_text("{ not json")
    (directory / "wrong.json").write_text(json.dumps({"format": 1, "backend": 3}))
    with pytest.warns(RecordWarning) as caught:
        reason = validation.auto_reason("triton", CUDA0)
    messages = " ".join(str(w.message) for w in caught if w.category is RecordWarning)
    assert "broken.json" in messages and "wrong.json" in messages and "'backend'" in messages
    assert "no validation record for the triton backend" in reason


def test_an_unwritable_cache_warns_instead_of_failing(monkeypatch, tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with pytest.warns(RecordWarning, match="cannot write the validation record"):
        assert validation.write_record(record_for("triton")) is None


# ----------------------------------------------------------------------------- auto and the warning
def test_without_records_auto_warns_once_naming_the_gpu_and_the_command(gpu):
    gpu(H100)
    with pytest.warns(UnvalidatedGPUWarning) as caught:
        for _ in range(3):
            for backend in ("cuda", "triton"):
                assert validation.auto_reason(backend, CUDA0) is not None
    unvalidated = [w for w in caught if w.category is UnvalidatedGPUWarning]
    assert len(unvalidated) == 1
    assert str(unvalidated[0].message) == validation.unvalidated_warning_text(H100, CUDA0)
    text = str(unvalidated[0].message)
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in text and "cuda:0" in text
    assert "`python -m resnet_fast.check` (about a minute)" in text and "enable them" in text


def test_no_warning_when_one_fused_backend_is_validated(gpu):
    gpu(H100)
    validation.write_record(record_for("triton"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnvalidatedGPUWarning)
        assert validation.auto_reason("cuda", CUDA0) is not None
        assert validation.auto_reason("triton", CUDA0) is None


def test_no_warning_on_the_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnvalidatedGPUWarning)
        assert "CUDA devices only" in validation.auto_reason("triton", torch.device("cpu"))
        resnet_fast.set_backend("auto")
        resnet_fast.ops.batch_norm_act(torch.randn(2, 3, 4, 4))


def test_the_decision_is_cached_per_backend_and_device(gpu, monkeypatch):
    gpu(H100)
    validation.write_record(record_for("triton"))
    loads, identities = [], []
    real_load, real_identity = validation.load_records, validation.device_identity
    monkeypatch.setattr(validation, "load_records", lambda: loads.append(1) or real_load())
    monkeypatch.setattr(validation, "device_identity",
                        lambda device: identities.append(device) or real_identity(device))
    for _ in range(5):
        assert validation.auto_reason("triton", CUDA0) is None
        assert validation.auto_reason("triton", torch.device("cuda", 1)) is None
    assert len(loads) == 1 and sorted(map(str, identities)) == ["cuda:0", "cuda:1"]


def _fake_cuda(*shape, dtype=torch.float16):
    with FakeTensorMode():
        return torch.empty(shape, dtype=dtype, device="cuda")


def test_auto_follows_the_records_in_dispatch(gpu, monkeypatch):
    """The real dispatcher on a fake GPU tensor: torch (with the warning) until a triton
    record exists, then triton; an explicit choice and RESNET_FAST_BACKEND as before."""
    gpu(H100)
    monkeypatch.setattr(dispatch.BACKENDS["triton"], "kernels",
                        {op: (lambda: "triton") for op in dispatch.BACKENDS["triton"].kernels})
    monkeypatch.setattr(dispatch.BACKENDS["torch"], "kernels",
                        {op: (lambda: "torch") for op in dispatch.BACKENDS["torch"].kernels})
    resnet_fast.set_backend("auto")
    x = _fake_cuda(2, 8, 4, 4)
    with pytest.warns(UnvalidatedGPUWarning, match="NVIDIA H100"):
        assert dispatch.select_kernel("batch_norm_act", x)() == "torch"
    validation.write_record(record_for("triton"))
    assert dispatch.select_kernel("batch_norm_act", x)() == "triton"
    validation.clear_cache()
    monkeypatch.setattr(validation, "current_versions",
                        lambda: {"torch": torch.__version__, "triton": "9.9.9", "cuda": torch.version.cuda})
    assert dispatch.select_kernel("batch_norm_act", x)() == "torch"  # a Triton upgrade needs a new check
    resnet_fast.set_backend("triton")
    assert dispatch.select_kernel("batch_norm_act", x)() == "triton"  # forcing needs no record
    resnet_fast.set_backend("auto")


def test_backend_info_says_which_record_enabled_a_backend_or_why_none(gpu, built_extension):
    gpu(H100)
    path = validation.write_record(record_for("triton"))
    info = resnet_fast.backend_info()
    assert info["triton"]["auto"] is True
    assert info["triton"]["validation"] == {"cuda:0": {"record": str(path), "reason": None}}
    assert info["cuda"]["auto"] is False
    cuda = info["cuda"]["validation"]["cuda:0"]
    assert cuda["record"] is None and "no validation record for the cuda backend" in cuda["reason"]
    assert info["torch"]["auto"] is True and info["torch"]["validation"] == {}
