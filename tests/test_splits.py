"""Splits: class-balanced, seeded, saved with the dataset's fingerprint, re-used on resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvat.config import DataConfig
from lvat.data import ImageDataset, Split, make_split, resolve_split
from lvat.errors import SplitError

LABELS = np.repeat(np.arange(10), 50)[np.random.default_rng(1).permutation(500)]


def test_labeled_subset_has_exact_per_class_counts():
    split = make_split(LABELS, 40, seed=0)
    assert len(split.labeled) == 40
    assert np.bincount(LABELS[split.labeled], minlength=10).tolist() == [4] * 10
    assert len(np.unique(split.labeled)) == 40


def test_same_seed_same_indices_other_seed_other_indices():
    a, b, c = make_split(LABELS, 40, 0), make_split(LABELS, 40, 0), make_split(LABELS, 40, 1)
    assert np.array_equal(a.labeled, b.labeled)
    assert not np.array_equal(a.labeled, c.labeled)


def test_validation_is_balanced_disjoint_and_not_unlabeled():
    split = make_split(LABELS, 20, 3, num_validation=100)
    assert np.bincount(LABELS[split.validation], minlength=10).tolist() == [10] * 10
    assert not set(split.labeled) & set(split.validation)
    assert len(split.unlabeled) == 400 and not set(split.unlabeled) & set(split.validation)
    assert set(split.labeled) <= set(split.unlabeled)


def test_supervised_labels_everything_but_validation():
    split = make_split(LABELS, -1, 0, num_validation=50)
    assert len(split.labeled) == 450 and np.array_equal(split.labeled, split.unlabeled)


@pytest.mark.parametrize(
    ("num_labeled", "num_validation", "message"),
    [(45, 0, "multiple of 10"), (0, 15, "num_validation=15"), (600, 0, "class 0 has 50")],
)
def test_impossible_splits_are_errors(num_labeled, num_validation, message):
    with pytest.raises(SplitError, match=message):
        make_split(LABELS, num_labeled, 0, num_validation=num_validation)


def test_save_load_identical(tmp_path):
    split = make_split(LABELS, 30, 7, num_validation=20, fingerprint="abc", dataset="toy")
    loaded = Split.load(split.save(tmp_path / "split.json"))
    assert np.array_equal(loaded.labeled, split.labeled)
    assert np.array_equal(loaded.validation, split.validation)
    assert np.array_equal(loaded.unlabeled, split.unlabeled)
    assert (loaded.fingerprint, loaded.seed, loaded.num_train) == ("abc", 7, 500)


def test_corrupt_split_file_is_a_clear_error(tmp_path):
    (tmp_path / "split.json").write_text("{not json")
    with pytest.raises(SplitError, match="not a valid split file"):
        Split.load(tmp_path / "split.json")


def _toy(labels=LABELS, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (len(labels), 1, 4, 4), dtype=torch.uint8, generator=g)
    return ImageDataset("toy", [str(i) for i in range(10)], x, torch.as_tensor(labels), x[:10],
                        torch.as_tensor(labels[:10]))  # fmt: skip


def test_fingerprint_mismatch_is_detected(tmp_path):
    ds, other = _toy(seed=0), _toy(seed=1)
    assert ds.fingerprint != other.fingerprint and ds.fingerprint == _toy(seed=0).fingerprint
    split = make_split(LABELS, 20, 0, fingerprint=ds.fingerprint)
    split.check(ds.fingerprint, 500)
    with pytest.raises(SplitError, match="fingerprint"):
        split.check(other.fingerprint, 500)


def test_run_folder_split_is_saved_and_reused(tmp_path):
    ds = _toy()
    first = resolve_split(DataConfig(num_labeled=20, split_seed=0), ds, tmp_path)
    assert (tmp_path / "split.json").is_file()
    # a resumed run with another seed in its config keeps the split already in its folder
    again = resolve_split(DataConfig(num_labeled=20, split_seed=5), ds, tmp_path)
    assert np.array_equal(first.labeled, again.labeled)
    # given again explicitly to a new run
    other_run = tmp_path / "run2"
    given = DataConfig(split_file=str(tmp_path / "split.json"), split_seed=9)
    assert np.array_equal(resolve_split(given, ds, other_run).labeled, first.labeled)
    with pytest.raises(SplitError, match="fingerprint"):
        resolve_split(given, _toy(seed=3), tmp_path / "run3")
