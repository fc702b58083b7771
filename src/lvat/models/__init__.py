"""Models: classifiers (by name from `CLASSIFIERS`) and the generative transformers of LVAT."""

from lvat.models.classifiers import (
    CLASSIFIERS,
    ConvLarge,
    ConvNet,
    ConvSmall,
    build_classifier,
    register_classifier,
)
from lvat.models.glow import Glow, glow_loss, nonfinite_decode_rate
from lvat.models.registry import (
    KINDS,
    TransformerKind,
    kind_for_config,
    kind_for_model,
    register_kind,
    unregister_kind,
)
from lvat.models.transformers import (
    TRANSFORMERS,
    available_transformers,
    export_transformer,
    load_transformer,
    save_transformer,
)
from lvat.models.vae import VAE, recon_mse, vae_loss

__all__ = [
    "CLASSIFIERS",
    "KINDS",
    "TRANSFORMERS",
    "VAE",
    "ConvLarge",
    "ConvNet",
    "ConvSmall",
    "Glow",
    "TransformerKind",
    "build_classifier",
    "glow_loss",
    "kind_for_config",
    "kind_for_model",
    "available_transformers",
    "export_transformer",
    "load_transformer",
    "nonfinite_decode_rate",
    "recon_mse",
    "register_classifier",
    "register_kind",
    "save_transformer",
    "unregister_kind",
    "vae_loss",
]
