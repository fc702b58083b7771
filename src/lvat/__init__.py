"""lvat: Latent space Virtual Adversarial Training (Osada et al., ECCV 2020) and VAT for PyTorch.

import lvat
reg = lvat.VAT(eps=2.5)                                   # input space
reg = lvat.LVAT(lvat.load_transformer("vae.pt"), eps=1.5)  # latent space of a VAE or Glow
loss = cross_entropy(model(x_l), y_l) + reg(model, x_u)

The transformers LVAT perturbs ship too: `lvat.VAE` and `lvat.Glow` (trained by `lvat fit`).
"""

__version__ = "0.1.0"

# Eager: load_transformer's module loads lvat.models (VAE, Glow) anyway: no extra import time.
from lvat.models.glow import Glow  # noqa: E402
from lvat.models.transformers import (  # noqa: E402
    available_transformers,
    export_transformer,
    load_transformer,
    save_transformer,
)
from lvat.models.vae import VAE  # noqa: E402
from lvat.regularizers import LVAT, VAT  # noqa: E402

__all__ = [
    "LVAT",
    "VAE",
    "VAT",
    "Glow",
    "__version__",
    "available_transformers",
    "export_transformer",
    "load_transformer",
    "save_transformer",
]

# Plugins: a new method (`lvat.regularizers.register_method`, `Method`) or transformer kind
# (`lvat.models.register_kind`, `TransformerKind`) registers from outside the package.
