"""Training numerics: the loss falls on a learnable task; fused and eager models train alike;
the paper's warm-up and milestone schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

from resnet_fast.nn import BasicBlock, BatchNormAct2d
from resnet_fast.train.config import Options, resolve_config
from resnet_fast.train.loop import ErrorGatedWarmup, Trainer
from resnet_fast.train.metrics import Meter, read_metrics


def _synthetic(tmp_path, name: str, **overrides) -> Trainer:
    options = Options("synthetic", model="resnet8", batch_size=8, image_size=8, num_classes=4, synthetic_images=40,
                      iterations=5, log_every=1, workers=0, progress=False, out=str(tmp_path / name))
    for key, value in overrides.items():
        setattr(options, key, value)
    return Trainer(resolve_config(options, cuda_available=False, cuda_bf16=False))


def _losses(trainer: Trainer) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(trainer.log.path) if row["phase"] == "train"]


def test_loss_falls_on_a_learnable_synthetic_task(tmp_path):
    trainer = _synthetic(tmp_path, "run", iterations=9, log_every=3, synthetic_images=72)
    assert trainer.run()
    losses = _losses(trainer)
    assert len(losses) == 3
    assert losses[0] > 1.0  # about ln 4 = 1.39 at the start
    assert losses[-1] < 0.5 * losses[0], losses
    evaluation = [row for row in read_metrics(trainer.log.path) if row["phase"] == "eval"]
    assert float(evaluation[-1]["top1_error"]) < 50.0  # well under chance (75%) on held-out images


# fp32 on the CPU: the fused operators (torch backend) and nn.BatchNorm2d differ by rounding;
# five SGD steps at lr 0.1 amplify that to a few 1e-6 relative, far below this tolerance.
LOSS_TOLERANCE = 1e-4


def test_fused_and_eager_models_follow_the_same_loss_curve(tmp_path):
    fused, eager = _synthetic(tmp_path, "fused"), _synthetic(tmp_path, "eager", eager=True)
    assert isinstance(fused.module.layer1[0], BasicBlock) and isinstance(fused.module.bn1, BatchNormAct2d)
    assert isinstance(eager.module.layer1[0], TorchvisionBasicBlock) and type(eager.module.bn1) is torch.nn.BatchNorm2d
    for name, value in fused.module.state_dict().items():  # the same initial weights
        assert torch.equal(eager.module.state_dict()[name], value), name
    assert fused.run() and eager.run()
    fused_losses, eager_losses = _losses(fused), _losses(eager)
    assert len(fused_losses) == 5 and len(set(fused_losses)) == 5  # five different steps
    assert fused_losses == pytest.approx(eager_losses, rel=LOSS_TOLERANCE)
    for name, value in fused.module.state_dict().items():
        torch.testing.assert_close(value, eager.module.state_dict()[name], rtol=1e-3, atol=1e-4)


def test_warmup_lowers_the_rate_until_the_error_is_under_80_percent():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [3], gamma=0.1)
    warmup = ErrorGatedWarmup(optimizer, enabled=True)
    warmup.start()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert not warmup.observe(85.0) and optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert warmup.observe(79.5) and optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert not warmup.observe(10.0) and warmup.state_dict() == {"active": False}
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # the milestone still divides by 10
    disabled = ErrorGatedWarmup(torch.optim.SGD([parameter], lr=0.1), enabled=False)
    disabled.start()
    assert disabled.optimizer.param_groups[0]["lr"] == 0.1 and not disabled.observe(0.0)


def test_meter_counts_top1_and_top5_errors():
    meter = Meter(torch.device("cpu"))
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 4])  # top-1 hit; miss in top 5; top-5 hit only
    meter.update(logits, labels, torch.tensor(6.0))
    reading = meter.read()
    assert reading.count == 3 and reading.loss == pytest.approx(2.0)
    assert reading.top1_error == pytest.approx(200 / 3) and reading.top5_error == pytest.approx(100 / 3)
    assert meter.read().count == 0 and math.isnan(meter.read().loss)  # read() reset the sums
