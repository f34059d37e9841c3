"""How close two images are, with the names the whole project uses.

`psnr_vs_full`: PSNR in dB of a against b, pixels in [-1, 1] mapped to [0, 1] and clamped (a tiled
output against the untiled one, or a round trip against its input). `max_abs_vs_full`: the largest
absolute difference. `worst_frame_psnr`: the lowest psnr_vs_full over the frames of two clips.
`seam_ratio`: mean |tiled - full| on pixels near tile boundaries over the mean
elsewhere (1.0: no seam).
"""
import math

import torch


def psnr_vs_full(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of a against b, pixels in [-1, 1] mapped to [0, 1] and clamped."""
    x = ((a.float() + 1) / 2).clamp(0, 1)
    y = ((b.float() + 1) / 2).clamp(0, 1)
    mse = (x - y).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def worst_frame_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest psnr_vs_full over the frames (of every item) of clips [B, C, T, H, W]."""
    return min(psnr_vs_full(a[i, :, t], b[i, :, t]) for i in range(a.shape[0]) for t in range(a.shape[2]))


def max_abs_vs_full(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def seam_ratio(tiled, full, boundaries_y, boundaries_x, width=2) -> float:
    """Mean |tiled - full| on pixels within `width` of a tile boundary over the mean elsewhere
    (1.0: no seam). It cannot see per-tile tone offsets, which shift whole tiles: read it next
    to the PSNR."""
    d = (tiled.float() - full.float()).abs().mean(dim=(0, 1))  # [H, W]
    H, W = d.shape
    mask = torch.zeros(H, W, dtype=torch.bool)
    for y in boundaries_y:
        mask[max(0, y - width): y + width, :] = True
    for x in boundaries_x:
        mask[:, max(0, x - width): x + width] = True
    if not mask.any() or mask.all():
        return 1.0
    inside, outside = d[mask].mean().item(), d[~mask].mean().item()
    return inside / outside if outside > 0 else (1.0 if inside == 0 else float("inf"))
