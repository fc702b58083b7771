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
and frozen running statistics, one set of dropout masks for every pass of a call). Inside
`forward_mode(model)`, BatchNorm layers that normalise with batch statistics compute their
tangent with the closed form of `_BatchNormWithTangent` (the same maths as PyTorch's formula, to
rounding, in a few fused passes instead of many: it was ~70 % of the exact product's time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lvat.regularizers.common import normalize_groups, replaced_forwards

__all__ = ["exact_power_iteration", "fisher_vector_product", "forward_mode", "matching_tangents"]


class _BatchNormWithTangent(torch.autograd.Function):
    """Batch norm with batch statistics and no running statistics, `(x, weight, bias, eps) ->
    (y, mean, invstd)`, with a closed-form tangent.

    With xhat = (x - mean) * invstd (per channel c, statistics over every other dim), the
    tangent of y = xhat * weight + bias along t is

        dy = weight * invstd * (t - mean_c(t) - xhat * mean_c(xhat * t))

    (differentiating mean and the biased variance). The backward is ATen's own.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple:
        return torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        x, weight, _, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(ctx, grad: Tensor, _mean: Tensor, _invstd: Tensor) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        grads = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, None, None, mean, invstd, True, ctx.eps, mask
        )
        return (*grads, None)

    @staticmethod
    def jvp(ctx, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, _teps: None) -> tuple:
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)  # per channel, broadcast over (B, C, ...)
        dims = [0, *range(2, x.dim())]
        # Full-size passes in x's dtype (bf16 under autocast); per-channel sums accumulate in
        # float32 (`_channel_mean`), the per-channel maths is float32 (float64 for float64).
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xhat = (x - mean.reshape(shape).to(x.dtype)) * invstd.reshape(shape).to(x.dtype)
        scale = torch.zeros_like(mean)  # coefficient of xhat
        shift = torch.zeros_like(mean)  # per-channel constant
        out = None
        if tx is not None:
            t = tx.to(x.dtype)
            a = invstd if weight is None else invstd * weight.to(acc)
            mean_t = _channel_mean(t, dims, acc)
            mean_xt = _channel_mean(xhat * t, dims, acc)
            scale, shift = -a * mean_xt, -a * mean_t
            out = t * a.reshape(shape).to(x.dtype)
        if tw is not None:
            scale = scale + tw.to(acc)
        if tb is not None:
            shift = shift + tb.to(acc)
        rest = torch.addcmul(
            shift.reshape(shape).to(x.dtype), xhat, scale.reshape(shape).to(x.dtype)
        )
        return (rest if out is None else out + rest), None, None


def _channel_mean(t: Tensor, dims: list[int], acc: torch.dtype) -> Tensor:
    """Per-channel mean in `acc`. A bf16 `t` is summed in its own dtype (ATen accumulates a bf16
    sum in float32; only the per-channel result is rounded to bf16): `mean(dtype=float32)` would
    first copy all of `t` to a fresh float32 tensor, as costly as the tangent pass itself."""
    if t.dtype == acc:
        return t.mean(dims, dtype=acc)
    return t.sum(dims).to(acc) / (t.numel() // t.shape[1])


def _batch_statistics_forward(bn: _BatchNorm) -> Callable[[Tensor], Tensor]:
    native = bn.forward

    def forward(x: Tensor) -> Tensor:
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        if not batch_stats or bn.track_running_stats:  # running stats read or updated: native
            return native(x)
        return _BatchNormWithTangent.apply(x, bn.weight, bn.bias, bn.eps)[0]

    return forward


@contextmanager
def forward_mode(model: nn.Module) -> Iterator[None]:
    """The context of the exact product's passes: `matching_tangents`, and BatchNorm layers that
    normalise with batch statistics (train mode; running statistics frozen by the caller) use
    `_BatchNormWithTangent`. SyncBatchNorm (cross-process statistics) keeps its own forward.

    `torch.compile`d code (`train.compile`: the classifier, a transformer's decode) runs eagerly
    inside: a compiled graph has no forward-mode AD (its autograd.Function implements no jvp, and
    a dual input fails), and the patched BatchNorm forwards would change its guards. The other
    passes of the step (labeled, adversarial) stay compiled."""
    bns = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
    ]
    patched = [(bn, _batch_statistics_forward(bn)) for bn in bns]
    with torch.compiler.set_stance("force_eager"), replaced_forwards(patched), matching_tangents():
        yield


def _match_tangent(module: nn.Module, inputs: tuple, output: object) -> object:
    if not isinstance(output, Tensor):
        return None
    primal, tangent = fwAD.unpack_dual(output)
    if tangent is None or tangent.dtype == primal.dtype:
        return None
    return fwAD.make_dual(primal, tangent.to(primal.dtype))


@contextmanager
def matching_tangents() -> Iterator[None]:
    """Inside, every module's output tangent has its output's dtype.

    Under bf16 autocast, torch 2.13's forward-mode formula for batch norm returns a float32
    tangent beside a bf16 output (its weight is float32); the next autocast layer then meets
    mixed dtypes and fails. Casting the tangent back at each module output fixes it for any
    model, the classifier and a transformer's decoder alike (a global module hook, removed on
    exit); without autocast the hook changes nothing.
    """
    handle = torch.nn.modules.module.register_module_forward_hook(_match_tangent)
    try:
        yield
    finally:
        handle.remove()


def fisher_vector_product(
    logits_fn: Callable[[list[Tensor]], Tensor],
    v: Sequence[Tensor],
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """G v = J^T M J v at r = 0 (see the module docstring), one group per tensor, detached.

    Args:
        logits_fn: maps perturbation groups r to the classifier's logits (B, K) at the perturbed
            point (VAT: model(x + r); LVAT: model(decode(z + r))).
        v: the vector: groups shaped like r, each (B, ...), float32 or float64.
        out: if given, the logits at r = 0 (detached, `logits_fn`'s precision) are appended to it:
            the product's forward pass is also a plain pass at the unperturbed point.

    Returns:
        G v as groups shaped like `v` (zeros for a group the logits do not depend on), in `v`'s
        dtypes, whatever precision `logits_fn` computes in.
    """
    with torch.enable_grad():
        primals = [torch.zeros_like(t).requires_grad_() for t in v]  # r = 0
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.detach()) for p, t in zip(primals, v, strict=True)]
            logits, jv = fwAD.unpack_dual(logits_fn(duals))  # (B, K) each
        if out is not None:
            out.append(logits.detach())
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
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """`power_iterations` products g <- G normalize(g), starting from g = d (random normal).

    The counterpart of `common.power_iteration` without xi: it returns G d_hat where that returns
    ~xi G d_hat (VAT), so `eps * normalize(g)` is the same r in the limit xi -> 0. `out`: as in
    `fisher_vector_product`, the logits at r = 0 of the first product.
    """
    g = list(d)
    for i in range(power_iterations):
        g = fisher_vector_product(logits_fn, normalize_groups(g, joint), out if i == 0 else None)
    return g
