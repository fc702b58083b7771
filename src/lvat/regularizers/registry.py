"""The registry of methods (what `method.name` may be) and the `Regularizer` protocol.

A method is a name plus how to build its regularizer from the run's `[method]` config. The
built-ins are "sup" (no regularizer: cross-entropy only), "vat" and "lvat". The rest of lvat -
the training loop, `lvat sweep`, `lvat report`, `lvat figures`, `lvat bench` - asks the `Method`
entry what it needs to know (does it regularize, does it need a transformer, its display name)
and never tests a method's name itself. A plugin adds one from outside the package::

    class NoiseConsistency:  # a `Regularizer`
        def __init__(self, eps): self.eps = eps
        def loss_and_stats(self, model, x, **cached):
            ...
            return loss, {"kl": loss.detach()}

    register_method(Method("noise", "Noise", build=lambda cfg, t: NoiseConsistency(cfg.eps)))
    # then: lvat train --method.name noise --method.eps 0.5 ...
    unregister_method("noise")  # undo (tests)

The `Regularizer` protocol, one signature for every method::

    loss, stats = regularizer.loss_and_stats(model, x, **cached)

- `loss`: the 0-d consistency cost on the unlabeled batch `x` (weighted by `method.alpha`).
- `stats`: an open dict of detached 0-d tensors. The training loop logs the keys of
  `lvat.train.step.STATS` ("kl", "entropy", "adv_l2", "zero_direction", "nonfinite_latent",
  "saturated_decode"); a key the regularizer does not report counts as 0 there, and keys outside
  that list are not logged.
- `cached`: values computed once before training and looked up per batch, by keyword. The rule:
  every regularizer accepts `**cached` and uses the keywords it knows, ignoring the others; a
  value of None means "not cached: compute it". Today there is one, `z`: encode(x) from the
  latent cache (`train.cache_latents`); LVAT takes it, VAT ignores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor, nn

from lvat.registry import Registry
from lvat.regularizers.lvat import LVAT
from lvat.regularizers.vat import VAT

if TYPE_CHECKING:
    from lvat.config import MethodConfig

__all__ = [
    "METHODS",
    "Method",
    "Regularizer",
    "method_key",
    "method_label",
    "register_method",
    "unregister_method",
]


@runtime_checkable
class Regularizer(Protocol):
    """What the training loop needs from a method's regularizer (see the module doc)."""

    def loss_and_stats(
        self, model: nn.Module, x: Tensor, **cached: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The consistency cost of `model` on the unlabeled batch `x`, and its stats."""
        ...


@dataclass(frozen=True)
class Method:
    """One method `method.name` can name.

    Attributes:
        name: the `method.name` value, saved in configs, checkpoints and results.json.
        display: its name in reports and figures ("VAT"); with a transformer, "-" and the kind's
            display name follow ("LVAT-VAE").
        build: `build(method_config, transformer) -> Regularizer`; `transformer` is the frozen
            model loaded from `method.transformer` when `needs_transformer`, else None. None
            here: the method has no regularizer (sup: cross-entropy only).
        needs_transformer: `method.transformer` must name a trained transformer checkpoint (`lvat
            fit`); report rows are then NAME-KIND ("lvat-vae"), and `train.cache_latents` applies.
        eps: its default eps (the paper's), for `lvat bench`; None: the transformer kind's `eps`
            (LVAT), or no eps (sup).
        adversarial: the regularizer also has `adversarial_examples(model, x) -> x_adv`, so `lvat
            figures` can draw the run; `method.eps` is then in input units unless
            `needs_transformer`.
        help: one line about the method.
    """

    name: str
    display: str
    build: Callable[[MethodConfig, nn.Module | None], Regularizer] | None = None
    needs_transformer: bool = False
    eps: float | None = None
    adversarial: bool = False
    help: str = ""

    @property
    def regularized(self) -> bool:
        """False for a method without a consistency cost (sup)."""
        return self.build is not None

    def default_eps(self, kind: str | None = None) -> float | None:
        """`eps`, or for a method with a transformer the kind's paper eps (None if unknown)."""
        if self.eps is not None or not self.needs_transformer or kind is None:
            return self.eps
        from lvat.models.registry import KINDS

        entry = KINDS.get(kind)
        return None if entry is None else entry.eps


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make `method` a valid `method.name` for `lvat train`, sweeps, reports and figures."""
    if not isinstance(method, Method):
        raise TypeError(f"register a lvat.regularizers.Method, got {method!r}")
    return METHODS.register(method, replace=replace)


def unregister_method(name: str) -> Method:
    """Remove the method `name` (the undo of `register_method`)."""
    return METHODS.unregister(name)


def _transformer_kind(method: Method | None, kind: str | None):
    if method is None or not method.needs_transformer or not kind:
        return None
    from lvat.models.registry import KINDS

    return KINDS.get(kind)


def method_key(name: str, kind: str | None = None) -> str:
    """A run's row key: `name`, or NAME-KIND for a method with a transformer of a registered
    kind ("lvat-vae"; the keys of the paper's Table 3). Unregistered names stay as they are."""
    method = METHODS.get(name)
    entry = _transformer_kind(method, kind)
    return f"{name}-{entry.name}" if entry is not None else name


def method_label(name: str, kind: str | None = None) -> str:
    """A run's display name: "VAT", "LVAT-VAE", "LVAT" (kind unknown); an unregistered method
    is shown by its name."""
    method = METHODS.get(name)
    if method is None:
        return name
    entry = _transformer_kind(method, kind)
    return method.display + (f"-{entry.display}" if entry is not None else "")


def _common(cfg: MethodConfig) -> dict[str, Any]:
    return dict(
        eps=cfg.eps,
        xi=cfg.xi,
        power_iterations=cfg.power_iterations,
        entropy_weight=cfg.entropy_weight,
        power_method=cfg.power_method,
    )


METHODS.register(Method("sup", "sup", help="cross-entropy on the labeled images only"))
METHODS.register(
    Method(
        "vat",
        "VAT",
        lambda cfg, transformer: VAT(**_common(cfg)),
        eps=2.5,  # SVHN (paper section 4)
        adversarial=True,
        help="virtual adversarial training in input space (Miyato et al.)",
    )
)
METHODS.register(
    Method(
        "lvat",
        "LVAT",
        lambda cfg, transformer: LVAT(transformer, latent_groups=cfg.latent_groups, **_common(cfg)),
        needs_transformer=True,
        adversarial=True,
        help="VAT in the latent space of a frozen transformer (Osada et al.)",
    )
)
