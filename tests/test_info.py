"""``python -m resnet_fast.info``: the extension, the backends and the machine, readable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_fast import _extension, info

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def extension_missing(monkeypatch):
    monkeypatch.setattr(_extension, "extension_load_error",
                        lambda: "CUDA extension resnet_fast._C is not available (No module named 'resnet_fast._C')")
    monkeypatch.setattr(info.torch.version, "cuda", None)


@pytest.fixture
def extension_built(monkeypatch):
    monkeypatch.setattr(_extension, "extension_load_error", lambda: None)
    monkeypatch.setattr(_extension, "build_info", lambda: {
        "architectures": ["7.5", "8.0", "9.0"], "cuda_version": "13.0", "torch_version": "2.14.1",
        "source_fingerprint": "ab" * 32, "build_flags": ["-O3", "--use_fast_math"]})


def test_short_form_says_what_is_missing_and_why(extension_missing, capsys):
    assert info.main(["--short"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("CUDA extension: not built (")
    assert "is not a CUDA build" in lines[0]
    assert lines[1].startswith("GPU: ")
    assert lines[2].startswith("backends: cuda ") and "torch yes" in lines[2] and "selected: " in lines[2]
    assert "CUDA extension resnet_fast._C is not available" in lines[2]  # the cuda backend's first reason


def test_tables_show_the_build_and_every_backend_with_reasons(extension_built, capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for text in ("CUDA extension resnet_fast._C", "architectures", "7.5, 8.0, 9.0", "Backends", "cuda",
                 "triton", "torch", "auto may choose it", "Machine and versions", "python"):
        assert text in out, text
    assert "{" not in out  # tables, not a printed dict


def test_gpu_outside_the_built_architectures_is_flagged():
    data = {"gpu": {"name": "Tesla V100", "capability": "7.0", "count": 1, "in_extension": False}}
    assert "not among the extension's architectures" in info._gpu_line(data)


def test_json_form_has_everything(extension_built, capsys):
    assert info.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["extension"]["build_info"]["architectures"] == ["7.5", "8.0", "9.0"]
    assert set(data["backends"]) == {"cuda", "triton", "torch"}
    assert data["backends"]["torch"]["available"] is True


def test_build_info_is_none_without_the_extension(monkeypatch):
    monkeypatch.setattr(_extension, "extension_load_error", lambda: "not available")
    _extension._reported_build_info.cache_clear()  # an earlier test may have cached the real build's facts
    try:
        assert _extension.build_info() is None
    finally:
        _extension._reported_build_info.cache_clear()


def test_module_runs_and_setup_prints_its_short_form():
    result = subprocess.run([sys.executable, "-m", "resnet_fast.info", "--short"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CUDA extension: ")
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "-m resnet_fast.info --short" in setup and "json.dumps" not in setup
