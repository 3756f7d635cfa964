"""Build-time helpers for ``setup.py``: which CUDA toolkit, which GPU architectures.

``setup.py`` loads this file by path (it must not import the ``resnet_fast`` package,
whose ``__init__`` needs torch and the rest of the package), so it imports only the
standard library. The functions that decide something are pure, so the tests check them
without running a build.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess

# Architectures each toolkit major version builds for by default. CUDA 13 dropped
# sm_70 (Volta) and earlier; CUDA 12 still has it (V100 users build with a CUDA 12
# toolkit against torch's cu126 wheels).
_ARCHES_CUDA_12 = ("7.0", "7.5", "8.0", "8.6", "9.0")
_ARCHES_CUDA_13 = ("7.5", "8.0", "8.6", "9.0")
# Newer architectures added only when this nvcc lists them (`nvcc --list-gpu-arch`).
_OPTIONAL_NEWER_ARCHES = ("10.0", "12.0")


def parse_nvcc_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` output ("... release 13.0, V13.0.88")."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def parse_gpu_arch_list(text: str) -> set[str]:
    """The "X.Y" architectures in ``nvcc --list-gpu-arch`` output (compute_90 -> "9.0")."""
    arches = set()
    for digits in re.findall(r"compute_(\d+)", text):
        arches.add(f"{digits[:-1]}.{digits[-1]}")
    return arches


def cuda_arch_list(
    nvcc_version: tuple[int, int],
    env_value: str | None = None,
    nvcc_arches: set[str] | frozenset[str] | None = None,
) -> str:
    """The ``TORCH_CUDA_ARCH_LIST`` to build with, e.g. "7.5;8.0;8.6;9.0+PTX".

    ``env_value`` (the user's ``TORCH_CUDA_ARCH_LIST``) wins when set and non-empty.
    Otherwise the list follows the toolkit's major version: CUDA 12 (and 11) include
    7.0, CUDA 13 and newer do not. ``nvcc_arches`` (from :func:`parse_gpu_arch_list`)
    adds 10.0 and 12.0 when this nvcc can target them. The last entry gets "+PTX" so
    newer GPUs can JIT the kernels.
    """
    if env_value is not None and env_value.strip():
        return env_value.strip()
    major, _minor = nvcc_version
    if major < 11:
        raise ValueError(f"CUDA {major}.{_minor} is too old; resnet_fast needs CUDA 11.8 or newer")
    arches = list(_ARCHES_CUDA_12 if major <= 12 else _ARCHES_CUDA_13)
    if nvcc_arches:
        arches += [arch for arch in _OPTIONAL_NEWER_ARCHES if arch in nvcc_arches]
    return ";".join(arches) + "+PTX"


def find_nvcc(cuda_home: str | None = None) -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc`` when given, else the one on PATH."""
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        return candidate if os.access(candidate, os.X_OK) else None
    return shutil.which("nvcc")


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (the folder holding ``include/cuda_runtime.h``).

    ``CUDA_HOME`` / ``CUDA_PATH`` when set. Otherwise torch would take the parent of
    the ``bin`` folder holding the nvcc on PATH, which is wrong when that nvcc is a
    wrapper script (``/usr/local/bin/nvcc`` -> ``/usr/local``), so ask nvcc itself
    where it lives (``nvcc --dryrun`` prints ``_HERE_=<its bin folder>``; a dry run
    compiles nothing).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc is not None:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            match = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if match:
                candidates.append(os.path.dirname(os.path.normpath(match.group(1))))
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and find_nvcc(home):
            return home
    return None


def nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of the given nvcc, or None when it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_version(out.stdout)


def nvcc_gpu_arches(nvcc: str) -> set[str]:
    """Architectures this nvcc can target ("7.5", "9.0", ...); empty when it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return set()
    return parse_gpu_arch_list(out.stdout) if out.returncode == 0 else set()


def source_fingerprint(csrc: str | os.PathLike) -> str:
    """sha256 (hex) of the extension's sources: every file under ``csrc`` (recursively).

    Files are taken in the order of their paths relative to ``csrc`` (POSIX separators);
    each contributes its relative path, a NUL byte, its bytes and a NUL byte, so a rename
    or a moved boundary between files changes the hash too. setup.py compiles the result
    into the extension (``resnet_fast._C.build_info()["source_fingerprint"]``), so a build
    can be compared with the sources it claims to be.
    """
    root = os.fspath(csrc)
    paths = []
    for folder, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            paths.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    digest = hashlib.sha256()
    for relative, full in sorted(paths):
        digest.update(relative.encode("utf-8") + b"\0")
        with open(full, "rb") as source:
            digest.update(source.read())
        digest.update(b"\0")
    return digest.hexdigest()


def arch_names(arch_list: str) -> list[str]:
    """The architectures of a ``TORCH_CUDA_ARCH_LIST`` ("7.5;8.0 9.0+PTX" -> ["7.5", "8.0", "9.0"])."""
    names = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        name = entry.removesuffix("+PTX")
        if name and name not in names:
            names.append(name)
    return names


def _c_string(value: str) -> str:
    # JSON's escapes of an ASCII string (\", \\, \n, \uXXXX) are C++'s as well.
    return json.dumps(value, ensure_ascii=True)


def build_info_defines(
    architectures: list[str],
    cuda_version: str,
    torch_version: str,
    source_fingerprint: str,
    build_flags: list[str],
) -> list[str]:
    """The ``-D`` flags through which csrc/module.cpp learns how it was built.

    String values become C++ string literals and lists braced initialisers, e.g.
    ``-DRESNET_FAST_ARCHITECTURES={"7.5","8.0"}``; torch's build passes each flag as one
    shell-quoted argument, so the quotes reach the compiler.
    """
    def string_list(values: list[str]) -> str:
        return "{" + ",".join(_c_string(v) for v in values) + "}"

    return [
        f"-DRESNET_FAST_ARCHITECTURES={string_list(architectures)}",
        f"-DRESNET_FAST_CUDA_VERSION={_c_string(cuda_version)}",
        f"-DRESNET_FAST_TORCH_VERSION={_c_string(torch_version)}",
        f"-DRESNET_FAST_SOURCE_FINGERPRINT={_c_string(source_fingerprint)}",
        f"-DRESNET_FAST_BUILD_FLAGS={string_list(build_flags)}",
    ]
