"""``import resnet_fast`` stays light: it must not import triton (``TRITON_INTERPRET`` is
read when triton is first imported, so ``python -m resnet_fast.check --interpret`` and the
interpreter test processes set it after importing the package) nor torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from resnet_fast.ops.dispatch import constant_under_compile


def test_import_resnet_fast_imports_neither_triton_nor_dynamo():
    code = ("import sys, resnet_fast; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_constant_under_compile_marks_as_torch_does():
    def ours():
        return 1

    def torchs():
        return 1

    constant_under_compile(ours)
    torch.compiler.assume_constant_result(torchs)
    marks = {name for name in vars(torchs) if name.startswith("_dynamo")}
    assert marks and marks == {name for name in vars(ours) if name.startswith("_dynamo")}
    assert all(getattr(ours, name) == getattr(torchs, name) for name in marks)
