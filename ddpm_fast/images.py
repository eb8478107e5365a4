"""Turning samples in [-1, 1] into pictures: uint8 NHWC arrays, PIL images and labelled PNG grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def to_images(x: torch.Tensor, *, pil: bool = False):
    """(B, C, H, W) float in [-1, 1] -> uint8 (B, H, W, C) numpy array (guided-diffusion's npz
    convention), or a list of PIL images when pil=True. Values outside [-1, 1] (infinities too)
    are clamped; NaN is refused (ValueError), B = 0 gives an empty (0, H, W, C) array. PIL images
    need C = 1 (grey) or 3 (RGB)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a (B, C, H, W) torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor in [-1, 1]; got dtype {x.dtype}")
    nan = int(torch.isnan(x).sum()) if x.numel() else 0
    if nan:
        raise ValueError(f"x holds {nan} NaN values; samples must be numbers in [-1, 1]")
    if pil and x.shape[1] not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels to become PIL images; got {x.shape[1]}")
    arr = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).contiguous().numpy()
    if not pil:
        return arr
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def save_grid(x: torch.Tensor, path: str | Path, *, nrow: int | None = None, scale: int = 4,
              row_labels: Sequence[str] | None = None, pad: int = 2) -> Path:
    """Write the samples x (B >= 1, C = 1 or 3, H, W) in [-1, 1] as one PNG grid, `nrow` images
    per row, each enlarged `scale` times (nearest), with an optional text label left of each
    row. The path's suffix picks the format (.png, .jpg, ...). Returns the path."""
    from PIL import Image, ImageDraw

    from . import validate

    imgs = to_images(x)
    b, h, w, c = imgs.shape
    if b == 0:
        raise ValueError("x holds no images (B = 0); a grid needs at least one")
    if c not in (1, 3):
        raise ValueError(f"x must have 1 or 3 channels for a grid; got {c}")
    if nrow is not None:
        nrow = validate.integer("nrow", nrow, minimum=1)
    scale = validate.integer("scale", scale, minimum=1)
    pad = validate.integer("pad", pad, minimum=0)
    path = check_image_path("path", path)
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / nrow))
    h2, w2 = h * scale, w * scale
    label_w = 0 if row_labels is None else 8 + 7 * max(len(s) for s in row_labels)
    mode = "L" if c == 1 else "RGB"
    grid = Image.new(mode, (label_w + nrow * (w2 + pad) + pad, rows * (h2 + pad) + pad),
                     color=255 if mode == "L" else (255, 255, 255))
    for i, a in enumerate(imgs):
        im = Image.fromarray(a[..., 0] if c == 1 else a).resize((w2, h2), Image.NEAREST)
        r, col = divmod(i, nrow)
        grid.paste(im, (label_w + pad + col * (w2 + pad), pad + r * (h2 + pad)))
    if row_labels is not None:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((4, pad + r * (h2 + pad) + h2 // 2 - 5), str(text), fill=0)
    grid.save(path)
    return path


def check_image_path(name: str, path) -> Path:
    """An image file to write (ddpm_fast.validate.output_file): its suffix must be one PIL can
    write (.png, .jpg, ...), checked before any work."""
    from PIL import Image

    from . import validate

    writable = Image.registered_extensions()
    suffixes = [".png"] + sorted(e for e, fmt in writable.items() if fmt in Image.SAVE and e != ".png")
    return validate.output_file(name, path, suffixes)
