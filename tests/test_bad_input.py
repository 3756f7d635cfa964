"""Bad input raises an error that names the problem, and mutates no running statistic,
on the native path (the default on the CPU) and through the operators (``torch``)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_gpu
from torch import nn

import resnet_fast
from resnet_fast.nn import BatchNormAct2d, ConvBNAct2d


@pytest.fixture(autouse=True, params=["auto", "torch"])
def backend(request):
    before = resnet_fast.get_backend()
    resnet_fast.set_backend(request.param)
    yield request.param
    resnet_fast.set_backend(before)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_untouched(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed after a failed call"


BN_CASES = [
    ("rank", lambda: torch.randn(4, 3, 5), None, ValueError, "4-D"),
    ("channels", lambda: torch.randn(4, 5, 3, 3), None, ValueError,
     "input has 5 channels but this BatchNormAct2d has num_features=3"),
    ("float64 input", lambda: torch.randn(4, 3, 3, 3, dtype=torch.float64), None, TypeError,
     "input is torch.float64 but weight is torch.float32"),
    ("integer dtype", lambda: torch.ones(4, 3, 3, 3, dtype=torch.int32), None, TypeError, "input must be float16"),
    ("residual shape", lambda: torch.randn(4, 3, 3, 3), lambda: torch.randn(4, 3, 2, 3), ValueError, "residual must have the same shape"),
    ("residual dtype", lambda: torch.randn(4, 3, 3, 3), lambda: torch.ones(4, 3, 3, 3, dtype=torch.long), TypeError, "residual must be float16"),
    ("one value per channel", lambda: torch.randn(1, 3, 1, 1), None, ValueError, "Expected more than 1 value per channel"),
    ("device mix", lambda: torch.randn(4, 3, 3, 3), lambda: torch.empty(4, 3, 3, 3, device="meta"), ValueError, "residual is on meta"),
]


@pytest.mark.parametrize("case", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batch_norm_act_errors(case):
    _, make_x, make_residual, error, message = case
    module = BatchNormAct2d(3, relu=True)
    before = _snapshot(module)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        module(make_x(), None if make_residual is None else make_residual())
    _assert_untouched(module, before)


CONV_CASES = [
    ("rank", lambda: torch.randn(3, 8, 8), None, ValueError, "4-D"),
    ("channels", lambda: torch.randn(2, 4, 8, 8), None, ValueError, "input has 4 channels but conv_weight expects 3"),
    ("integer dtype", lambda: torch.ones(2, 3, 8, 8, dtype=torch.int64), None, TypeError, "input must be float16"),
    ("dtype mismatch", lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64), None, TypeError, "conv_weight is torch.float32"),
    ("residual shape", lambda: torch.randn(2, 3, 8, 8), lambda: torch.randn(2, 6, 4, 8), ValueError, "residual must have the same shape"),
    ("one value per channel", lambda: torch.randn(1, 3, 3, 3), None, ValueError, "Expected more than 1 value per channel"),
    ("too small", lambda: torch.randn(2, 3, 1, 1), None, ValueError, "too small"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_bn_act_errors(case):
    _, make_x, make_residual, error, message = case
    module = ConvBNAct2d(3, 6, kernel_size=3, padding=0 if case[0] in ("too small", "one value per channel") else 1)
    before = _snapshot(module)
    with pytest.raises(error, match=message):
        module(make_x(), None if make_residual is None else make_residual())
    _assert_untouched(module, before)


def test_parameter_on_other_device_is_named():
    module = BatchNormAct2d(3)
    module.running_mean = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="running_mean is on meta"):
        module(torch.randn(4, 3, 2, 2))
    assert module.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_on_float32_module_is_accepted_like_torch(dtype, training):
    """nn.BatchNorm2d takes a float16/bfloat16 input with float32 parameters (autocast relies
    on it) and returns the input's dtype; so does BatchNormAct2d, updating the statistics."""
    ours, ref = BatchNormAct2d(3).train(training), nn.BatchNorm2d(3).train(training)
    x = torch.randn(4, 3, 2, 2).to(dtype)
    out, expected = ours(x), ref(x)
    assert out.dtype == expected.dtype == dtype
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@pytest.mark.parametrize("x_dtype, module_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                   (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_dtype_mixes_torch_refuses_are_refused_naming_both(x_dtype, module_dtype):
    ref = nn.BatchNorm2d(3).to(module_dtype)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        ref(torch.randn(4, 3, 2, 2, dtype=x_dtype))
    ours = BatchNormAct2d(3).to(module_dtype)
    before = _snapshot(ours)
    with pytest.raises(TypeError, match=f"input is {x_dtype} but weight is {module_dtype}"):
        ours(torch.randn(4, 3, 2, 2, dtype=x_dtype))
    _assert_untouched(ours, before)


def test_float64_residual_is_added_in_place_keeping_the_input_dtype():
    """As torchvision's ``out += identity``: the output keeps the input's dtype."""
    x, residual = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    out = BatchNormAct2d(3, relu=True)(x, residual)
    expected = nn.BatchNorm2d(3)(x)
    expected += residual
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.relu(expected))


def test_eval_without_running_stats_uses_batch_stats_like_torch():
    ours = BatchNormAct2d(3, track_running_stats=False).eval()
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))


def test_missing_one_running_stat():
    from resnet_fast.ops import batch_norm_act

    with pytest.raises(ValueError, match="running_mean and running_var must both be given"):
        batch_norm_act(torch.randn(2, 3, 2, 2), running_mean=torch.zeros(3))


@pytest.mark.gpu
@requires_gpu
def test_cpu_gpu_mix_is_named_and_mutates_nothing():
    module = BatchNormAct2d(3).cuda()
    before = _snapshot(module)
    with pytest.raises(ValueError, match="weight is on cuda:0 but input is on cpu"):
        module(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2, device="cuda"))  # input on the CPU
    with pytest.raises(ValueError, match="residual is on cpu"):
        module(torch.randn(4, 3, 2, 2, device="cuda"), torch.randn(4, 3, 2, 2))
    _assert_untouched(module, before)
    conv = ConvBNAct2d(3, 4, 3).cuda()
    with pytest.raises(ValueError, match="conv_weight is on cuda"):
        conv(torch.randn(2, 3, 5, 5))
