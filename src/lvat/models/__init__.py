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
from lvat.models.transformers import TRANSFORMERS, load_transformer, save_transformer
from lvat.models.vae import VAE, recon_mse, vae_loss

__all__ = [
    "CLASSIFIERS",
    "TRANSFORMERS",
    "VAE",
    "ConvLarge",
    "ConvNet",
    "ConvSmall",
    "Glow",
    "build_classifier",
    "glow_loss",
    "load_transformer",
    "nonfinite_decode_rate",
    "recon_mse",
    "register_classifier",
    "save_transformer",
    "vae_loss",
]
