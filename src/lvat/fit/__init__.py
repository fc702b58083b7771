"""Fitting the generative transformers of LVAT (VAE, Glow): `lvat fit vae|glow`."""

from lvat.fit.evaluate import evaluate_transformer, write_grids
from lvat.fit.loop import fit, fit_config, resolve_out, summary
from lvat.fit.setup import KINDS, ImageStream, Kind, lr_at

__all__ = [
    "KINDS",
    "ImageStream",
    "Kind",
    "evaluate_transformer",
    "fit",
    "fit_config",
    "lr_at",
    "resolve_out",
    "summary",
    "write_grids",
]
