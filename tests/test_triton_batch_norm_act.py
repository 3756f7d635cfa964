"""The ``triton`` backend of batch_norm_act / conv_bn_act against float64 torch.

Without a GPU the kernels run in Triton's CPU interpreter, which needs
``TRITON_INTERPRET=1`` set before triton is imported at all (triton's own library
functions, ``tl.sum`` included, are decorated at import), and torch may import triton
early (``torch._dynamo`` does). So the interpreter tests (the ``cpu`` parameters) run in
a fresh process that starts with the variable set: :func:`test_interpreter_run` runs
this file there with ``-k cpu``, and in this process they skip. (Setting the variable in
conftest would also work, but would leak into the other tests and their subprocesses,
e.g. the benchmark smoke run, and make the triton backend "available" on CPU there.)

The interpreter has no bf16 arithmetic, so CPU runs test float32 and float16 on tiny
shapes; the CUDA parameters (``gpu`` mark) add bfloat16, a ResNet-sized shape and a
tensor past 2^31 elements. Every output the kernels allocate is poisoned with NaN first,
so an element a kernel forgot to write fails the comparison.
"""

from __future__ import annotations

import pytest
import test_batch_norm_act as bn_tests
import test_conv_bn_act as conv_tests
import torch
from conftest import (
    TRITON_DEVICES,
    TRITON_INTERPRETER,
    assert_close_to_reference,
    import_kernel_module,
    poisoned_empty,
    random_input,
    relu_with_mask_of,
    requires_gpu,
    run_cpu_tests_in_triton_interpreter,
    strided_buffer,
    strided_per_channel,
)

import resnet_fast
from resnet_fast.nn import BatchNormAct2d
from resnet_fast.ops import dispatch

KERNEL_MODULE = "resnet_fast.kernels.batch_norm_act"
ON_GPU = torch.cuda.is_available()
DEVICES = TRITON_DEVICES


def _dtypes(device: str) -> list[torch.dtype]:
    """The interpreter has no bf16 arithmetic."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


SHAPES = [(3, 5, 4, 4), (3, 3, 1, 1), (4, 12, 3, 5), (5, 3, 2, 3)]
LAYOUTS = [(shape, channels_last) for shape in SHAPES for channels_last in (False, True)
           if not (shape[2] * shape[3] == 1 and channels_last)]
# Tiny blocks: several splits per channel, several tiles per split, row, pixel, channel
# and split tails, multi-step combines, on the tiny shapes above.
SMALL_TILES = {"TILE": 16, "BACKWARD_TILE": 16, "ELEMENTWISE_TILE": 64, "MAX_BLOCK_C": 4, "MAX_BLOCK_HW": 4,
               "MIN_TILES_PER_SPLIT": 3, "COMBINE_BLOCK_S": 4, "COMBINE_BLOCK_C": 4}


@pytest.mark.skipif(TRITON_INTERPRETER, reason="this is the interpreter process")
@pytest.mark.skipif(ON_GPU, reason="with a GPU the kernels are tested on it")
def test_interpreter_run():
    """Every ``cpu`` test of this file, in a fresh process with TRITON_INTERPRET=1."""
    run_cpu_tests_in_triton_interpreter(__file__, min_passed=120)  # 141 when this was written


@pytest.fixture(scope="module")
def kernels():
    """The kernel module (its kernels interpreted in the interpreter process)."""
    return import_kernel_module(KERNEL_MODULE)


@pytest.fixture(autouse=True)
def triton_backend(kernels, monkeypatch):
    """Select the triton backend and poison every tensor the launchers allocate."""
    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("triton")
    yield
    resnet_fast.set_backend(before)


@pytest.fixture
def small_tiles(kernels, monkeypatch):
    """The launchers' block-size rules shrunk to exercise every loop on tiny inputs."""
    for name, value in SMALL_TILES.items():
        monkeypatch.setattr(kernels, name, value)


@pytest.fixture(params=["default", "small"])
def tiles(request, monkeypatch):
    """The launchers' block-size rules as shipped, or shrunk (:func:`small_tiles`)."""
    if request.param == "small":
        request.getfixturevalue("small_tiles")
    return request.param


# ----------------------------------------------------------------------------- modules
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,channels_last", LAYOUTS)
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False), (False, False)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_matches_float64_reference(shape, dtype, channels_last, residual, relu, training, device):
    """BatchNormAct2d output, all gradients and running stats (test_batch_norm_act's check)."""
    if dtype not in _dtypes(device):
        pytest.skip("no bf16 arithmetic in the Triton interpreter")
    if device == "cpu" and dtype == torch.float16 and residual != relu:
        pytest.skip("interpreter time: float16 runs with both or neither of residual and ReLU")
    bn_tests.test_matches_float64_reference(shape, dtype, channels_last, residual, relu, training, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,channels_last", LAYOUTS)
@pytest.mark.parametrize("dtype,residual,relu,training", [
    (torch.float32, True, True, True), (torch.float16, True, True, True), (torch.float32, False, False, False)],
    ids=["fp32-add-relu-train", "fp16-add-relu-train", "fp32-eval"])
def test_small_tiles_match_float64_reference(shape, dtype, channels_last, residual, relu, training, device,
                                             small_tiles):
    """The same check with tiny blocks: many splits, loops, tails and combine steps per channel."""
    bn_tests.test_matches_float64_reference(shape, dtype, channels_last, residual, relu, training, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("conv", [conv_tests.CONVS[4], conv_tests.CONVS[5]], ids=["1x1s2-bias", "grouped"])
@pytest.mark.parametrize("residual,relu", [(True, True)])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act_matches_float64_reference(dtype, channels_last, conv, residual, relu, training, device):
    """ConvBNAct2d (cuDNN / ATen convolution, Triton BatchNorm) (test_conv_bn_act's check)."""
    if dtype not in _dtypes(device):
        pytest.skip("no bf16 arithmetic in the Triton interpreter")
    conv_tests.test_matches_float64_reference(dtype, channels_last, conv, residual, relu, training, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_mean_offset_of_1000_keeps_everything_accurate(dtype, channels_last, device, tiles):
    """x = 1000 + N(0, 1): statistics, output and gradients stay within the reference bounds."""
    if dtype not in _dtypes(device):
        pytest.skip("no bf16 arithmetic in the Triton interpreter")
    shape = (4, 12, 3, 5)
    g = torch.Generator().manual_seed(5)
    x = random_input(shape, dtype, channels_last, shift=1000.0, generator=g, device=device)
    res = random_input(shape, dtype, channels_last, generator=g, device=device)
    params_dtype = torch.float32
    bn64, _ = bn_tests._make_pair(shape[1], torch.float64, relu=True)
    bn_same, ours = bn_tests._make_pair(shape[1], params_dtype, relu=True)
    for m in (bn64, bn_same, ours):
        m.to(device)
    out, grads = bn_tests._forward_backward(lambda a, r: ours(a, r), ours, x, res)
    same_out, same_grads = bn_tests._forward_backward(
        lambda a, r: bn_tests._torch_bn_act(bn_same, a, r, True), bn_same, x, res)
    ref_out, ref_grads = bn_tests._forward_backward(
        lambda a, r: bn_tests._torch_bn_act(bn64, a, r, True, mask_of=out), bn64, x.double(), res.double())
    assert_close_to_reference(out, ref_out, same_out, "output")
    for name, ref in ref_grads.items():
        assert_close_to_reference(grads[name], ref, same_grads[name], f"grad {name}")
    for name in ("running_mean", "running_var"):
        assert_close_to_reference(getattr(ours, name), getattr(bn64, name), getattr(bn_same, name), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_strided_per_channel_vectors_give_the_contiguous_results(channels_last, training, device, tiles):
    """weight, bias, running statistics, mean and var as stride-2 views (test_batch_norm_act's check)."""
    bn_tests.test_strided_per_channel_vectors_give_the_contiguous_results(device, torch.float32, channels_last,
                                                                          training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act_strided_per_channel_vectors(channels_last, training, device):
    """conv_bias and the BatchNorm vectors as stride-2 views (test_conv_bn_act's check)."""
    conv_tests.test_strided_per_channel_vectors_give_the_contiguous_results(device, torch.float16, channels_last,
                                                                            training)


# ----------------------------------------------------------------------------- the ops
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_statistics_of_offset_data_are_float32_exact(kernels, channels_last, device):
    """Shifted sums + Chan merge: mean and var to float32 rounding even 1000 std away from 0."""
    x = random_input((8, 4, 16, 16), torch.float32, channels_last, shift=1000.0, device=device,
                     generator=torch.Generator().manual_seed(0))
    _, mean, var = kernels.triton_batch_norm_act_forward(x, None, None, None, None, None, True, 1e-5, False)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=2e-7, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_returns_float32_copies_of_running_stats(kernels, device):
    x = torch.randn(2, 3, 4, 4, device=device, dtype=torch.float16)
    rm = torch.randn(3, device=device, dtype=torch.float16)
    rv = torch.rand(3, device=device, dtype=torch.float16) + 0.5
    out, mean, var = kernels.triton_batch_norm_act_forward(x, None, None, None, rm, rv, False, 1e-5, False)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, rm.float(), rtol=0, atol=0)
    torch.testing.assert_close(var, rv.float(), rtol=0, atol=0)
    mean.add_(1)
    assert not torch.equal(mean, rm.float())
    torch.testing.assert_close(out.float(), ((x.float() - rm.float()[:, None, None]) /
                                             torch.sqrt(rv.float()[:, None, None] + 1e-5)), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_other_strides_and_mixed_layouts_match_the_torch_backend(device):
    """Non-contiguous x (made contiguous first), a residual and grad in the other layout."""
    from resnet_fast.ops.reference import batch_norm_act, batch_norm_act_backward

    g = torch.Generator().manual_seed(4)
    base = torch.randn(3, 5, 6, 8, generator=g).to(device)
    x = base[:, :, ::2, 1:7].transpose(2, 3)  # neither NCHW- nor NHWC-contiguous
    res = torch.randn(x.shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(5).to(device) + 0.5, torch.randn(5).to(device)
    resnet_fast.set_backend("triton")
    out, mean, var = dispatch.select_kernel("batch_norm_act", x)(x, w, b, res, None, None, True, 1e-5, True)
    ref_out, ref_mean, ref_var = batch_norm_act(x, w, b, res, None, None, True, 1e-5, True)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    grad = torch.randn(x.shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    ours = dispatch.select_kernel("batch_norm_act_backward", x)(grad, x, w, mean, var, out, True, 1e-5, True, True)
    ref = batch_norm_act_backward(grad, x, w, ref_mean, ref_var, ref_out, True, 1e-5, True, True)
    for name, a, r in zip(("input", "weight", "bias", "residual"), ours, ref):
        assert a.is_contiguous(), name
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


def test_float64_is_refused_with_a_reason():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons("batch_norm_act", x)
    assert any("torch.float64 input is not supported by the triton backend" in r for r in reasons)
    with pytest.raises(resnet_fast.BackendUnavailableError, match="float64 input is not supported"):
        BatchNormAct2d(3).double()(x)
    resnet_fast.set_backend("auto")  # auto passes float64 on to a backend that takes it
    assert dispatch.select_kernel("batch_norm_act", x) is dispatch.BACKENDS["torch"].kernels["batch_norm_act"]


def _opcheck_utils(device: str) -> tuple[str, ...]:
    """Everything opcheck has, except, in the interpreter, the AOT-dispatch tests.

    ``wrap_triton`` captures a kernel into a traced graph only as a compiled
    ``JITFunction``; under TRITON_INTERPRET=1 kernels are ``InterpretedFunction`` and
    run eagerly, so a graph traced with fake tensors holds no kernel launches and its
    outputs cannot match. Schema, autograd registration and the fake (traced) output
    metadata are checked everywhere; AOT dispatch only on a GPU.
    """
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    return utils if device == "cpu" else (*utils, "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual,relu", [(True, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_triton_ops(kernels, training, residual, relu, channels_last, device):
    g = torch.Generator().manual_seed(3)
    x = random_input((3, 4, 5, 5), torch.float32, channels_last, generator=g, device=device)
    r = random_input((3, 4, 5, 5), torch.float32, channels_last, generator=g, device=device) if residual else None
    w, b = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)
    rm, rv = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
    utils = _opcheck_utils(device)
    args = (x, w, b, r, rm, rv, training, 1e-5, relu)
    torch.library.opcheck(kernels.triton_batch_norm_act_forward, args, test_utils=utils)
    out, mean, var = kernels.triton_batch_norm_act_forward(*args)
    grad = random_input(x.shape, torch.float32, channels_last, generator=g, device=device)
    torch.library.opcheck(kernels.triton_batch_norm_act_backward,
                          (grad, x, w, mean, var, out if relu else None, training, 1e-5, relu, residual),
                          test_utils=utils)
    torch.library.opcheck(kernels.triton_batch_norm_act_backward,
                          (grad, x, None, mean, var, out, training, 1e-5, True, False), test_utils=utils)
    for counter, momentum in ((torch.tensor(2, device=device), None), (None, 0.1)):
        torch.library.opcheck(kernels.triton_update_running_stats,
                              (rm.clone(), rv.clone(), counter, mean, var, 75, momentum), test_utils=utils)


def test_launchers_are_torch_library_triton_ops(kernels):
    for name in ("triton_batch_norm_act_forward", "triton_batch_norm_act_backward", "triton_update_running_stats"):
        assert hasattr(torch.ops.resnet_fast, name)
        assert isinstance(getattr(kernels, name), torch._library.custom_ops.CustomOpDef)
    for op in ("batch_norm_act", "batch_norm_act_backward", "conv_bn_act", "update_running_stats"):
        assert dispatch.BACKENDS["triton"].kernels[op] is getattr(kernels, op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_apply_program_normalises_with_the_stored_statistics(kernels, channels_last, device, tiles):
    """The apply programs merge the statistics partials themselves and split 0's store them:
    normalising with the stored (mean, var) in eval mode reproduces the training output bit
    for bit, so every program merged the same values."""
    g = torch.Generator().manual_seed(6)
    x = random_input((4, 12, 3, 5), torch.float32, channels_last, scale=3.0, shift=2.0, generator=g, device=device)
    w, b = torch.rand(12, device=device) + 0.5, torch.randn(12, device=device)
    out, mean, var = kernels.triton_batch_norm_act_forward(x, w, b, None, None, None, True, 1e-5, True)
    again, _, _ = kernels.triton_batch_norm_act_forward(x, w, b, None, mean, var, False, 1e-5, True)
    assert torch.equal(out, again)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("tracked", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_update_running_stats_kernel(kernels, dtype, momentum, tracked, strided, device):
    """The one-launch running-statistics update against float64 math: buffers of the tested
    dtype (strided ones updated in place, nothing written between their elements), the
    counter incremented once, f = 1 / num_batches_tracked for momentum None."""
    g = torch.Generator().manual_seed(2)
    c, count = 37, 29
    rm = torch.randn(c, generator=g).to(device, dtype)
    rv = (torch.rand(c, generator=g) + 0.5).to(device, dtype)
    mean, var = torch.randn(c, generator=g).to(device), torch.rand(c, generator=g).to(device)
    counter = torch.tensor(4, device=device) if tracked else None
    expected_factor = 0.0 if momentum is None else momentum
    if tracked and momentum is None:
        expected_factor = 1 / 5
    expected_mean = (1 - expected_factor) * rm.double() + expected_factor * mean.double()
    expected_var = (1 - expected_factor) * rv.double() + expected_factor * var.double() * count / (count - 1)
    if strided:
        (rm, rm_gaps), (rv, rv_gaps) = strided_buffer(rm), strided_buffer(rv)
        mean, var = strided_per_channel(mean), strided_per_channel(var)
    kernels.update_running_stats(rm, rv, counter, mean, var, count, momentum)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(rm.double(), expected_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(rv.double(), expected_var, rtol=tol, atol=tol)
    if tracked:
        assert counter.item() == 5
    if strided:
        assert rm_gaps.isnan().all() and rv_gaps.isnan().all()


# ----------------------------------------------------------------------------- launch count
@pytest.fixture
def launch_log(kernels, monkeypatch) -> list[tuple[str, tuple, dict]]:
    """(kernel name in ``KERNELS``, positional arguments, keyword arguments) of every launch."""
    launches = []
    names = {id(kernel): name for name, kernel in kernels.KERNELS.items()}
    wrap_triton = kernels.wrap_triton

    class Recording:
        def __init__(self, kernel):
            self.name, self.wrapped = names[id(kernel)], wrap_triton(kernel)

        def __getitem__(self, grid):
            launch = self.wrapped[grid]

            def record(*args, **kwargs):
                launches.append((self.name, args, kwargs))
                return launch(*args, **kwargs)
            return record

    monkeypatch.setattr(kernels, "wrap_triton", Recording)
    return launches


# Kernels per BatchNorm layer (the module docstring's table): the statistics combine runs
# in the apply kernel's prologue, the gradient combine in the dx kernel's (training); the
# running-statistics update is one more kernel.
LAUNCHES_PER_LAYER = {
    (True, "forward"): ["stats", "apply", "update_running_stats"],
    (True, "backward"): ["bwd_reduce", "bwd_dx"],
    (False, "forward"): ["apply"],
    (False, "backward"): ["bwd_reduce", "bwd_combine"],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_launches_per_layer(kernels, launch_log, channels_last, training, residual, device):
    """Two kernels forward and two backward in training; with a residual gradient the dx kernel
    reads dy' (written by the reduction) instead of dy and out."""
    g = torch.Generator().manual_seed(8)
    layer = BatchNormAct2d(6, relu=True).to(device).train(training)
    x = random_input((3, 6, 4, 5), torch.float32, channels_last, generator=g, device=device).requires_grad_()
    res = random_input(x.shape, torch.float32, channels_last, generator=g, device=device).requires_grad_() \
        if residual else None
    out = layer(x, res)
    forward = [name for name, _, _ in launch_log]
    out.backward(random_input(x.shape, torch.float32, channels_last, generator=g, device=device))
    backward = [name for name, _, _ in launch_log[len(forward):]]
    layout = "nhwc" if channels_last else "nchw"
    for stage, names in (("forward", forward), ("backward", backward)):
        expected = [k if k in kernels.KERNELS else f"{k}_{layout}" for k in LAUNCHES_PER_LAYER[training, stage]]
        assert names == expected, f"{stage}: {names}"
    if training and residual:
        (_, reduce_args, reduce_flags), (_, dx_args, dx_flags) = launch_log[-2:]
        assert reduce_flags["WRITE_DRES"]
        assert dx_args[0] is reduce_args[7], "the dx kernel should read dy' (the reduction's d_residual)"
        assert dx_flags["RELU"] is False, "dy' is already masked: the dx kernel should not read out"


@pytest.mark.skipif(TRITON_INTERPRETER, reason="interpreted kernels are not specialised")
def test_split_geometry_is_not_specialised(kernels):
    """Integer arguments that only say how a layer is split (rows or tiles per split, number
    of splits) vary between layers: specialising them (== 1, divisible by 16) would compile
    each kernel once per geometry class. Sizes (M, C, HW: alignment) stay specialised."""
    geometry = {"rows_per_split", "n_per_split", "hw_per_split", "splits_hw", "num_splits", "num_partials"}
    for name, kernel in kernels.KERNELS.items():
        if name == "stats_combine":  # kernels.conv2d's workspace merge, one launch per call
            continue
        params = {p.name: p for p in kernel.params}
        assert not any(n.endswith("blocks") for n in params), f"{name} takes a block count"
        for arg in geometry & params.keys():
            assert params[arg].do_not_specialize, f"{name} specialises {arg}"
        for arg in {"M", "C", "HW"} & params.keys():
            assert not params[arg].do_not_specialize, f"{name} does not specialise {arg}"


def test_profiler_files_every_batch_norm_kernel_under_normalisation(kernels):
    """Traces name Triton kernels by function: the breakdown's categories must see them."""
    from resnet_fast.bench.trace import categorize

    for name, kernel in kernels.KERNELS.items():
        if name == "stats_combine":  # launched by kernels.conv2d after its convolution
            continue
        function = getattr(kernel, "fn", kernel).__name__
        assert categorize(function) == "normalisation", function


@pytest.mark.parametrize("device", DEVICES)
def test_resnet50_training_step_launches_five_kernels_per_batch_norm(launch_log, device):
    """A training step of ResNet-50 (53 BatchNorms) launches 265 Triton kernels for them and
    nothing else (before: 318, with a combine kernel after each reduction, plus 10 PyTorch
    kernels per running-statistics update)."""
    torch.manual_seed(0)
    model = resnet_fast.resnet50(num_classes=10).to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    counts = {}
    for name, _, _ in launch_log:
        counts[name] = counts.get(name, 0) + 1
    assert counts == {"stats_nhwc": 53, "apply_nhwc": 53, "update_running_stats": 53,
                      "bwd_reduce_nhwc": 53, "bwd_dx_nhwc": 53}
    assert len(launch_log) == 265


# ----------------------------------------------------------------------------- GPU only
def _run_large(shape, dtype, channels_last):
    """Triton forward (training, ReLU) and backward (with d_residual) of a large tensor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 3).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    c = shape[1]
    w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
    out, mean, var = dispatch.select_kernel("batch_norm_act", x)(x, w, b, None, None, None, True, 1e-5, True)
    grads = dispatch.select_kernel("batch_norm_act_backward", x)(grad, x, w, mean, var, out, True, 1e-5, True, True)
    assert out.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    return x, grad, w, b, out, mean, var, grads


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_resnet_sized_bf16_layer_matches_the_float64_reference(channels_last):
    """(256, 256, 56, 56) bf16: the shipped tile rules with many splits per channel."""
    from resnet_fast.ops.reference import batch_norm_act, batch_norm_act_backward

    x, grad, w, b, out, mean, var, grads = _run_large((256, 256, 56, 56), torch.bfloat16, channels_last)
    ref = batch_norm_act(x.double(), w.double(), b.double(), None, None, None, True, 1e-5, False)
    same = batch_norm_act(x, w, b, None, None, None, True, 1e-5, True)
    assert_close_to_reference(out, relu_with_mask_of(ref[0], out), same[0], "output")
    assert_close_to_reference(mean, ref[1], same[1], "mean")
    assert_close_to_reference(var, ref[2], same[2], "var")
    del ref
    ref_grads = batch_norm_act_backward(grad.double(), x.double(), w.double(), mean.double(), var.double(),
                                        out, True, 1e-5, True, True)
    same_grads = batch_norm_act_backward(grad, x, w, same[1], same[2], same[0], True, 1e-5, True, True)
    for name, ours, r, s in zip(("input", "weight", "bias", "residual"), grads, ref_grads, same_grads):
        assert_close_to_reference(ours, r, s, f"grad {name}")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_tensor_past_2_31_elements(channels_last):
    """2^31 + 2^24 elements: statistics of every channel; outputs and gradients of the last
    images, which lie past element 2^31 in either layout."""
    if torch.cuda.mem_get_info()[0] < 48 * 2**30:
        pytest.skip("needs about 48 GiB of free GPU memory")
    shape = (129, 16, 1024, 1024)
    x, grad, w, b, out, mean, var, grads = _run_large(shape, torch.bfloat16, channels_last)
    ref_var, ref_mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-4, atol=1e-5)
    tail = slice(shape[0] - 2, shape[0])
    view = (1, -1, 1, 1)
    invstd = torch.rsqrt(var + 1e-5).view(view)
    x_hat = (x[tail].float() - mean.view(view)) * invstd
    expected = torch.relu(x_hat * w.view(view) + b.view(view))
    torch.testing.assert_close(out[tail].float(), expected, rtol=2e-2, atol=2e-2)
    dy = grad[tail].masked_fill(out[tail] <= 0, 0)
    torch.testing.assert_close(grads[3][tail], dy, rtol=0, atol=0)
    count = x.numel() // shape[1]
    dx = w.view(view) * invstd * (dy.float() - grads[2].view(view) / count - x_hat * grads[1].view(view) / count)
    torch.testing.assert_close(grads[0][tail].float(), dx, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("channels_last", [True, False])
def test_training_layer_is_bitwise_deterministic(channels_last):
    """Two runs of a (64, 64, 56, 56) bf16 layer (many partials merged by every apply and dx
    program) give identical outputs, statistics and gradients; eval-mode normalisation with
    the stored statistics reproduces the training output."""
    x, grad, w, b, out, mean, var, grads = _run_large((64, 64, 56, 56), torch.bfloat16, channels_last)
    forward = dispatch.select_kernel("batch_norm_act", x)
    backward = dispatch.select_kernel("batch_norm_act_backward", x)
    out2, mean2, var2 = forward(x, w, b, None, None, None, True, 1e-5, True)
    grads2 = backward(grad, x, w, mean2, var2, out2, True, 1e-5, True, True)
    for name, a, c in zip(("out", "mean", "var"), (out, mean, var), (out2, mean2, var2)):
        assert torch.equal(a, c), name
    for name, a, c in zip(("input", "weight", "bias", "residual"), grads, grads2):
        assert torch.equal(a, c), f"grad {name}"
    assert torch.equal(out, forward(x, w, b, None, mean, var, False, 1e-5, True)[0])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_captures_in_a_cuda_graph(momentum):
    """No host synchronisation in the Triton launchers either."""
    bn_tests.test_training_step_captures_in_a_cuda_graph(momentum)
