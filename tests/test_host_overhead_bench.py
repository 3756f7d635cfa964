"""The host-overhead benchmark (benchmarks/bench_host_overhead.py) runs on the CPU and
records what the report needs: per-call time and the ratio to torchvision per variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_overhead_benchmark_runs_on_cpu(tmp_path):
    path = tmp_path / "host.json"
    env = {**os.environ, "RESNET_FAST_BENCH_HOST_ROUNDS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_host_overhead.py", "-m", "not gpu", "-q",
         "-p", "no:cacheprovider", "--benchmark-quiet", f"--benchmark-json={path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    infos = [entry["extra_info"] for entry in json.loads(path.read_text())["benchmarks"]]
    measured = {(i["module"], i["pass"], i["variant"]) for i in infos}
    for module in ("batch_norm_act", "basic_block", "bottleneck"):
        for pass_ in ("train", "eval"):
            assert {(module, pass_, "torchvision"), (module, pass_, "default"), (module, pass_, "torch")} <= measured
    assert {("basic_block", "train", "fused_training"), ("bottleneck", "train", "fused_training")} <= measured
    for info in infos:
        assert info["device"] == "cpu" and info["per_call_us"] > 0
        assert (info["variant"] == "torchvision") != ("x_torchvision" in info)
