"""Synchronized BatchNorm: ``sync_batch_norm_act``, ``SyncBatchNormAct2d``, ``convert_sync_batchnorm``.

Two gloo processes on the CPU (the torch math of the stage operators) against one
process holding the whole batch, in float64: outputs, every gradient, running
statistics, and a DistributedDataParallel training step of a converted CIFAR ResNet.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICES, strided_buffer, strided_per_channel
from torch import nn

import resnet_fast
from resnet_fast.nn import BatchNormAct2d, SyncBatchNormAct2d, convert_sync_batchnorm
from resnet_fast.ops import sync_batch_norm_act

# The modules here run the fused operators (their torch reference composition), not the
# default native path (torchvision's own aten operators, tested in test_native_path.py).
pytestmark = pytest.mark.usefixtures("reference_backend")

WORLD = 2
# Rank r holds rows SPLITS[case][r] of the global batch (uneven, and one rank empty).
OP_CASES = {
    "uneven_residual_relu": dict(split=(3, 5), residual=True, relu=True, channels_last=False),
    "channels_last_relu": dict(split=(4, 4), residual=False, relu=True, channels_last=True),
    "residual_no_relu": dict(split=(6, 2), residual=True, relu=False, channels_last=False),
    "one_rank_empty": dict(split=(8, 0), residual=False, relu=True, channels_last=False),
    # weight, bias, running_mean and running_var as stride-2 views (NaN between the elements)
    "strided_per_channel": dict(split=(5, 3), residual=True, relu=True, channels_last=True, strided=True),
}
SHAPE = (8, 5, 3, 4)
MODEL_BATCH = 8


def _op_data(case: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    data = {
        "x": torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2 + 3,
        "residual": torch.randn(SHAPE, generator=g, dtype=torch.float64),
        "grad": torch.randn(SHAPE, generator=g, dtype=torch.float64),
        "weight": torch.rand(SHAPE[1], generator=g, dtype=torch.float64) + 0.5,
        "bias": torch.randn(SHAPE[1], generator=g, dtype=torch.float64),
    }
    if case["channels_last"]:
        for k in ("x", "residual", "grad"):
            data[k] = data[k].contiguous(memory_format=torch.channels_last)
    return data


def _op_run(rank: int, case: dict, device: str) -> dict[str, torch.Tensor]:
    data = {k: v.to(device) for k, v in _op_data(case).items()}
    start = sum(case["split"][:rank])
    rows = slice(start, start + case["split"][rank])
    x = data["x"][rows].clone().requires_grad_()
    residual = data["residual"][rows].clone().requires_grad_() if case["residual"] else None
    weight = data["weight"].clone().requires_grad_()
    bias = data["bias"].clone().requires_grad_()
    running_mean = torch.zeros(SHAPE[1], dtype=torch.float64, device=device)
    running_var = torch.ones(SHAPE[1], dtype=torch.float64, device=device)
    tracked = torch.tensor(0, device=device)
    weight_arg, bias_arg, gaps = weight, bias, []
    if case.get("strided"):
        weight_arg, bias_arg = strided_per_channel(weight), strided_per_channel(bias)
        (running_mean, mean_gaps), (running_var, var_gaps) = strided_buffer(running_mean), strided_buffer(running_var)
        gaps = [mean_gaps, var_gaps]
    out = sync_batch_norm_act(x, weight_arg, bias_arg, running_mean, running_var, residual, relu=case["relu"],
                              momentum=None, num_batches_tracked=tracked)
    (out * data["grad"][rows]).sum().backward()
    result = {"out": out.detach(), "grad_x": x.grad, "grad_weight": weight.grad, "grad_bias": bias.grad,
              "running_mean": running_mean.clone(), "running_var": running_var.clone(), "tracked": tracked,
              "out_channels_last": torch.tensor(out.is_contiguous(memory_format=torch.channels_last)),
              "gaps_untouched": torch.tensor(all(bool(g.isnan().all()) for g in gaps))}
    if residual is not None:
        result["grad_residual"] = residual.grad
    return {k: v.cpu() for k, v in result.items()}


def _model_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = resnet_fast.resnet20().double()
    images = torch.randn(MODEL_BATCH, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 10, (MODEL_BATCH,))
    return model, images, labels


def _train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step()


def _model_run(rank: int) -> dict[str, torch.Tensor]:
    model, images, labels = _model_data()
    model = convert_sync_batchnorm(model)
    synced = sum(isinstance(m, SyncBatchNormAct2d) for m in model.modules())
    ddp = nn.parallel.DistributedDataParallel(model)
    per_rank = MODEL_BATCH // WORLD
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    _train_step(ddp, images[rows], labels[rows])
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "synced": synced}


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        results = {"cpu": {name: _op_run(rank, case, "cpu") for name, case in OP_CASES.items()}}
        if torch.cuda.is_available():  # gloo moves CUDA tensors too; the stage ops run their CUDA kernels
            results["cuda"] = {name: _op_run(rank, case, "cuda") for name, case in OP_CASES.items()}
        results["model"] = _model_run(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Results of both gloo ranks (one spawn for every case: process start-up is the cost)."""
    tmp = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _reference_op(case: dict) -> dict[str, torch.Tensor]:
    data = _op_data(case)
    bn = nn.BatchNorm2d(SHAPE[1], momentum=None, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(data["weight"])
        bn.bias.copy_(data["bias"])
    x = data["x"].clone().requires_grad_()
    residual = data["residual"].clone().requires_grad_()
    out = bn(x) + residual if case["residual"] else bn(x)
    out = torch.relu(out) if case["relu"] else out
    (out * data["grad"]).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "grad_residual": residual.grad, "grad_weight": bn.weight.grad,
            "grad_bias": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
            "tracked": bn.num_batches_tracked}


@pytest.mark.parametrize("name", sorted(OP_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_equal_one_process_on_the_global_batch(two_ranks, name, device):
    case = OP_CASES[name]
    ref = _reference_op(case)
    ranks = [r[device][name] for r in two_ranks]
    tight = dict(rtol=1e-10, atol=1e-10)
    for key in ("out", "grad_x") + (("grad_residual",) if case["residual"] else ()):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), ref[key], **tight, msg=key)
    # Parameter gradients are each rank's share (DDP sums/averages them over the group).
    for key in ("grad_weight", "grad_bias"):
        torch.testing.assert_close(sum(r[key] for r in ranks), ref[key], **tight, msg=key)
    for r in ranks:
        for key in ("running_mean", "running_var", "tracked"):
            torch.testing.assert_close(r[key], ref[key], rtol=1e-12, atol=1e-12, msg=key)
    if case["channels_last"]:
        assert all(bool(r["out_channels_last"]) for r in ranks if r["out"].numel())
    assert all(bool(r["gaps_untouched"]) for r in ranks), "written between a strided buffer's elements"


def test_ddp_step_of_a_converted_model_equals_one_process(two_ranks):
    model, images, labels = _model_data()
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _train_step(model, images, labels)
    expected = model.state_dict()
    for rank in two_ranks:
        assert rank["model"]["synced"] == bn_count
        state = rank["model"]["state"]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-11, msg=key)


def test_convert_shares_parameters_and_keeps_keys():
    model = resnet_fast.resnet20()
    keys = list(model.state_dict())
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    converted = convert_sync_batchnorm(model)
    assert converted is model
    assert list(model.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    assert not any(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in model.modules())
    fused = BatchNormAct2d(4, relu=True)
    synced = convert_sync_batchnorm(fused)
    assert isinstance(synced, SyncBatchNormAct2d) and synced.relu and synced.weight is fused.weight


def test_without_a_process_group_it_is_a_batch_norm_act():
    torch.manual_seed(0)
    fused = BatchNormAct2d(3, relu=True).double()
    synced = convert_sync_batchnorm(copy.deepcopy(fused))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(synced(x), fused(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_var, fused.running_var, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        sync_batch_norm_act(x, relu=True)
