"""reduction.cuh's vector_width on the CPU: the load width of the BatchNorm-family kernels.

The statistics, apply, backward-reduce and backward-apply kernels read 16-byte vectors
when the contiguous extent (C channels_last, H*W NCHW) is a multiple of the 16-byte width
and every tensor is 16-byte aligned; fp16/bf16 also have an 8-byte tier (4 elements:
NCHW 14x14 planes, H*W = 196); otherwise one element at a time. The host function is
compiled (with tests/cuda_emulation/emulation.h standing in for the CUDA compiler) and
asked about extents and alignments; the GPU tests check that the kernels launched follow it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMULATION = pathlib.Path(__file__).resolve().parent / "cuda_emulation"

DRIVER = r"""
#include "emulation.h"

#include <cstdint>
#include <iostream>

#include "reduction.cuh"

// stdin lines "full inner offset_bytes_1 offset_bytes_2 ..." (offset -1: an absent tensor)
// -> the chosen width per line.
int main() {
  alignas(256) static unsigned char storage[4096];
  int full = 0, count = 0;
  long long inner = 0;
  while (std::cin >> full >> inner >> count) {
    const void* pointers[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int i = 0; i < count; ++i) {
      long long offset = 0;
      std::cin >> offset;
      pointers[i] = offset < 0 ? nullptr : storage + offset;
    }
    std::cout << resnet_fast::vector_width(full, inner, {pointers[0], pointers[1], pointers[2], pointers[3]})
              << "\n";
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def vector_width(tmp_path_factory):
    compiler = next((shutil.which(c) for c in (os.environ.get("CXX"), "c++", "g++") if c and shutil.which(c)), None)
    cuda_home = next((pathlib.Path(h) for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda")
                      if h and (pathlib.Path(h) / "include" / "cuda_fp16.h").exists()), None)
    if compiler is None or cuda_home is None:
        reason = "needs a C++ compiler and the CUDA headers (CUDA_HOME/include)"
        if os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1":
            pytest.fail(reason + ", which building the CUDA extension needs too")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("vector_width")
    (folder / "driver.cpp").write_text(DRIVER)
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", "-Wno-attributes", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}",
         f"-I{torch_include}", f"-I{cuda_home / 'include'}", str(folder / "driver.cpp"), "-o", str(folder / "driver")],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-5000:]

    def ask(queries: list[tuple[int, int, list[int]]]) -> list[int]:
        text = "".join(f"{full} {inner} {len(offsets)} {' '.join(map(str, offsets))}\n"
                       for full, inner, offsets in queries)
        run = subprocess.run([str(folder / "driver")], input=text, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        return [int(line) for line in run.stdout.split()]

    return ask


def _expected(full: int, inner: int, offsets: list[int]) -> int:
    element = 16 // full
    for width in ((full, 4) if full == 8 else (full,)):
        if width > 1 and inner % width == 0 and all(o < 0 or o % (width * element) == 0 for o in offsets):
            return width
    return 1


def test_fp16_planes_of_196_take_8_byte_loads(vector_width):
    # fp16/bf16 (full = 8): 14x14 NCHW planes, aligned tensors -> 4; 16x16 -> 8; 7x7 -> 1
    assert vector_width([(8, 196, [0, 256, -1]), (8, 256, [0, 256]), (8, 49, [0, 0])]) == [4, 8, 1]


def test_alignment_decides_between_tiers(vector_width):
    # one tensor 8-byte but not 16-byte aligned: 4; 2-byte aligned: 1; absent tensors do not count
    assert vector_width([(8, 256, [0, 8]), (8, 256, [0, 2]), (8, 196, [0, -1, 4]), (8, 256, [-1, 16])]) == [4, 1, 1, 8]


def test_only_16_bit_types_have_the_middle_tier(vector_width):
    # float32 (full = 4) and float64 (full = 2): 16 bytes or one element
    assert vector_width([(4, 6, [0]), (4, 8, [8]), (2, 3, [0]), (2, 4, [0]), (1, 3, [0])]) == [1, 1, 1, 2, 1]


def test_matches_the_rule_everywhere(vector_width):
    queries = [(full, inner, [a, b]) for full in (8, 4, 2) for inner in range(1, 40)
               for a in (0, 2, 4, 8, 16) for b in (-1, 0, 6, 8, 24)]
    assert vector_width(queries) == [_expected(*q) for q in queries]
