"""The registry of transformer kinds: every generative model LVAT can perturb and `lvat fit` trains.

A kind owns everything that differs between transformers: its model class (rebuilt from a
checkpoint's `hparams`), how a fit config and an image shape build it, its training loss terms,
its test metrics, its samples, its one-line summary and its display name. The rest of lvat looks a
kind up here by name - `lvat fit KIND`, a sweep's `[[fit]] kind`, `load_transformer` (the
checkpoint's `kind`), `lvat report` ("LVAT-" + display name), `lvat figures`, `lvat bench` - and
never tests a kind's name itself.

The built-in kinds, "vae" and "glow", are defined in `lvat.fit.setup` beside the rest of `lvat
fit` and registered on the first use of `KINDS`. A plugin adds one from outside the package::

    class ToyKind(TransformerKind):
        name, display, model, config = "toy", "Toy", ToyAutoencoder, ToyFitConfig
        terms = ("loss", "mse")

        def build(self, cfg, shape): return ToyAutoencoder(shape, cfg.model.latent_dim)
        def loss(self, model, x, cfg): mse = ...; return {"loss": mse, "mse": mse}
        def sample(self, model, n, cfg, generator): return model.decode(torch.randn(...))

    register_kind(ToyKind())  # then: lvat fit toy, --method.transformer runs/fit/DATA-toy/...
    unregister_kind("toy")    # undo (tests)

The model must have `encode(x) -> latent` and `decode(latent) -> x` (`lvat.regularizers.
Transformer`) and an `hparams` dict of constructor keywords (what `save_transformer` stores);
the fit config needs the sections and keys of the built-in ones (`data`, `train` as
`FitTrainConfig`, `seed`, `device`, `out`, `RESUME_FIXED`; `model` as it likes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lvat.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "KINDS",
    "TransformerKind",
    "kind_for_config",
    "kind_for_model",
    "kinds_text",
    "register_kind",
    "unregister_kind",
]


class TransformerKind:
    """One kind of transformer. Subclass it, set the class attributes, override the methods that
    raise NotImplementedError (and any other whose default does not fit), register an instance."""

    name: ClassVar[str] = ""  # `lvat fit NAME`, the `kind` of its checkpoints, rows "lvat-NAME"
    display: ClassVar[str] = ""  # in tables, figures and messages: "VAE", "Glow"
    model: ClassVar[type]  # the nn.Module class; a checkpoint rebuilds it as model(**hparams)
    config: ClassVar[type]  # its `lvat fit` config class
    help: ClassVar[str] = ""  # what `lvat fit --help` says it trains ("the VAE of LVAT-VAE ...")
    terms: ClassVar[tuple[str, ...]] = ("loss",)  # what `loss` returns; "loss" first
    divisible: ClassVar[str] = ""  # for `--help`: what H and W must be divisible by ("8")
    eps: ClassVar[float | None] = None  # LVAT's eps in this latent (paper), for `lvat bench`

    def build(self, cfg: Any, shape: tuple[int, int, int]) -> nn.Module:
        """A fresh model for images of `shape` (C, H, W), as the fit config `cfg` describes."""
        raise NotImplementedError

    def loss(self, model: nn.Module, x: torch.Tensor, cfg: Any) -> dict[str, torch.Tensor]:
        """Training loss terms of a batch of float images in [0, 1]: 0-d tensors named `terms`,
        "loss" the one minimised."""
        raise NotImplementedError

    def sample(
        self, model: nn.Module, n: int, cfg: Any, generator: torch.Generator
    ) -> torch.Tensor:
        """`n` model samples in [0, 1] (samples.png), drawing only from `generator`."""
        raise NotImplementedError

    def divisor(self, cfg: Any) -> int:
        """Image height and width must be multiples of this (1: any size)."""
        return 1

    def size_reason(self, cfg: Any) -> str:
        """Who needs that divisor, for the error message ("the VAE (three ...)")."""
        return f"the {self.display or self.name}"

    def initialize(
        self, model: nn.Module, x_train: torch.Tensor, cfg: Any, device: torch.device
    ) -> None:
        """Data-dependent initialisation before the first step of a fresh fit (not on resume);
        `x_train`: all uint8 training images (N, C, H, W) on the CPU. Default: none."""

    def reconstruct(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Deterministic Dec(Enc(x)): the reconstructions of grids, metrics and `lvat figures`."""
        return model.decode(model.encode(x))

    def test_metrics(
        self, model: nn.Module, x: torch.Tensor, recon: torch.Tensor, cfg: Any
    ) -> dict[str, torch.Tensor]:
        """Per-batch SUMS of the kind's test metrics (besides recon_mse and the non-finite decode
        rate, which every kind gets); `recon` = reconstruct(model, x). Default: the loss terms."""
        return {k: v * len(x) for k, v in self.loss(model, x, cfg).items()}

    def summary(self, results: dict) -> str:
        """The kind's part of the line `lvat fit` prints at the end (results.json's values)."""
        return f"test loss {results['test_loss']:.4g}, recon MSE {results['test_recon_mse']:.2e}"

    def __repr__(self) -> str:
        return f"<transformer kind {self.name!r} ({type(self).__name__})>"


KINDS: Registry[TransformerKind] = Registry("transformer kind", builtins="lvat.fit.setup")


def register_kind(kind: TransformerKind, *, replace: bool = False) -> TransformerKind:
    """Make `kind` known to `lvat fit`, `load_transformer`, sweeps, reports and figures."""
    if not isinstance(kind, TransformerKind):
        raise TypeError(f"register an instance of a TransformerKind subclass, got {kind!r}")
    return KINDS.register(kind, replace=replace)


def unregister_kind(name: str) -> TransformerKind:
    """Remove the kind `name` (the undo of `register_kind`)."""
    return KINDS.unregister(name)


def _match(obj: Any, attr: str) -> TransformerKind | None:
    kinds = KINDS.values()
    exact = [k for k in kinds if type(obj) is getattr(k, attr, None)]
    loose = [k for k in kinds if isinstance(obj, getattr(k, attr, ()))]
    return (exact or loose or [None])[0]


def kind_for_model(model: Any) -> TransformerKind:
    """The registered kind whose model class `model` is (exactly, else by subclass)."""
    kind = _match(model, "model")
    if kind is None:
        raise TypeError(f"not a registered transformer kind's model: {type(model).__name__}")
    return kind


def kind_for_config(cfg: Any) -> TransformerKind:
    """The registered kind whose fit config class `cfg` is."""
    kind = _match(cfg, "config")
    if kind is None:
        raise TypeError(f"not a fit config: {type(cfg).__name__}")
    return kind


def kinds_text(sep: str = " or ") -> str:
    """The display names of the registered kinds: "VAE or Glow"."""
    return sep.join(k.display or k.name for k in KINDS.values())
