"""The Triton convolution compiled ahead of time exactly as the runtime builds it, read with ``ptxas -v``.

Each case goes through :mod:`conv2d_compile` (run as a script without ``TRITON_INTERPRET``):
real ResNet-50 layer shapes through the launcher's own argument builder, Triton's own
specialisation for the target (16-divisible integers and aligned pointers as attributes,
integers equal to 1 as constants), each config with its own block sizes, warps and
stages. For every config autotuning may pick (:func:`~resnet_fast.kernels.conv2d.configs_for`)
it asserts ``wgmma`` on sm_90, ``mma.sync`` on sm_80 (but for IEEE float32, which has
no tensor-core path), ``cp.async`` loads (but for the stem's 3-channel gather), and zero
spill stores and loads.

What runs where (about 1.5 s of CPU per compile):

* CI (:func:`test_every_config_autotuning_may_pick_builds_without_spills`): float16/
  bfloat16 3x3 convolutions, the training kernel (statistics epilogue, BatchNorm+ReLU
  prologue) and the inference kernel (bias, residual, ReLU), on sm_90 and sm_80 — every
  config either may pick (28 compiles, about 45 s of CPU on an idle core).
* The full set (:func:`test_full_set_matches_the_spill_table`): every ResNet-50 layer kind
  (3x3 and 1x1, strides 1 and 2, the 7x7 stem with its flat K tiling) x every variant x
  bfloat16, float16, TF32 and IEEE float32 x sm_90 and sm_80 x every config autotuning
  may pick there, in parallel
  processes. ``gpu``-marked so that
  ``scripts/gpu_check.sh`` runs it on its 16 cores; ``RESNET_FAST_FULL_COMPILE=1`` runs it
  anywhere. ``python tests/conv2d_compile.py --table`` prints the spill-free table it measures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HELPER = Path(__file__).with_name("conv2d_compile.py")
ARCHS = {90: "sm_90", 80: "sm_80"}
CI_VARIANTS = (("stats+prologue", "16-bit", "taps"), ("epilogue", "16-bit", "taps"))


def _compile(cases: list[str], cache: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    result = subprocess.run([sys.executable, str(HELPER), *cases], env=env, capture_output=True, text=True,
                            timeout=1800, cwd=HELPER.parents[1])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _known_spill(case: str) -> bool:
    """A spill the kernel module documents (:data:`SPILLING_ON_TRITON_3_6`), on that Triton."""
    import triton

    from resnet_fast.kernels import conv2d as K

    sys.path.insert(0, str(HELPER.parent))
    try:
        import conv2d_compile
    finally:
        sys.path.remove(str(HELPER.parent))
    return triton.__version__.startswith("3.6.") and conv2d_compile.variant_key(case) in K.SPILLING_ON_TRITON_3_6


def _problems(report: dict) -> list[str]:
    """What is wrong with one compiled case: any spill; no ``wgmma`` on sm_90 or no
    ``mma.sync`` on sm_80 (IEEE float32 has no tensor-core path: its ``tl.dot`` is FMA);
    no ``cp.async`` where K runs along contiguous channels (the stem's 3-channel gather
    has no 16-byte runs to copy)."""
    cap, dtype, layer = report["case"].split(":")[:3]
    tensor_cores = dtype != "fp32-ieee"
    contiguous_k = layer != "stem"
    problems = []
    if (report["spill_stores"] or report["spill_loads"]) and not _known_spill(report["case"]):
        problems.append(f"spills {report['spill_stores']} B stores, {report['spill_loads']} B loads "
                        f"({report['registers']} registers)")
    if tensor_cores and int(cap) >= 90 and not report["wgmma"]:
        problems.append("no wgmma")
    if tensor_cores and int(cap) == 80 and not report["mma_sync"]:
        problems.append("no mma.sync")
    if contiguous_k and not report["cp_async"]:
        problems.append("no cp.async")
    return problems


def test_every_config_autotuning_may_pick_builds_without_spills(tmp_path):
    from resnet_fast.kernels import conv2d as K

    expected = {}
    for cap, arch in ARCHS.items():
        for kind in CI_VARIANTS:
            for config in K.configs_for(arch, kind):
                case = f"{cap}:bf16:3x3s1:{kind[0]}:{K.config_name(config)}"
                expected[case] = config
    reports = _compile(list(expected), tmp_path / "triton-cache")
    assert [r["case"] for r in reports] == list(expected)
    failures = {r["case"]: _problems(r) for r in reports if _problems(r)}
    assert not failures, failures
    for report in reports:
        config = expected[report["case"]]
        assert (report["num_warps"], report["num_stages"]) == (config.num_warps, config.num_stages)
        # the runtime's specialisation: 16-divisible sizes and strides as attributes, 1s as constants
        assert {"C", "C_out", "M", "x_ptr", "w_ptr", "out_ptr"} <= set(report["divisible"]), report["divisible"]
        assert {"stride_h", "stride_w", "pad_h", "pad_w", "sxc"} <= set(report["ones"]), report["ones"]


def test_one_by_one_convolutions_specialise_their_filter_size(tmp_path):
    """A 1x1 convolution compiles with R = S = 1 as constants (as the runtime builds it)."""
    from resnet_fast.kernels import conv2d as K

    name = K.config_name(K.configs_for("sm_90", ("stats+prologue", "16-bit", "taps"))[0])
    (report,) = _compile([f"90:bf16:1x1s1:stats+prologue:{name}"], tmp_path / "triton-cache")
    assert {"R", "S", "stride_h", "stride_w"} <= set(report["ones"])
    assert "pad_h" in report["divisible"]  # 0 is divisible by 16
    assert not _problems(report), _problems(report)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("RESNET_FAST_FULL_COMPILE") == "1"),
                    reason="the full compile set runs in scripts/gpu_check.sh or with RESNET_FAST_FULL_COMPILE=1")
def test_full_set_matches_the_spill_table(tmp_path):
    """Every layer kind, variant, input precision, architecture and config: each config of
    :data:`SPILL_FREE_CONFIGS` compiles without spills (and with the expected tensor-core
    and copy instructions) in every case of its variant."""
    sys.path.insert(0, str(HELPER.parent))
    try:
        import conv2d_compile
    finally:
        sys.path.remove(str(HELPER.parent))
    from resnet_fast.kernels import conv2d as K

    measured = conv2d_compile.measure_all(conv2d_compile.full_set(spill_free_only=True), cache=tmp_path / "triton-cache")
    assert set(measured) == set(K.SPILL_FREE_CONFIGS)
    failures = [f"{report['case']}: {problem}" for key, by_config in measured.items()
                for name, reports in by_config.items() if name in K.SPILL_FREE_CONFIGS[key]
                for report in reports for problem in _problems(report)]
    assert not failures, "\n".join(failures)
