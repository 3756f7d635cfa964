"""Every Triton kernel of the package compiles ahead of time for sm_70, sm_75, sm_80 and sm_90.

CPU-only proof that the Triton backend builds for V100 (sm_70), T4 (sm_75), A100 (sm_80)
and H100 (sm_90): ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
needs no GPU. The kernels are discovered, not listed here: every module of
:mod:`resnet_fast.kernels` is imported, each one registers a
:class:`~resnet_fast.kernels.CompileExample` per kernel, and every ``@triton.jit``
function a module defines must have one (a new kernel without one fails). It runs in a
fresh process without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled) and
with its own Triton cache, so every kernel is really compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# (compute capability, activation dtype): bf16 where it is native, fp16 on Volta and Turing.
TARGETS = ((90, "bf16"), (80, "bf16"), (75, "fp16"), (70, "fp16"))
SCRIPT = textwrap.dedent("""
    import importlib
    import json
    import pkgutil
    import sys

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import resnet_fast.kernels as kernels

    modules = [importlib.import_module(f"{kernels.__name__}.{m.name}")
               for m in pkgutil.iter_modules(kernels.__path__)]
    registered = {id(example.kernel) for example in kernels.COMPILE_EXAMPLES.values()}
    registered |= {id(function) for function in kernels.DEVICE_FUNCTIONS.values()}  # compiled inside kernels
    defined = {}  # id -> first name (a kernel may also sit in a loop variable or alias)
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.JITFunction) and obj.fn.__module__ == module.__name__:
                defined.setdefault(id(obj), f"{module.__name__}.{name}")
    unregistered = [name for key, name in defined.items() if key not in registered]
    compiled = []
    for target in sys.argv[1:]:
        cap, data = target.split(":")
        for key, example in sorted(kernels.COMPILE_EXAMPLES.items()):
            binary = triton.compile(
                ASTSource(fn=example.kernel, signature=example.signature_for(data), constexprs=example.constexprs),
                target=GPUTarget("cuda", int(cap), 32))
            assert f".target sm_{cap}" in binary.asm["ptx"], (key, cap)
            assert len(binary.asm["cubin"]) > 1000, (key, cap)
            compiled.append(f"{key}@sm_{cap}")
    print(json.dumps({"modules": [m.__name__ for m in modules], "defined": sorted(defined.values()),
                      "unregistered": unregistered, "examples": sorted(kernels.COMPILE_EXAMPLES),
                      "device_functions": sorted(kernels.DEVICE_FUNCTIONS),
                      "compiled": compiled}))
""")


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    result = subprocess.run([sys.executable, "-c", SCRIPT, *(f"{cap}:{data}" for cap, data in TARGETS)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_module_registers_every_kernel(compile_run):
    """Each ``@triton.jit`` function of each kernel module has a compile example."""
    assert "resnet_fast.kernels.batch_norm_act" in compile_run["modules"]
    assert len(compile_run["defined"]) >= 10, compile_run["defined"]  # the BatchNorm module alone has 10
    assert compile_run["unregistered"] == []
    assert len(compile_run["examples"]) + len(compile_run["device_functions"]) >= len(compile_run["defined"])


@pytest.mark.parametrize("cap,data", TARGETS, ids=[f"sm_{cap}-{data}" for cap, data in TARGETS])
def test_every_kernel_compiles_for_the_target(compile_run, cap, data):
    """PTX for the target and a cubin, for every registered kernel (bf16 on sm_80/sm_90, fp16 below)."""
    built = {entry.split("@")[0] for entry in compile_run["compiled"] if entry.endswith(f"@sm_{cap}")}
    assert built == set(compile_run["examples"])
