"""CNN classifiers of the VAT/LVAT papers and a name -> constructor registry.

`conv-large` is the 13-layer CNN of Osada et al., "Regularization with Latent Space Virtual
Adversarial Training" (ECCV 2020), Table 1, itself the "Conv-Large" of Miyato et al. (VAT, TPAMI
2018); layer for layer it follows takerum/vat_tf `cnn.py` and `layers.py`. `conv-small` is the same
topology at reduced width, for CPU runs.

Input: float images in [0, 1], shape (B, C, H, W), any C, any H, W >= 28 (no normalisation here:
the authors' LVAT runs feed raw [0, 1] pixels). Output: logits (B, K).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

# vat_tf `layers.bn`: moving averages with decay 0.99 (= PyTorch momentum 0.01), eps 1e-6.
BN_EPS = 1e-6
BN_MOMENTUM = 0.01
LRELU_SLOPE = 0.1  # vat_tf flag `lrelu_a`

# (block-1 width, block-2 width, valid 3x3 conv, 1x1 conv, 1x1 conv = features fed to the fc).
CONV_LARGE_WIDTHS = (128, 256, 512, 256, 128)
CONV_SMALL_WIDTHS = (32, 64, 128, 64, 32)

CLASSIFIERS: dict[str, Callable[..., nn.Module]] = {}


def register_classifier(
    name: str,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make a constructor `fn(in_channels=, num_classes=, **kw)` buildable by `name`."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in CLASSIFIERS:
            raise ValueError(f"classifier {name!r} is already registered")
        CLASSIFIERS[name] = fn
        return fn

    return decorator


def build_classifier(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered classifier by name; extra kwargs go to its constructor."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(sorted(CLASSIFIERS))}")
    return CLASSIFIERS[name](in_channels=in_channels, num_classes=num_classes, **kwargs)


def he_truncated_normal_(weight: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """In-place init as TF1 `variance_scaling_initializer()` (factor 2, FAN_IN, normal), vat_tf.

    TF1 draws from a normal with std sqrt(1.3 * factor / fan_in), truncated (re-drawn) outside
    +-2 std. Truncation at 2 std shrinks the variance by 0.774, so the final std is
    sqrt(1.3 * 0.774 * factor / fan_in) = 1.003 * sqrt(factor / fan_in): the He std. We copy TF's
    1.3 instead of the exact 1.2924 so weights match vat_tf's distribution to the digit.
    fan_in = in_channels * kh * kw for a conv weight (out, in, kh, kw), in_features for a linear.
    """
    fan_in = weight[0].numel()
    std = math.sqrt(1.3 * factor / fan_in)
    return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


def _conv_bn_lrelu(c_in: int, c_out: int, kernel_size: int, padding: int) -> list[nn.Module]:
    # No conv bias: the BN right after would cancel it (vat_tf `conv(use_bias=False)`).
    return [
        nn.Conv2d(c_in, c_out, kernel_size, padding=padding, bias=False),
        nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.LeakyReLU(LRELU_SLOPE),
    ]


class ConvNet(nn.Module):
    """The Conv-Large topology (paper Table 1) at any widths; see `ConvLarge`, `ConvSmall`.

    Args:
        in_channels: image channels C.
        num_classes: number of classes K.
        widths: (w1, w2, w3, w4, w5): three 3x3 'same' convs of w1, three of w2, one 3x3 'valid'
            of w3, then 1x1 convs of w4 and w5; the fc maps w5 -> K.
        top_bn: BatchNorm1d on the logits (vat_tf flag `top_bn`; the paper uses it on SVHN).
        dropout: drop probability after each max-pool (vat_tf keep_prob 0.5).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: Sequence[int] = CONV_LARGE_WIDTHS,
        top_bn: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.widths = tuple(widths)
        # ceil_mode=True reproduces TF max_pool(padding='SAME') on odd sizes (e.g. 29 -> 15);
        # on even sizes it is the plain 2x2/2 pool.
        self.features = nn.Sequential(
            *_conv_bn_lrelu(in_channels, w1, 3, 1),
            *_conv_bn_lrelu(w1, w1, 3, 1),
            *_conv_bn_lrelu(w1, w1, 3, 1),  # (B, w1, H, W)
            nn.MaxPool2d(2, 2, ceil_mode=True),  # (B, w1, H/2, W/2): 32 -> 16, 28 -> 14
            nn.Dropout(dropout),  # element-wise, as tf.nn.dropout
            *_conv_bn_lrelu(w1, w2, 3, 1),
            *_conv_bn_lrelu(w2, w2, 3, 1),
            *_conv_bn_lrelu(w2, w2, 3, 1),
            nn.MaxPool2d(2, 2, ceil_mode=True),  # (B, w2, H/4, W/4): 16 -> 8, 14 -> 7
            nn.Dropout(dropout),
            *_conv_bn_lrelu(w2, w3, 3, 0),  # 'valid': (B, w3, H/4-2, W/4-2): 8 -> 6, 7 -> 5
            *_conv_bn_lrelu(w3, w4, 1, 0),
            *_conv_bn_lrelu(w4, w5, 1, 0),
            nn.AdaptiveAvgPool2d(1),  # global average pool, any spatial size
            nn.Flatten(),  # (B, w5)
        )
        head: list[nn.Module] = [nn.Linear(w5, num_classes)]  # (B, K), with bias as vat_tf `fc`
        if top_bn:
            head.append(nn.BatchNorm1d(num_classes, eps=BN_EPS, momentum=BN_MOMENTUM))
        self.head = nn.Sequential(*head)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """vat_tf init: He truncated normal for conv/fc weights, zero fc bias, BN (1, 0)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                he_truncated_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1 as vat_tf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [0, 1] -> logits (B, K)."""
        return self.head(self.features(x))


@register_classifier("conv-large")
class ConvLarge(ConvNet):
    """Conv-Large of the VAT/LVAT papers (widths 128/256/512/256/128), ~3.1 M parameters."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        top_bn: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_classes, CONV_LARGE_WIDTHS, top_bn, dropout)


@register_classifier("conv-small")
class ConvSmall(ConvNet):
    """Conv-Large topology at 1/4 width (32/64/128/64/32), for CPU runs; not in the paper."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        top_bn: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(in_channels, num_classes, CONV_SMALL_WIDTHS, top_bn, dropout)
