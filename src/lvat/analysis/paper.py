"""The paper's Table 3 (Osada et al., ECCV 2020) as data: test error in %, lower is better.

Copied exactly from docs/method.md §7.1. SSL cells use 1,000 labels (SVHN) and 4,000 (CIFAR-10);
SL cells use every training label. The VAT row is the LVAT paper's own VAT runs, not the
VAT paper's numbers. Nothing else in the package depends on these values: they are the
reference column of `lvat report`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "DATASET_LABELS",
    "METHOD_LABELS",
    "PAPER_DATASETS",
    "PAPER_LABELS",
    "PAPER_METHODS",
    "TABLE3",
    "Cell",
    "paper_cells",
    "paper_error",
]


class Cell(NamedTuple):
    """One column of Table 3 for one method: which method, data and training setting."""

    method: str  # sup | vat | lvat-vae | lvat-glow | lvat (transformer kind unknown)
    dataset: str  # a dataset name as in results.json: svhn, cifar10, fashion-mnist, ...
    aug: bool  # augmented training batches (paper section 5.1)
    setting: str  # "SSL" (a labeled subset) or "SL" (every training label)


PAPER_METHODS = ("vat", "lvat-vae", "lvat-glow")
PAPER_DATASETS = ("svhn", "cifar10")
PAPER_LABELS = {"svhn": 1000, "cifar10": 4000}  # labeled images of the paper's SSL cells

METHOD_LABELS = {
    "sup": "sup",
    "vat": "VAT",
    "lvat-vae": "LVAT-VAE",
    "lvat-glow": "LVAT-Glow",
    "lvat": "LVAT",
}
DATASET_LABELS = {"svhn": "SVHN", "cifar10": "C10", "fashion-mnist": "F-MNIST", "mnist": "MNIST"}

# Column order of Table 3: (dataset, aug, setting).
_COLUMNS = (
    ("svhn", False, "SSL"),
    ("svhn", False, "SL"),
    ("svhn", True, "SSL"),
    ("svhn", True, "SL"),
    ("cifar10", False, "SSL"),
    ("cifar10", False, "SL"),
    ("cifar10", True, "SSL"),
    ("cifar10", True, "SL"),
)
_ROWS = {
    "vat": (5.77, 2.34, 5.42, 2.22, 16.92, 8.175, 11.36, 5.81),
    "lvat-vae": (4.44, 2.26, 4.20, 2.02, 13.90, 8.05, 14.64, 6.54),
    "lvat-glow": (4.20, 2.23, 3.83, 2.13, 9.94, 5.24, 7.34, 3.94),
}

TABLE3: dict[Cell, float] = {
    Cell(method, *column): error
    for method, errors in _ROWS.items()
    for column, error in zip(_COLUMNS, errors, strict=True)
}


def paper_error(cell: Cell, num_labeled: int | None = None) -> float | None:
    """The paper's error for `cell`, or None if the paper has no such cell.

    An SSL cell only matches when `num_labeled` is the paper's label count (or not given):
    250 SVHN labels are not comparable with the paper's 1,000.
    """
    ssl = cell.setting == "SSL" and num_labeled is not None
    if ssl and PAPER_LABELS.get(cell.dataset) != num_labeled:
        return None
    return TABLE3.get(cell)


def paper_cells(datasets: set[str] | None = None) -> list[Cell]:
    """Table 3's cells in table order, optionally only for some datasets."""
    return [c for c in TABLE3 if datasets is None or c.dataset in datasets]
