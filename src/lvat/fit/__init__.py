"""Fitting the generative transformers of LVAT: `lvat fit KIND` for every registered kind
(`lvat.models.registry.KINDS`: the built-in VAE and Glow, and any a plugin registers)."""

from lvat.fit.evaluate import evaluate_transformer, write_grids
from lvat.fit.loop import fit, fit_config, resolve_out, summary
from lvat.fit.setup import GlowKind, ImageStream, Kind, VAEKind, lr_at
from lvat.models.registry import KINDS, TransformerKind, register_kind, unregister_kind

__all__ = [
    "KINDS",
    "GlowKind",
    "ImageStream",
    "Kind",
    "TransformerKind",
    "VAEKind",
    "evaluate_transformer",
    "fit",
    "fit_config",
    "lr_at",
    "register_kind",
    "resolve_out",
    "summary",
    "unregister_kind",
    "write_grids",
]
