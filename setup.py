"""Build script for resnet_fast: the pure-Python package plus, optionally, the CUDA
extension ``resnet_fast._C`` (csrc/*.cu, csrc/*.cpp).

Install with

    pip install --no-build-isolation -e .        # or without -e

``--no-build-isolation`` is required for the CUDA extension: this script imports the torch
already installed in your environment to compile against it (an isolated build would
fetch a different torch, or none). Metadata lives in pyproject.toml.

The extension is built when nvcc and a CUDA build of torch are both found, and skipped
otherwise with one line saying why (the package then runs on its Triton and torch
backends). Switches:

    RESNET_FAST_BUILD_CUDA=1      build it, and fail if it cannot be built
    RESNET_FAST_BUILD_CUDA=0      do not build it
    MAX_JOBS=N                    parallel compile jobs (ninja)
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"   GPU architectures; the default follows nvcc's
                                  version (CUDA 12: 7.0 ... 9.0; CUDA 13: 7.5 ... 9.0, plus
                                  10.0 and 12.0 when that nvcc has them)
    CUDA_HOME=/usr/local/cuda     toolkit to use (default: found from nvcc)
"""

from __future__ import annotations

import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_helpers():
    # By path: importing the resnet_fast package here would run its __init__.
    path = os.path.join(ROOT, "resnet_fast", "_build.py")
    spec = importlib.util.spec_from_file_location("_resnet_fast_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_helpers()


def _say(message: str) -> None:
    print(f"resnet_fast: {message}", flush=True)


def _cuda_extension():
    """(ext_modules, cmdclass) for resnet_fast._C, or ([], {}) when it is skipped."""
    switch = os.environ.get("RESNET_FAST_BUILD_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise SystemExit(f"resnet_fast: RESNET_FAST_BUILD_CUDA must be 0 or 1, got {switch!r}")
    if switch == "0":
        _say("not building the CUDA extension resnet_fast._C (RESNET_FAST_BUILD_CUDA=0)")
        return [], {}
    forced = switch == "1"

    reason = None
    torch = None
    try:
        import torch
    except ImportError as error:
        reason = (f"torch is not importable ({error}); install torch first and build with "
                  "pip install --no-build-isolation")
    cuda_home = _build.find_cuda_home()
    nvcc = _build.find_nvcc(cuda_home)
    version = _build.nvcc_version(nvcc) if nvcc else None
    if reason is None and torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    if reason is None and (cuda_home is None or nvcc is None):
        reason = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if reason is None and version is None:
        reason = f"could not read the version of {nvcc}"
    if reason is None:
        torch_major = int(torch.version.cuda.split(".")[0])
        if torch_major != version[0]:
            reason = (f"nvcc is CUDA {version[0]}.{version[1]} but torch {torch.__version__} "
                      f"was built with CUDA {torch.version.cuda}; their major versions must match")
    if reason is not None:
        if forced:
            raise SystemExit(f"resnet_fast: RESNET_FAST_BUILD_CUDA=1 but the CUDA extension "
                             f"cannot be built: {reason}")
        _say(f"skipping the CUDA extension resnet_fast._C: {reason}")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME and TORCH_CUDA_ARCH_LIST from the
    # environment (the former when it is imported), so set both before importing it.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    arch_list = _build.cuda_arch_list(
        version, os.environ.get("TORCH_CUDA_ARCH_LIST"), _build.nvcc_gpu_arches(nvcc)
    )
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cu", root_dir=ROOT)) + sorted(
        glob.glob("csrc/*.cpp", root_dir=ROOT)
    )
    _say(f"building the CUDA extension resnet_fast._C with CUDA {version[0]}.{version[1]} "
         f"({nvcc}) for TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')}")
    # torch's headers (2.10+) need C++20, and BuildExtension would add -std=c++20 itself;
    # it is spelled out so nvcc and the host compiler agree. No --use_fast_math: the
    # statistics kernels rely on IEEE division and exact subtraction.
    # --threads=0: nvcc compiles the architectures of one file in parallel (one thread per
    # CPU), so the largest kernel file is not one long serial job.
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--threads=0"]
    # resnet_fast._C.build_info() reports how the extension was built (csrc/module.cpp, the
    # only C++ file, gets these defines; the .cu files do not, so a new fingerprint
    # recompiles module.cpp alone).
    info_defines = _build.build_info_defines(
        architectures=_build.arch_names(arch_list),
        cuda_version=f"{version[0]}.{version[1]}",
        torch_version=torch.__version__,
        source_fingerprint=_build.source_fingerprint(os.path.join(ROOT, "csrc")),
        build_flags=nvcc_flags,
    )
    extension = CUDAExtension(
        name="resnet_fast._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++20", *info_defines], "nvcc": nvcc_flags},
    )
    # BuildExtension runs ninja with MAX_JOBS parallel jobs when that is set.
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
