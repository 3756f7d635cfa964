"""resnet_fast.train.data: CIFAR-10 and ImageFolder readers, their errors, sampling, augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from train_fixtures import write_cifar, write_image_folder

from resnet_fast.train.data import (
    CifarImages,
    DataError,
    GlobalBatchSampler,
    SeededSamples,
    build_data,
    cifar10_datasets,
    imagenet_datasets,
    load_cifar10,
    rank_shard,
)


def test_cifar_reader_layout_and_mean(tmp_path):
    folder = write_cifar(tmp_path, per_batch=6)
    arrays = load_cifar10(tmp_path)  # the parent folder is accepted too
    with open(folder / "data_batch_2", "rb") as file:
        raw = pickle.load(file, encoding="bytes")
    # row = 1024 red, 1024 green, 1024 blue values of a 32x32 image
    first = arrays.train_images[6]
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    assert torch.equal(first[1].flatten(), torch.from_numpy(raw[b"data"][0, 1024:2048]))
    assert arrays.train_labels[6:12].tolist() == raw[b"labels"]
    assert len(arrays.train_labels) == 30 and len(arrays.test_labels) == 6

    train, evaluation, name = cifar10_datasets(folder, val_split=0)
    assert name == "test" and len(train) == 30 and len(evaluation) == 6
    mean = arrays.train_images.double().mean(0) / 255
    image, label = evaluation[2]
    expected = arrays.test_images[2].double() / 255 - mean
    torch.testing.assert_close(image.double(), expected, atol=1e-6, rtol=0)
    assert label == arrays.test_labels[2]


def test_cifar_val_split_holds_out_the_last_training_images(tmp_path):
    write_cifar(tmp_path, per_batch=6)
    arrays = load_cifar10(tmp_path)
    train, evaluation, name = cifar10_datasets(tmp_path, val_split=5)
    assert len(train) == 25 and len(evaluation) == 5 and "5 held-out" in name
    assert torch.equal(evaluation.images, arrays.train_images[-5:])
    # the mean subtracted is that of the 25 images trained on
    torch.testing.assert_close(train.mean_image.double(), arrays.train_images[:25].double().mean(0) / 255)


def test_cifar_augmentation_pads_crops_flips_and_depends_only_on_seed_epoch_index():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data = CifarImages(images, torch.arange(4), torch.zeros(3, 32, 32), augment=True)
    samples = SeededSamples(data, seed=3)
    torch.manual_seed(123)
    first, _ = samples[(0, 1)]
    torch.manual_seed(999)  # the caller's generator does not matter, and is left alone
    state = torch.get_rng_state()
    assert torch.equal(samples[(0, 1)][0], first)
    assert torch.equal(torch.get_rng_state(), state)
    # every result is a shifted (and maybe flipped) window of the zero-padded image
    padded = torch.nn.functional.pad(images[1].float() / 255, (4, 4, 4, 4))
    windows = [padded[:, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
    candidates = windows + [w.flip(-1) for w in windows]
    for epoch in range(6):
        out, _ = samples[(epoch, 1)]
        assert any(torch.equal(out, c) for c in candidates)
    assert len({samples[(epoch, 1)][0].sum().item() for epoch in range(6)}) > 1  # epochs differ


def test_global_batch_sampler_splits_global_batches_between_ranks_and_resumes():
    single = GlobalBatchSampler(22, global_batch=8, seed=5)
    assert single.batches_per_epoch == 2  # the incomplete last batch is dropped
    single.set_position(epoch=3)
    global_batches = list(single)
    ranks = [GlobalBatchSampler(22, global_batch=8, rank=r, world_size=2, seed=5) for r in range(2)]
    for sampler in ranks:
        sampler.set_position(epoch=3)
    shares = [list(sampler) for sampler in ranks]
    for i, batch in enumerate(global_batches):
        assert shares[0][i] + shares[1][i] == batch
        assert all(epoch == 3 for epoch, _ in batch)
    assert len({index for batch in global_batches for _, index in batch}) == 16
    single.set_position(epoch=3, start_batch=1)
    assert list(single) == global_batches[1:] and len(single) == 1
    single.set_position(epoch=4)
    assert list(single) != global_batches  # a new order each epoch
    assert sorted(i for r in range(3) for i in rank_shard(10, r, 3)) == list(range(10))


def test_sampler_refuses_uneven_split_and_tiny_sets():
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        GlobalBatchSampler(100, global_batch=9, rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        GlobalBatchSampler(4, global_batch=8)


def test_image_folder_train_and_val_transforms(tmp_path):
    write_image_folder(tmp_path)
    train, val, name = imagenet_datasets(tmp_path, image_size=32, ten_crop=False)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and "centre" in name
    image, label = SeededSamples(train, seed=0)[(0, 5)]
    assert image.shape == (3, 32, 32) and label == 1
    assert val[0][0].shape == (3, 32, 32)
    _, ten, _ = imagenet_datasets(tmp_path, image_size=32, ten_crop=True)
    crops = ten[0][0]
    assert crops.shape == (10, 3, 32, 32)
    assert torch.equal(crops[4], val[0][0])  # TenCrop's fifth crop is the centre crop


def _malformed(folder, name, content: bytes) -> None:
    (folder / name).write_bytes(content)


@pytest.mark.parametrize("damage, message", [
    ("missing_folder", r"does not exist or is not a folder; expected the CIFAR-10 python version"),
    ("no_batches", r"found no CIFAR-10 batches in .* expected .*data_batch_1"),
    ("missing_file", r"lacks data_batch_3"),
    ("not_pickle", r"data_batch_2 is not a CIFAR-10 python batch"),
    ("wrong_keys", r"data_batch_2: expected a dict with keys b'data' and b'labels', found keys b'pixels'"),
    ("wrong_shape", r"data_batch_2: b'data' must be a uint8 array of N x 3072 .* got uint8 \(4, 1024\)"),
    ("wrong_labels", r"data_batch_2: b'labels' must be 4 integers"),
    ("label_range", r"data_batch_2: labels must lie in 0..9, found 0..12"),
])
def test_cifar_errors_say_what_was_expected_and_where(tmp_path, damage, message):
    root = tmp_path / "data"
    if damage != "missing_folder":
        root.mkdir()
    if damage not in ("missing_folder", "no_batches"):
        folder = write_cifar(root, per_batch=4)
        bad = {"not_pickle": b"this is not a pickle",
               "wrong_keys": pickle.dumps({b"pixels": 1}),
               "wrong_shape": pickle.dumps({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}),
               "wrong_labels": pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}),
               "label_range": pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 12]})}
        if damage == "missing_file":
            (folder / "data_batch_3").unlink()
        else:
            _malformed(folder, "data_batch_2", bad[damage])
    with pytest.raises(DataError, match=message):
        load_cifar10(root)


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist.*ImageFolder tree"):
        imagenet_datasets(tmp_path / "nowhere", 32, False)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train holds no usable images .*expected an ImageFolder tree"):
        imagenet_datasets(tmp_path, 32, False)
    write_image_folder(tmp_path / "ok", classes=("a", "b"))
    (tmp_path / "ok" / "val" / "b").rename(tmp_path / "ok" / "val" / "c")
    with pytest.raises(DataError, match=r"class folders differ .*only in train \['b'\], only in val \['c'\]"):
        imagenet_datasets(tmp_path / "ok", 32, False)
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "only_train" / "train" / "a" / "0.png")
    with pytest.raises(DataError, match=r"only_train/val does not exist"):
        imagenet_datasets(tmp_path / "only_train", 32, False)


def test_build_data_needs_data_for_real_recipes():
    with pytest.raises(DataError, match="this recipe needs --data: the CIFAR-10 python batches folder"):
        build_data("cifar10", root=None, image_size=32, num_classes=10, global_batch=8, seed=0, rank=0,
                   world_size=1, workers=0, device=torch.device("cpu"), val_split=0, ten_crop=False,
                   synthetic_images=0)


def test_synthetic_data_is_on_the_device_and_sharded():
    kwargs = dict(root=None, image_size=8, num_classes=3, global_batch=4, seed=1, workers=0,
                  device=torch.device("cpu"), val_split=0, ten_crop=False, synthetic_images=12)
    whole = build_data("synthetic", rank=0, world_size=1, **kwargs)
    halves = [build_data("synthetic", rank=r, world_size=2, **kwargs) for r in range(2)]
    batches = list(whole.epoch_batches(0, 0))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 8, 8)
    for i, (images, labels) in enumerate(batches):
        parts = [list(h.epoch_batches(0, 0))[i] for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), images)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    eval_count = sum(len(labels) for h in halves for _, labels in h.eval_batches())
    assert eval_count == sum(len(labels) for _, labels in whole.eval_batches()) == 12
