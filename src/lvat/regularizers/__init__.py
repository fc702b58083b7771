"""Consistency regularizers: VAT (input space) and LVAT (latent space of a frozen transformer).

Usage in a training loop::

    reg = LVAT(vae, eps=1.5)  # or VAT(eps=2.5)
    loss = F.cross_entropy(model(x_l), y_l) + alpha * reg(model, x_ul)

Each regularizer is a thin class (`vat.py`, `lvat.py`) over one shared algorithm
(`algorithm.py`), pure functions (`common.py`, `exact.py`) and one context for how the
classifier is called inside (`passes.py`: BatchNorm, dropout, precision). The
methods `method.name` may name, and the `Regularizer` protocol they share, are in `registry.py`.
"""

from lvat.regularizers.algorithm import VirtualAdversarial, virtual_adversarial
from lvat.regularizers.common import (
    POWER_METHODS,
    RngSnapshot,
    entropy,
    frozen_bn_stats,
    full_precision,
    kl_divergence,
    normalize,
    normalize_groups,
    normalize_joint,
    power_iteration,
)
from lvat.regularizers.exact import exact_power_iteration, fisher_vector_product
from lvat.regularizers.lvat import LATENT_GROUPS, LVAT, Latent, Transformer
from lvat.regularizers.passes import UnlabeledPasses
from lvat.regularizers.registry import (
    METHODS,
    Method,
    Regularizer,
    method_key,
    method_label,
    register_method,
    unregister_method,
)
from lvat.regularizers.vat import VAT

__all__ = [
    "LATENT_GROUPS",
    "LVAT",
    "METHODS",
    "POWER_METHODS",
    "VAT",
    "Latent",
    "Method",
    "Regularizer",
    "RngSnapshot",
    "Transformer",
    "UnlabeledPasses",
    "VirtualAdversarial",
    "entropy",
    "exact_power_iteration",
    "fisher_vector_product",
    "frozen_bn_stats",
    "full_precision",
    "kl_divergence",
    "method_key",
    "method_label",
    "normalize",
    "normalize_groups",
    "normalize_joint",
    "power_iteration",
    "register_method",
    "unregister_method",
    "virtual_adversarial",
]
