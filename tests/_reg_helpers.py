"""Tiny models, toy transformers and recorders shared by test_vat.py and test_lvat.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def mlp(
    dim: int = 6, hidden: int = 16, classes: int = 3, bn: bool = False, p: float = 0.0
) -> nn.Module:
    """Linear -> [BN1d] -> Softplus -> [Dropout] -> Linear (Softplus > 0: zeros are dropout)."""
    layers: list[nn.Module] = [nn.Linear(dim, hidden)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.Softplus())
    if p > 0:
        layers.append(nn.Dropout(p))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


def cnn(channels: int = 2, classes: int = 3, bn: bool = True, p: float = 0.0) -> nn.Module:
    """Conv -> [BN2d] -> Softplus -> [Dropout] -> flatten -> Linear -> [BN1d] -> Tanh -> Linear."""
    layers: list[nn.Module] = [nn.Conv2d(channels, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers.append(nn.Softplus())
    if p > 0:
        layers.append(nn.Dropout(p))
    layers += [nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, classes)]
    return nn.Sequential(*layers)


# A finite-difference probe well above float32 rounding, for tests of what r is (its norm, its
# structure, that it is non-zero). At the authors' xi = 1e-6 a float32 probe is at rounding
# level: on some CPUs (kernel paths) p(x + xi*d) == p(x) bit for bit for a sample, its g is
# exactly 0 and so is its r. That is the method's float32 behaviour, not what these tests check.
XI = 1e-3


def sample_norms(t: Tensor) -> Tensor:
    """Per-sample L2 norm over all non-batch elements, (B,)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1).double(), dim=1)


def authors_norm(t: Tensor, eps: float) -> Tensor:
    """Exact norm of eps * normalize(g) for any g parallel to t: eps * s / sqrt(1e-6 + s^2)."""
    s = sample_norms(t) / t.reshape(t.shape[0], -1).abs().amax(dim=1).double()
    return eps * s / torch.sqrt(1e-6 + s**2)


def buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of all buffers (BN running_mean, running_var, num_batches_tracked)."""
    return {k: v.clone() for k, v in model.named_buffers()}


class DropoutRecorder:
    """Records, for every forward of every nn.Dropout in a model, which elements it zeroed."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: list[Tensor] = []
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        assert (inputs[0] != 0).all(), "the recorder needs non-zero dropout inputs"
        self.masks.append((output == 0).detach().clone())


class TupleTransformer(nn.Module):
    """Toy transformer with a two-group latent: x (B, 6) -> (a (B, 3), b (B, 2, 2, 2)).

    decode is nonlinear, so the KL gradient depends on where in latent space it is taken. A dropout
    layer in decode makes decode random if the transformer were left in train mode.
    """

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.enc_a, self.enc_b = nn.Linear(dim, 3), nn.Linear(dim, 8)
        self.dec = nn.Linear(11, dim)
        self.drop = nn.Dropout(0.5)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.enc_a(x), self.enc_b(x).reshape(-1, 2, 2, 2)

    def decode(self, z: tuple[Tensor, Tensor]) -> Tensor:
        a, b = z
        return torch.tanh(self.drop(self.dec(torch.cat([a, b.flatten(1)], dim=1))))
