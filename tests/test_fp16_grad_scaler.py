"""fp16 training with ``torch.amp.GradScaler``: the V100/T4 recipe (no bf16 there).

What must hold, as with stock PyTorch: gradients that overflow in fp16 (inf, or nan from
inf - inf) leave our operators' backward as they are, so the scaler sees them and skips
the step — parameters and optimizer state unchanged, the scale reduced — exactly as with
torchvision's model in the same situation; the running statistics stay finite
throughout. On the CPU (torch backend, CPU autocast in float16) with small inputs; the
``gpu`` test trains a CIFAR ResNet-20 for a few hundred fp16 steps on each GPU backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import requires_gpu
from torch import nn

import resnet_fast
from resnet_fast.ops import conv2d_cuda

OVERFLOWING_SCALE = 2.0**40  # d(scaled loss)/d(logits) ~ 2^40 / batch: far past fp16's 65504


@pytest.fixture(autouse=True)
def torch_backend_on_cpu():
    before = resnet_fast.get_backend()
    resnet_fast.set_backend("auto")
    yield
    resnet_fast.set_backend(before)


def running_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b for name, b in model.named_buffers() if "running" in name}


def fp16_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
              images: torch.Tensor, labels: torch.Tensor, device: str) -> float:
    """One autocast-fp16 training step through the scaler; returns the (unscaled) loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.float16):
        loss = F.cross_entropy(model(images), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.item()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    return params, state


def non_finite_grads(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()}


def test_overflowing_step_is_skipped_exactly_as_with_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10)
    ours = resnet_fast.resnet18(num_classes=10)
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (4,))
    runs = {}
    for name, model in (("torchvision", reference), ("resnet_fast", ours)):
        model.to(memory_format=torch.channels_last).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        fp16_step(model, optimizer, scaler, images, labels, "cpu")  # a finite step: momentum buffers exist
        assert scaler.get_scale() == 2.0**8, name
        scaler.update(OVERFLOWING_SCALE)
        params, state = snapshot(model, optimizer)
        fp16_step(model, optimizer, scaler, images, labels, "cpu")
        after_params, after_state = snapshot(model, optimizer)
        runs[name] = non_finite_grads(model), scaler.get_scale()
        # The step was skipped: parameters and momentum untouched, the scale halved.
        for key, value in params.items():
            assert torch.equal(after_params[key], value), (name, key)
        for before, after in zip(state, after_state):
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), name
        assert scaler.get_scale() == OVERFLOWING_SCALE / 2, name
        for key, buffer in running_buffers(model).items():
            assert buffer.isfinite().all(), (name, key)
    ours_bad, ours_scale = runs["resnet_fast"]
    reference_bad, reference_scale = runs["torchvision"]
    assert ours_scale == reference_scale
    # The overflow reaches the same parameters: our BatchNorm backward passes inf/nan on.
    assert ours_bad == reference_bad
    assert any(name.endswith(("bn1.weight", "bn2.weight")) for name in ours_bad)


def test_running_statistics_stay_finite_while_the_scale_backs_off():
    """From an absurd scale, steps are skipped until the scale fits fp16; then training
    proceeds. Parameters, gradients of taken steps and running statistics stay finite."""
    torch.manual_seed(1)
    model = resnet_fast.resnet20().to(memory_format=torch.channels_last).train()
    plain = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    images = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (4,))
    skipped = taken = 0
    for _ in range(12):
        scale = scaler.get_scale()
        fp16_step(model, optimizer, scaler, images, labels, "cpu")
        if scaler.get_scale() < scale:
            skipped += 1
        else:
            taken += 1
            assert not non_finite_grads(model)
        for key, buffer in running_buffers(model).items():
            assert buffer.isfinite().all(), key
        assert all(p.isfinite().all() for p in model.parameters())
    assert skipped >= 3 and taken >= 3, (skipped, taken)
    # The taken steps trained the model: it moved away from its starting point.
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def learnable_batches(steps: int, batch: int, device: str, seed: int = 0):
    """Synthetic CIFAR-like data that a ResNet can learn: each class a fixed random image,
    each sample its class's image plus noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    prototypes = torch.randn(10, 3, 32, 32, device=device, generator=g)
    for _ in range(steps):
        labels = torch.randint(0, 10, (batch,), device=device, generator=g)
        noise = torch.randn(batch, 3, 32, 32, device=device, generator=g)
        yield (prototypes[labels] + noise).contiguous(memory_format=torch.channels_last), labels


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda-sm75-fused"])
def test_resnet20_trains_in_fp16_with_a_grad_scaler(backend, monkeypatch):
    """300 fp16 steps of CIFAR ResNet-20: the loss falls, no running statistic or
    parameter goes non-finite, and the scaler skips only a few steps.

    ``cuda-sm75-fused``: the V100/T4 path on this GPU: the cuda backend with the device
    reported as sm_75 and fused training on, so every block convolution runs our WMMA
    kernel ``conv2d_tensor_core`` with its prologue and statistics epilogue."""
    torch.manual_seed(0)
    model = resnet_fast.resnet20().cuda().to(memory_format=torch.channels_last).train()
    tensor_core_calls = []
    if backend == "cuda-sm75-fused":
        original = torch.ops.resnet_fast.conv2d_tensor_core
        monkeypatch.setattr(conv2d_cuda, "device_capability", lambda device: (7, 5))
        monkeypatch.setattr(torch.ops.resnet_fast, "conv2d_tensor_core",
                            lambda *args: tensor_core_calls.append(1) or original(*args))
        assert resnet_fast.nn.enable_fused_training(model) > 0
        backend = "cuda"
    resnet_fast.set_backend(backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda")
    losses, skipped = [], 0
    for images, labels in learnable_batches(300, 128, "cuda"):
        scale = scaler.get_scale()
        losses.append(fp16_step(model, optimizer, scaler, images, labels, "cuda"))
        skipped += scaler.get_scale() < scale
        for key, buffer in running_buffers(model).items():
            assert buffer.isfinite().all(), key
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert skipped <= 15, skipped
    assert all(p.isfinite().all() for p in model.parameters())
    if tensor_core_calls:
        assert len(tensor_core_calls) >= 300  # at least one WMMA convolution in every step
