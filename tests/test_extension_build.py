"""The CUDA extension resnet_fast._C: that it was built and registers its kernels, the
architecture choice in setup.py, and the GPU code inside the shared object. Runs on CPU.

With RESNET_FAST_EXPECT_CUDA_EXT=1 (CI sets it where nvcc is present) a missing
extension fails these tests; without it they skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECT_EXT = os.environ.get("RESNET_FAST_EXPECT_CUDA_EXT") == "1"


def _load_build_helpers():
    # By path, as setup.py does: resnet_fast/_build.py needs nothing but the standard library.
    spec = importlib.util.spec_from_file_location("_resnet_fast_build", ROOT / "resnet_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _load_build_helpers()


def _extension_path() -> pathlib.Path | None:
    """Where the built resnet_fast._C shared object is, or None."""
    try:
        spec = importlib.util.find_spec("resnet_fast._C")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin)


def _need_extension() -> pathlib.Path:
    path = _extension_path()
    if path is None:
        if EXPECT_EXT:
            pytest.fail("RESNET_FAST_EXPECT_CUDA_EXT=1 but resnet_fast._C was not built "
                        "(see the 'resnet_fast:' line of the pip install / setup.py output)")
        pytest.skip("resnet_fast._C is not built (set RESNET_FAST_EXPECT_CUDA_EXT=1 to require it)")
    return path


# ---------------------------------------------------------------------------------------
# (a) the extension imports and adds CUDA kernels


def test_extension_imports_and_registers_cuda_kernel():
    _need_extension()
    import resnet_fast.ops  # noqa: F401  defines the schemas, then loads resnet_fast._C
    from resnet_fast._extension import extension_load_error

    assert extension_load_error() is None, extension_load_error()
    importlib.import_module("resnet_fast._C")
    for op in ("batch_norm_stats", "batch_norm_act_apply", "batch_norm_act_backward_reduce",
               "batch_norm_act_backward_apply", "conv2d_tensor_core"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{op}", "CUDA"), op


def test_cuda_kernel_sits_beside_the_python_schema():
    """The C++ side only adds a CUDA kernel; the schema stays the Python one."""
    _need_extension()
    import resnet_fast.ops  # noqa: F401

    schema = torch.ops.resnet_fast.batch_norm_stats.default._schema
    assert [a.name for a in schema.arguments] == ["input"]
    assert len(schema.returns) == 2
    # The CPU call still goes to the torch reference.
    x = torch.randn(2, 3, 4, 5)
    mean, var = torch.ops.resnet_fast.batch_norm_stats(x)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# (b) the architecture list


def test_arch_list_cuda12_includes_volta():
    arches = _build.cuda_arch_list((12, 6), None)
    assert arches == "7.0;7.5;8.0;8.6;9.0+PTX"
    assert arches.split(";")[0] == "7.0"


def test_arch_list_cuda13_drops_volta():
    arches = _build.cuda_arch_list((13, 0), None)
    assert "7.0" not in arches.replace("+PTX", "").split(";")
    assert arches == "7.5;8.0;8.6;9.0+PTX"


def test_arch_list_adds_newer_arches_only_when_nvcc_lists_them():
    listed = _build.parse_gpu_arch_list("compute_75\ncompute_80\ncompute_86\ncompute_90\ncompute_100\n"
                                        "compute_110\ncompute_120\ncompute_121\n")
    assert {"7.5", "9.0", "10.0", "12.0", "12.1"} <= listed
    assert _build.cuda_arch_list((13, 0), None, listed) == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    assert _build.cuda_arch_list((13, 0), None, {"7.5", "8.0", "8.6", "9.0"}) == "7.5;8.0;8.6;9.0+PTX"
    # CUDA 12.8 knows 10.0 and 12.0 too; 7.0 stays.
    assert _build.cuda_arch_list((12, 8), None, {"7.0", "10.0", "12.0"}) == "7.0;7.5;8.0;8.6;9.0;10.0;12.0+PTX"


def test_arch_list_env_override_wins():
    assert _build.cuda_arch_list((13, 0), "8.0;9.0+PTX") == "8.0;9.0+PTX"
    assert _build.cuda_arch_list((12, 4), " 7.0 ") == "7.0"
    assert _build.cuda_arch_list((13, 0), "") == "7.5;8.0;8.6;9.0+PTX"  # empty: not set


def test_arch_list_last_entry_carries_ptx():
    for version in ((12, 1), (13, 0), (13, 2)):
        arches = _build.cuda_arch_list(version, None).split(";")
        assert arches[-1].endswith("+PTX")
        assert all("+PTX" not in a for a in arches[:-1])


def test_arch_list_rejects_ancient_toolkit():
    with pytest.raises(ValueError, match="too old"):
        _build.cuda_arch_list((10, 2), None)


def test_parse_nvcc_version():
    text = ("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"
            "Build cuda_13.0.r13.0/compiler.36424714_0\n")
    assert _build.parse_nvcc_version(text) == (13, 0)
    assert _build.parse_nvcc_version("Cuda compilation tools, release 12.6, V12.6.77") == (12, 6)
    assert _build.parse_nvcc_version("no version here") is None


def test_local_nvcc_arch_list_matches_its_version():
    """On this machine's toolkit (if any): CUDA 13 -> no sm_70, CUDA 12 -> sm_70."""
    nvcc = _build.find_nvcc(_build.find_cuda_home())
    if nvcc is None:
        pytest.skip("no nvcc here")
    version = _build.nvcc_version(nvcc)
    assert version is not None
    arches = _build.cuda_arch_list(version, None, _build.nvcc_gpu_arches(nvcc)).replace("+PTX", "").split(";")
    assert "7.5" in arches
    assert ("7.0" in arches) == (version[0] <= 12)


# ---------------------------------------------------------------------------------------
# (c) the shared object holds sm_75 code


def _find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), _build.find_cuda_home()]
    for home in homes:
        if home and os.access(os.path.join(home, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(home, "bin", "cuobjdump")
    # Triton's NVIDIA backend ships one (CUDA toolkits without the binary utilities).
    try:
        import triton.backends.nvidia as nvidia_backend
    except ImportError:
        return None
    bundled = pathlib.Path(nvidia_backend.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if os.access(bundled, os.X_OK) else None


def _list_elf(path) -> subprocess.CompletedProcess:
    """``cuobjdump --list-elf`` of the shared object (fails where the extension must exist
    and cuobjdump is missing; skips elsewhere)."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        if EXPECT_EXT:
            pytest.fail("cuobjdump not found (looked on PATH, in CUDA_HOME/bin and in triton)")
        pytest.skip("cuobjdump not found")
    out = subprocess.run([cuobjdump, "--list-elf", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_shared_object_has_sm75_code():
    path = _need_extension()
    out = _list_elf(path)
    elves = set(re.findall(r"sm_\d+a?", out.stdout))
    assert elves, out.stdout
    # scripts/gpu_check.sh builds for the lent GPU alone (TORCH_CUDA_ARCH_LIST=its
    # capability); the default build, the one CI checks, must carry sm_75 for T4s.
    if "sm_75" not in elves and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if elves == {f"sm_{major}{minor}"}:
            pytest.skip(f"built for this GPU only ({sorted(elves)})")
    assert "sm_75" in elves, out.stdout


# ---------------------------------------------------------------------------------------
# (d) build_info(): what the extension says about its own build


def test_source_fingerprint_covers_names_and_contents(tmp_path):
    (tmp_path / "a.cu").write_text("kernel a\n")
    (tmp_path / "b.cuh").write_text("header b\n")
    first = _build.source_fingerprint(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert _build.source_fingerprint(tmp_path) == first
    (tmp_path / "b.cuh").write_text("header b changed\n")
    changed = _build.source_fingerprint(tmp_path)
    assert changed != first
    (tmp_path / "b.cuh").rename(tmp_path / "c.cuh")
    assert _build.source_fingerprint(tmp_path) not in (first, changed)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.h").write_text("")
    assert len({first, changed, _build.source_fingerprint(tmp_path)}) == 3
    # the boundary between two files counts: "ab" + "c" is not "a" + "bc"
    left, right = tmp_path / "left", tmp_path / "right"
    for folder, (x, y) in ((left, ("ab", "c")), (right, ("a", "bc"))):
        folder.mkdir()
        (folder / "1").write_text(x)
        (folder / "2").write_text(y)
    assert _build.source_fingerprint(left) != _build.source_fingerprint(right)


def test_arch_names_drop_ptx_and_duplicates():
    assert _build.arch_names("7.5;8.0;8.6;9.0+PTX") == ["7.5", "8.0", "8.6", "9.0"]
    assert _build.arch_names(" 8.0 9.0+PTX 8.0 ") == ["8.0", "9.0"]
    assert _build.arch_names(_build.cuda_arch_list((12, 6), None)) == ["7.0", "7.5", "8.0", "8.6", "9.0"]


def test_build_info_defines_are_cpp_literals():
    defines = _build.build_info_defines(["7.5", "9.0"], "13.0", "2.9.0+cu130", "ab" * 32,
                                        ["-O3", '-DX="y"', "a\\b"])
    assert defines == [
        '-DRESNET_FAST_ARCHITECTURES={"7.5","9.0"}',
        '-DRESNET_FAST_CUDA_VERSION="13.0"',
        '-DRESNET_FAST_TORCH_VERSION="2.9.0+cu130"',
        f'-DRESNET_FAST_SOURCE_FINGERPRINT="{"ab" * 32}"',
        '-DRESNET_FAST_BUILD_FLAGS={"-O3","-DX=\\"y\\"","a\\\\b"}',
    ]


def test_build_info_is_none_without_the_extension(monkeypatch):
    from resnet_fast import _extension

    monkeypatch.setattr(_extension, "extension_load_error", lambda: "not built here")
    _extension._reported_build_info.cache_clear()
    try:
        assert _extension.build_info() is None
    finally:
        _extension._reported_build_info.cache_clear()


def test_build_info_describes_this_build():
    """The built extension reports the architectures it has GPU code for, and the
    fingerprint of the csrc/ it was compiled from (stale after an edit without a rebuild)."""
    path = _need_extension()
    from resnet_fast._extension import build_info

    info = build_info()
    assert info is not None, "resnet_fast._C has no build_info(): rebuild it"
    assert set(info) == {"architectures", "cuda_version", "torch_version", "source_fingerprint", "build_flags"}
    assert info["source_fingerprint"] == _build.source_fingerprint(ROOT / "csrc"), (
        "resnet_fast._C was built from other sources than csrc/ holds now: rebuild it")
    assert info["torch_version"] == torch.__version__
    assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
    nvcc = _build.find_nvcc(_build.find_cuda_home())
    if nvcc is not None:
        assert info["cuda_version"] == "%d.%d" % _build.nvcc_version(nvcc)
    assert info["build_flags"] and all(isinstance(flag, str) for flag in info["build_flags"])
    architectures = info["architectures"]
    assert architectures and all(re.fullmatch(r"\d+\.\d+", a) for a in architectures), architectures
    # exactly the GPU code in the shared object
    out = _list_elf(path)
    elves = set(re.findall(r"sm_(\d+)a?\b", out.stdout))
    assert elves == {a.replace(".", "") for a in architectures}, (architectures, out.stdout)
    # a new dict each call
    info["architectures"].append("0.0")
    assert "0.0" not in build_info()["architectures"]


def test_validation_fingerprints_csrc_as_the_build_does(monkeypatch):
    """Without build_info(), validation records fingerprint csrc/ with the very function
    setup.py compiles in, so a record made either way matches the other."""
    from resnet_fast import _extension, validation

    monkeypatch.setattr(_extension, "build_info", lambda: None)
    assert validation._cuda_compiled_identity() == (_build.source_fingerprint(ROOT / "csrc"), [])