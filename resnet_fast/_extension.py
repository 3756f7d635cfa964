"""Loading the compiled CUDA extension ``resnet_fast._C``, and how it was built.

The extension registers CUDA kernels for operators whose schemas are defined in Python
(:mod:`resnet_fast.ops`); importing it is all that is needed. The package works without
it: the ``cuda`` backend then reports why it is unavailable.
"""

from __future__ import annotations

import copy
import functools
import importlib


@functools.lru_cache(maxsize=None)
def extension_load_error() -> str | None:
    """Import ``resnet_fast._C`` once; None when it loaded, else why it did not."""
    try:
        importlib.import_module("resnet_fast._C")
    except ImportError as error:
        return f"CUDA extension resnet_fast._C is not available ({error})"
    return None


@functools.lru_cache(maxsize=None)
def _reported_build_info() -> dict | None:
    if extension_load_error() is not None:
        return None
    reporter = getattr(importlib.import_module("resnet_fast._C"), "build_info", None)
    # An extension built before build_info() existed cannot say what it was built from.
    return None if reporter is None else dict(reporter())


def build_info() -> dict | None:
    """How ``resnet_fast._C`` was built, or None when it is not available.

    A new dict (``resnet_fast._C.build_info()``, written by setup.py at build time):

    * ``"architectures"``: list of ``"X.Y"`` compute capabilities the shared object has
      GPU code for (the build's ``TORCH_CUDA_ARCH_LIST`` without ``+PTX``);
    * ``"cuda_version"``: the nvcc that compiled it, ``"major.minor"``;
    * ``"torch_version"``: the torch it was compiled against (``torch.__version__``);
    * ``"source_fingerprint"``: sha256 hex of the ``csrc/`` sources it was compiled from
      (:func:`resnet_fast._build.source_fingerprint`); differs from the checkout's when
      the sources changed after the build;
    * ``"build_flags"``: nvcc's flags, list of str.

    None also for an extension built before it reported its build.
    """
    info = _reported_build_info()
    return None if info is None else copy.deepcopy(info)
