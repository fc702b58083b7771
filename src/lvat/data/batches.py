"""Batches on the training device: uint8 data resident there, augmented whole-batch, no workers.

Following cifar10-airbench: the dataset is small enough to live on the device as uint8, so a
batch is an index gather plus a few tensor ops, with no host round trip and no DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lvat.data.dataset import ImageDataset
from lvat.data.splits import Split


def augment(
    x: torch.Tensor, translate: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random translation by up to `translate` px (zero-pad, random crop) and horizontal flip.

    Args:
        x: (B, C, H, W) images of any dtype (uint8 here); returned with the same shape and dtype.
        translate: maximum shift in pixels along each axis.
        flip: flip each image left-right with probability 1/2.
        generator: source of randomness, on x's device (reproducible under a seed).
    """
    b, c, h, w = x.shape
    dev = x.device
    if translate > 0:
        p = translate
        padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p), zeros outside
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=dev)
        rows = (dy + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        chan = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[batch, chan, rows, cols]  # per-sample crop as one gather: (B, C, H, W)
    if flip:
        mirror = torch.rand(b, generator=generator, device=dev) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [0, 1] (docs/method.md §1.9: [0, 1], no ZCA)."""
    return x.float().div_(255)


class IndexStream:
    """Endless batches of indices from a pool, reshuffled every pass (epoch)."""

    def __init__(self, pool: torch.Tensor, batch_size: int, generator: torch.Generator):
        self.pool, self.batch_size, self.generator = pool, batch_size, generator
        self.order = pool[:0]
        self.pos = 0

    def next(self) -> torch.Tensor:
        while len(self.order) - self.pos < self.batch_size:  # a pool smaller than a batch wraps
            perm = torch.randperm(len(self.pool), generator=self.generator, device=self.pool.device)
            self.order = torch.cat([self.order[self.pos :], self.pool[perm]])
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"order": self.order.cpu(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order = state["order"].to(self.pool.device)
        self.pos = int(state["pos"])


@dataclass
class Batch:
    """One training step's images (float, [0, 1], on the device) and labels."""

    x_labeled: torch.Tensor  # (B_l, C, H, W)
    y_labeled: torch.Tensor  # (B_l,)
    x_unlabeled: torch.Tensor  # (B_u, C, H, W)
    idx_unlabeled: torch.Tensor | None = None  # (B_u,) indices into x_train (latent cache look-up)


class TrainBatches:
    """Endless labeled and unlabeled training batches, held and augmented on `device`.

    Labeled batches come from `split.labeled`, unlabeled ones from `split.unlabeled` (every
    training image not held out for validation). `state_dict()` captures the generator and both
    streams' positions, so a resumed run draws exactly the batches it would have drawn.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        split: Split,
        batch_labeled: int,
        batch_unlabeled: int,
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        augment: bool = False,
        translate: int = 2,
        flip: bool = False,
    ):
        if len(split.labeled) == 0:
            raise ValueError("the split has no labeled images")
        split.check(dataset.fingerprint, len(dataset.x_train))
        self.device = torch.device(device)
        self.x = dataset.x_train.to(self.device)  # uint8: 4x less memory than float
        self.y = dataset.y_train.to(self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.augment, self.translate, self.flip = augment, translate, flip
        to_dev = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long, device=self.device)  # noqa: E731
        self.labeled = IndexStream(to_dev(split.labeled), batch_labeled, self.generator)
        self.unlabeled = IndexStream(to_dev(split.unlabeled), batch_unlabeled, self.generator)

    def _images(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.x[idx]
        if self.augment:
            x = augment(x, self.translate, self.flip, self.generator)
        return to_float(x)

    def next(self) -> Batch:
        li, ui = self.labeled.next(), self.unlabeled.next()
        return Batch(self._images(li), self.y[li], self._images(ui), ui)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "labeled": self.labeled.state_dict(),
            "unlabeled": self.unlabeled.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])


def eval_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Test/validation batches in order, never augmented: (float images, labels) on `device`."""
    for i in range(0, len(x), batch_size):
        yield to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
