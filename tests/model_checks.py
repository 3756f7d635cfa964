"""float64 model-parity checks shared by the model and conversion tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

RTOL64 = 1e-10


def assert_close64(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = RTOL64) -> None:
    """float64 agreement, relative to the reference's largest magnitude."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == ref.dtype, f"{name}: dtype {ours.dtype} != {ref.dtype}"
    if not ours.is_floating_point():
        assert torch.equal(ours, ref), f"{name}: {ours} != {ref}"
        return
    error = (ours - ref).abs().max().item() if ours.numel() else 0.0
    bound = rtol * max(1.0, ref.abs().max().item()) if ref.numel() else 0.0
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def randomize_batch_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen, dtype=torch.float64))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen, dtype=torch.float64))
                m.num_batches_tracked.fill_(3)
    return model


def images(n: int, size: int = 32, seed: int = 1, channels: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)


def compare_eval(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    ours.eval()
    ref.eval()
    with torch.no_grad():
        assert_close64(ours(x), ref(x), "eval output")


def compare_training_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """One SGD step in train mode: loss, every gradient, every buffer, every updated parameter.

    Integer targets use cross-entropy, floating targets mean-squared error.
    """
    ours.train()
    ref.train()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = F.cross_entropy if target.dtype == torch.long else F.mse_loss
    loss_ours, loss_ref = loss_fn(ours(x), target), loss_fn(ref(x), target)
    assert_close64(loss_ours.detach(), loss_ref.detach(), "loss")
    loss_ours.backward()
    loss_ref.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert_close64(p.grad, ref_params[name].grad, f"grad of {name}")
    ref_buffers = dict(ref.named_buffers())
    assert set(ref_buffers) == {name for name, _ in ours.named_buffers()}
    for name, b in ours.named_buffers():
        assert_close64(b, ref_buffers[name], f"buffer {name}")
    opt_ours.step()
    opt_ref.step()
    for name, p in ours.named_parameters():
        assert_close64(p.detach(), ref_params[name].detach(), f"updated {name}")
