"""Batches on the device: augmentation bounds, flips only where configured, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvat.config import DataConfig
from lvat.data import ImageDataset, TrainBatches, augment, eval_batches, make_split, train_batches


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_keeps_shape_and_dtype():
    x = torch.randint(0, 256, (16, 3, 12, 10), dtype=torch.uint8)
    y = augment(x, 2, True, _gen())
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_a_lit_pixel_moves_at_most_two_pixels_and_all_shifts_occur():
    x = torch.zeros(2000, 1, 9, 9, dtype=torch.uint8)
    x[:, 0, 4, 4] = 255
    y = augment(x, 2, False, _gen())
    lit = y[:, 0].flatten(1).argmax(1)
    rows, cols = lit // 9, lit % 9
    assert (y.flatten(1) > 0).sum(1).eq(1).all()  # the pixel survives, nothing else lights
    assert ((rows - 4).abs() <= 2).all() and ((cols - 4).abs() <= 2).all()
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 25  # every shift drawn


def test_translation_pads_with_zeros():
    x = torch.full((500, 1, 6, 6), 7, dtype=torch.uint8)
    y = augment(x, 2, False, _gen())
    assert set(torch.unique(y).tolist()) == {0, 7}
    assert (y == 7).flatten(1).sum(1).min() >= 16  # at least a 4x4 block stays


def test_flips_only_where_configured():
    x = torch.randint(0, 256, (400, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(augment(x, 0, False, _gen()), x)
    y = augment(x, 0, True, _gen())
    flipped = (y == x.flip(3)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped | same).all() and 120 < flipped.sum() < 280


def test_same_seed_same_batch_other_seed_other_batch():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(augment(x, 2, True, _gen(3)), augment(x, 2, True, _gen(3)))
    assert not torch.equal(augment(x, 2, True, _gen(3)), augment(x, 2, True, _gen(4)))


def _toy(n=200, k=10) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % k
    return ImageDataset("toy", [str(i) for i in range(k)], x, y, x[:20], y[:20], flip=True)


def test_batches_draw_labeled_from_the_split_and_are_float_in_unit_range():
    ds = _toy()
    split = make_split(ds.y_train.numpy(), 20, 0, num_validation=20, fingerprint=ds.fingerprint)
    it = TrainBatches(ds, split, 8, 32, seed=0)
    label_of = {bytes(ds.x_train[i].numpy()): int(ds.y_train[i]) for i in split.labeled}
    held_out = {bytes(ds.x_train[i].numpy()) for i in split.validation}
    for _ in range(10):
        b = it.next()
        assert b.x_labeled.shape == (8, 1, 8, 8) and b.x_unlabeled.shape == (32, 1, 8, 8)
        assert b.x_labeled.dtype == torch.float32
        assert 0 <= b.x_labeled.min() <= b.x_labeled.max() <= 1
        for img, label in zip(b.x_labeled, b.y_labeled, strict=True):
            raw = bytes((img * 255).round().to(torch.uint8).numpy())
            assert label_of[raw] == label  # a labeled image, with its own label
        for img in b.x_unlabeled:
            assert bytes((img * 255).round().to(torch.uint8).numpy()) not in held_out


def test_every_labeled_image_is_seen_once_per_pass():
    ds = _toy()
    split = make_split(ds.y_train.numpy(), 20, 0, fingerprint=ds.fingerprint)
    it = TrainBatches(ds, split, 5, 5, seed=1)
    seen = torch.cat([it.labeled.next() for _ in range(4)])
    assert sorted(seen.tolist()) == sorted(split.labeled.tolist())


def test_resume_draws_exactly_the_batches_an_unbroken_run_draws():
    ds = _toy()
    split = make_split(ds.y_train.numpy(), 30, 0, fingerprint=ds.fingerprint)
    make = lambda: TrainBatches(ds, split, 8, 16, seed=5, augment=True, flip=True)  # noqa: E731
    unbroken = make()
    expected = [unbroken.next() for _ in range(12)]
    first = make()
    for _ in range(5):
        first.next()
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = resumed.next()
        assert torch.equal(got.x_labeled, want.x_labeled)
        assert torch.equal(got.y_labeled, want.y_labeled)
        assert torch.equal(got.x_unlabeled, want.x_unlabeled)


def test_augmentation_config_and_dataset_default_flip():
    ds = _toy()
    split = make_split(ds.y_train.numpy(), 20, 0, fingerprint=ds.fingerprint)
    kw = dict(batch_labeled=4, batch_unlabeled=4, device="cpu", seed=0)
    assert train_batches(DataConfig(augment=True), ds, split, **kw).flip is True  # dataset default
    assert train_batches(DataConfig(augment=True, flip="off"), ds, split, **kw).flip is False
    plain = train_batches(DataConfig(augment=False), ds, split, **kw)
    b = plain.next()
    raw = (b.x_unlabeled * 255).round().to(torch.uint8)
    pool = {bytes(x.numpy()) for x in ds.x_train}
    assert all(bytes(r.numpy()) in pool for r in raw)  # unaugmented: exact training images


def test_test_data_is_never_augmented():
    ds = _toy()
    xs, ys = zip(*eval_batches(ds.x_test, ds.y_test, 7, "cpu"), strict=True)
    assert torch.equal((torch.cat(xs) * 255).round().to(torch.uint8), ds.x_test)
    assert torch.equal(torch.cat(ys), ds.y_test)


def test_batches_refuse_a_split_of_other_data():
    ds = _toy()
    split = make_split(np.arange(200) % 10, 20, 0, fingerprint="not-this-data")
    with pytest.raises(Exception, match="fingerprint"):
        TrainBatches(ds, split, 4, 4)
