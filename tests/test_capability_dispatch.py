"""Dispatch by compute capability, on a mocked GPU: V100 (7.0), T4 (7.5), A100 (8.0), H100 (9.0).

No GPU is needed: ``torch.cuda.get_device_capability`` is replaced by a stand-in that
reports the chosen capability, and the inputs are fake CUDA tensors (``FakeTensorMode``:
real ``torch.Tensor`` objects with ``device == cuda:0`` and no storage). Everything else
is the real dispatch code: :func:`resnet_fast.ops.dispatch.select_kernel`, the backends'
reasons, :func:`resnet_fast.backend_info` and the operators' input validation.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fast
from resnet_fast import kernels, validation
from resnet_fast.ops import dispatch
from resnet_fast.ops.dispatch import TENSOR_CORE_DOT, CapabilityWarning

CAPABILITIES = {"V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "H100": (9, 0)}
BELOW_SM80 = {"V100", "T4"}
REAL_OPS = ("batch_norm_act", "batch_norm_act_backward", "conv_bn_act", "update_running_stats")
TENSOR_CORE_OP = "tensor_core_probe"  # a stand-in for a Triton convolution built on tl.dot


@pytest.fixture(autouse=True)
def clear_capability_cache():
    """The tests fake GPUs of several capabilities: forget them afterwards."""
    yield
    dispatch._capability_of.cache_clear()


@pytest.fixture
def gpu(monkeypatch):
    """``gpu(name)``: pretend cuda:0 is that GPU; returns a factory of fake CUDA tensors on it."""
    fake_mode = FakeTensorMode()

    def pretend(name: str):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: CAPABILITIES[name])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"mocked {name}")
        dispatch._capability_of.cache_clear()

        def tensor(*shape, dtype=torch.float16):
            with fake_mode:
                return torch.empty(shape, dtype=dtype, device="cuda")

        return tensor

    return pretend


@pytest.fixture
def tagged(monkeypatch):
    """Every registered kernel replaced by one that returns its backend's name (backends
    may share a function); the registrations and requirements are restored afterwards."""
    for name in dispatch.BACKEND_NAMES:
        backend = dispatch.BACKENDS[name]
        monkeypatch.setattr(backend, "kernels", {op: (lambda name=name: name) for op in backend.kernels})
        monkeypatch.setattr(backend, "requirements", dict(backend.requirements))


@pytest.fixture
def tensor_core_op(tagged):
    """Register ``tensor_core_probe`` as the real API does: a Triton kernel needing tensor
    cores and a torch one; calling the fixture's value adds a CUDA C++ one."""
    dispatch.register_kernel("triton", TENSOR_CORE_OP, requires=TENSOR_CORE_DOT)(lambda: "triton")
    dispatch.register_kernel("torch", TENSOR_CORE_OP)(lambda: "torch")

    def add_cuda():
        dispatch.register_kernel("cuda", TENSOR_CORE_OP)(lambda: "cuda")

    return add_cuda


@pytest.fixture
def validated(monkeypatch):
    """The GPU backends as they are on a GPU with validation records for both, the CUDA
    extension loaded."""
    monkeypatch.setattr(validation, "auto_reason", lambda backend, device: None)
    for name in ("cuda", "triton"):
        monkeypatch.setattr(dispatch.BACKENDS[name], "availability", lambda: [])


def chosen_backend(op: str, x: torch.Tensor) -> str:
    """The backend the real dispatcher picks (kernels tagged by the ``tagged`` fixture)."""
    return dispatch.select_kernel(op, x)()


# ----------------------------------------------------------------------------- auto
@pytest.mark.parametrize("name", CAPABILITIES)
def test_auto_never_sends_a_tensor_core_kernel_below_sm80(name, gpu, tensor_core_op, validated):
    x = gpu(name)(2, 8, 4, 4)
    expected = "torch" if name in BELOW_SM80 else "triton"
    assert chosen_backend(TENSOR_CORE_OP, x) == expected
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons(TENSOR_CORE_OP, x, explicit=False)
    if name in BELOW_SM80:
        need = "%d.%d" % CAPABILITIES[name]
        assert reasons == [f"operator '{TENSOR_CORE_OP}' in the triton backend needs compute capability 8.0 or "
                           f"newer ({TENSOR_CORE_DOT.why}); cuda:0 has {need}"]
        assert "tl.dot" in reasons[0] and "FMA" in reasons[0]
    else:
        assert reasons == []


@pytest.mark.parametrize("name", CAPABILITIES)
def test_auto_prefers_the_cuda_backend_for_tensor_core_work_below_sm80(name, gpu, tensor_core_op, validated):
    """With a CUDA C++ kernel too, cuda (first in the order) takes it everywhere; below sm_80
    it is the only GPU backend left."""
    tensor_core_op()
    x = gpu(name)(2, 8, 4, 4)
    assert chosen_backend(TENSOR_CORE_OP, x) == "cuda"
    dispatch.BACKENDS["cuda"].kernels.pop(TENSOR_CORE_OP)
    assert chosen_backend(TENSOR_CORE_OP, x) == ("torch" if name in BELOW_SM80 else "triton")


@pytest.mark.parametrize("name", CAPABILITIES)
@pytest.mark.parametrize("op", REAL_OPS)
def test_bandwidth_kernels_run_on_gpu_backends_on_every_capability(name, op, gpu, validated, tagged):
    """The BatchNorm-family kernels use no tl.dot: auto takes them from sm_70 up, the CUDA
    C++ ones first, Triton's where the cuda backend has none (the running-stats update)."""
    assert op not in dispatch.BACKENDS["triton"].requirements
    assert op not in dispatch.BACKENDS["cuda"].requirements
    x = gpu(name)(2, 8, 4, 4)
    expected = "cuda" if op in dispatch.BACKENDS["cuda"].kernels else "triton"
    assert chosen_backend(op, x) == expected


@pytest.mark.parametrize("name", CAPABILITIES)
def test_without_records_auto_keeps_torch_and_says_why(name, gpu, tensor_core_op):
    """Without validation records auto runs torch; the reason is the capability below sm_80
    and the missing record above."""
    x = gpu(name)(2, 8, 4, 4)
    with pytest.warns(validation.UnvalidatedGPUWarning, match=f"mocked {name}"):
        for op in (*REAL_OPS, TENSOR_CORE_OP):
            assert chosen_backend(op, x) == "torch"
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons(TENSOR_CORE_OP, x, explicit=False)
    assert any("needs compute capability 8.0" in r for r in reasons) == (name in BELOW_SM80)
    assert any("no validation record for the triton backend" in r for r in reasons) == (name not in BELOW_SM80)


def test_conv_bn_act_registered_with_tensor_cores_moves_off_triton_below_sm80(gpu, tensor_core_op, validated,
                                                                              monkeypatch):
    """What a Triton convolution's registration (``requires=TENSOR_CORE_DOT``) does to the real
    op, where the cuda backend has no kernel for it (it is tried first otherwise)."""
    monkeypatch.setitem(dispatch.BACKENDS["triton"].requirements, "conv_bn_act", TENSOR_CORE_DOT)
    for op in ("conv_bn_act", "batch_norm_act"):
        monkeypatch.delitem(dispatch.BACKENDS["cuda"].kernels, op)
    for name in CAPABILITIES:
        x = gpu(name)(2, 8, 4, 4)
        assert chosen_backend("conv_bn_act", x) == ("torch" if name in BELOW_SM80 else "triton"), name
        assert chosen_backend("batch_norm_act", x) == "triton", name


# ----------------------------------------------------------------------------- explicit
@pytest.mark.parametrize("name", CAPABILITIES)
def test_explicit_triton_runs_below_sm80_with_one_warning(name, gpu, tensor_core_op, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    x = gpu(name)(2, 8, 4, 4)
    resnet_fast.set_backend("triton")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert chosen_backend(TENSOR_CORE_OP, x) == "triton"
        assert chosen_backend(TENSOR_CORE_OP, x) == "triton"
    capability_warnings = [w for w in caught if issubclass(w.category, CapabilityWarning)]
    if name in BELOW_SM80:
        assert len(capability_warnings) == 1
        message = str(capability_warnings[0].message)
        assert "chosen explicitly" in message and "needs compute capability 8.0" in message
        assert "set_backend('auto')" in message
    else:
        assert capability_warnings == []


# ----------------------------------------------------------------------------- capability lookup
def test_capability_is_looked_up_once_per_device(monkeypatch):
    calls = []

    def capability(device=None):
        calls.append(device)
        return (7, 0) if device == 0 else (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    dispatch._capability_of.cache_clear()
    for _ in range(3):
        assert dispatch.device_capability(torch.device("cuda", 0)) == (7, 0)
        assert dispatch.device_capability(torch.device("cuda", 1)) == (9, 0)
    assert sorted(calls) == [0, 1]


def test_capability_comes_from_the_input_tensors_device(gpu, tensor_core_op, validated, monkeypatch):
    """Two GPUs of different generations in one machine: each call is decided by its input."""
    gpu("H100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0) if device == 1 else (9, 0))
    dispatch._capability_of.cache_clear()
    with FakeTensorMode():
        on_h100 = torch.empty(2, 8, 4, 4, dtype=torch.float16, device="cuda:0")
        on_v100 = torch.empty(2, 8, 4, 4, dtype=torch.float16, device="cuda:1")
    assert chosen_backend(TENSOR_CORE_OP, on_h100) == "triton"
    assert chosen_backend(TENSOR_CORE_OP, on_v100) == "torch"


def test_a_registration_without_requirement_keeps_the_declared_one(tensor_core_op):
    """The lazily loaded kernel module replaces the loader registered with the requirement."""
    dispatch.register_kernel("triton", TENSOR_CORE_OP)(lambda: "loaded module")
    assert dispatch.BACKENDS["triton"].requirements[TENSOR_CORE_OP] is TENSOR_CORE_DOT
    assert dispatch.BACKENDS["triton"].kernels[TENSOR_CORE_OP]() == "loaded module"


def test_kernel_modules_that_use_tensor_cores_declare_it():
    """A module with ``USES_TENSOR_CORES = True`` has all its operators in
    ``TENSOR_CORE_OPERATORS``, and those carry the requirement in the dispatcher."""
    pytest.importorskip("triton")
    for op, module_name in kernels.OPERATORS.items():
        module = importlib.import_module(module_name)
        assert isinstance(module.USES_TENSOR_CORES, bool), module_name
        assert (op in kernels.TENSOR_CORE_OPERATORS) == module.USES_TENSOR_CORES, (op, module_name)
    for op in kernels.TENSOR_CORE_OPERATORS:
        assert dispatch.BACKENDS["triton"].requirements[op] is TENSOR_CORE_DOT


# ----------------------------------------------------------------------------- backend_info
@pytest.mark.parametrize("name", CAPABILITIES)
def test_backend_info_reports_requirements_and_what_this_gpu_misses(name, gpu, tensor_core_op):
    gpu(name)
    info = resnet_fast.backend_info()
    assert info["cuda_device"] == {"name": f"mocked {name}", "capability": CAPABILITIES[name]}
    triton = info["triton"]
    assert triton["requirements"][TENSOR_CORE_OP].startswith("needs compute capability 8.0 or newer: uses tl.dot")
    if name in BELOW_SM80:
        assert set(triton["capability_reasons"]) == {TENSOR_CORE_OP, *kernels.TENSOR_CORE_OPERATORS}
        assert "cuda:0 has %d.%d" % CAPABILITIES[name] in triton["capability_reasons"][TENSOR_CORE_OP]
    else:
        assert triton["capability_reasons"] == {}
    assert info["torch"]["requirements"] == info["torch"]["capability_reasons"] == {}


# ----------------------------------------------------------------------------- bf16
OPERATOR_CALLS = {
    "batch_norm_act": lambda x, w, cw: resnet_fast.ops.batch_norm_act(x, w, w),
    "conv_bn_act": lambda x, w, cw: resnet_fast.ops.conv_bn_act(x, cw, None, w, w, padding=1),
    "batch_norm_stats": lambda x, w, cw: resnet_fast.ops.batch_norm_stats(x),
}


def _call(op: str, x: torch.Tensor) -> None:
    """``op`` on ``x``: under FakeTensorMode the operator's fake kernel runs, after the same
    input validation as the real one."""
    with FakeTensorMode() as mode:
        x = mode.from_tensor(x)
        weight = torch.ones(x.shape[1], device=x.device)
        conv_weight = torch.empty(x.shape[1], x.shape[1], 3, 3, dtype=x.dtype, device=x.device)
        OPERATOR_CALLS[op](x, weight, conv_weight)


@pytest.mark.parametrize("name", CAPABILITIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", OPERATOR_CALLS)
def test_bf16_on_a_gpu_without_bf16_is_a_clear_error(op, name, dtype, gpu):
    x = gpu(name)(2, 4, 5, 5, dtype=dtype)
    if dtype == torch.bfloat16 and name in BELOW_SM80:
        with pytest.raises(TypeError) as error:
            _call(op, x)
        message = str(error.value)
        assert "input is torch.bfloat16 on cuda:0" in message
        assert "compute capability %d.%d" % CAPABILITIES[name] in message
        assert "float16" in message and "GradScaler" in message
    else:
        _call(op, x)  # no error


def test_bf16_on_the_cpu_is_not_affected():
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    assert resnet_fast.ops.batch_norm_act(x).dtype == torch.bfloat16


@pytest.mark.parametrize("name", CAPABILITIES)
def test_cuda_conv2d_stats_takes_the_wmma_kernel_below_sm80_and_backend_info_says_so(name, gpu):
    from resnet_fast.ops import conv2d_cuda

    tensor = gpu(name)
    x = tensor(2, 8, 8, 16).permute(0, 3, 1, 2)  # channels_last
    weight = tensor(32, 16, 3, 3)
    below = name in BELOW_SM80
    assert conv2d_cuda._runs_tensor_core_kernel(x, weight) is below
    x32 = tensor(2, 8, 8, 16, dtype=torch.float32).permute(0, 3, 1, 2)
    assert not conv2d_cuda._runs_tensor_core_kernel(x32, tensor(32, 16, 3, 3, dtype=torch.float32))  # fp16 only
    described = resnet_fast.backend_info()["cuda"]["implementations"]["conv2d_stats"]
    assert described.startswith("float16 channels_last: conv2d_tensor_core") is below
    assert described.startswith("BatchNorm prologue kernel") is not below
