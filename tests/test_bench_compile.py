"""torch.compile of the resnet_fast model in the profiler (``resnet_fast[:<backend>]+compile``,
composing with ``+fused``): variant names, refusals, labels, the model built, and one tiny
CPU run (inductor compiles with the host C++ compiler) whose rows are measured. The CUDA
graph run of a compiled resnet_fast model is GPU-marked."""

from __future__ import annotations

import json

import pytest
import torch

import resnet_fast
from resnet_fast.bench.__main__ import main as bench_main
from resnet_fast.bench.profiler import (
    BenchConfigError,
    Options,
    Variant,
    build_model,
    parse_variant,
    parse_variants,
    resolve_config,
    variant_label,
)
from resnet_fast.models.cifar import CifarResNet

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def profiler_restores_backend():
    """A profiler run selects each variant's backend and restores it; make sure of it."""
    before = resnet_fast.get_backend()
    yield
    assert resnet_fast.get_backend() == before


def test_compiled_resnet_fast_variant_names_are_canonical():
    assert parse_variant("resnet_fast+compile") == Variant("resnet_fast+compile", "resnet_fast", "auto",
                                                           compiled=True)
    assert parse_variant("resnet_fast:auto+compile").name == "resnet_fast+compile"
    triton = parse_variant("resnet_fast:triton+compile")
    assert (triton.name, triton.backend, triton.compiled, triton.fused_training) == (
        "resnet_fast:triton+compile", "triton", True, False)
    both = parse_variant("resnet_fast:triton+compile+fused")  # either order, one spelling
    assert both == parse_variant("resnet_fast:triton+fused+compile") == Variant(
        "resnet_fast:triton+fused+compile", "resnet_fast", "triton", fused_training=True, compiled=True)
    assert [v.torch_compiled for v in parse_variants("eager,compile,resnet_fast,resnet_fast+compile")] == [
        False, True, False, True]
    names = [v.name for v in parse_variants("compile,resnet_fast:triton,resnet_fast:triton+compile")]
    assert names == ["compile", "resnet_fast:triton", "resnet_fast:triton+compile"]


@pytest.mark.parametrize("text, message", [
    ("eager+compile", "torchvision's model under torch.compile is the variant 'compile'"),
    ("compile+compile", "'compile' .*got 'compile\\+compile'"),
    ("resnet_fast+compile+compile", "option \\+compile given twice"),
    ("resnet_fast+compiled", "unknown variant option '\\+compiled'.*\\+compile \\(torch.compile"),
    ("resnet_fast:nope+compile", "unknown resnet_fast backend 'nope'"),
    ("resnet_fast:triton+compile+fused,resnet_fast:triton+fused+compile",
     "listed twice in --compare: resnet_fast:triton\\+fused\\+compile"),
])
def test_bad_compiled_variants_are_refused(text, message):
    with pytest.raises(BenchConfigError, match=message):
        parse_variants(text)


def test_compiled_variants_are_labelled_with_the_backend_that_ran():
    assert variant_label(parse_variant("resnet_fast+compile"), ["torch"]) == "resnet_fast+compile (torch)"
    assert variant_label(parse_variant("resnet_fast:triton+compile"), ["triton"]) == "resnet_fast:triton+compile"
    assert (variant_label(parse_variant("resnet_fast:cuda+fused+compile"), ["torch"])
            == "resnet_fast:cuda+fused+compile (torch)")
    assert variant_label(parse_variant("compile"), ["triton"]) == "compile"


def test_compiled_variant_builds_the_resnet_fast_model_under_torch_compile():
    config = resolve_config(Options(device="cpu", batch=2, image_size=32, model="resnet20"), cuda_available=False)
    state = resnet_fast.resnet20().state_dict()
    compiled = build_model(config, parse_variant("resnet_fast:torch+fused+compile"), state)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled._orig_mod, CifarResNet) and compiled._orig_mod.fused_training
    assert not isinstance(build_model(config, parse_variant("resnet_fast:torch"), state),
                          torch._dynamo.eval_frame.OptimizedModule)


def test_cli_measures_a_compiled_resnet_fast_model_on_the_cpu(tmp_path, capsys):
    """Inductor compiles the CIFAR ResNet-20 for the CPU; both modes are timed, beside eager."""
    path, plot = tmp_path / "out.json", tmp_path / "out.png"
    assert bench_main(["--model", "resnet20", "--device", "cpu", "--batch", "2", "--steps", "1", "--warmup", "1",
                       "--mode", "both", "--compare", "eager,resnet_fast+compile", "--json", str(path),
                       "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["skipped"] == []
    rows = {(r["variant"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(v, m) for v in ("eager", "resnet_fast+compile") for m in ("train", "infer")}
    for mode in ("train", "infer"):
        row = rows["resnet_fast+compile", mode]
        assert row["label"].startswith("resnet_fast+compile") and row["label"] in out
        assert row["compile_s"] > 0 and row["median_ms"] > 0 and row["baseline"] == "eager"
        assert rows["eager", mode]["compile_s"] is None
    assert data["config"]["variants"] == ["eager", "resnet_fast+compile"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
@requires_gpu
def test_profiler_cuda_graphs_capture_compiled_models(tmp_path):
    """torchvision's and resnet_fast's Triton model under torch.compile, each step replayed
    from one CUDA graph, train and infer."""
    path = tmp_path / "out.json"
    assert bench_main(["--model", "resnet20", "--device", "cuda", "--batch", "32", "--dtype", "bf16",
                       "--steps", "3", "--warmup", "2", "--mode", "both", "--cuda-graphs", "--compare",
                       "compile,resnet_fast:triton+compile", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    assert data["skipped"] == []
    assert {(r["variant"], r["mode"]) for r in data["results"]} == {
        (v, m) for v in ("compile", "resnet_fast:triton+compile") for m in ("train", "infer")}
    assert all(r["graph"] and r["compile_s"] > 0 for r in data["results"])
