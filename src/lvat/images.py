"""PNG image grids (Pillow): training previews, reconstructions, and the paper's figures.

`save_grid` tiles a batch into rows of `nrow` images; `save_rows` puts several batches one under
another (e.g. original / Dec(Enc(x)) / adversarial, paper Fig. 3). Images are (N, C, H, W)
tensors in [0, 1] with C = 1 (grey) or 3 (RGB), on any device; non-finite pixels are drawn black
so that a broken decode is visible rather than an exception. Files are written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvat.io import atomic_write


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] (or uint8) -> uint8 0..255 on the CPU, NaN/inf -> 0."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images
    x = torch.nan_to_num(images.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8)  # round, not floor: 1.0 -> 255, 0.5 -> 128


def tile(
    images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0
) -> torch.Tensor:
    """Arrange N images into one (C, H', W') uint8 canvas, `nrow` images per row.

    Args:
        images: (N, C, H, W) in [0, 1] (float) or 0..255 (uint8).
        nrow: images per row (the last row may be shorter).
        padding: pixels of `pad_value` between and around the images.
        pad_value: separator brightness in [0, 1] (white by default: visible on dark data).
    """
    x = _to_uint8(images)
    n, c, h, w = x.shape
    ncol = max(1, min(nrow, n))
    nrows = max(1, math.ceil(n / ncol))
    fill = int(round(255 * min(max(pad_value, 0.0), 1.0)))
    size = (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding)
    canvas = torch.full(size, fill, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        canvas[:, top : top + h, left : left + w] = x[i]
    return canvas


def _write_png(canvas: torch.Tensor, path: str | Path) -> Path:
    array = canvas.permute(1, 2, 0).numpy()  # (H, W, C)
    image = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[2] == 1 else array))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write (N, C, H, W) images in [0, 1] as one PNG grid with `nrow` images per row.

    Returns the path written. Grey images (C = 1) give a greyscale PNG, C = 3 an RGB one.
    """
    return _write_png(tile(images, nrow, padding, pad_value), path)


def save_rows(
    rows: Sequence[torch.Tensor],
    path: str | Path,
    padding: int = 2,
    pad_value: float = 1.0,
) -> Path:
    """Write several batches as one PNG, batch i as row i (e.g. originals over reconstructions).

    Every batch must have the same (C, H, W); a shorter batch leaves its row's tail blank.
    """
    if not rows:
        raise ValueError("save_rows needs at least one batch")
    shape = tuple(rows[0].shape[1:])
    if any(tuple(r.shape[1:]) != shape for r in rows):
        raise ValueError(f"all rows must be (N, {shape}); got {[tuple(r.shape) for r in rows]}")
    ncol = max(len(r) for r in rows)
    c, h, w = shape
    fill = int(round(255 * min(max(pad_value, 0.0), 1.0)))
    blank = torch.full((1, c, h, w), fill, dtype=torch.uint8)
    padded = [torch.cat([_to_uint8(r), blank.expand(ncol - len(r), c, h, w)]) for r in rows]
    return _write_png(tile(torch.cat(padded), ncol, padding, pad_value), path)
