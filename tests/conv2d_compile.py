"""Compile the Triton convolution ahead of time exactly as the runtime would, and read ``ptxas -v``.

Used by ``tests/test_triton_conv2d_compile.py`` (run as a script in a fresh process without
``TRITON_INTERPRET``, whose kernels cannot be compiled):

    python tests/conv2d_compile.py CASE [CASE ...]      CASE = cap:dtype:layer:variant:config

prints one JSON object per case (``--table`` instead compiles the full set in parallel
and prints the table :data:`resnet_fast.kernels.conv2d.SPILL_FREE_CONFIGS` should hold). For each case the launcher's own argument builder
(:func:`resnet_fast.kernels.conv2d.kernel_arguments`) is given tensors of a real ResNet-50
layer's shape (allocated, never filled), and the kernel's own binder — Triton's runtime
specialisation, ``native_specialize_impl`` with the NVIDIA backend of the target — turns
them into the signature, the constexprs (integers equal to 1 become constants) and the
attributes (16-divisible integers and 16-byte aligned pointers), with the config's block
sizes, warps and stages as launch options. ``triton.compile`` then builds for
``GPUTarget("cuda", cap, 32)``, and the bundled ``ptxas -v`` reports registers and spills
of the PTX.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# name -> (C_in, C_out, kernel, stride, padding, H): the ResNet-50 layer kinds at batch 32,
# each specialising differently (R = S = 1, stride 1 or 2, padding 1, C_in = 3).
LAYERS = {
    "3x3s1": (64, 64, 3, 1, 1, 56),
    "3x3s2": (128, 128, 3, 2, 1, 56),
    "1x1s1": (256, 64, 1, 1, 0, 56),
    "1x1s2": (512, 1024, 1, 2, 0, 28),
    "stem": (3, 64, 7, 2, 3, 224),
}
BATCH = 32
# variant -> (bias, residual, relu, statistics, prologue)
VARIANTS = {
    "epilogue": (True, True, True, False, False),
    "stats": (False, False, False, True, False),
    "stats+prologue": (False, False, False, True, True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-ieee": torch.float32}
"""``fp32`` runs as TF32 (torch's default for convolutions), ``fp32-ieee`` as IEEE float32."""


def _tensors(layer: str, dtype: torch.dtype):
    cin, cout, k, s, p, h = LAYERS[layer]
    x = torch.empty(BATCH, cin, h, h, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.empty(cout, cin, k, k, dtype=dtype).contiguous(memory_format=torch.channels_last)
    q = (h + 2 * p - k) // s + 1
    out = torch.empty(BATCH, cout, q, q, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return x, w, out, [s, s], [p, p]


def specialise(cap: int, dtype: str, layer: str, variant: str, config) -> tuple:
    """(ASTSource, target, options) for one case, built as the runtime's launch builds them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from resnet_fast.kernels import conv2d as K

    bias, residual, relu, stats, prologue = VARIANTS[variant]
    x, w, out, stride, padding = _tensors(layer, DTYPES[dtype])
    c_in, c_out = x.shape[1], out.shape[1]
    m = out.shape[0] * out.shape[2] * out.shape[3]
    ws = torch.empty(3, -(-m // config.kwargs["BLOCK_M"]), c_out) if stats else None
    args, flags = K.kernel_arguments(
        x, w, torch.empty(c_out) if bias else None, torch.empty_like(out) if residual else None, out,
        torch.empty(c_in) if prologue else None, torch.empty(c_in) if prologue else None, ws,
        stride, padding, [1, 1], relu, True)
    flags["INPUT_PRECISION"] = "tf32" if dtype == "fp32" else "ieee"  # the launcher reads torch's flag on a GPU
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    kernel = K._conv2d_kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**flags, **config.all_kwargs()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def _ptxas_report(ptx: str, cap: int) -> dict:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True, check=True)
    text = result.stderr + result.stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    registers = re.search(r"Used (\d+) registers", text)
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def compile_case(case: str) -> dict:
    """Compile ``cap:dtype:layer:variant:config`` and report what ptxas and the PTX say."""
    import triton

    from resnet_fast.kernels import conv2d as K

    cap, dtype, layer, variant, name = case.split(":")
    config = K.config_by_name(name)
    source, target, options = specialise(int(cap), dtype, layer, variant, config)
    binary = triton.compile(source, target=target, options=options)
    ptx = binary.asm["ptx"]
    names = [p.name for p in K._conv2d_kernel.params]
    divisible = sorted(names[path[0]] for path, attrs in source.attrs.items() if ["tt.divisibility", 16] in attrs)
    ones = sorted(names[path[0]] for path, value in source.constants.items()
                  if not K._conv2d_kernel.params[path[0]].is_constexpr and value == 1)
    return {"case": case, **_ptxas_report(ptx, int(cap)), "divisible": divisible, "ones": ones,
            "wgmma": "wgmma.mma_async" in ptx,
            "mma_sync": "mma.sync" in ptx, "cp_async": "cp.async" in ptx,
            "shared": binary.metadata.shared, "num_warps": binary.metadata.num_warps,
            "num_stages": binary.metadata.num_stages}


INPUTS = {"bf16": "16-bit", "fp16": "16-bit", "fp32": "tf32", "fp32-ieee": "fp32-ieee"}
"""Measured dtype -> the input class of :data:`resnet_fast.kernels.conv2d.Variant`."""


def variant_key(case: str) -> tuple[str, str, str, str]:
    """(architecture, epilogue, input, K tiling): the spill table's key of a case."""
    from resnet_fast.kernels import conv2d as K

    cap, dtype, layer, variant, _ = case.split(":")
    tiling = "flat-k" if LAYERS[layer][0] < K.FLAT_K_BELOW_CHANNELS else "taps"
    return K.architecture((int(cap) // 10, int(cap) % 10)), variant, INPUTS[dtype], tiling


def full_set(spill_free_only: bool = False) -> list[str]:
    """Every layer kind x variant x dtype x sm_90/sm_80 x config of :data:`CONFIGS` (with
    ``spill_free_only``, only the configs autotuning may pick for that variant)."""
    from resnet_fast.kernels import conv2d as K

    cases = [f"{cap}:{dtype}:{layer}:{variant}:{K.config_name(config)}"
             for cap in (90, 80) for dtype in DTYPES for layer in LAYERS for variant in VARIANTS
             for config in K.CONFIGS]
    if spill_free_only:
        cases = [c for c in cases if c.rsplit(":", 1)[1] in K.SPILL_FREE_CONFIGS[variant_key(c)]]
    return cases


def measure_all(cases: list[str] | None = None, cache=None, workers: int | None = None,
                chunk: int = 8) -> dict:
    """Compile ``cases`` (default :func:`full_set`) in parallel processes of ``chunk`` cases
    each; returns {spill-table key: {config name: [reports]}}."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    cases = full_set() if cases is None else cases
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache is not None:
        env["TRITON_CACHE_DIR"] = str(cache)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(part: list[str]) -> list[dict]:
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *part], env=env, cwd=root,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {part} failed:\n{result.stderr[-4000:]}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    parts = [cases[i:i + chunk] for i in range(0, len(cases), chunk)]
    reports = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            tqdm(total=len(cases), desc="compiling", unit="kernel", file=sys.stderr) as bar:
        for done in pool.map(run, parts):
            reports += done
            bar.update(len(done))
    table: dict = {}
    for report in reports:
        name = report["case"].rsplit(":", 1)[1]
        table.setdefault(variant_key(report["case"]), {}).setdefault(name, []).append(report)
    return table


def spill_free_table(measured: dict) -> dict:
    """{key: sorted names of the configs free of spills in every case of that key}."""
    return {key: sorted(name for name, reports in by_config.items()
                        if not any(r["spill_stores"] or r["spill_loads"] for r in reports))
            for key, by_config in sorted(measured.items())}


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        for key, names in spill_free_table(measure_all()).items():
            print(f"    {key!r}: frozenset({set(names)!r})," if names else f"    {key!r}: frozenset(),")
    else:
        for arg in sys.argv[1:]:
            print(json.dumps(compile_case(arg)), flush=True)
