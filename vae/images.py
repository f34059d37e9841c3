"""Images as tensors: a file to [1, 3, H, W] in [-1, 1] (what encode takes), and back."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import KLVAEError

FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def read_image(path, size: int | None = None) -> torch.Tensor:
    """An image file as [1, 3, H, W] in [-1, 1] (alpha dropped, greyscale replicated); `size`:
    centre-cropped to a square and resized to size x size (Lanczos)."""
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise KLVAEError(f"{path}: no such file") from None
    except OSError as e:
        raise KLVAEError(f"{path}: not a readable image ({e})") from e
    im = im.convert("RGB")
    if size:
        s = min(im.size)
        box = ((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2, (im.height + s) // 2)
        im = im.crop(box).resize((size, size), Image.LANCZOS)
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def check_image_path(path) -> Path:
    """A path an image can be written to (its suffix a format Pillow writes), checked before any work."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise KLVAEError(f"{path}: unknown image format {path.suffix or '(none)'!r}; use {', '.join(FORMATS[:3])}")
    return path


def write_image(x: torch.Tensor, path) -> None:
    """The first image of [B, 3, H, W] in [-1, 1] to a file (8-bit, rounded)."""
    path = check_image_path(path)
    a = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(path)
    except (OSError, ValueError, KeyError) as e:
        raise KLVAEError(f"cannot write {path}: {e}") from e
