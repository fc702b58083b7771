"""Latent space Virtual Adversarial Training (Osada et al., ECCV 2020, Algorithm 2).

VAT in the latent space of a frozen generative model, the "transformer" (a VAE or a Glow):

1. Z = encode(X) (no gradient); d ~ N(0, I) shaped like Z; d <- xi * normalize(d).
2. g = grad_d KL(stopgrad p(X) || p(decode(Z + d))); repeat `power_iterations` times.
3. r = eps * normalize(g); X_adv = decode(Z + r).
4. L_lvat = KL(stopgrad p(X) || p(X_adv)).

The target is p(X) on the original X, never p(decode(encode(X))) (authors' code). A latent may be
one tensor (VAE: the encoder mean mu, (B, 128)) or a tuple of tensors, the "groups" (Glow: y and
all factored-out z). With latent_groups="separate" (authors) each group gets its own d, its own
normalisation and its own scaling to eps, so r has total norm eps * sqrt(n_groups); with "joint"
the groups are one vector of norm eps per sample.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lvat.regularizers.algorithm import VirtualAdversarial, virtual_adversarial
from lvat.regularizers.common import check_hparams, full_precision, perturbation_dtype

__all__ = ["LATENT_GROUPS", "LVAT", "Latent", "Transformer"]

Latent = Tensor | tuple[Tensor, ...]  # a latent: one group, or a tuple of groups
LATENT_GROUPS = ("separate", "joint")


@runtime_checkable
class Transformer(Protocol):
    """What LVAT needs from a generative model: any object with these two methods.

    `decode(encode(x))` should reconstruct x (approximately for a VAE, up to quantisation for
    Glow), and `decode` must be differentiable w.r.t. its input latent: g reaches d through it.
    """

    def encode(self, x: Tensor) -> Latent:
        """x (B, ...) -> latent: a tensor (B, ...) or a tuple of such tensors (the groups)."""
        ...

    def decode(self, z: Latent) -> Tensor:
        """Latent of the same structure as `encode` returns -> x (B, ...)."""
        ...


def _groups(z: Latent) -> list[Tensor]:
    """Latent -> list of groups."""
    if isinstance(z, Tensor):
        return [z]
    if isinstance(z, (tuple, list)) and z and all(isinstance(t, Tensor) for t in z):
        return list(z)
    raise TypeError(f"encode must return a tensor or a tuple of tensors, got {type(z).__name__}")


def _like(z: Latent, groups: list[Tensor]) -> Latent:
    """List of groups -> a latent with z's structure (tensor, tuple or list)."""
    if isinstance(z, Tensor):
        return groups[0]
    return list(groups) if isinstance(z, list) else tuple(groups)


class LVAT:
    """Latent-space VAT consistency cost: `LVAT(transformer, eps)(model, x)` -> 0-d loss tensor.

    Args:
        transformer: any object with `encode(x) -> latent` and `decode(latent) -> x` (see
            `Transformer`); a latent is a tensor or a tuple of tensors. If it is an `nn.Module`
            it is frozen here: eval mode and `requires_grad_(False)`; eval mode is re-asserted on
            every call. `encode` runs under `torch.no_grad()`; gradients flow through `decode` to
            d only.
        eps: L2 norm of r per sample in latent units (per group with "separate"). Paper: VAE 1.5
            (SVHN) / 1.0 (CIFAR-10), Glow 1.0.
        xi: norm of the finite-difference probe in latent space (authors: 1e-6).
        power_iterations: power-iteration passes (authors: 1).
        latent_groups: "separate" (authors: each group normalised and scaled to eps on its own) or
            "joint" (all groups one vector of norm eps).
        entropy_weight: weight of the entropy of p(x) added to the loss (0 = off).
        power_method: "finite-difference" (authors) or "exact" (`lvat.regularizers.exact`: no xi;
            for LVAT the curvature of the prediction at decode(encode(x)), without the
            first-order term that dominates the authors' finite difference).

    The classifier sees the same BatchNorm / dropout / float32 treatment as in `VAT`.
    """

    def __init__(
        self,
        transformer: Transformer,
        eps: float,
        xi: float = 1e-6,
        power_iterations: int = 1,
        latent_groups: str = "separate",
        entropy_weight: float = 0.0,
        power_method: str = "finite-difference",
    ) -> None:
        check_hparams(eps, xi, power_iterations, entropy_weight, power_method)
        if latent_groups not in LATENT_GROUPS:
            raise ValueError(f"latent_groups must be one of {LATENT_GROUPS}, got {latent_groups!r}")
        if not (
            callable(getattr(transformer, "encode", None))
            and callable(getattr(transformer, "decode", None))
        ):
            raise TypeError(
                "transformer must have encode(x) -> latent and decode(latent) -> x methods, "
                f"got {type(transformer).__name__}"
            )
        if isinstance(transformer, nn.Module):
            transformer.eval().requires_grad_(False)  # frozen: trained first, then reused (§5.2)
        self.transformer = transformer
        self.eps = float(eps)
        self.xi = float(xi)
        self.power_iterations = power_iterations
        self.latent_groups = latent_groups
        self.entropy_weight = float(entropy_weight)
        self.power_method = power_method

    def __repr__(self) -> str:
        return (
            f"LVAT({type(self.transformer).__name__}, eps={self.eps}, xi={self.xi}, "
            f"power_iterations={self.power_iterations}, latent_groups={self.latent_groups!r}, "
            f"entropy_weight={self.entropy_weight}, power_method={self.power_method!r})"
        )

    def _run(
        self, model: nn.Module, x: Tensor, with_loss: bool, z: Latent | None = None
    ) -> tuple[Latent, VirtualAdversarial]:
        t = self.transformer
        # A parent's .train() may have flipped it; checking the top-level flag is cheap.
        if isinstance(t, nn.Module) and t.training:
            t.eval()
        if z is None:
            # True float32 even under autocast: a bf16 Glow latent would not decode back to x.
            with torch.no_grad(), full_precision(x.device):
                z = t.encode(x.to(perturbation_dtype(x)) if x.is_floating_point() else x)
        # float32 latent maths even under autocast (docs/method.md §1.6); float64 stays float64.
        base = [g.detach().to(perturbation_dtype(g)) for g in _groups(z)]
        # A transformer that overflows on some images (a flow's couplings in float32) gives them
        # non-finite latents and the loss turns NaN; this stat says why (no host sync here).
        finite = torch.stack([g.flatten(1).isfinite().all(1) for g in base]).all(0)
        out = virtual_adversarial(
            model,
            x,
            base,
            lambda groups: t.decode(_like(z, groups)),
            eps=self.eps,
            xi=self.xi,
            power_iterations=self.power_iterations,
            joint=self.latent_groups == "joint",
            entropy_weight=self.entropy_weight,
            with_loss=with_loss,
            power_method=self.power_method,
        )
        if out.stats is not None:
            out.stats["nonfinite_latent"] = (~finite).float().mean()
            # A saturating decoder (Glow: `glow.REVERSE_BOUND`) flags the samples whose last
            # decode, x_adv's, ran away off the data manifold and was clamped.
            saturated = getattr(t, "last_saturated", None)
            if isinstance(saturated, Tensor) and saturated.shape[:1] == x.shape[:1]:
                out.stats["saturated_decode"] = saturated.float().mean()
        return z, out

    def perturbation(self, model: nn.Module, x: Tensor) -> Latent:
        """The latent perturbation r, with the structure of `transformer.encode(x)` (detached)."""
        z, out = self._run(model, x, with_loss=False)
        return _like(z, out.r)

    def adversarial_examples(self, model: nn.Module, x: Tensor) -> Tensor:
        """x_adv = decode(encode(x) + r) (detached)."""
        return self._run(model, x, with_loss=False)[1].x_adv

    def loss_and_stats(
        self, model: nn.Module, x: Tensor, z: Latent | None = None, **cached: object
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and detached 0-d stats "kl", "entropy", "adv_l2" (mean ||x_adv - x||_2).

        `z`: encode(x) computed beforehand (a latent cache); None encodes x now. Other cached
        keywords are ignored (`lvat.regularizers.Regularizer`).
        """
        out = self._run(model, x, with_loss=True, z=z)[1]
        return out.loss, out.stats

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        """L_lvat = KL(stopgrad p(x) || p(decode(encode(x) + r))) [+ entropy_weight * entropy]."""
        return self.loss_and_stats(model, x)[0]
