"""lvat: Latent space Virtual Adversarial Training (Osada et al., ECCV 2020) and VAT for PyTorch."""

__version__ = "0.1.0"
