"""The WMMA convolution's CUDA kernels, run on the CPU under an emulation of CUDA.

``csrc/conv2d_tensor_core_kernel.cuh`` (the kernels nvcc compiles for the ``cuda``
backend on sm_7x) is compiled with the host C++ compiler together with
``tests/cuda_emulation/emulation.h`` (threads, barriers, shared memory and WMMA on the
CPU) and a driver that sets the kernels up as the launcher does. Every GPU case of
tests/test_cuda_conv2d_tensor_core.py (each kind of ResNet convolution, partial tiles,
both halves of the staged epilogue, channel counts that are not multiples of 8, the
prologue, bias/residual/ReLU, the statistics and their merge) then runs here and is
checked against float64 with that file's tolerance, in the vector and, with storage one
element off a 16-byte boundary, the element-by-element paths.

What this cannot show: timing, the real WMMA fragment layout, or races that the
hardware's scheduling would expose (each lane holds a whole fragment here).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch
from test_cuda_conv2d_tensor_core import MODES, SHAPES, _case, _check_against_float64

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMULATION = pathlib.Path(__file__).resolve().parent / "cuda_emulation"


def _cuda_include() -> pathlib.Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "include" / "cuda_fp16.h").exists():
            return pathlib.Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> pathlib.Path:
    compiler = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++") if c and shutil.which(c)), None)
    cuda_include = _cuda_include()
    if compiler is None or cuda_include is None:
        reason = "needs a C++ compiler and the CUDA headers (CUDA_HOME/include)"
        if os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1":
            pytest.fail(reason + ", which building the CUDA extension needs too")
        pytest.skip(reason)
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    binary = tmp_path_factory.mktemp("emulated") / "conv2d_tensor_core_driver"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-ffp-contract=off", "-pthread", "-Wno-attributes",
         f"-I{ROOT / 'csrc'}", f"-I{EMULATION}", f"-I{torch_include}", f"-I{cuda_include}",
         str(EMULATION / "conv2d_tensor_core_driver.cpp"), "-o", str(binary)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-5000:]
    return binary


def _bits(t: torch.Tensor) -> str:
    return " ".join(map(str, t.contiguous().view(torch.int16).reshape(-1).numpy().astype(np.uint16).tolist()))


def _floats(t: torch.Tensor) -> str:
    return " ".join(repr(v) for v in t.float().tolist())


def _case_file(path: pathlib.Path, args, misalign: bool) -> None:
    x, weight, bias, residual, scale, shift, stride, padding, dilation, prologue_relu, relu, stats = args
    n, c, h, w = x.shape
    k, _, r, s = weight.shape
    header = [n, c, h, w, k, r, s, *stride, *padding, *dilation, int(scale is not None), int(prologue_relu),
              int(relu), int(stats), int(bias is not None), int(residual is not None), int(misalign)]
    parts = [" ".join(map(str, header)), _bits(x.permute(0, 2, 3, 1)), _bits(weight.permute(0, 2, 3, 1))]
    if scale is not None:
        parts += [_floats(scale), _floats(shift)]
    if bias is not None:
        parts.append(_floats(bias))
    if residual is not None:
        parts.append(_bits(residual.permute(0, 2, 3, 1)))
    path.write_text("\n".join(parts) + "\n")


def _parse(line: str, args):
    """(out, mean, var, vector_in, vector_out) from the driver's answer to ``args``."""
    fields = line.split()
    assert fields[0] == "ok", line[:300]
    p, q = int(fields[1]), int(fields[2])
    vector_in, vector_out = fields[3] == "vector_in=1", fields[4] == "vector_out=1"
    i_mean, i_var = fields.index("mean"), fields.index("var")
    n, k = args[0].shape[0], args[1].shape[0]
    bits = np.array([int(v) for v in fields[5:i_mean]], dtype=np.uint16)
    out = torch.from_numpy(bits.view(np.float16).copy()).view(n, p, q, k).permute(0, 3, 1, 2)
    mean = torch.tensor([float(v) for v in fields[i_mean + 1:i_var]], dtype=torch.float32)
    var = torch.tensor([float(v) for v in fields[i_var + 1:]], dtype=torch.float32)
    return out, mean, var, vector_in, vector_out


def _run(driver, tmp_path, cases):
    files = []
    for i, (args, misalign) in enumerate(cases):
        path = tmp_path / f"case{i}.txt"
        _case_file(path, args, misalign)
        files.append(str(path))
    run = subprocess.run([str(driver), *files], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == len(cases)
    return lines


@pytest.mark.parametrize("shape", list(SHAPES))
def test_emulated_kernel_matches_float64(driver, tmp_path, shape):
    """Every mode, on aligned storage (vector loads where C_in % 8 == 0) and misaligned storage."""
    cases = [(_case(shape, mode), misalign) for mode in MODES for misalign in (False, True)]
    for (args, misalign), line in zip(cases, _run(driver, tmp_path, cases)):
        out, mean, var, vector_in, vector_out = _parse(line, args)
        cin, cout = SHAPES[shape][1], SHAPES[shape][2]
        assert vector_in == (cin % 8 == 0 and not misalign)
        assert vector_out == (cout % 8 == 0 and not misalign)
        _check_against_float64(args, (out, mean, var))


def test_emulated_kernel_on_a_layer_with_many_steps(driver, tmp_path):
    """ResNet's 3x3 at 64 channels: depth 576 (18 steps of the depth walk), two row tiles,
    prologue with ReLU and statistics."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 64, 12, 12, generator=g, dtype=torch.float64) * 2 + 0.5).half()
    weight = (torch.randn(64, 64, 3, 3, generator=g, dtype=torch.float64) / 24).half()
    scale, shift = torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g)
    args = (x, weight, None, None, scale, shift, [1, 1], [1, 1], [1, 1], True, False, True)
    (line,) = _run(driver, tmp_path, [(args, False)])
    out, mean, var, vector_in, _ = _parse(line, args)
    assert vector_in
    _check_against_float64(args, (out, mean, var))


def test_emulated_kernel_fails_when_the_kernel_is_wrong(driver, tmp_path):
    """The check has teeth: the same answer scored against a different weight fails."""
    args = _case("3x3s2", "bias_relu")
    (line,) = _run(driver, tmp_path, [(args, False)])
    out, mean, var, _, _ = _parse(line, args)
    wrong = list(args)
    wrong[1] = args[1].clone()
    wrong[1][0, 0, 0, 0] += 0.5
    with pytest.raises(AssertionError):
        _check_against_float64(tuple(wrong), (out, mean, var))
