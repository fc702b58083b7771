"""lvat: Latent space Virtual Adversarial Training (Osada et al., ECCV 2020) and VAT for PyTorch.

import lvat
reg = lvat.VAT(eps=2.5)                                   # input space
reg = lvat.LVAT(lvat.load_transformer("vae.pt"), eps=1.5)  # latent space of a VAE or Glow
loss = cross_entropy(model(x_l), y_l) + reg(model, x_u)
"""

__version__ = "0.1.0"

from lvat.models.transformers import load_transformer, save_transformer  # noqa: E402
from lvat.regularizers import LVAT, VAT  # noqa: E402

__all__ = ["LVAT", "VAT", "__version__", "load_transformer", "save_transformer"]
