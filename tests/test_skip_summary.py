"""The test summary groups skips by reason and lists each Triton CPU case once.

Runs pytest on a small file with this directory's conftest.py, in a fresh process with no
GPU visible, and reads its terminal output.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import grouped_skip_lines

HERE = Path(__file__).resolve().parent

SAMPLE = '''
import pytest
from conftest import DEVICES, TRITON_DEVICES

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(3))
def test_ops(device, case):
    assert device == "cpu"

@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_kernel(device):
    assert device == "cpu"

@pytest.mark.skipif(True, reason="needs triton")
def test_needs_triton():
    pass

def test_fails():
    assert 1 == 2, "a failure is still shown in full"
'''


def test_skips_are_grouped_and_triton_cases_not_listed_twice(tmp_path):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "SKIPPED" not in out  # no line per skipped test
    assert "4 GPU tests skipped: needs a CUDA device; run scripts/gpu_check.sh on a GPU" in out
    assert "1 test skipped: needs triton" in out
    assert "1 Triton CPU case deselected here: each file's test_interpreter_run runs them" in out
    assert "FAILED" in out and "a failure is still shown in full" in out
    assert out.strip().splitlines()[-1].startswith("1 failed, 3 passed, 5 skipped, 1 deselected")


def test_grouped_lines_count_and_order():
    def report(reason, gpu):
        return SimpleNamespace(longrepr=("f.py", 1, f"Skipped: {reason}"), keywords={"gpu": 1} if gpu else {})

    reports = [report("needs a CUDA device", True)] * 2414 + [report("timm is not installed", False)]
    assert grouped_skip_lines(reports) == [
        "2,414 GPU tests skipped: needs a CUDA device; run scripts/gpu_check.sh on a GPU",
        "1 test skipped: timm is not installed",
    ]
