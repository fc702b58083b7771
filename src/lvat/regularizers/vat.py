"""Virtual Adversarial Training (Miyato et al., 2018; LVAT paper Algorithm 1).

For an unlabeled batch X and a classifier f with p = softmax(f(X)):

1. d ~ N(0, I) shaped like X; d <- xi * normalize(d).
2. g = grad_d KL(stopgrad p(X) || p(X + d)); repeat `power_iterations` times with
   d <- xi * normalize(g).
3. r_vat = eps * normalize(g).
4. L_vat = KL(stopgrad p(X) || p(X + r_vat)).

The algorithm itself is `algorithm.virtual_adversarial`, shared with LVAT: VAT is it with one
perturbation group (X itself) and the identity map to the classifier's input. `VAT` is a thin
class over it.
"""

from __future__ import annotations

from torch import Tensor, nn

from lvat.regularizers.algorithm import VirtualAdversarial, virtual_adversarial
from lvat.regularizers.common import check_hparams, perturbation_dtype

__all__ = ["VAT", "VirtualAdversarial", "virtual_adversarial"]


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
        base_is_input=True,
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
    are the finite difference's target and probe passes; the adversarial pass follows the
    caller's autocast, and so do all the exact mode's passes (its first product's forward pass,
    at x itself, is the target pass).
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
