"""csrc/conv2d_geometry.h on the CPU: the size checks and the depth walk of the WMMA convolution.

The header is what ``conv2d_tensor_core.cu`` uses, both on the host (the launcher's checks
of the output size and of every value it narrows to ``int``) and on the device (the main
loop's filter tap and channel, advanced by adding instead of dividing). Here it is
compiled with the host C++ compiler alone into a small driver that answers queries on
stdin, and every answer is compared with Python's own arithmetic: the output size with
floor division (``conv_output_shape``, the check that runs for CPU tensors, whose message
the C++ check repeats word for word) and the walk with ``divmod``.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import random
import shutil
import subprocess

import pytest
import torch

from resnet_fast.ops.common import conv_output_shape

ROOT = pathlib.Path(__file__).resolve().parents[1]
INT_MAX = 2**31 - 1

DRIVER = r"""
#include <iostream>
#include <sstream>
#include <string>

#include "conv2d_geometry.h"

using namespace resnet_fast::conv2d_geometry;

// One query per line; one answer line per query (a walk: one line per position).
//   sizes H W C R S stride_h stride_w pad_h pad_w dilation_h dilation_w -> "ok P Q" | "error <why>"
//   advance C S k0 delta count -> count lines "r s c": Tap::at(k0), then advance(delta) each time
//   next C S k0 count          -> the same with next()
int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string what;
    in >> what;
    if (what == "sizes") {
      ConvSizes s{};
      in >> s.height >> s.width >> s.in_channels >> s.kernel_h >> s.kernel_w >> s.stride[0] >> s.stride[1] >>
          s.padding[0] >> s.padding[1] >> s.dilation[0] >> s.dilation[1];
      int64_t p = 0, q = 0;
      const std::string why = check_sizes(s, &p, &q);
      if (why.empty()) {
        std::cout << "ok " << p << ' ' << q << '\n';
      } else {
        std::cout << "error " << why << '\n';
      }
    } else {
      int channels = 0, kernel_w = 0, delta = 1, count = 0;
      long long k0 = 0;
      in >> channels >> kernel_w >> k0;
      if (what == "advance") in >> delta;
      in >> count;
      Tap t = Tap::at(k0, channels, kernel_w);
      for (int i = 0; i < count; ++i) {
        std::cout << t.r << ' ' << t.s << ' ' << t.c << '\n';
        if (what == "advance") {
          t.advance(delta, channels, kernel_w);
        } else {
          t.next(channels, kernel_w);
        }
      }
    }
  }
  return 0;
}
"""


def _compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
    """A function sending query lines to the compiled driver and returning its answer lines."""
    compiler = _compiler()
    if compiler is None:
        if os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1":
            pytest.fail("no C++ compiler found (CXX, c++, g++, clang++), but the CUDA extension must build")
        pytest.skip("no C++ compiler found (CXX, c++, g++, clang++)")
    folder = tmp_path_factory.mktemp("conv2d_geometry")
    source = folder / "driver.cpp"
    source.write_text(DRIVER)
    binary = folder / "driver"
    build = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(source), "-o",
         str(binary)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr

    def ask(queries: list[str]) -> list[str]:
        run = subprocess.run([str(binary)], input="\n".join(queries) + "\n", capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout.splitlines()

    return ask


def _sizes_query(h, w, c, r, s, stride, padding, dilation) -> str:
    return " ".join(str(v) for v in (h, w, c, r, s, *stride, *padding, *dilation))


def _python_answer(h, w, c, r, s, stride, padding, dilation) -> str:
    """What the Python check says for CPU tensors of these sizes (meta tensors: no data)."""
    x = torch.empty(1, c, h, w, device="meta")
    weight = torch.empty(1, c, r, s, device="meta")
    try:
        _, _, p, q = conv_output_shape(x, weight, stride, padding, dilation)
    except ValueError as error:
        return f"error {error}"
    return f"ok {p} {q}"


def test_a_negative_output_span_is_an_error_not_one_row(geometry):
    # H + 2p - d(R - 1) - 1 = 2 - 2 - 1 = -1 with stride 2: truncating division gave
    # -1 / 2 + 1 = 1 output row; floor division (and the fixed check) gives none.
    args = (2, 9, 8, 3, 3, (2, 2), (0, 1), (1, 1))
    (answer,) = geometry(["sizes " + _sizes_query(*args)])
    assert answer.startswith("error input spatial size (2, 9) is too small for a (3, 3) kernel")
    assert answer == _python_answer(*args)
    # the same along the width, with dilation
    args = (9, 4, 8, 3, 3, (1, 3), (1, 0), (1, 2))
    (answer,) = geometry(["sizes " + _sizes_query(*args)])
    assert answer.startswith("error") and answer == _python_answer(*args)


def test_output_sizes_and_messages_match_the_python_check(geometry):
    rng = random.Random(0)
    cases = []
    for _ in range(2000):
        cases.append((rng.randint(1, 12), rng.randint(1, 12), rng.choice([1, 3, 8, 64]), rng.randint(1, 7),
                      rng.randint(1, 7), (rng.randint(1, 4), rng.randint(1, 4)),
                      (rng.randint(0, 3), rng.randint(0, 3)), (rng.randint(1, 3), rng.randint(1, 3))))
    # ResNet's own convolutions on their usual inputs
    cases += [(224, 224, 3, 7, 7, (2, 2), (3, 3), (1, 1)), (56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1)),
              (56, 56, 256, 1, 1, (2, 2), (0, 0), (1, 1)), (7, 7, 512, 3, 3, (1, 1), (1, 1), (1, 1))]
    answers = geometry(["sizes " + _sizes_query(*case) for case in cases])
    expected = [_python_answer(*case) for case in cases]
    errors = sum(a.startswith("error") for a in expected)
    assert 100 < errors < len(cases) - 100, "the cases cover both outcomes"
    mismatches = [(case, a, e) for case, a, e in zip(cases, answers, expected) if a != e]
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("name,index,value,lowest", [
    ("stride", 0, 2**32 + 1, 1),      # would have been narrowed to stride 1
    ("stride", 1, 0, 1),
    ("padding", 0, -1, 0),
    ("padding", 1, INT_MAX + 1, 0),
    ("dilation", 0, 2**33, 1),
    ("dilation", 1, 0, 1),
])
def test_values_narrowed_to_int_are_range_checked(geometry, name, index, value, lowest):
    args = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1]}
    args[name][index] = value
    (answer,) = geometry(["sizes " + _sizes_query(8, 8, 16, 3, 3, args["stride"], args["padding"],
                                                  args["dilation"])])
    pair = tuple(args[name])
    assert answer == f"error {name} must be in [{lowest}, {INT_MAX}], got {pair}"


def test_kernel_size_and_channels_are_range_checked(geometry):
    answers = geometry([
        "sizes " + _sizes_query(8, 8, 16, INT_MAX + 1, 1, (1, 1), (0, 0), (1, 1)),
        "sizes " + _sizes_query(8, 8, 0, 1, 1, (1, 1), (0, 0), (1, 1)),
        "sizes " + _sizes_query(8, 8, INT_MAX + 1, 1, 1, (1, 1), (0, 0), (1, 1)),
        "sizes " + _sizes_query(8, 8, INT_MAX, 1, 1, (1, 1), (0, 0), (1, 1)),
    ])
    assert answers[0] == f"error the kernel size must be in [1, {INT_MAX}], got ({INT_MAX + 1}, 1)"
    assert answers[1] == f"error the input channels must be in [1, {INT_MAX}], got 0"
    assert answers[2] == f"error the input channels must be in [1, {INT_MAX}], got {INT_MAX + 1}"
    assert answers[3] == "ok 8 8"


def _walk_expected(channels, kernel_w, k0, delta, count):
    lines = []
    for i in range(count):
        tap, c = divmod(k0 + i * delta, channels)
        r, s = divmod(tap, kernel_w)
        lines.append(f"{r} {s} {c}")
    return lines


# (C, S): the stem (C = 3), channel counts below, at and above the step of 32, 1x1 kernels
WALKS = list(itertools.product([1, 3, 8, 12, 16, 24, 40, 64, 96, 512], [1, 3, 7]))


@pytest.mark.parametrize("channels,kernel_w", WALKS)
def test_main_loop_walk_advances_like_the_division(geometry, channels, kernel_w):
    """Each thread's first depth index of a step: chunk_k in {0, 8, 16, 24}, +32 per step."""
    depth = kernel_w * kernel_w * channels  # R = S
    steps = depth // 32 + 3  # past the depth, as the last step's loads are
    queries = [f"advance {channels} {kernel_w} {k0} 32 {steps}" for k0 in (0, 8, 16, 24)]
    answers = geometry(queries)
    expected = []
    for k0 in (0, 8, 16, 24):
        expected += _walk_expected(channels, kernel_w, k0, 32, steps)
    assert answers == expected


@pytest.mark.parametrize("channels,kernel_w", WALKS)
def test_element_walk_steps_like_the_division(geometry, channels, kernel_w):
    """The element-by-element loads (C % 8 != 0): 8 consecutive depth indices from each chunk."""
    starts = [k0 for k0 in range(0, kernel_w * kernel_w * channels + 8, 8)][:64]
    answers = geometry([f"next {channels} {kernel_w} {k0} 8" for k0 in starts])
    expected = []
    for k0 in starts:
        expected += _walk_expected(channels, kernel_w, k0, 1, 8)
    assert answers == expected
