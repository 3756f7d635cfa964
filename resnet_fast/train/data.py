"""Training and evaluation data: CIFAR-10's python batches, an ImageFolder tree, synthetic images.

Nothing downloads: CIFAR-10 is read from the folder of the "python version"
(``cifar-10-batches-py``: pickles ``data_batch_1`` … ``data_batch_5`` and ``test_batch``
holding ``b"data"``, a uint8 array of N x 3072 — 1024 red, 1024 green, 1024 blue values of
a 32x32 image per row — and ``b"labels"``); ImageNet from an ImageFolder tree
``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``. Missing or malformed data raises
:class:`DataError` naming what was expected and where.

Data order and augmentation are functions of (seed, epoch, position) only, so a resumed
run sees exactly the batches an uninterrupted one would, with or without loader workers:

* :class:`GlobalBatchSampler` shuffles each epoch with a generator seeded by
  (seed, epoch); global batch ``i`` is ``permutation[i*B:(i+1)*B]`` and each rank takes
  its contiguous share, so several processes see the same global batches as one process;
* :class:`SeededSamples` seeds torch's random number generator from
  (seed, epoch, index) before transforming each training sample.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from resnet_fast.runtime import ConfigError

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_PADDING = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224  # evaluation resizes the shorter side to 256 for a 224 crop


class DataError(ConfigError):
    """The data set is missing or malformed (the message says what was expected and where)."""


Batch = tuple[Tensor, Tensor]  # (images, labels)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one training sample's augmentation in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


# ---------------------------------------------------------------------------------------
# Sampling


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of each global batch of one epoch, as ``[(epoch, index), ...]``.

    The epoch's order is ``torch.randperm(size)`` under a generator seeded with
    ``seed + epoch`` (identity order without ``shuffle``); the incomplete last global batch
    is dropped. Rank ``r`` of ``world_size`` takes positions ``[r*b, (r+1)*b)`` of every
    global batch, ``b = global_batch // world_size``. :meth:`set_position` chooses the
    epoch and the first global batch (to resume in the middle of an epoch).
    """

    def __init__(self, size: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ConfigError(f"--batch-size {global_batch} must be divisible by the number of processes "
                              f"({world_size})")
        if size < global_batch:
            raise ConfigError(f"the training set has {size} images, fewer than one batch "
                              f"(--batch-size {global_batch})")
        self.size = size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Global batches in a full epoch."""
        return self.size // self.global_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch`` from global batch ``start_batch`` on."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, index) for index in order[first:first + self.local_batch]]


class SeededSamples(Dataset):
    """``dataset[index]`` with torch's CPU generator seeded from (seed, epoch, index).

    Indexed by ``(epoch, index)`` pairs (what :class:`GlobalBatchSampler` yields), so a
    sample's random augmentation depends on nothing else — not on the loader worker
    that produces it nor on what ran before. The caller's generator state is restored.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


def rank_shard(size: int, rank: int, world_size: int) -> list[int]:
    """Evaluation indices of ``rank``: ``rank, rank + world_size, ...`` (each sample exactly once)."""
    return list(range(rank, size, world_size))


# ---------------------------------------------------------------------------------------
# CIFAR-10


@dataclass(frozen=True)
class CifarArrays:
    """CIFAR-10 as uint8 image tensors (N, 3, 32, 32) and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def find_cifar_folder(root: str | Path) -> Path:
    """``root`` if it holds the CIFAR-10 batches, else ``root/cifar-10-batches-py`` if that does."""
    root = Path(root).expanduser()
    expected = (f"the CIFAR-10 python version: a folder ({CIFAR_FOLDER}) with {', '.join(CIFAR_TRAIN_FILES)} "
                f"and {CIFAR_TEST_FILE} (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
                "extracted; nothing is downloaded)")
    if not root.is_dir():
        raise DataError(f"--data {root} does not exist or is not a folder; expected {expected}")
    for folder in (root, root / CIFAR_FOLDER):
        if (folder / CIFAR_TEST_FILE).exists() or (folder / CIFAR_TRAIN_FILES[0]).exists():
            missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (folder / name).is_file()]
            if missing:
                raise DataError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; expected {expected}")
            return folder
    raise DataError(f"found no CIFAR-10 batches in {root} (nor in {root / CIFAR_FOLDER}); expected {expected}")


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    try:
        with open(path, "rb") as file:
            entry = pickle.load(file, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as error:
        raise DataError(f"{path} is not a CIFAR-10 python batch (a pickled dict with b'data' and "
                        f"b'labels'): {type(error).__name__}: {error}") from None
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        found = f"keys {', '.join(sorted(map(repr, entry)))}" if isinstance(entry, dict) else type(entry).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels', found {found}")
    data, labels = np.asarray(entry[b"data"]), np.asarray(entry[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be a uint8 array of N x 3072 (32x32 RGB images, "
                        f"channel-major), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: b'labels' must be {len(data)} integers (one per image), "
                        f"got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(root: str | Path) -> CifarArrays:
    """Read the five training batches and the test batch under ``root``."""
    folder = find_cifar_folder(root)
    train = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    test_images, test_labels = read_cifar_batch(folder / CIFAR_TEST_FILE)
    return CifarArrays(torch.cat([images for images, _ in train]), torch.cat([labels for _, labels in train]),
                       test_images, test_labels)


class CifarImages(Dataset):
    """CIFAR images as float tensors ``image / 255 - mean_image`` (the paper's per-pixel mean).

    With ``augment``: zero-pad 4 pixels on each side, take a random 32x32 crop and flip it
    horizontally with probability 1/2, drawing from torch's CPU generator.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean_image: Tensor, augment: bool) -> None:
        self.images, self.labels, self.mean_image, self.augment = images, labels, mean_image, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].float().div_(255).sub_(self.mean_image)
        if self.augment:
            padded = F.pad(image, (CIFAR_PADDING,) * 4)
            top, left = torch.randint(0, 2 * CIFAR_PADDING + 1, (2,)).tolist()
            image = padded[:, top:top + 32, left:left + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            image = image.contiguous()
        return image, int(self.labels[index])


def cifar10_datasets(root: str | Path, val_split: int) -> tuple[Dataset, Dataset, str]:
    """Training and evaluation sets, and what the evaluation set is.

    ``val_split`` > 0 holds out the last ``val_split`` training images as the evaluation
    set (the paper's 45k/5k split is ``5000``); otherwise the test batch is evaluated.
    The per-pixel mean is that of the images trained on.
    """
    arrays = load_cifar10(root)
    train_images, train_labels = arrays.train_images, arrays.train_labels
    if val_split:
        if not 0 < val_split < len(train_labels):
            raise ConfigError(f"--val-split must be between 1 and {len(train_labels) - 1} images, got {val_split}")
        eval_images, eval_labels = train_images[-val_split:], train_labels[-val_split:]
        train_images, train_labels = train_images[:-val_split], train_labels[:-val_split]
        eval_name = f"validation ({val_split} held-out training images)"
    else:
        eval_images, eval_labels, eval_name = arrays.test_images, arrays.test_labels, "test"
    mean_image = train_images.double().mean(0).div(255).float()
    return (CifarImages(train_images, train_labels, mean_image, augment=True),
            CifarImages(eval_images, eval_labels, mean_image, augment=False), eval_name)


# ---------------------------------------------------------------------------------------
# ImageFolder (ImageNet)


def image_folder(root: Path, split: str, transform: Callable) -> Dataset:
    """``torchvision.datasets.ImageFolder(root/split)`` with a :class:`DataError` when unusable."""
    from torchvision.datasets import ImageFolder

    folder = root / split
    expected = (f"an ImageFolder tree {root}/{{train,val}}/<class name>/<image> (.jpg, .jpeg, .png, ...), "
                "with the same class folders in train and val")
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; expected {expected}")
    try:
        return ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"{folder} holds no usable images ({error}); expected {expected}") from None


class EachCrop:
    """Apply ``transform`` to each image of a tuple (``TenCrop``'s output) and stack the results."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, images: tuple) -> Tensor:
        return torch.stack([self.transform(image) for image in images])


def imagenet_datasets(root: str | Path, image_size: int, ten_crop: bool) -> tuple[Dataset, Dataset, str]:
    """Training set (random-resized crop + flip) and validation set (centre or ten crops)."""
    from torchvision import transforms as T

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {root} does not exist or is not a folder; expected an ImageFolder tree "
                        f"{root}/{{train,val}}/<class name>/<image>")
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    train = image_folder(root, "train", T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                                                   normalize]))
    resize = T.Resize(round(image_size * EVAL_RESIZE_RATIO))
    if ten_crop:
        crops = T.Compose([resize, T.TenCrop(image_size), EachCrop(normalize)])
    else:
        crops = T.Compose([resize, T.CenterCrop(image_size), normalize])
    val = image_folder(root, "val", crops)
    if train.classes != val.classes:  # type: ignore[attr-defined]
        only_train = sorted(set(train.classes) - set(val.classes))  # type: ignore[attr-defined]
        only_val = sorted(set(val.classes) - set(train.classes))  # type: ignore[attr-defined]
        raise DataError(f"class folders differ between {root / 'train'} and {root / 'val'}: only in train "
                        f"{only_train[:5]}, only in val {only_val[:5]}")
    return train, val, "validation (ten crops)" if ten_crop else "validation (centre crop)"


# ---------------------------------------------------------------------------------------
# What the training loop iterates over


class TrainData(Protocol):
    """Batches on the host or the device; the loop moves them to the device."""

    sampler: GlobalBatchSampler
    eval_name: str
    num_classes: int

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Batch]:
        """This rank's batches of ``epoch`` from global batch ``start_batch`` on."""

    def eval_batches(self) -> Iterable[Batch]:
        """This rank's shard of the evaluation set."""


class LoaderData:
    """Map-style data sets read by ``DataLoader`` workers into pinned memory."""

    def __init__(self, train: Dataset, evaluation: Dataset, eval_name: str, num_classes: int,
                 sampler: GlobalBatchSampler, workers: int, pin_memory: bool, rank: int, world_size: int) -> None:
        self.sampler, self.eval_name, self.num_classes = sampler, eval_name, num_classes
        # Their own generator: creating an iterator draws a worker base seed from it, which would
        # otherwise advance torch's global generator a run-history-dependent number of times.
        options = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0,
                   "generator": torch.Generator().manual_seed(sampler.seed)}
        self.train_loader = DataLoader(SeededSamples(train, sampler.seed), batch_sampler=sampler, **options)
        self.eval_loader = DataLoader(evaluation, batch_size=sampler.local_batch,
                                      sampler=rank_shard(len(evaluation), rank, world_size),  # type: ignore[arg-type]
                                      **options)

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable[Batch]:
        self.sampler.set_position(epoch, start_batch)
        return self.train_loader

    def eval_batches(self) -> Iterable[Batch]:
        return self.eval_loader


class SyntheticData:
    """Learnable random images made on the device: class ``c`` is a fixed random template
    (a 4x4 pattern per channel, upsampled to the image size) plus standard normal noise.

    A pool of ``pool_size`` training images (and as many evaluation images, with fresh
    noise) is generated once; an epoch draws ``epoch_images`` samples from it through the
    same :class:`GlobalBatchSampler` as real data, so no loader or host copy is involved.
    """

    def __init__(self, num_classes: int, image_size: int, epoch_images: int, pool_size: int,
                 sampler: GlobalBatchSampler, device: torch.device, seed: int, rank: int, world_size: int) -> None:
        self.sampler, self.num_classes, self.device = sampler, num_classes, device
        self.eval_name = f"synthetic ({pool_size} held-out images)"
        generator = torch.Generator(device).manual_seed(seed)
        templates = torch.randn(num_classes, 3, 4, 4, generator=generator, device=device)
        self.pool_images, self.pool_labels = self._images(templates, pool_size, image_size, generator)
        eval_images, eval_labels = self._images(templates, pool_size, image_size, generator)
        shard = torch.tensor(rank_shard(pool_size, rank, world_size), device=device)
        self.eval_images, self.eval_labels = eval_images[shard], eval_labels[shard]

    @staticmethod
    def _images(templates: Tensor, count: int, size: int, generator: torch.Generator) -> Batch:
        labels = torch.randint(0, len(templates), (count,), generator=generator, device=templates.device)
        signal = F.interpolate(templates[labels], size=(size, size), mode="nearest")
        noise = torch.randn(signal.shape, generator=generator, device=templates.device)
        return signal + noise, labels

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        self.sampler.set_position(epoch, start_batch)
        pool = len(self.pool_labels)
        for keys in self.sampler:
            rows = torch.tensor([index % pool for _, index in keys], device=self.device)
            yield self.pool_images[rows], self.pool_labels[rows]

    def eval_batches(self) -> Iterator[Batch]:
        step = self.sampler.local_batch
        for start in range(0, len(self.eval_labels), step):
            yield self.eval_images[start:start + step], self.eval_labels[start:start + step]


def build_data(kind: str, *, root: str | None, image_size: int, num_classes: int, global_batch: int,
               seed: int, rank: int, world_size: int, workers: int, device: torch.device, val_split: int,
               ten_crop: bool, synthetic_images: int) -> TrainData:
    """The data of a recipe: ``kind`` is ``"cifar10"``, ``"imagefolder"`` or ``"synthetic"``."""
    if kind == "synthetic":
        sampler = GlobalBatchSampler(synthetic_images, global_batch, rank, world_size, seed)
        pool = min(synthetic_images, 4 * global_batch)
        return SyntheticData(num_classes, image_size, synthetic_images, pool, sampler, device, seed, rank,
                             world_size)
    if root is None:
        what = "the CIFAR-10 python batches folder" if kind == "cifar10" else "an ImageFolder tree with train/ and val/"
        raise DataError(f"this recipe needs --data: {what}")
    if kind == "cifar10":
        train, evaluation, eval_name = cifar10_datasets(root, val_split)
    else:
        train, evaluation, eval_name = imagenet_datasets(root, image_size, ten_crop)
        num_classes = len(train.classes)  # type: ignore[attr-defined]
    sampler = GlobalBatchSampler(len(train), global_batch, rank, world_size, seed)  # type: ignore[arg-type]
    return LoaderData(train, evaluation, eval_name, num_classes, sampler, workers, device.type == "cuda", rank,
                      world_size)
