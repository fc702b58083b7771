"""The baseline: VAT/LVAT the way popular PyTorch ports write it, for a side-by-side speedup.

What "naive" means here (each item is common in public VAT ports, e.g. TorchSSL/USB):

- data: a `DataLoader` over a `TensorDataset` of float32 CPU tensors (images scaled to [0, 1]
  with numpy on the host once), shuffled, copied to the device every step;
- float32, eager, no channels-last, the default (foreach) Adam;
- the perturbation normalised on the host in numpy (device -> host -> device twice a step);
- g from `kl.backward()`, which also fills every parameter's `.grad` (wasted weight-gradient
  work), then `model.zero_grad()`; BatchNorm running statistics updated by every pass;
- `loss.item()` every step for the progress meter (a host sync).

It computes the same thing as `lvat.regularizers` (the authors' normalisation, the same target
p(x), the same r), which tests/test_bench.py checks; only the way it is computed differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def host_normalize(d: Tensor) -> Tensor:
    """vat_tf `get_normalized_vector` in numpy on the host: d / max|d|, / sqrt(1e-6 + |d|^2)."""
    a = d.detach().cpu().numpy()  # a device -> host copy and sync
    axes = tuple(range(1, a.ndim))
    a = a / (1e-12 + np.abs(a).max(axis=axes, keepdims=True))
    a = a / np.sqrt(1e-6 + (a**2).sum(axis=axes, keepdims=True))
    return torch.from_numpy(a)


def kl_with_logits(q_logit: Tensor, p_logit: Tensor) -> Tensor:
    """KL(q || p) from logits, batch mean (the ports' `kl_div_with_logit`)."""
    q = F.softmax(q_logit, dim=1)
    return (q * (F.log_softmax(q_logit, dim=1) - F.log_softmax(p_logit, dim=1))).sum(1).mean()


def naive_consistency(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    xi: float = 1e-6,
    transformer: nn.Module | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """VAT (no transformer) or LVAT consistency cost and the perturbation r (one per group)."""
    device = x.device
    with torch.no_grad():
        logit_p = model(x)
        z = transformer.encode(x) if transformer is not None else x
    base = [z] if isinstance(z, Tensor) else list(z)

    def to_input(groups: Sequence[Tensor]) -> Tensor:
        if transformer is None:
            return groups[0]
        return transformer.decode(groups[0] if isinstance(z, Tensor) else tuple(groups))

    d = [torch.randn(b.shape) for b in base]  # drawn on the CPU, as `torch.Tensor(size).normal_()`
    d = [(xi * host_normalize(di)).to(device).requires_grad_() for di in d]
    kl = kl_with_logits(logit_p, model(to_input([b + di for b, di in zip(base, d, strict=True)])))
    kl.backward()  # also accumulates every parameter's .grad
    g = [di.grad for di in d]
    model.zero_grad()
    r = [(eps * host_normalize(gi)).to(device) for gi in g]
    with torch.no_grad():
        x_adv = to_input([b + ri for b, ri in zip(base, r, strict=True)])
    return kl_with_logits(logit_p, model(x_adv)), r


def _endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


class NaiveData:
    """Labeled and unlabeled float32 batches from two shuffled DataLoaders on the host."""

    def __init__(
        self,
        x_train: Tensor,
        y_train: Tensor,
        labeled: np.ndarray,
        unlabeled: np.ndarray,
        batch_labeled: int,
        batch_unlabeled: int,
        seed: int = 0,
    ) -> None:
        if len(labeled) < batch_labeled or len(unlabeled) < batch_unlabeled:
            raise ValueError("the naive baseline needs pools at least as large as the batches")
        x = torch.from_numpy(x_train.numpy().astype(np.float32) / 255.0)  # host-side scaling
        gen = torch.Generator().manual_seed(seed)
        lab, unl = torch.as_tensor(labeled), torch.as_tensor(unlabeled)
        self.labeled = _endless(
            DataLoader(
                TensorDataset(x[lab], y_train[lab]),
                batch_size=batch_labeled,
                shuffle=True,
                drop_last=True,
                generator=gen,
            )
        )
        self.unlabeled = _endless(
            DataLoader(
                TensorDataset(x[unl]),
                batch_size=batch_unlabeled,
                shuffle=True,
                drop_last=True,
                generator=gen,
            )
        )

    def next(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        x_l, y_l = next(self.labeled)
        (x_u,) = next(self.unlabeled)
        return x_l.to(device), y_l.to(device), x_u.to(device)


def naive_step_fn(
    model: nn.Module,
    data: NaiveData,
    device: torch.device,
    *,
    regularized: bool,
    eps: float,
    alpha: float = 1.0,
    transformer: nn.Module | None = None,
) -> Callable[[], float]:
    """A closure running one naive training step: cross-entropy only unless `regularized`, then
    plus the naive VAT cost, or LVAT's in the latent space of `transformer` when one is given."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        x_l, y_l, x_u = data.next(device)
        loss = F.cross_entropy(model(x_l), y_l)
        if regularized:
            reg, _ = naive_consistency(model, x_u, eps=eps, transformer=transformer)
            loss = loss + alpha * reg
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()  # the progress meter's per-step read-back

    return step
