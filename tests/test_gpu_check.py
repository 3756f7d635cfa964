"""The GPU check (resnet_fast.bench.gpu_check): its dry run end to end on the CPU, its deadline,
its results as data, and BENCHMARKS.md generated from them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from resnet_fast.bench import check_report, gpu_check, report
from resnet_fast.bench.gpu_check import STAGES, CheckContext, Stage, Task, junit_records, run_check, stage_schedule
from resnet_fast.bench.results import DRY_RUN_LABEL, assemble, document_name, load_document, read_records

REPOSITORY = Path(__file__).resolve().parents[1]
DEVICE_TOOL_MAX_FILES = 8


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the whole check, as CI runs it (the exit status, the wall time, the folder)."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "resnet_fast.bench.gpu_check", "--dry-run", "--out", str(out)],
                            cwd=REPOSITORY, capture_output=True, text=True, timeout=900)
    return {"returncode": result.returncode, "seconds": time.monotonic() - started, "out": out,
            "output": result.stdout + result.stderr}


def test_stage_budgets_add_up_to_at_most_the_deadline():
    assert [s.name for s in STAGES] == ["environment", "build", "kernel_check", "model_parity", "headline",
                                        "primitives", "gpu_tests"]
    assert sum(s.share for s in STAGES) <= 1 + 1e-9
    for deadline in (gpu_check.DEFAULT_DEADLINE_S, 30.0):
        ends = stage_schedule(STAGES, deadline)
        assert ends == sorted(ends) and ends[-1] <= deadline
    assert gpu_check.DEFAULT_DEADLINE_S == 480
    with pytest.raises(ValueError, match="more than the whole deadline"):
        stage_schedule([STAGES[0], Stage("extra", "Extra", 0.99, 1, lambda ctx: [])], 100)


def test_dry_run_writes_every_stage_into_few_files(dry_run):
    out = dry_run["out"]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in files) and len(files) <= DEVICE_TOOL_MAX_FILES
    [document_file] = [name for name in files if name.startswith("cpu-dry-run-")]
    assert set(files) == {"results.jsonl", "summary.md", "check.log", "BENCHMARKS.md", "plots.tar.gz", document_file}

    records = read_records(out / "results.jsonl")
    stages = [r for r in records if r["type"] == "stage" and "task" not in r]
    assert [s["stage"] for s in stages] == [s.name for s in STAGES]
    # every stage ran to its end; a stage may fail only through checks it recorded as failed
    failed_checks = [r for r in records if r["type"] == "check" and r["outcome"] in ("failed", "error")]
    for stage in stages:
        own_failures = [c for c in failed_checks if c["stage"] == stage["stage"]]
        assert stage["status"] == ("failed" if own_failures else "ok"), (stage, own_failures)
    assert all(c["outcome"] == "failed" and c.get("tolerance") is not None for c in failed_checks), failed_checks
    assert dry_run["returncode"] == (1 if failed_checks else 0), dry_run["output"][-3000:]
    document = json.loads((out / document_file).read_text())
    assert document == json.loads(json.dumps(assemble(records), default=str))
    assert document["run"]["dry_run"] is True and document["run"]["deadline_s"] == gpu_check.DEFAULT_DEADLINE_S
    assert document_name(document) == document_file
    assert document["environment"]["torch"] and "backends" in document["environment"]
    summary = (out / "summary.md").read_text()
    assert DRY_RUN_LABEL in summary and ("**Overall: ok**" in summary) == (not failed_checks)
    assert "===== " in (out / "check.log").read_text()


def test_dry_run_records_measurements_and_checks_with_tolerances(dry_run):
    document = load_document(dry_run["out"] / "results.jsonl")
    kinds = {m["kind"] for m in document["measurements"]}
    assert kinds == {"build", "throughput", "primitive", "host_overhead"}
    host = [m for m in document["measurements"] if m["kind"] == "host_overhead"]
    assert {"torchvision", "default", "fused_training"} <= {m["variant"] for m in host}
    assert all(m["median_s"] > 0 for m in host)
    throughput = [m for m in document["measurements"] if m["kind"] == "throughput"]
    assert {"eager", "resnet_fast"} <= {m["variant"] for m in throughput}
    assert all(m["images_per_s"] > 0 for m in throughput)
    # the small-batch rows (issue 17): ResNet-20 with eager beside resnet_fast
    assert {"eager"} <= {m["variant"] for m in throughput if m["model"] == "resnet20" and m["batch"] == 4}
    # fused-training variants are measured once the profiler knows them, else skipped with why
    measured = {m["variant"] for m in throughput}
    for variant in ("resnet_fast:torch+fused",):
        skipped = [s for s in document["skipped"] if s.get("variant") == variant]
        assert variant in measured or (skipped and "variant not available" in skipped[0]["reason"])
    # backends this machine cannot run are skipped with the backend's reasons, not failed
    assert any(s.get("variant", "").startswith("resnet_fast:cuda") for s in document["skipped"])

    parity = [c for c in document["checks"] if c["stage"] == "model_parity" and "eager_error" in c]
    assert {c["quantity"] for c in parity} == {"loss", "gradients", "running statistics"}
    assert {c["variant"] for c in parity} >= {"resnet_fast", "resnet_fast:torch", "resnet_fast:torch+fused"}
    assert all(c["outcome"] == "passed" and c["error"] <= c["tolerance"] for c in parity)
    [eager_curve, fused_curve] = document["curves"]
    assert (eager_curve["variant"], fused_curve["variant"]) == ("eager", "resnet_fast:torch+fused")
    assert all(0 <= a <= 1 for a in eager_curve["heldout_accuracy"] + fused_curve["heldout_accuracy"])
    # the kernel check: the self-check through the Triton interpreter, every case with its error and tolerance
    kernel = [c for c in document["checks"] if c["stage"] == "kernel_check"]
    assert kernel and all(c["error"] is not None and c["tolerance"] is not None
                          for c in kernel if c["outcome"] != "skipped")
    [self_check] = document["self_checks"]
    assert self_check["report"]["interpreted"] is True


def test_dry_run_benchmarks_md_is_labelled_and_has_plots(dry_run):
    out = dry_run["out"]
    text = (out / "BENCHMARKS.md").read_text()
    assert f"every document below is a {DRY_RUN_LABEL}" in text
    for heading in ("### Stages", "### Headline throughput", "### Primitives vs the bandwidth floor",
                    "### Model parity: one training step against float64",
                    "### Convergence: ResNet-20 on scikit-learn's digits", "### Checks"):
        assert f"\n{heading}\n" in text
        after = text.split(f"\n{heading}\n", 1)[1].lstrip("\n")
        assert after.startswith(f"_**{DRY_RUN_LABEL}.**"), f"{heading} lacks the dry-run label"
    with tarfile.open(out / "plots.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert {"throughput", "primitives", "convergence"} <= {name.rsplit("-", 1)[-1].removesuffix(".png")
                                                          for name in names if name.endswith(".png")}


def test_dry_run_wall_time_is_reported(dry_run, record_property):
    record_property("dry_run_seconds", round(dry_run["seconds"], 1))
    print(f"gpu_check --dry-run took {dry_run['seconds']:.0f} s")
    assert dry_run["seconds"] < gpu_check.DEFAULT_DEADLINE_S


# --- the deadline ---------------------------------------------------------------------------


def sleeper(seconds: float) -> tuple[str, ...]:
    return (sys.executable, "-c", f"import time; time.sleep({seconds})")


def test_tiny_deadline_skips_a_slow_stage_and_stops_an_overrunning_one(tmp_path):
    stages = [
        Stage("quick", "Quick", 0.2, 0.5, lambda ctx: [Task("nothing", argv=sleeper(0))]),
        Stage("slow", "Slow", 0.2, 60, lambda ctx: [Task("minute", argv=sleeper(60))]),
        Stage("hangs", "Hangs", 0.6, 0.5, lambda ctx: [Task("forever", argv=sleeper(600))]),
    ]
    ctx = CheckContext(out=tmp_path / "out", work=tmp_path / "work", dry_run=True)
    deadline = 8.0
    started = time.monotonic()
    status = run_check(ctx, deadline, stages, command="test")
    elapsed = time.monotonic() - started
    assert elapsed <= deadline + 1.0, f"overran the {deadline} s deadline: {elapsed:.1f} s"
    assert status == 1
    stages_run = {r["stage"]: r for r in read_records(ctx.results) if r["type"] == "stage"}
    assert stages_run["quick"]["status"] == "ok"
    assert stages_run["slow"]["status"] == "skipped" and "needs at least 60 s" in stages_run["slow"]["reason"]
    assert stages_run["hangs"]["status"] == "timed out"
    summary = ctx.summary.read_text()
    assert "## Slow: skipped" in summary and "## Hangs: timed out" in summary


def test_an_overrunning_worker_row_costs_that_row_only(tmp_path):
    ctx = CheckContext(out=tmp_path / "out", work=tmp_path / "work", dry_run=True)
    ctx.out.mkdir()
    ctx.work.mkdir()
    runner = gpu_check.Runner(ctx, gpu_check.Clock(60))
    rows = tuple({"kind": "environment", "name": f"probe {i}"} for i in range(2))
    status, why = runner.run_task(Task("probe", rows=rows, row_timeout_s=0.3), "stage", until_s=30)
    assert status == "failed" and "probe 0" in why and "probe 1" in why
    errors = [r for r in read_records(ctx.results) if r["type"] == "check"]
    assert [e["name"] for e in errors] == ["environment probe 0", "environment probe 1"]
    assert all("stopped at the row time limit" in e["message"] for e in errors)


# --- results as data ------------------------------------------------------------------------


def test_junit_records_keep_outcome_and_message(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok" time="0.5"/>
      <testcase classname="tests.test_a" name="test_bad" time="1"><failure message="relative error 0.2 exceeds 0.01">tb</failure></testcase>
      <testcase classname="tests.test_a" name="test_gpu" time="0"><skipped message="needs a CUDA device"/></testcase>
    </testsuite></testsuites>""")
    records = junit_records(xml)
    assert [(r["name"], r["outcome"], r["passed"]) for r in records] == [
        ("tests.test_a::test_ok", "passed", True), ("tests.test_a::test_bad", "failed", False),
        ("tests.test_a::test_gpu", "skipped", None)]
    assert records[1]["message"] == "relative error 0.2 exceeds 0.01"
    assert junit_records(tmp_path / "missing.xml") == []


def test_a_line_cut_short_by_a_kill_is_left_out(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"type": "run", "dry_run": false}\n{"type": "stage", "sta')
    assert read_records(path) == [{"type": "run", "dry_run": False}]


GPU_DOCUMENT = {
    "format": "resnet_fast-gpu-check/1",
    "run": {"type": "run", "command": "python -m resnet_fast.bench.gpu_check --deadline 480 --out gpu-out",
            "started": "2026-12-01T10:00:00+00:00", "deadline_s": 480, "dry_run": False},
    "environment": {"type": "environment", "device_name": "NVIDIA H200", "capability": "9.0", "torch": "2.14.1",
                    "cuda": "13.0", "cudnn": 91000, "triton": "3.8.0"},
    "stages": [{"type": "stage", "stage": "headline", "status": "ok", "seconds": 100.0, "budget_s": 114.0}],
    "measurements": [
        {"type": "measurement", "kind": "throughput", "group": "resnet50, batch 256, 224x224, bf16",
         "variant": variant, "mode": "train", "images_per_s": 256 / ms * 1e3, "median_ms": ms,
         "peak_memory_gib": memory}
        for variant, ms, memory in (("eager", 64.0, 11.0), ("resnet_fast:triton", 40.0, 8.0))
    ] + [{"type": "measurement", "kind": "primitive", "bench": "bn_relu", "case": "bf16-nhwc-256x256x56x56-fwd",
          "variant": "resnet_fast:triton", "median_ms": 0.5, "floor_ms": 0.45, "floor_multiple": 1.11,
          "gb_per_s": 2700.0}],
    "checks": [], "skipped": [], "curves": [], "self_checks": [],
}


def test_report_renders_a_gpu_document_naming_device_versions_and_command(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "nvidia-h200-20261201.json").write_text(json.dumps(GPU_DOCUMENT))
    markdown = tmp_path / "BENCHMARKS.md"
    assert report.main([str(results / "*.json"), "-o", str(markdown), "--plots", str(results)]) == 0
    text = markdown.read_text()
    assert DRY_RUN_LABEL not in text
    assert "| resnet_fast:triton | train | 6,400 | 40.00 | 8.00 GiB | 1.60x |" in text
    assert "| eager | train | 4,000 | 64.00 | 11.00 GiB | 1.00x |" in text
    assert "| bn_relu bf16-nhwc-256x256x56x56-fwd | resnet_fast:triton | 0.5 | 0.45 | 1.11x | 2,700 |" in text
    provenance = ("_NVIDIA H200 (sm 9.0); torch 2.14.1, CUDA 13.0, cuDNN 91000, triton 3.8.0; "
                  "`python -m resnet_fast.bench.gpu_check --deadline 480 --out gpu-out` → `nvidia-h200-20261201.json`_")
    assert text.count(provenance) == 3  # above the stages, throughput and primitives tables
    for plot in ("throughput", "memory", "primitives"):
        assert (results / f"nvidia-h200-20261201-{plot}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(results/nvidia-h200-20261201-{plot}.png)" in text


def test_report_of_an_empty_results_folder_says_no_gpu_numbers_exist(tmp_path):
    (tmp_path / "results").mkdir()
    markdown = tmp_path / "BENCHMARKS.md"
    assert report.main([str(tmp_path / "results" / "*.json"), "-o", str(markdown)]) == 0
    assert markdown.read_text() == check_report.NO_MEASUREMENTS
    assert "No GPU measurement has been recorded yet" in check_report.NO_MEASUREMENTS


def test_committed_benchmarks_md_is_what_the_committed_results_generate(tmp_path):
    documents = sorted((REPOSITORY / "benchmarks" / "results").glob("*.json"))
    committed = (REPOSITORY / "BENCHMARKS.md").read_text()
    if documents:  # a real document exists: the file names it
        assert all(f"`{path.name}`" in committed for path in documents)
    else:
        assert committed == check_report.NO_MEASUREMENTS


# --- what a real run plans ------------------------------------------------------------------


def gpu_context(tmp_path, bf16: bool = True) -> CheckContext:
    ctx = CheckContext(out=tmp_path / "out", work=tmp_path / "work", dry_run=False)
    ctx.environment = {"bf16": bf16, "capability": "9.0" if bf16 else "7.0"}
    return ctx


def test_headline_order_of_value_on_a_gpu(tmp_path):
    rows = gpu_check.headline_rows(gpu_context(tmp_path))
    plan = [(r["model"], r["batch"], r["dtype"], r["variant"], r["mode"], r["cuda_graphs"]) for r in rows]
    assert plan[:6] == [("resnet50", 256, "bf16", v, m, False) for v, m in (
        ("eager", "both"), ("resnet_fast", "both"), ("resnet_fast:triton", "both"), ("resnet_fast:cuda", "both"),
        ("resnet_fast:triton+fused", "train"), ("resnet_fast:cuda+fused", "train"))]
    assert {p[2] for p in plan[6:11]} == {"fp16"} and plan[6][3] == "eager"
    # issue 17: ResNet-50 at 32 and ResNet-20 at 128, with and without CUDA graphs, eager beside
    for model, batch in (("resnet50", 32), ("resnet20", 128)):
        for graphs in (False, True):
            variants = [p[3] for p in plan if p[:2] == (model, batch) and p[5] == graphs]
            assert variants[0] == "eager" and "resnet_fast:cuda" in variants and "resnet_fast:triton+fused" in variants
    compile_row = plan.index(("resnet50", 256, "bf16", "compile", "both", False))
    # resnet_fast under torch.compile right after torchvision's, in its group: ratios from one run
    assert plan[compile_row + 1] == ("resnet50", 256, "bf16", "resnet_fast:triton+compile", "both", False)
    assert rows[compile_row + 1]["group"] == rows[compile_row]["group"] == "resnet50, batch 256, 224x224, bf16"
    assert sum(p[3].endswith("compile") for p in plan) == 2
    assert {p[0] for p in plan[compile_row + 2:]} == {"resnet18", "resnet56"}  # if time remains
    assert all("--channels-last" in r["profiler_args"] and "--device cuda" in r["profiler_args"] for r in rows)
    assert {r["dtype"] for r in gpu_check.headline_rows(gpu_context(tmp_path, bf16=False))} == {"fp16"}


def test_model_parity_plan_on_a_gpu(tmp_path):
    [task] = gpu_check.plan_model_parity(gpu_context(tmp_path))
    steps = [r for r in task.rows if r["kind"] == "parity"]
    assert {(r["model"], r["dtype"]) for r in steps} == {(m, d) for m in ("resnet50", "resnet20") for d in ("bf16", "fp16")}
    assert {(r["backend"], r["fused"]) for r in steps} >= {("triton", True), ("cuda", True), ("auto", False)}
    digits = [r for r in task.rows if r["kind"] == "convergence"]
    assert [(r["backend"], r["fused"]) for r in digits] == [(None, False), ("triton", True), ("cuda", True)]
    assert all(r["epochs"] >= 5 and r["limit"] is None for r in digits)
    assert task.env == {"RESNET_FAST_AUTOTUNE": "0"}


SELF_CHECK_JSON = {  # python -m resnet_fast.check --json: verdicts per backend and one row per case
    "device": "cuda:0", "gpu": "NVIDIA H200", "capability": [9, 0], "interpreted": False, "seconds": 50.0,
    "backends": {"triton": {"checked": True, "passed": False, "verdict": "triton: FAILED 1 of 2 checks"},
                 "cuda": {"checked": True, "passed": True, "verdict": "cuda: passed all 1 checks"}},
    "rows": [
        {"operator": "batch_norm_act", "backend": "triton", "dtype": "bf16", "layout": "nhwc", "case": "2x3x1x1",
         "max_error": 0.5, "tolerance": 0.01, "result": "FAIL", "detail": "output", "seconds": 0.1},
        {"operator": "batch_norm_act", "backend": "triton", "dtype": "bf16", "layout": "nchw", "case": "2x3x1x1",
         "max_error": 0.001, "tolerance": 0.01, "result": "pass", "detail": "", "seconds": 0.1},
        {"operator": "conv2d_stats", "backend": "cuda", "dtype": "fp16", "layout": "nhwc", "case": "r50",
         "max_error": None, "tolerance": None, "result": "skipped", "detail": "auto never runs it", "seconds": 0},
    ],
}


def test_self_check_rows_become_checks_with_error_and_tolerance(tmp_path):
    report_path, record_dir = tmp_path / "self-check.json", tmp_path / "records"
    report_path.write_text(json.dumps(SELF_CHECK_JSON))
    record_dir.mkdir()
    (record_dir / "cuda-nvidia-h200.json").write_text(json.dumps({"backend": "cuda", "gpu": "NVIDIA H200"}))
    *checks, kept = gpu_check.self_check_records(report_path, record_dir)
    assert [(c["outcome"], c["passed"], c["error"], c["tolerance"]) for c in checks] == [
        ("failed", False, 0.5, 0.01), ("passed", True, 0.001, 0.01), ("skipped", None, None, None)]
    assert checks[0]["name"] == "triton batch_norm_act bf16 nhwc 2x3x1x1" and checks[0]["message"] == "output"
    assert kept["type"] == "self_check" and "rows" not in kept["report"]
    assert kept["validation_records"] == {"cuda-nvidia-h200.json": {"backend": "cuda", "gpu": "NVIDIA H200"}}
    assert gpu_check.self_check_records(tmp_path / "missing.json", record_dir) == []


@pytest.mark.parametrize("available", [True, False])
def test_kernel_check_uses_the_self_check_where_it_exists(tmp_path, monkeypatch, available):
    monkeypatch.setattr(gpu_check, "self_check_available", lambda: available)
    ctx = gpu_context(tmp_path)
    [task] = gpu_check.plan_kernel_check(ctx)
    assert task.env["RESNET_FAST_AUTOTUNE"] == "0"
    if available:
        assert task.argv[1:3] == ("-m", "resnet_fast.check") and "--json" in task.argv and "--record-dir" in task.argv
        assert "--interpret" not in task.argv and "TRITON_INTERPRET" not in task.env
        dry = CheckContext(out=tmp_path / "dry", work=tmp_path / "work", dry_run=True)
        [rehearsal] = gpu_check.plan_kernel_check(dry)
        assert "--interpret" in rehearsal.argv and rehearsal.env["TRITON_INTERPRET"] == "1"
        assert not ctx.kernel_tests_ran
    else:
        assert task.argv[1:3] == ("-m", "pytest") and "gpu" in task.argv and ctx.kernel_tests_ran
        assert set(gpu_check.KERNEL_TEST_FILES) <= set(task.argv)
        [host, rest] = gpu_check.plan_gpu_tests(ctx)
        assert "benchmarks/bench_host_overhead.py" in host.argv and "gpu" in host.argv
        assert {f"--ignore={path}" for path in gpu_check.KERNEL_TEST_FILES} <= set(rest.argv)


def test_a_cuda_error_ends_the_worker_after_recording_its_row(tmp_path, monkeypatch):
    from resnet_fast.bench import gpu_check_worker

    def poisoned(row):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
        yield  # a generator, like every kind

    monkeypatch.setitem(gpu_check_worker.KINDS, "poisoned", poisoned)
    out = tmp_path / "out.jsonl"
    rows = [{"row": 0, "kind": "poisoned", "name": "first"}, {"row": 1, "kind": "poisoned", "name": "second"}]
    with pytest.raises(SystemExit) as exit_:
        gpu_check_worker.run_rows(rows, out)
    assert exit_.value.code == gpu_check_worker.EXIT_RESTART
    records = read_records(out)
    assert [(r["type"], r["row"]) for r in records] == [("check", 0), ("row_done", 0)]
    assert records[0]["outcome"] == "error" and "illegal memory access" in records[0]["message"]


def test_primitives_time_the_fused_backends_before_compile_on_a_gpu(tmp_path):
    fused, compiled = gpu_check.plan_primitives(gpu_context(tmp_path))
    for task in (fused, compiled):
        assert "benchmarks/bench_batch_norm_act.py" in task.argv and "256x256x56x56" in " ".join(task.argv)
    assert "not compile" in " ".join(fused.argv) and "and compile" in " ".join(compiled.argv)


def test_the_script_is_a_thin_wrapper_of_the_driver(tmp_path):
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # the script runs python3: this one
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=REPOSITORY, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OUT": str(tmp_path / "out"), "PATH": path})
    assert result.returncode == 0, result.stderr
    assert "--deadline" in result.stdout and "--dry-run" in result.stdout
    header = (REPOSITORY / "scripts" / "gpu_check.sh").read_text()
    assert 'run(command="bash scripts/gpu_check.sh", timeout_s=560)' in header
    assert "python -m resnet_fast.bench.report benchmarks/results/*.json -o BENCHMARKS.md" in header
