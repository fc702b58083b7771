"""Models: classifiers (by name from `CLASSIFIERS`) and the generative transformers of LVAT."""

from lvat.models.classifiers import (
    CLASSIFIERS,
    ConvLarge,
    ConvNet,
    ConvSmall,
    build_classifier,
    register_classifier,
)

__all__ = [
    "CLASSIFIERS",
    "ConvLarge",
    "ConvNet",
    "ConvSmall",
    "build_classifier",
    "register_classifier",
]
