"""Virtual Adversarial Training (Miyato et al., 2018; LVAT paper Algorithm 1).

For an unlabeled batch X and a classifier f with p = softmax(f(X)):

1. d ~ N(0, I) shaped like X; d <- xi * normalize(d).
2. g = grad_d KL(stopgrad p(X) || p(X + d)); repeat `power_iterations` times with
   d <- xi * normalize(g).
3. r_vat = eps * normalize(g).
4. L_vat = KL(stopgrad p(X) || p(X + r_vat)).

`virtual_adversarial` below is the algorithm over any "perturbation groups" and a map from the
perturbed groups to the classifier's input; VAT uses one group (X itself, identity map), LVAT
(`lvat.py`) the latent groups of a frozen transformer and its decoder. `VAT` is a thin class
over it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lvat.regularizers.common import (
    RngSnapshot,
    check_hparams,
    entropy,
    frozen_bn_stats,
    full_precision,
    kl_divergence,
    normalize_groups,
    perturbation_dtype,
    power_iteration,
    zero_direction,
)
from lvat.regularizers.exact import exact_power_iteration, matching_tangents

__all__ = ["VAT", "VirtualAdversarial", "virtual_adversarial"]


class VirtualAdversarial(NamedTuple):
    """What one regularizer call computes. `loss` and `stats` are None when not asked for."""

    r: list[Tensor]  # adversarial perturbation, one tensor per group, each of norm ~eps per sample
    x_adv: Tensor  # classifier input at the adversarial point (detached)
    loss: Tensor | None  # KL(p(x) || p(x_adv)) [+ entropy_weight * entropy(p(x))], 0-d
    # detached 0-d tensors: "kl", "entropy", "adv_l2", "zero_direction" (`common.zero_direction`)
    stats: dict[str, Tensor] | None


def virtual_adversarial(
    model: nn.Module,
    x: Tensor,
    base: Sequence[Tensor],
    to_input: Callable[[list[Tensor]], Tensor],
    *,
    eps: float,
    xi: float = 1e-6,
    power_iterations: int = 1,
    joint: bool = False,
    entropy_weight: float = 0.0,
    with_loss: bool = True,
    power_method: str = "finite-difference",
) -> VirtualAdversarial:
    """Virtual adversarial perturbation of `base` and, optionally, the consistency cost.

    The classifier runs on: x (clean target), to_input(base + xi*d) (`power_iterations` times)
    and to_input(base + r) (only if `with_loss`). All these passes share one set of dropout masks
    and use batch statistics, running stats untouched (docs/method.md §1.7). Under autocast
    only the last classifier pass (the one the loss's parameter gradients come from) runs in
    reduced precision; the others, and `to_input`, run in true float32 (`full_precision`).

    Args:
        model: classifier, x -> logits (B, K); its mode (train/eval) is left as the caller set it.
        x: the original batch (B, ...); the clean target is always p(x).
        base: the point to perturb, as groups in float32/float64, detached (VAT: [x]; LVAT: the
            latent groups of encode(x)).
        to_input: maps perturbed groups to the classifier input (VAT: identity; LVAT: decode).
            It runs before the RNG restore of each pass, so random numbers it draws do not shift
            the classifier's dropout masks.
        eps: norm of r per sample (per group unless `joint`).
        xi: norm of the finite-difference probe d.
        power_iterations: passes of the power iteration.
        joint: normalise all groups as one vector per sample.
        entropy_weight: weight of the mean entropy of p(x) added to the loss (VAT+Ent); it keeps
            its gradient through the clean pass.
        with_loss: also run the adversarial pass and return loss and stats.
        power_method: "finite-difference" (Algorithms 1/2 as the authors: a probe of norm xi,
            in true float32) or "exact" (`lvat.regularizers.exact`: Fisher-vector products by
            forward-mode AD, no xi; the classifier runs in the caller's precision, `to_input` in
            true float32).
    """
    base = [b.detach() for b in base]
    with frozen_bn_stats(model):
        # All random d first, then the snapshot: every classifier pass below starts from it.
        d = [torch.randn_like(b) for b in base]
        rng = RngSnapshot(x.device)

        def forward(x_in: Tensor) -> Tensor:
            rng.restore()
            return model(x_in)

        # Target, probes and x_adv in true float32 (`full_precision`: a bf16/TF32 probe rounds
        # away and g == 0); only the adversarial pass below runs in the caller's precision.
        with full_precision(x.device):
            # VAT+Ent needs the clean pass's graph; the target needs none (docs/method.md §1.7).
            keep_graph = with_loss and entropy_weight > 0
            # The same dtype as the probes' inputs (a bf16 x would meet float32 weights here).
            x_clean = x.to(perturbation_dtype(x)) if x.is_floating_point() else x
            with contextlib.nullcontext() if keep_graph else torch.no_grad():
                clean_logits = forward(x_clean)
            target = clean_logits.detach()

            if power_method != "exact":
                g = power_iteration(
                    lambda ds: forward(to_input([b + di for b, di in zip(base, ds, strict=True)])),
                    target,
                    d,
                    xi,
                    power_iterations,
                    joint,
                )
        if power_method == "exact":

            def probe_logits(ds: list[Tensor]) -> Tensor:
                with full_precision(x.device):  # decode in float32; the classifier as the caller
                    x_in = to_input([b + di for b, di in zip(base, ds, strict=True)])
                return forward(x_in)

            with matching_tangents(model):
                g = exact_power_iteration(probe_logits, d, power_iterations, joint)
        with full_precision(x.device):
            r = [eps * n for n in normalize_groups(g, joint)]
            with torch.no_grad():  # r is a constant: x_adv carries no graph
                x_adv = to_input([b + ri for b, ri in zip(base, r, strict=True)])
        if not with_loss:
            return VirtualAdversarial(r, x_adv, None, None)

        kl = kl_divergence(target, forward(x_adv))
    ent = entropy(clean_logits)
    loss = kl + entropy_weight * ent if entropy_weight > 0 else kl
    with torch.no_grad():
        dt = perturbation_dtype(x_adv)
        adv_l2 = torch.linalg.vector_norm(
            (x_adv.to(dt) - x.to(dt)).reshape(x.shape[0], -1), dim=1
        ).mean()
    stats = {
        "kl": kl.detach(),
        "entropy": ent.detach(),
        "adv_l2": adv_l2,
        "zero_direction": zero_direction(r, eps),  # r vanished: no regularization there
    }
    return VirtualAdversarial(r, x_adv, loss, stats)


def _vat(model: nn.Module, x: Tensor, vat: VAT, with_loss: bool) -> VirtualAdversarial:
    base = x.detach().to(perturbation_dtype(x))  # float32 even under autocast (docs/method.md §1.6)
    return virtual_adversarial(
        model,
        x,
        [base],
        lambda groups: groups[0],
        eps=vat.eps,
        xi=vat.xi,
        power_iterations=vat.power_iterations,
        entropy_weight=vat.entropy_weight,
        with_loss=with_loss,
        power_method=vat.power_method,
    )


class VAT:
    """Input-space VAT consistency cost: `VAT(eps)(model, x)` -> 0-d loss tensor.

    Args:
        eps: L2 norm of the adversarial perturbation r per sample, in input units (the paper uses
            2.5–10 for images in [0, 1]).
        xi: norm of the finite-difference probe (authors: 1e-6). In float32 a 1e-6 probe spread
            over a 32x32x3 image in [0, 1] is at rounding level, so g is mostly rounding noise
            (still within the span of the logit gradients); 1e-4 to 1e-2 gives the true
            first-order direction. The default stays faithful to the authors.
        power_iterations: power-iteration passes (authors: 1).
        entropy_weight: weight of the entropy of p(x) added to the loss (VAT+Ent; 0 = off).
        power_method: "finite-difference" (authors) or "exact": Hessian-vector products by
            forward-mode AD (`lvat.regularizers.exact`), no xi, exact in any precision.

    The model is called in whatever mode the caller set (train mode in training); BatchNorm running
    statistics are never updated by these calls and the passes of one call share dropout masks.
    The perturbation maths is float32 (float64 for float64 inputs), also under autocast, and so
    are the target and probe passes; only the adversarial pass follows the caller's autocast.
    """

    def __init__(
        self,
        eps: float,
        xi: float = 1e-6,
        power_iterations: int = 1,
        entropy_weight: float = 0.0,
        power_method: str = "finite-difference",
    ) -> None:
        check_hparams(eps, xi, power_iterations, entropy_weight, power_method)
        self.eps = float(eps)
        self.xi = float(xi)
        self.power_iterations = power_iterations
        self.entropy_weight = float(entropy_weight)
        self.power_method = power_method

    def __repr__(self) -> str:
        return (
            f"VAT(eps={self.eps}, xi={self.xi}, power_iterations={self.power_iterations}, "
            f"entropy_weight={self.entropy_weight}, power_method={self.power_method!r})"
        )

    def perturbation(self, model: nn.Module, x: Tensor) -> Tensor:
        """The adversarial perturbation r_vat (shaped like x, float32/float64, detached)."""
        return _vat(model, x, self, with_loss=False).r[0]

    def adversarial_examples(self, model: nn.Module, x: Tensor) -> Tensor:
        """x + r_vat (float32/float64, detached)."""
        return _vat(model, x, self, with_loss=False).x_adv

    def loss_and_stats(
        self, model: nn.Module, x: Tensor, **cached: object
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss and detached 0-d stats "kl", "entropy", "adv_l2" (mean ||x_adv - x||_2).

        `cached`: precomputed inputs of other regularizers (e.g. LVAT's `z`); VAT uses none and
        ignores them (`lvat.regularizers.Regularizer`).
        """
        out = _vat(model, x, self, with_loss=True)
        return out.loss, out.stats

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        """L_vat = KL(stopgrad p(x) || p(x + r_vat)) [+ entropy_weight * entropy(p(x))]."""
        return self.loss_and_stats(model, x)[0]
