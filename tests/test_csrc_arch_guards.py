"""The CUDA sources build for sm_70/sm_75: Ampere-and-newer features only under guards.

bf16 intrinsics, ``cp.async``, ``ldmatrix`` and ``wgmma`` must sit inside a preprocessor
block whose condition tests ``__CUDA_ARCH__ >= 800`` (or higher), so that the sm_70 build
(CUDA 12) and the sm_75 build (CUDA 13, this workplace) compile the same files. A static
scan of ``csrc/`` (comments stripped); the scanner itself is tested on small sources.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NEWER_THAN_SM75 = re.compile(
    r"__nv_bfloat16|__float2bfloat16|__bfloat162float|__hfma2_relu|\bcp\.async|\bcp_async|\bldmatrix|\bwgmma")
GUARD = re.compile(r"__CUDA_ARCH__\s*>=\s*(\d+)")


def strip_comments(source: str) -> str:
    """The source without // and /* */ comments (line count kept)."""
    source = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group().count("\n"), source, flags=re.S)
    return re.sub(r"//[^\n]*", "", source)


def unguarded_uses(source: str) -> list[tuple[int, str]]:
    """(line number, token) of every newer-than-sm_75 feature outside an sm_80+ guard."""
    stack: list[bool] = []  # per open #if: whether this branch guarantees sm_80+
    found = []
    for number, line in enumerate(strip_comments(source).splitlines(), 1):
        directive = line.strip()
        if directive.startswith(("#if", "#ifdef", "#ifndef")):
            match = GUARD.search(directive)
            stack.append(bool(match) and int(match.group(1)) >= 800)
        elif directive.startswith("#elif"):
            match = GUARD.search(directive)
            stack[-1] = bool(match) and int(match.group(1)) >= 800
        elif directive.startswith("#else"):
            stack[-1] = False
        elif directive.startswith("#endif"):
            stack.pop()
        elif not any(stack):
            found.extend((number, m.group()) for m in NEWER_THAN_SM75.finditer(line))
    return found


def test_scanner_finds_unguarded_features_and_accepts_guarded_ones():
    source = """
        __device__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }  // unguarded
        #if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(a), "l"(b));
        #else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0}, [%1];" : "=r"(r) : "r"(a));
        #endif
        /* __nv_bfloat16 in a comment */
        #if __CUDA_ARCH__ >= 750
        wgmma(x);
        #endif
    """
    assert [token for _, token in unguarded_uses(source)] == ["__nv_bfloat16", "__bfloat162float", "ldmatrix",
                                                             "wgmma"]


@pytest.mark.parametrize("path", sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")), ids=lambda p: p.name)
def test_cuda_sources_guard_features_newer_than_sm75(path):
    assert unguarded_uses(path.read_text()) == []
