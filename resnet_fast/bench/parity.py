"""Model parity: resnet_fast against plain PyTorch on whole networks, as the GPU check runs it.

:func:`step_parity` takes one training step (forward, cross-entropy, backward; fp16 with a
``GradScaler`` whose unscaled gradients are compared) of a network three ways from the same
weights and inputs: in float64 (the reference), in plain PyTorch under autocast to the
tested dtype (torchvision's ResNet, or for the CIFAR networks
:class:`~resnet_fast.train.models.TorchCifarResNet`), and as resnet_fast on one backend,
default or with fused training. The loss, the gradients of every parameter (as one
vector) and the running statistics of every BatchNorm after the step pass when

    error(resnet_fast) <= 2 * error(plain PyTorch in the same dtype) + floor[dtype],

errors relative to the float64 reference in the Euclidean norm (the project's rule,
:mod:`resnet_fast.testing`, with the floor of the autocast dtype: under autocast the
gradients and statistics are float32 tensors computed through that dtype). Each
comparison is returned with its numbers.

:func:`convergence_curve` trains a CIFAR ResNet on scikit-learn's 8x8 digits (1,797
images, a stratified held-out fifth) for a few epochs from a fixed seed and data order and
returns per-epoch training loss and held-out accuracy, so fused and plain training can be
compared from identical starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resnet_fast
from resnet_fast.runtime import DTYPES, autocast, grad_scaler, memory_format
from resnet_fast.testing import RELATIVE_FLOOR
from resnet_fast.train.models import build_model

QUANTITIES = ("loss", "gradients", "running statistics")


@dataclass
class StepOutcome:
    """What one training step produced, in float64 on the CPU."""

    loss: Tensor  # a one-element vector
    gradients: Tensor  # every parameter's gradient, flattened and concatenated in parameter order
    running_stats: Tensor  # every running_mean and running_var after the step, concatenated

    def quantity(self, name: str) -> Tensor:
        return {"loss": self.loss, "gradients": self.gradients, "running statistics": self.running_stats}[name]


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` (the denominator at least 1e-30)."""
    return (value - reference).norm().item() / max(reference.norm().item(), 1e-30)


def train_step(model: nn.Module, images: Tensor, labels: Tensor, dtype: str) -> StepOutcome:
    """One training step's loss, gradients and running statistics (no optimizer update)."""
    model.train()
    device = images.device
    scaler = grad_scaler(device, dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # only for the scaler's unscale_
    with autocast(device, dtype):
        loss = F.cross_entropy(model(images), labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # fp16: the gradients the optimizer would see; no-op when disabled

    def flat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.detach().double().flatten().cpu() for t in tensors])

    return StepOutcome(
        loss=loss.detach().double().reshape(1).cpu(),
        gradients=flat([p.grad for _, p in model.named_parameters()]),
        running_stats=flat([b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]),
    )


def step_inputs(model: str, batch: int, image_size: int, device: str, channels_last: bool,
                seed: int) -> tuple[Tensor, Tensor]:
    """Random images and labels, the same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, num_classes(model), (batch,), generator=generator)
    return (images.to(device).contiguous(memory_format=memory_format(channels_last)), labels.to(device))


def num_classes(model: str) -> int:
    return 1000 if model in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152") else 10


def fresh_models(model: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """(plain PyTorch, resnet_fast) networks holding the same weights, drawn under ``seed``."""
    torch.manual_seed(seed)
    eager = build_model(model, num_classes(model), eager=True)  # the weights resnet_fast's model draws
    fused = build_model(model, num_classes(model), eager=False)
    fused.load_state_dict(eager.state_dict(), strict=True)
    return eager, fused


def place(model: nn.Module, device: str, channels_last: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    return model.to(device=device, dtype=dtype, memory_format=memory_format(channels_last))


@dataclass
class StepBaseline:
    """The float64 reference and plain PyTorch in the tested dtype, computed once per model and dtype."""

    reference: StepOutcome
    eager: StepOutcome


def step_baseline(model: str, dtype: str, batch: int, image_size: int, device: str, channels_last: bool,
                  seed: int) -> StepBaseline:
    images, labels = step_inputs(model, batch, image_size, device, channels_last, seed)
    eager, _ = fresh_models(model, seed)
    reference = train_step(place(eager, device, channels_last, torch.float64), images, labels, "fp32")
    eager, _ = fresh_models(model, seed)
    same_dtype = train_step(place(eager, device, channels_last), images.float(), labels, dtype)
    return StepBaseline(reference=reference, eager=same_dtype)


def step_parity(model: str, dtype: str, backend: str, fused: bool, baseline: StepBaseline, *, batch: int,
                image_size: int, device: str, channels_last: bool, seed: int) -> list[dict[str, Any]]:
    """One comparison per quantity (:data:`QUANTITIES`) of resnet_fast on ``backend`` against
    ``baseline``: each a dict with the error, plain PyTorch's error, the tolerance, the
    verdict and the values behind them (loss values, gradient norms)."""
    images, labels = step_inputs(model, batch, image_size, device, channels_last, seed)
    _, ours_model = fresh_models(model, seed)
    if fused:
        resnet_fast.nn.enable_fused_training(ours_model)
    previous = resnet_fast.get_backend()
    resnet_fast.set_backend(backend)
    try:
        ours = train_step(place(ours_model, device, channels_last), images.float(), labels, dtype)
    finally:
        resnet_fast.set_backend(previous)
    comparisons = []
    for quantity in QUANTITIES:
        reference = baseline.reference.quantity(quantity)
        finite = bool(torch.isfinite(ours.quantity(quantity)).all())
        error = relative_error(ours.quantity(quantity), reference)
        eager_error = relative_error(baseline.eager.quantity(quantity), reference)
        tolerance = 2 * eager_error + RELATIVE_FLOOR[DTYPES[dtype]]
        comparisons.append({
            "quantity": quantity, "error": error, "eager_error": eager_error, "tolerance": tolerance,
            "passed": finite and error <= tolerance, "finite": finite,
            "norm": ours.quantity(quantity).norm().item(),
            "eager_norm": baseline.eager.quantity(quantity).norm().item(),
            "reference_norm": reference.norm().item(),
        })
    return comparisons


# ---------------------------------------------------------------------------------------
# Convergence on scikit-learn's digits


@dataclass
class Digits:
    """scikit-learn's 8x8 digits as 3-channel images in [0, 1], split into training and held-out sets."""

    train_images: Tensor
    train_labels: Tensor
    heldout_images: Tensor
    heldout_labels: Tensor


def load_digits_split(seed: int, heldout_fraction: float = 0.2, limit: int | None = None) -> Digits:
    """The digits, a stratified held-out split drawn with ``seed``; ``limit`` keeps only the first images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images, labels = data.images, data.target
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    train_x, heldout_x, train_y, heldout_y = train_test_split(
        images, labels, test_size=heldout_fraction, random_state=seed, stratify=labels)

    def as_images(array: Any) -> Tensor:
        return (torch.as_tensor(array, dtype=torch.float32) / 16.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()

    return Digits(as_images(train_x), torch.as_tensor(train_y), as_images(heldout_x), torch.as_tensor(heldout_y))


def heldout_accuracy(model: nn.Module, digits: Digits, device: str, dtype: str, channels_last: bool) -> float:
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        images = digits.heldout_images.to(device).contiguous(memory_format=memory_format(channels_last))
        predictions = model(images).argmax(dim=1).cpu()
    return (predictions == digits.heldout_labels).float().mean().item()


def convergence_curve(model: nn.Module, digits: Digits, *, epochs: int, batch: int, lr: float, device: str,
                      dtype: str, channels_last: bool, seed: int) -> dict[str, list[float]]:
    """Train ``model`` (already on ``device``) with SGD (momentum 0.9, weight decay 5e-4,
    constant ``lr``) in a data order fixed by ``seed``; per epoch the mean training loss
    and the held-out accuracy. Incomplete last batches are dropped."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(device, dtype)
    curve: dict[str, list[float]] = {"train_loss": [], "heldout_accuracy": []}
    count = len(digits.train_labels)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
        losses = []
        for start in range(0, count - batch + 1, batch):
            index = order[start:start + batch]
            images = digits.train_images[index].to(device).contiguous(memory_format=memory_format(channels_last))
            labels = digits.train_labels[index].to(device)
            with autocast(device, dtype):
                loss = F.cross_entropy(model(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        curve["train_loss"].append(torch.stack(losses).float().mean().item())
        curve["heldout_accuracy"].append(heldout_accuracy(model, digits, device, dtype, channels_last))
    return curve
