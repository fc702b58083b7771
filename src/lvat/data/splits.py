"""Labeled / validation / unlabeled index sets: class-balanced, seeded, saved with a fingerprint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvat.errors import SplitError
from lvat.io import atomic_write_text

SPLIT_FORMAT = 1


@dataclass(frozen=True, eq=False)
class Split:
    """Indices into the training set. Unlabeled = every training image not held out."""

    labeled: np.ndarray  # sorted int64
    validation: np.ndarray  # sorted int64, disjoint from labeled
    num_train: int
    fingerprint: str  # ImageDataset.fingerprint of the data the indices refer to
    seed: int
    dataset: str = ""

    @property
    def unlabeled(self) -> np.ndarray:
        """All training indices except the validation hold-out (labels are ignored there)."""
        keep = np.ones(self.num_train, dtype=bool)
        keep[self.validation] = False
        return np.flatnonzero(keep)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": SPLIT_FORMAT,
                "dataset": self.dataset,
                "fingerprint": self.fingerprint,
                "num_train": self.num_train,
                "seed": self.seed,
                "num_labeled": len(self.labeled),
                "num_validation": len(self.validation),
                "labeled": self.labeled.tolist(),
                "validation": self.validation.tolist(),
            }
        )

    def save(self, path: str | Path) -> Path:
        """Write split.json atomically."""
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != SPLIT_FORMAT:
                raise ValueError(f"unsupported format {d.get('format')!r}")
            split = cls(
                labeled=np.asarray(d["labeled"], dtype=np.int64),
                validation=np.asarray(d["validation"], dtype=np.int64),
                num_train=int(d["num_train"]),
                fingerprint=str(d["fingerprint"]),
                seed=int(d["seed"]),
                dataset=str(d.get("dataset", "")),
            )
        except FileNotFoundError:
            raise SplitError(f"split file not found: {path}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SplitError(f"{path}: not a valid split file ({exc})") from None
        every = np.concatenate([split.labeled, split.validation])
        if len(every) and (every.min() < 0 or every.max() >= split.num_train):
            raise SplitError(f"{path}: indices outside 0..{split.num_train - 1}")
        if len(np.intersect1d(split.labeled, split.validation)):
            raise SplitError(f"{path}: labeled and validation indices overlap")
        return split

    def check(self, fingerprint: str, num_train: int, where: str = "split") -> None:
        """Raise SplitError unless this split belongs to the dataset with `fingerprint`."""
        if fingerprint != self.fingerprint or num_train != self.num_train:
            raise SplitError(
                f"{where} was drawn for dataset {self.dataset or '?'} with fingerprint "
                f"{self.fingerprint} ({self.num_train} images), but the loaded data has "
                f"{fingerprint} ({num_train} images); use the same dataset and data.pad_to, "
                f"or draw a new split (remove data.split_file)"
            )


def make_split(
    labels: np.ndarray,
    num_labeled: int,
    seed: int,
    *,
    num_validation: int = 0,
    num_classes: int | None = None,
    fingerprint: str = "",
    dataset: str = "",
) -> Split:
    """Draw a class-balanced labeled subset (and validation hold-out) with a seed.

    Args:
        labels: training labels (N,).
        num_labeled: labeled images, a multiple of the class count; -1 labels every training image
            that is not held out (supervised learning).
        seed: the label seed; same seed, same indices (numpy PCG64, stable across versions).
        num_validation: images held out, also class-balanced (a multiple of the class count).
    """
    labels = np.asarray(labels)
    k = num_classes or int(labels.max()) + 1
    for what, n in (("num_labeled", num_labeled), ("num_validation", num_validation)):
        if n > 0 and n % k:
            raise SplitError(
                f"data.{what}={n} cannot be class-balanced over {k} classes; use a multiple of {k}"
            )
    if num_labeled < -1 or num_validation < 0:
        raise SplitError("data.num_labeled must be >= -1 and data.num_validation >= 0")
    rng = np.random.default_rng(seed)
    val_per, lab_per = num_validation // k, max(num_labeled, 0) // k
    labeled, validation = [], []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        need = val_per + (lab_per if num_labeled != -1 else 0)
        if len(idx) < need:
            raise SplitError(
                f"class {c} has {len(idx)} training images but {need} are needed "
                f"({lab_per} labeled + {val_per} validation per class); ask for fewer"
            )
        perm = rng.permutation(idx)
        validation.append(perm[:val_per])
        labeled.append(perm[val_per:] if num_labeled == -1 else perm[val_per : val_per + lab_per])
    return Split(
        labeled=np.sort(np.concatenate(labeled)).astype(np.int64),
        validation=np.sort(np.concatenate(validation)).astype(np.int64),
        num_train=len(labels),
        fingerprint=fingerprint,
        seed=seed,
        dataset=dataset,
    )
