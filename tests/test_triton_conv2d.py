"""The Triton implicit-GEMM convolution (``resnet_fast/kernels/conv2d.py``) against float64 torch.

As in ``test_triton_batch_norm_act.py``: without a GPU the kernels run in Triton's CPU
interpreter, in a fresh process started with ``TRITON_INTERPRET=1``
(:func:`test_interpreter_run` runs this file there with ``-k cpu``); the ``cuda``
parameters are ``gpu``-marked. The interpreter has no bf16 arithmetic: CPU runs test
float32 and float16 on tiny shapes with 16-wide tiles, so that every M, C_out and C_in
tail and several K steps per filter tap are exercised. Every tensor the launchers
allocate is poisoned with NaN first.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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
)

import resnet_fast
from resnet_fast.ops import dispatch, reference
from resnet_fast.ops.conv2d_stats import conv2d_stats

KERNEL_MODULE = "resnet_fast.kernels.conv2d"
ON_GPU = torch.cuda.is_available()
DEVICES = TRITON_DEVICES
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}

# (C_in, C_out, kernel, stride, padding, H): every ResNet convolution kind, tiny; channel
# counts off the 16-wide tiles (the stem's 49 taps cost the interpreter most: one C_out
# tile there), C_in > 16 so a filter tap takes two K steps, M = N*P*Q tails.
CONVS = {
    "stem7x7s2": (3, 16, 7, 2, 3, 5),
    "3x3s1": (20, 17, 3, 1, 1, 3),
    "3x3s2": (20, 24, 3, 2, 1, 7),
    "1x1s1": (24, 33, 1, 1, 0, 5),
    "1x1s2": (18, 20, 1, 2, 0, 7),
}
BATCH = 2


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def _interpreter_skips(device: str, dtype: torch.dtype, channels_last: bool, variant: str, full: str,
                       float16: tuple[str, ...]) -> None:
    """Keep the interpreter run short: NHWC float32 runs every variant, float16 ``float16``
    ones, NCHW only float32 with the ``full`` variant. The GPU runs everything."""
    if dtype not in _dtypes(device):
        pytest.skip("no bf16 arithmetic in the Triton interpreter")
    if device != "cpu":
        return
    if not channels_last and (dtype != torch.float32 or variant != full):
        pytest.skip(f"interpreter time: NCHW runs float32 with {full}")
    if dtype == torch.float16 and variant not in float16:
        pytest.skip(f"interpreter time: float16 runs {', '.join(float16)}")


@pytest.mark.skipif(TRITON_INTERPRETER, reason="this is the interpreter process")
@pytest.mark.skipif(ON_GPU, reason="with a GPU the kernels are tested on it")
def test_interpreter_run():
    """Every ``cpu`` test of this file, in a fresh process with TRITON_INTERPRET=1."""
    run_cpu_tests_in_triton_interpreter(__file__, min_passed=60)


@pytest.fixture(scope="module")
def kernels():
    """The kernel module (its kernels interpreted in the interpreter process)."""
    return import_kernel_module(KERNEL_MODULE)


@pytest.fixture(autouse=True)
def triton_backend(kernels, monkeypatch):
    """Select the triton backend, poison every allocation, and use 16-wide tiles when interpreted."""
    monkeypatch.setattr(kernels, "_empty", poisoned_empty)
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", SMALL_BLOCKS)
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("triton")
    yield
    resnet_fast.set_backend(before)


def _conv_inputs(conv: str, dtype, channels_last: bool, device: str, seed: int = 0, batch: int = BATCH):
    cin, cout, k, s, p, h = CONVS[conv]
    g = torch.Generator().manual_seed(seed)
    x = random_input((batch, cin, h, h), dtype, channels_last, generator=g, device=device)
    w = random_input((cout, cin, k, k), dtype, channels_last, scale=(cin * k * k) ** -0.5, generator=g,
                     device=device)
    out_hw = (h + 2 * p - k) // s + 1
    return x, w, [s, s], [p, p], (batch, cout, out_hw, out_hw), g


# ----------------------------------------------------------------------------- inference
EPILOGUES = {"bias-res-relu": (True, True, True), "bias-relu": (True, False, True), "plain": (False, False, False),
             "res": (False, True, False)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv2d_bias_act_matches_float64_reference(conv, epilogue, dtype, channels_last, device):
    """relu(conv2d(x, w) + bias + residual) against float64, for every conv kind and epilogue."""
    _interpreter_skips(device, dtype, channels_last, epilogue, "bias-res-relu", ("bias-res-relu", "plain"))
    has_bias, has_res, relu = EPILOGUES[epilogue]
    x, w, stride, padding, out_shape, g = _conv_inputs(conv, dtype, channels_last, device)
    bias = torch.randn(out_shape[1], generator=g).to(device) if has_bias else None  # float32, as the fold
    res = random_input(out_shape, dtype, channels_last, generator=g, device=device) if has_res else None
    args = (stride, padding, [1, 1], relu)
    out = dispatch.select_kernel("conv2d_bias_act", x)(x, w, bias, res, *args)
    same = reference.conv2d_bias_act(x, w, bias, res, *args)
    pre = reference.conv2d_bias_act(x.double(), w.double(), None if bias is None else bias.double(),
                                    None if res is None else res.double(), *args[:3], False)
    ref = relu_with_mask_of(pre, out) if relu else pre
    assert out.dtype == dtype and out.shape == out_shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_to_reference(out, ref, same, "output")


# ----------------------------------------------------------------------------- training
PROLOGUES = {"none": (False, False), "scale-shift-relu": (True, True), "scale-shift": (True, False)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prologue", list(PROLOGUES))
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv2d_stats_matches_float64_reference(conv, prologue, dtype, channels_last, device):
    """conv2d(relu(x * scale + shift), w) and its per-channel mean and variance against float64."""
    _interpreter_skips(device, dtype, channels_last, prologue, "scale-shift-relu", ("scale-shift-relu", "none"))
    has_prologue, prologue_relu = PROLOGUES[prologue]
    x, w, stride, padding, out_shape, g = _conv_inputs(conv, dtype, channels_last, device, seed=1)
    cin = x.shape[1]
    scale = (torch.rand(cin, generator=g) + 0.5).to(device) if has_prologue else None
    shift = torch.randn(cin, generator=g).to(device) if has_prologue else None
    args = (stride, padding, [1, 1], scale, shift, prologue_relu)
    out, mean, var = dispatch.select_kernel("conv2d_stats", x)(x, w, *args)
    same = reference.conv2d_stats(x, w, *args)
    ref = reference.conv2d_stats(x.double(), w.double(), *args[:3],
                                 None if scale is None else scale.double(),
                                 None if shift is None else shift.double(), prologue_relu)
    assert out.shape == out_shape and mean.dtype == var.dtype == torch.float32
    for name, ours, r, s in zip(("output", "mean", "var"), (out, mean, var), ref, same):
        assert_close_to_reference(ours, r, s, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiling", ["flat", "taps"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_both_k_tilings_match_float64_reference(kernels, conv, tiling, device, monkeypatch):
    """Every conv kind with K tiled across filter taps (FLAT_K, the stem's default) and per
    tap (the default elsewhere): full epilogue, then statistics with the full prologue."""
    default_flat = CONVS[conv][0] < kernels.FLAT_K_BELOW_CHANNELS
    if default_flat == (tiling == "flat"):
        pytest.skip("the default tiling of this conv is covered by the tests above")
    monkeypatch.setattr(kernels, "FLAT_K_BELOW_CHANNELS", 1 << 30 if tiling == "flat" else 0)
    x, w, stride, padding, out_shape, g = _conv_inputs(conv, torch.float32, True, device, seed=2)
    bias = torch.randn(out_shape[1], generator=g).to(device)
    res = random_input(out_shape, torch.float32, True, generator=g, device=device)
    args = (stride, padding, [1, 1], True)
    out = dispatch.select_kernel("conv2d_bias_act", x)(x, w, bias, res, *args)
    pre = reference.conv2d_bias_act(x.double(), w.double(), bias.double(), res.double(), *args[:3], False)
    assert_close_to_reference(out, relu_with_mask_of(pre, out), reference.conv2d_bias_act(x, w, bias, res, *args))
    scale, shift = (torch.rand(x.shape[1], generator=g) + 0.5).to(device), torch.randn(x.shape[1], generator=g).to(device)
    stats_args = (stride, padding, [1, 1], scale, shift, True)
    ours = dispatch.select_kernel("conv2d_stats", x)(x, w, *stats_args)
    same = reference.conv2d_stats(x, w, *stats_args)
    ref = reference.conv2d_stats(x.double(), w.double(), *stats_args[:3], scale.double(), shift.double(), True)
    for name, o, r, sm in zip(("output", "mean", "var"), ours, ref, same):
        assert_close_to_reference(o, r, sm, name)


@pytest.mark.parametrize("device", DEVICES)
def test_prologue_keeps_padding_zero(device):
    """shift > 0 everywhere: a padded position activated would add weight * shift to the border."""
    c = 4
    x = torch.zeros(1, c, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.ones(1, c, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.ones(c, device=device), torch.full((c,), 2.0, device=device)
    out, mean, var = dispatch.select_kernel("conv2d_stats", x)(x, w, [1, 1], [1, 1], [1, 1], scale, shift, True)
    taps = torch.tensor([[4.0, 6.0, 4.0], [6.0, 9.0, 6.0], [4.0, 6.0, 4.0]], device=device)  # in-image taps
    torch.testing.assert_close(out[0, 0], 2.0 * c * taps, rtol=0, atol=0)
    torch.testing.assert_close(mean, (2.0 * c * taps).mean().view(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_statistics_of_offset_outputs_are_accurate(device):
    """Outputs with mean about 300 standard deviations from zero: the variance stays at
    float32 rounding (per-tile mean and M2 merged by Chan's formula, no sum-of-squares)."""
    g = torch.Generator().manual_seed(3)
    x = random_input((3, 8, 6, 6), torch.float32, True, shift=1000.0, generator=g, device=device)
    w = (torch.rand(5, 8, 1, 1, generator=g) * 0.1 + 0.1).to(device).contiguous(memory_format=torch.channels_last)
    out, mean, var = dispatch.select_kernel("conv2d_stats", x)(x, w, [1, 1], [0, 0], [1, 1], None, None, False)
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_through_the_triton_forward(device):
    """conv2d_stats with the triton forward: every gradient against float64 autograd."""
    g = torch.Generator().manual_seed(7)
    x = random_input((2, 20, 5, 5), torch.float32, True, generator=g, device=device)
    w = random_input((17, 20, 3, 3), torch.float32, True, scale=0.1, generator=g, device=device)
    scale, shift = (torch.rand(20, generator=g) + 0.5).to(device), torch.randn(20, generator=g).to(device)
    go, gm, gv = (torch.randn(t, generator=g).to(device) for t in ((2, 17, 5, 5), 17, 17))
    leaves = [t.detach().requires_grad_() for t in (x, w, scale, shift)]
    out, mean, var = conv2d_stats(leaves[0], leaves[1], padding=1, prologue_scale=leaves[2],
                                  prologue_shift=leaves[3])
    grads = torch.autograd.grad((out * go).sum() + (mean * gm).sum() + (var * gv).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, scale, shift)]
    a = torch.relu(leaves64[0] * leaves64[2].view(1, -1, 1, 1) + leaves64[3].view(1, -1, 1, 1))
    y = F.conv2d(a, leaves64[1], padding=1)
    v, m = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    ref = torch.autograd.grad((y * go.double()).sum() + (m * gm.double()).sum() + (v * gv.double()).sum(),
                              leaves64)
    for name, ours, r in zip(("input", "weight", "scale", "shift"), grads, ref):
        torch.testing.assert_close(ours.double(), r, rtol=1e-4, atol=1e-4, msg=name)


# ------------------------------------------------------------------- per-channel vectors
def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with stride 2 (every other element of a twice-as-long buffer)."""
    buffer = torch.full((2 * t.shape[0],), float("nan"), dtype=t.dtype, device=t.device)
    buffer[::2] = t
    return buffer[::2]


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_per_channel_vectors(device):
    """A sliced bias, prologue scale or shift gives bitwise the result of its contiguous copy."""
    x, w, stride, padding, out_shape, g = _conv_inputs("3x3s1", torch.float32, True, device, seed=4)
    bias = torch.randn(out_shape[1], generator=g).to(device)
    scale = (torch.rand(x.shape[1], generator=g) + 0.5).to(device)
    shift = torch.randn(x.shape[1], generator=g).to(device)
    assert not _strided(bias).is_contiguous()
    conv = dispatch.select_kernel("conv2d_bias_act", x)
    args = (stride, padding, [1, 1], True)
    torch.testing.assert_close(conv(x, w, _strided(bias), None, *args), conv(x, w, bias, None, *args),
                               rtol=0, atol=0)
    stats = dispatch.select_kernel("conv2d_stats", x)
    ours = stats(x, w, stride, padding, [1, 1], _strided(scale), _strided(shift), True)
    expected = stats(x, w, stride, padding, [1, 1], scale, shift, True)
    for name, o, e in zip(("output", "mean", "var"), ours, expected):
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------- TF32 precision
@pytest.fixture
def restore_fp32_precision():
    """Put torch's float32 precision flags back as they were."""
    levels = (torch.backends, torch.backends.cudnn, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    before = [level.fp32_precision for level in levels]
    yield
    for level, value in zip(levels, before):
        level.fp32_precision = value


@pytest.mark.parametrize("conv,rnn,expected", [("tf32", "ieee", "tf32"), ("ieee", "tf32", "ieee"),
                                               ("tf32", "tf32", "tf32"), ("ieee", "ieee", "ieee")])
def test_fp32_runs_as_tf32_when_the_conv_precision_says_so(kernels, monkeypatch, restore_fp32_precision,
                                                           conv, rnn, expected):
    """torch.backends.cudnn.conv.fp32_precision decides, also when the RNN flag differs
    (then the legacy ``torch.backends.cudnn.allow_tf32`` raises)."""
    torch.backends.cudnn.conv.fp32_precision = conv
    torch.backends.cudnn.rnn.fp32_precision = rnn
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # the GPU's choice (the interpreter runs IEEE)
    assert kernels.conv_fp32_precision() == expected
    assert kernels._input_precision(torch.float32) == expected
    assert kernels._input_precision(torch.bfloat16) == "ieee"


@pytest.mark.parametrize("cudnn,generic,expected", [("tf32", "ieee", "tf32"), ("none", "tf32", "tf32"),
                                                    ("none", "none", "ieee"), ("ieee", "tf32", "ieee")])
def test_unset_conv_precision_defers_to_the_parent_flags(kernels, restore_fp32_precision, cudnn, generic, expected):
    """``"none"`` defers to torch.backends.cudnn.fp32_precision, then torch.backends.fp32_precision."""
    torch.backends.fp32_precision = generic
    torch.backends.cudnn.fp32_precision = cudnn
    torch.backends.cudnn.conv.fp32_precision = "none"
    assert kernels.conv_fp32_precision() == expected


# ------------------------------------------------------------------ tiles and autotuning
def test_autotune_key_holds_every_constexpr_but_the_tile(kernels):
    """Two kernels differing in epilogue, prologue, input precision or K tiling never share a tuned config."""
    tile = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    constexprs = {p.name for p in kernels._conv2d_kernel.params if p.is_constexpr} - tile
    assert constexprs == {"HAS_BIAS", "HAS_RESIDUAL", "RELU", "STATS", "PROLOGUE", "PROLOGUE_RELU",
                          "INPUT_PRECISION", "FLAT_K"}
    assert constexprs <= set(kernels.AUTOTUNE_KEY)
    assert {"M", "C_out", "C", "H", "W", "R", "S", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h",
            "dil_w"} <= set(kernels.AUTOTUNE_KEY)
    assert set(kernels.AUTOTUNE_KEY) <= set(kernels._conv2d_kernel.arg_names)


VARIANTS = [(kind, precision, tiling) for kind in ("epilogue", "stats", "stats+prologue")
            for precision in ("16-bit", "tf32", "fp32-ieee") for tiling in ("taps", "flat-k")]


@pytest.mark.skipif(TRITON_INTERPRETER, reason="the interpreter does not autotune")
def test_tuning_results_are_cached_on_disk(kernels):
    for arch in ("sm_80", "sm_90"):
        for kind in VARIANTS:
            block_m = 64 if kind[0].startswith("stats") else None
            if not kernels.configs_for(arch, kind, block_m):
                continue  # no spill-free 64-row tile for this variant: launch_plan never picks it
            tuner = kernels._autotuner(arch, kind, block_m)
            assert tuner.cache_results and tuner.keys == kernels.AUTOTUNE_KEY
            assert tuner.configs == kernels.configs_for(arch, kind, block_m)


@pytest.fixture
def gpu_planning(kernels, monkeypatch):
    """Plan launches as on a GPU (not interpreted), for a CPU device (sm_90, 132 SMs assumed)."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    return kernels


def test_autotuning_is_the_default(gpu_planning):
    plan = gpu_planning.launch_plan(32 * 56 * 56, 64, torch.device("cpu"), stats=True, prologue=True,
                                    dtype=torch.bfloat16, c_in=64)
    assert plan["autotune"] and plan["config"] is None and plan["block_m"] == 128
    assert plan["arch"] == "sm_90" and plan["variant"] == ("stats+prologue", "16-bit", "taps")


def test_variant_follows_precision_and_k_tiling(gpu_planning, restore_fp32_precision):
    K = gpu_planning
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert K.variant(False, False, torch.float32, 64) == ("epilogue", "tf32", "taps")
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert K.variant(True, False, torch.float32, 3) == ("stats", "fp32-ieee", "flat-k")
    assert K.variant(True, True, torch.float16, 3) == ("stats+prologue", "16-bit", "flat-k")


@pytest.mark.parametrize("switch", ["deterministic", "env"])
def test_one_fixed_config_per_shape_without_autotuning(gpu_planning, monkeypatch, switch):
    """Under torch.use_deterministic_algorithms(True) or RESNET_FAST_AUTOTUNE=0: no autotuner,
    one non-spilling config per shape, the same at every call."""
    K = gpu_planning
    if switch == "env":
        monkeypatch.setenv(K.AUTOTUNE_ENV, "0")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(switch == "deterministic")
    try:
        for m, c_out, stats, prologue, dtype, c_in in (
                (32 * 56 * 56, 64, True, True, torch.bfloat16, 64), (32 * 7 * 7, 2048, True, False, torch.float16, 512),
                (32 * 28 * 28, 512, False, False, torch.float32, 256), (32 * 112 * 112, 64, True, False,
                                                                         torch.bfloat16, 3)):
            plans = [K.launch_plan(m, c_out, torch.device("cpu"), stats, prologue, dtype, c_in) for _ in range(2)]
            assert not plans[0]["autotune"] and plans[0]["config"] is plans[1]["config"]
            allowed = K.configs_for(plans[0]["arch"], plans[0]["variant"], plans[0]["block_m"])
            assert plans[0]["config"] in allowed
    finally:
        torch.use_deterministic_algorithms(before)


def test_autotune_switch_rejects_other_values(gpu_planning, monkeypatch):
    monkeypatch.setenv(gpu_planning.AUTOTUNE_ENV, "maybe")
    with pytest.raises(ValueError, match="RESNET_FAST_AUTOTUNE must be 0 or 1, got 'maybe'"):
        gpu_planning.autotune_enabled()
    for value, enabled in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(gpu_planning.AUTOTUNE_ENV, value)
        assert gpu_planning.autotune_enabled() is enabled


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_statistics_are_bitwise_equal(device):
    """Two runs under torch.use_deterministic_algorithms(True): bitwise the same statistics."""
    x, w, stride, padding, out_shape, g = _conv_inputs("3x3s2", torch.float32, True, device, seed=5)
    scale = (torch.rand(x.shape[1], generator=g) + 0.5).to(device)
    shift = torch.randn(x.shape[1], generator=g).to(device)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [dispatch.select_kernel("conv2d_stats", x)(x, w, stride, padding, [1, 1], scale, shift, True)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    for name, first, second in zip(("output", "mean", "var"), *runs):
        assert torch.equal(first, second), name


def test_only_spill_free_configs_are_tried(kernels):
    """Every variant on every architecture has an entry of spill-free configs, and
    autotuning (and the fixed choice) takes only from it — for the statistics' M tiles too."""
    assert set(kernels.SPILL_FREE_CONFIGS) == {(arch, *kind) for arch in ("sm_80", "sm_90") for kind in VARIANTS}
    names = {kernels.config_name(c) for c in kernels.CONFIGS}
    for (arch, *kind), allowed in kernels.SPILL_FREE_CONFIGS.items():
        assert allowed and allowed <= names, (arch, kind, allowed - names)
        assert {kernels.config_name(c) for c in kernels.configs_for(arch, tuple(kind))} == allowed
        if kind[0] != "epilogue":
            assert any(kernels.configs_for(arch, tuple(kind), b) for b in kernels.STATS_BLOCK_MS), (arch, kind)


# ------------------------------------------------------------ statistics merge and M tiles
def test_statistics_merge_is_two_level_and_parallel(kernels):
    """ResNet-50 layer1 at batch 256 (6,272 M tiles, 64 channels): the first level runs in
    about sqrt(tiles) groups, so no program loops over more than ~2 sqrt(tiles) rows
    (the single-level merge had 2 programs loop over all 6,272 rows twice)."""
    rows, c_out = 256 * 56 * 56 // 128, 64
    per_group, groups = kernels.merge_groups(rows)
    c_blocks = -(-c_out // kernels.COMBINE_BLOCK_C)
    assert groups * c_blocks >= 128  # programs of the first level
    assert per_group <= 2 * math.isqrt(rows) and groups <= 2 * math.isqrt(rows)
    assert kernels.merge_groups(kernels.COMBINE_BLOCK_S) == (kernels.COMBINE_BLOCK_S, 1)  # one final launch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sm_count", [1, 1 << 20], ids=["large-m-tile", "small-m-tile"])
def test_statistics_through_the_two_level_merge(kernels, monkeypatch, device, sm_count):
    """Many M tiles merged in several groups (tiny merge steps), with the statistics M tile
    chosen for few or many SMs (workspace sized for it): against float64, and bitwise
    repeatable."""
    monkeypatch.setattr(kernels, "COMBINE_BLOCK_S", 2)
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16})
    monkeypatch.setattr(kernels, "INTERPRETER_SM_COUNT", sm_count)
    monkeypatch.setattr(kernels, "DEFAULT_SM_COUNT", sm_count)
    x, w, stride, padding, out_shape, g = _conv_inputs("1x1s1", torch.float32, True, device, seed=6, batch=9)
    m = out_shape[0] * out_shape[2] * out_shape[3]
    if device == "cpu":
        block_m = kernels.stats_block_m(m, out_shape[1], sm_count)
        assert block_m == (32 if sm_count == 1 else 16)
        assert kernels.merge_groups(-(-m // block_m))[1] > 1
    args = (stride, padding, [1, 1], None, None, False)
    runs = [dispatch.select_kernel("conv2d_stats", x)(x, w, *args) for _ in range(2)]
    ref = reference.conv2d_stats(x.double(), w.double(), *args)
    same = reference.conv2d_stats(x, w, *args)
    for name, ours, again, r, sm in zip(("output", "mean", "var"), *runs, ref, same):
        assert_close_to_reference(ours, r, sm, name)
        assert torch.equal(ours, again), name


def test_small_batches_get_the_smaller_statistics_tile(kernels, monkeypatch):
    """DDP's batch 32 per GPU: layer4's convolutions (M = 1,568) fill 132 SMs only with
    64-row M tiles; layer1 at batch 256 keeps 128."""
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    assert kernels.stats_block_m(32 * 7 * 7, 512, 132) == 64
    assert kernels.stats_block_m(32 * 7 * 7, 2048, 132) == 128  # 13 x 16 = 208 programs already
    assert kernels.stats_block_m(256 * 56 * 56, 64, 132) == 128
    assert kernels.stats_block_m(8 * 7 * 7, 512, 132) == 64  # even 64 cannot fill them: the smallest


# ----------------------------------------------------------------------------- blocks
def _bottleneck_pair(stride: int):
    """(float64 torchvision Bottleneck with random BN statistics, our float32 copy of it)."""
    import copy

    from torch import nn
    from torchvision.models import resnet as tv_resnet

    from resnet_fast.nn import Bottleneck

    torch.manual_seed(0)
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride, bias=False), nn.BatchNorm2d(32))
    tv_block = tv_resnet.Bottleneck(16, 8, stride=stride, downsample=downsample)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in (m for m in tv_block.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    ours = Bottleneck.from_torchvision(copy.deepcopy(tv_block)).to(memory_format=torch.channels_last)
    return tv_block.double(), ours


@pytest.mark.parametrize("device", DEVICES)
def test_eval_bottleneck_runs_folded_triton_convolutions(device):
    """Eval Bottleneck (stride 2, downsample): four folded Triton convolutions, the last
    with residual + ReLU, against torchvision's block in float64."""
    tv_block, ours = _bottleneck_pair(2)
    tv_block.eval()
    ours.eval().to(device)
    x = random_input((2, 16, 6, 6), torch.float32, True, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ours(x.to(device))
        ref = tv_block(x.double())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_training_bottleneck_with_triton_convolutions(device):
    """Opt-in fused training (statistics epilogues, BatchNorm+ReLU prologues in Triton):
    output, gradients and running statistics against torchvision's block in float64."""
    tv_block, ours = _bottleneck_pair(1)
    tv_block.train()
    ours.train().to(device)
    ours.fused_training = True
    g = torch.Generator().manual_seed(3)
    x = random_input((2, 16, 5, 5), torch.float32, True, generator=g)
    grad = torch.randn(2, 32, 5, 5, generator=g, dtype=torch.float64)
    xs = x.to(device).clone().requires_grad_()
    out = ours(xs)
    out.backward(grad.to(device, torch.float32))
    x64 = x.double().requires_grad_()
    ref = tv_block(x64)
    ref.backward(grad)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xs.grad.double().cpu(), x64.grad, rtol=1e-3, atol=1e-3)
    for (name, p), q in zip(ours.named_parameters(), tv_block.parameters()):
        torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=1e-3, atol=1e-3, msg=name)
    for (name, b), c in zip(ours.named_buffers(), tv_block.buffers()):
        torch.testing.assert_close(b.double().cpu(), c.double(), rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- the ops
def _opcheck_utils(device: str) -> tuple[str, ...]:
    """In the interpreter no kernel launch can be traced (see test_triton_batch_norm_act)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    return utils if device == "cpu" else (*utils, "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_triton_ops(kernels, channels_last, device):
    x, w, stride, padding, out_shape, g = _conv_inputs("3x3s2", torch.float32, channels_last, device)
    bias = torch.randn(out_shape[1], generator=g).to(device)
    res = random_input(out_shape, torch.float32, channels_last, generator=g, device=device)
    utils = _opcheck_utils(device)
    torch.library.opcheck(kernels.triton_conv2d_bias_act, (x, w, bias, res, stride, padding, [1, 1], True),
                          test_utils=utils)
    scale, shift = torch.rand(x.shape[1]).to(device) + 0.5, torch.randn(x.shape[1]).to(device)
    torch.library.opcheck(kernels.triton_conv2d_stats, (x, w, stride, padding, [1, 1], scale, shift, True),
                          test_utils=utils)


def test_launchers_are_registered(kernels):
    for name in ("triton_conv2d_bias_act", "triton_conv2d_stats"):
        assert hasattr(torch.ops.resnet_fast, name)
        assert isinstance(getattr(kernels, name), torch._library.custom_ops.CustomOpDef)
    for op in ("conv2d_bias_act", "conv2d_stats"):
        assert dispatch.BACKENDS["triton"].kernels[op] is getattr(kernels, op)
    assert kernels.USES_TENSOR_CORES is True


def test_float64_is_refused_with_a_reason():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons("conv2d_stats", x)
    assert any("float64 input is not supported by the triton backend" in r for r in reasons)


# ----------------------------------------------------------------------------- GPU only
RESNET50_CONVS = [  # (C_in, C_out, kernel, stride, padding, H) at batch 32
    (3, 64, 7, 2, 3, 224), (64, 64, 1, 1, 0, 56), (64, 64, 3, 1, 1, 56), (256, 128, 1, 1, 0, 56),
    (128, 128, 3, 2, 1, 56), (512, 1024, 1, 2, 0, 28), (512, 512, 3, 1, 1, 7), (512, 2048, 1, 1, 0, 7),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("conv", RESNET50_CONVS, ids=lambda c: f"{c[0]}-{c[1]}-k{c[2]}s{c[3]}-{c[5]}")
def test_resnet50_layers_bf16_on_gpu(conv):
    """Autotuned tiles on ResNet-50 layer shapes, bf16: both ops against float64."""
    cin, cout, k, s, p, h = conv
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(32, cin, h, h, device="cuda", generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device="cuda", generator=g) * (cin * k * k) ** -0.5).bfloat16()
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout, device="cuda", generator=g)
    res = torch.randn(32, cout, (h + 2 * p - k) // s + 1, (h + 2 * p - k) // s + 1, device="cuda",
                      generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    args = ([s, s], [p, p], [1, 1])
    out = dispatch.select_kernel("conv2d_bias_act", x)(x, w, bias, res, *args, True)
    pre = reference.conv2d_bias_act(x.double(), w.double(), bias.double(), res.double(), *args, False)
    same = reference.conv2d_bias_act(x, w, bias, res, *args, True)
    assert_close_to_reference(out, relu_with_mask_of(pre, out), same, "output")
    scale, shift = torch.rand(cin, device="cuda") + 0.5, torch.randn(cin, device="cuda")
    ours = dispatch.select_kernel("conv2d_stats", x)(x, w, *args, scale, shift, True)
    same = reference.conv2d_stats(x, w, *args, scale, shift, True)
    ref = reference.conv2d_stats(x.double(), w.double(), *args, scale.double(), shift.double(), True)
    for name, o, r, sm in zip(("output", "mean", "var"), ours, ref, same):
        assert_close_to_reference(o, r, sm, name)


@pytest.mark.gpu
@requires_gpu
def test_activation_past_2_31_elements():
    """A 1x1 convolution whose input and output pass 2^31 elements: the last image is right."""
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    x = torch.randn(2**31 // (64 * 128 * 128) + 1, 64, 128, 128, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 1, 1, device="cuda") / 8).bfloat16().contiguous(memory_format=torch.channels_last)
    out = dispatch.select_kernel("conv2d_bias_act", x)(x, w, None, None, [1, 1], [0, 0], [1, 1], False)
    expected = F.conv2d(x[-1:].float(), w.float())
    torch.testing.assert_close(out[-1:].float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@requires_gpu
def test_statistics_merge_at_resnet50_layer1_batch_256():
    """Item 6's case on the GPU: 6,272 M tiles merged in two levels, against float64, and
    bitwise repeatable under torch.use_deterministic_algorithms(True)."""
    from resnet_fast.kernels import conv2d as K

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 256, 56, 56, device="cuda", generator=g).bfloat16().contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(64, 256, 1, 1, device="cuda", generator=g) / 16).bfloat16().contiguous(
        memory_format=torch.channels_last)
    rows = -(-256 * 56 * 56 // 128)
    assert K.merge_groups(rows)[1] > 1
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [dispatch.select_kernel("conv2d_stats", x)(x, w, [1, 1], [0, 0], [1, 1], None, None, False)
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(before)
    out, mean, var = runs[0]
    assert torch.equal(mean, runs[1][1]) and torch.equal(var, runs[1][2])
    ref_var, ref_mean = torch.var_mean(out.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("c_out", [512, 2048])
def test_layer4_statistics_at_a_per_gpu_batch_of_32(c_out):
    """Item 7's case on the GPU: layer4 (7x7, M = 1,568) takes the M tile that fills the
    SMs, with a workspace sized for it; output and statistics against float64."""
    from resnet_fast.kernels import conv2d as K

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(32, 512, 7, 7, device="cuda", generator=g).bfloat16().contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(c_out, 512, 3, 3, device="cuda", generator=g) / 64).bfloat16().contiguous(
        memory_format=torch.channels_last)
    plan = K.launch_plan(32 * 7 * 7, c_out, x.device, stats=True, prologue=True, dtype=x.dtype, c_in=512)
    expected = K.stats_block_m(32 * 7 * 7, c_out, sms,
                               [b for b in K.STATS_BLOCK_MS if K.configs_for(plan["arch"], plan["variant"], b)])
    assert plan["block_m"] == expected
    scale, shift = torch.rand(512, device="cuda") + 0.5, torch.randn(512, device="cuda")
    args = ([1, 1], [1, 1], [1, 1], scale, shift, True)
    ours = dispatch.select_kernel("conv2d_stats", x)(x, w, *args)
    same = reference.conv2d_stats(x, w, *args)
    ref = reference.conv2d_stats(x.double(), w.double(), *args[:3], scale.double(), shift.double(), True)
    for name, o, r, s in zip(("output", "mean", "var"), ours, ref, same):
        assert_close_to_reference(o, r, s, name)
