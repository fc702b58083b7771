"""The algorithm VAT and LVAT share (paper Algorithms 1 and 2), over "perturbation groups".

VAT perturbs the image (one group, identity map to the classifier's input); LVAT perturbs the
latent groups of a frozen transformer and maps them to the input with its decoder. Everything
about how the classifier is called (BatchNorm, dropout, precision) is in `UnlabeledPasses`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lvat.regularizers.common import (
    entropy,
    kl_divergence,
    normalize_groups,
    perturbation_dtype,
    power_iteration,
    zero_direction,
)
from lvat.regularizers.exact import exact_power_iteration, forward_mode
from lvat.regularizers.passes import UnlabeledPasses

__all__ = ["VirtualAdversarial", "virtual_adversarial"]


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
    base_is_input: bool = False,
) -> VirtualAdversarial:
    """Virtual adversarial perturbation of `base` and, optionally, the consistency cost.

    Args:
        model: classifier, x -> logits (B, K); its mode (train/eval) is left as the caller set it.
        x: the original batch (B, ...); the clean target is always p(x), never p(to_input(base)).
        base: the point to perturb, as groups in float32/float64, detached (VAT: [x]; LVAT: the
            latent groups of encode(x)).
        to_input: maps perturbed groups to the classifier input (VAT: identity; LVAT: decode); it
            runs in true float32, before each pass's dropout restore (its random draws do not
            shift the masks).
        eps: norm of r per sample (per group unless `joint`).
        xi: norm of the finite-difference probe (unused by the exact power method).
        power_iterations: passes of the power iteration.
        joint: normalise all groups as one vector per sample.
        entropy_weight: weight of the mean entropy of p(x) added to the loss (VAT+Ent); it keeps
            its gradient through the clean pass.
        with_loss: also run the adversarial pass and return loss and stats.
        power_method: "finite-difference" (the authors: a probe of norm xi, in true float32) or
            "exact" (`lvat.regularizers.exact`: Fisher-vector products, no xi, in the caller's
            precision; the clean pass too).
        base_is_input: `to_input(base)` is `x` itself (VAT): the exact mode then takes the clean
            logits from its first product's forward pass at r = 0 instead of a pass of its own.
    """
    base = [b.detach() for b in base]

    def moved(r: Sequence[Tensor]) -> Tensor:  # the classifier input at base + r
        return to_input([b + ri for b, ri in zip(base, r, strict=True)])

    # 1. random d, drawn before the masks are fixed; in float32 whatever the base's precision, so
    # that a float64 reference (`lvat diagnose`) sees the same d as a float32 run of the same seed
    d = [torch.randn_like(b, dtype=torch.float32).to(b.dtype) for b in base]
    exact = power_method == "exact"
    keep_graph = with_loss and entropy_weight > 0  # VAT+Ent: the clean pass keeps its graph
    with UnlabeledPasses(model, x.device) as classify:
        # The clean pass, p(x): in true float32 for the finite difference, whose probe is compared
        # with it at rounding level; in the caller's precision for the exact mode (no xi), whose
        # first product for VAT runs at r = 0, at x itself, so its forward pass is the clean pass.
        clean_logits = None
        if not (exact and base_is_input and not keep_graph):
            grad_mode = contextlib.nullcontext() if keep_graph else torch.no_grad()
            with contextlib.nullcontext() if exact else classify.precise(), grad_mode:
                clean_logits = classify(x.to(perturbation_dtype(x)) if x.is_floating_point() else x)
        if exact:  # 2. g = G d_hat, exactly, in the caller's precision
            at_zero: list[Tensor] = []  # the logits at r = 0
            with forward_mode(model):
                g = exact_power_iteration(
                    lambda r: classify(_precise(classify, moved, r)),
                    d,
                    power_iterations,
                    joint,
                    out=at_zero,
                )
            clean_logits = at_zero[0] if clean_logits is None else clean_logits
        target = clean_logits.detach()  # p(x), a constant
        if not exact:  # 2. g = grad_d KL(p(x) || p(base + xi d_hat)), in true float32
            with classify.precise():
                g = power_iteration(
                    lambda r: classify(moved(r)), target, d, xi, power_iterations, joint
                )
        with classify.precise(), torch.no_grad():
            r = [eps * n for n in normalize_groups(g, joint)]  # 3. r = eps normalize(g)
            x_adv = moved(r)
        if not with_loss:
            return VirtualAdversarial(r, x_adv, None, None)
        kl = kl_divergence(target, classify(x_adv))  # 4. KL(p(x) || p(x_adv))
    ent = entropy(clean_logits)
    loss = kl + entropy_weight * ent if entropy_weight > 0 else kl
    return VirtualAdversarial(r, x_adv, loss, _stats(x, x_adv, r, eps, kl, ent))


def _precise(
    classify: UnlabeledPasses, moved: Callable[[Sequence[Tensor]], Tensor], r: Sequence[Tensor]
) -> Tensor:
    # Decode in true float32, the classifier then runs as the caller's: a bf16 decoder's tangent
    # and backward lose much more of the direction than a bf16 classifier (docs/numerics.md §4).
    with classify.precise():
        return moved(r)


def _stats(
    x: Tensor, x_adv: Tensor, r: list[Tensor], eps: float, kl: Tensor, ent: Tensor
) -> dict[str, Tensor]:
    with torch.no_grad():
        dt = perturbation_dtype(x_adv)
        adv_l2 = torch.linalg.vector_norm(
            (x_adv.to(dt) - x.to(dt)).reshape(x.shape[0], -1), dim=1
        ).mean()
    return {
        "kl": kl.detach(),
        "entropy": ent.detach(),
        "adv_l2": adv_l2,  # mean ||x_adv - x||_2 in input space
        "zero_direction": zero_direction(r, eps),  # r vanished: no regularization there
    }
