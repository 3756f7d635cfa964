"""The training recipes as data: batch size, optimizer, learning-rate schedule, length, data.

* ``cifar10`` — He et al. 2015, §4.2: batch 128, SGD (momentum 0.9, weight decay 1e-4),
  learning rate 0.1 divided by 10 at 32k and 48k iterations, 64k iterations in all;
  4-pixel zero padding + random 32x32 crop + horizontal flip, per-pixel mean subtracted;
  ResNet-110 warms up at 0.01 until the training error is below 80%.
* ``imagenet`` — §3.4: batch 256, same optimizer, 0.1 divided by 10 at epochs 30 and 60
  (90 epochs), or on a plateau of the validation error; random-resized crop + flip,
  single 224 centre crop for evaluation (ten crops on request).
* ``synthetic`` — the ImageNet optimizer settings on random, learnable images generated
  on the device (no data set, no loader): for throughput profiling and smoke tests.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_UNITS = ("iterations", "epochs")


@dataclass(frozen=True)
class Recipe:
    """One recipe's defaults; every field can be overridden from the command line.

    ``length`` and ``milestones`` count iterations or epochs, as ``unit`` says; the
    learning rate is multiplied by ``lr_decay`` at each milestone.
    """

    name: str
    model: str
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    unit: str
    length: int
    milestones: tuple[int, ...]
    lr_decay: float
    image_size: int
    num_classes: int
    data: str  # "cifar10", "imagefolder" or "synthetic"
    augmentation: str  # what the training transform does, for the run summary
    warmup_models: tuple[str, ...] = ()  # models that warm up at lr/10 until training error < 80%

    def scaled_milestones(self, length: int) -> tuple[int, ...]:
        """The milestones at the same fractions of ``length`` as of the recipe's own length.

        ``cifar10`` with ``--iterations 6400`` decays at 3200 and 4800, as 32k/48k of 64k
        (milestones that round to the same count merge).
        """
        return tuple(sorted({max(1, round(m * length / self.length)) for m in self.milestones}))


RECIPES: dict[str, Recipe] = {
    "cifar10": Recipe(
        name="cifar10", model="resnet20", batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
        unit="iterations", length=64_000, milestones=(32_000, 48_000), lr_decay=0.1,
        image_size=32, num_classes=10, data="cifar10",
        augmentation="4-pixel zero padding, random 32x32 crop, horizontal flip; per-pixel mean subtracted",
        warmup_models=("resnet110",),
    ),
    "imagenet": Recipe(
        name="imagenet", model="resnet50", batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
        unit="epochs", length=90, milestones=(30, 60), lr_decay=0.1,
        image_size=224, num_classes=1000, data="imagefolder",
        augmentation="random-resized crop, horizontal flip; ImageNet mean/std normalisation",
    ),
    "synthetic": Recipe(
        name="synthetic", model="resnet50", batch_size=256, lr=0.1, momentum=0.9, weight_decay=1e-4,
        unit="iterations", length=200, milestones=(), lr_decay=0.1,
        image_size=224, num_classes=1000, data="synthetic",
        augmentation="none (class templates plus Gaussian noise, generated on the device)",
    ),
}
