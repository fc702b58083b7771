"""The exact power iteration: Hessian-vector products by forward-mode AD, no finite difference.

Algorithms 1/2 find the direction of largest curvature of the consistency cost by a power
iteration whose matrix-vector product is a finite difference: g = grad_d KL(p || q(base + xi d)),
which is xi * H d + O(xi^2) for VAT. At the authors' xi = 1e-6 a float32 probe is at rounding
level and g is mostly rounding noise (docs/numerics.md). This module computes the product the
finite difference approximates, exactly, with no xi:

    G v = J^T M J v,   M = blockdiag_i(diag q_i - q_i q_i^T) / B,

where J = d logits / d base is the Jacobian of the classifier's logits at the unperturbed point
with respect to the perturbation groups (VAT: the image; LVAT: the latent, through decode), q =
softmax(logits) there, and B the batch size (the cost is a batch mean). One forward pass carries
the tangent v (forward-mode AD gives J v next to the logits) and one backward pass applies J^T.

G is the Fisher information of the classifier's prediction, pulled back to the perturbation
space: the Hessian of KL(q(base) || q(base + r)) at r = 0.

- VAT: the unperturbed point is x and q = p(x), the target, so G is exactly the Hessian of the
  VAT cost KL(p(x) || p(x + r)) at r = 0 (its gradient is 0 there), wherever the network is twice
  differentiable. Exact mode is the xi -> 0 limit of the authors' finite difference.
- LVAT: the unperturbed point is decode(encode(x)), not x, so KL(p(x) || p(decode(z + r))) has a
  first-order term at r = 0 (the reconstruction changes the prediction): its gradient there is
  not 0 and does not depend on d. The authors' finite difference at xi = 1e-6 is dominated by that
  term, so their "power iteration" returns nearly the gradient direction, whatever d. Exact mode
  instead iterates with G at the reconstruction: the latent direction in which the classifier's
  prediction on decode(z + r) changes fastest, VAT's second-order criterion in latent space. The
  loss is unchanged: KL(p(x) || p(decode(z + r))) with the clean target p(x).

The caller keeps the conventions of the finite-difference path (BatchNorm with batch statistics
and frozen running statistics, one set of dropout masks for every pass of a call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from lvat.regularizers.common import normalize_groups

__all__ = ["exact_power_iteration", "fisher_vector_product", "matching_tangents"]


def _match_tangent(module: nn.Module, inputs: tuple, output: object) -> object:
    if not isinstance(output, Tensor):
        return None
    primal, tangent = fwAD.unpack_dual(output)
    if tangent is None or tangent.dtype == primal.dtype:
        return None
    return fwAD.make_dual(primal, tangent.to(primal.dtype))


@contextmanager
def matching_tangents(model: nn.Module) -> Iterator[None]:
    """Inside, every submodule's output tangent has its output's dtype.

    Under bf16 autocast, torch 2.13's forward-mode formula for batch norm returns a float32
    tangent beside a bf16 output (its weight is float32); the next autocast layer then meets
    mixed dtypes and fails. Casting the tangent back at each module output fixes it for any
    model; without autocast the hooks change nothing.
    """
    handles = [m.register_forward_hook(_match_tangent) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fisher_vector_product(
    logits_fn: Callable[[list[Tensor]], Tensor], v: Sequence[Tensor]
) -> list[Tensor]:
    """G v = J^T M J v at r = 0 (see the module docstring), one group per tensor, detached.

    Args:
        logits_fn: maps perturbation groups r to the classifier's logits (B, K) at the perturbed
            point (VAT: model(x + r); LVAT: model(decode(z + r))).
        v: the vector: groups shaped like r, each (B, ...), float32 or float64.

    Returns:
        G v as groups shaped like `v` (zeros for a group the logits do not depend on), in `v`'s
        dtypes, whatever precision `logits_fn` computes in.
    """
    with torch.enable_grad():
        primals = [torch.zeros_like(t).requires_grad_() for t in v]  # r = 0
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.detach()) for p, t in zip(primals, v, strict=True)]
            logits, jv = fwAD.unpack_dual(logits_fn(duals))  # (B, K) each
        if jv is None:  # the logits do not depend on the groups at all
            return [torch.zeros_like(p) for p in primals]
        dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
        q = F.softmax(logits.detach().to(dt), dim=1)
        jv = jv.detach().to(dt)
        u = q * jv - q * (q * jv).sum(dim=1, keepdim=True)  # (diag q - q q^T) J v, per sample
        grads = torch.autograd.grad(
            logits, primals, grad_outputs=(u / logits.shape[0]).to(logits.dtype), allow_unused=True
        )
    return [
        torch.zeros_like(p) if g is None else g.detach().to(p.dtype)
        for p, g in zip(primals, grads, strict=True)
    ]


def exact_power_iteration(
    logits_fn: Callable[[list[Tensor]], Tensor],
    d: Sequence[Tensor],
    power_iterations: int = 1,
    joint: bool = False,
) -> list[Tensor]:
    """`power_iterations` products g <- G normalize(g), starting from g = d (random normal).

    The counterpart of `common.power_iteration` without xi: it returns G d_hat where that returns
    ~xi G d_hat (VAT), so `eps * normalize(g)` is the same r in the limit xi -> 0.
    """
    g = list(d)
    for _ in range(power_iterations):
        g = fisher_vector_product(logits_fn, normalize_groups(g, joint))
    return g
