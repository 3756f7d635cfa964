"""Loading the compiled CUDA extension ``resnet_fast._C``.

The extension only registers CUDA kernels for operators whose schemas are defined in
Python (:mod:`resnet_fast.ops`); importing it is all that is needed. The package works
without it: the ``cuda`` backend then reports why it is unavailable.
"""

from __future__ import annotations

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


def build_info() -> dict | None:
    """What the compiled extension says about its own build, or None when it is not built.

    The dict (from ``resnet_fast._C.build_info()``) has ``architectures`` (the compute
    capabilities compiled, e.g. ``["7.5", "8.0", "9.0"]``), ``cuda_version``,
    ``torch_version`` (the torch it was built against), ``source_fingerprint`` (sha256 of
    its csrc sources) and ``build_flags``. None also when the loaded extension predates
    ``build_info``.
    """
    if extension_load_error() is not None:
        return None
    report = getattr(importlib.import_module("resnet_fast._C"), "build_info", None)
    return None if report is None else dict(report())
