"""Shared by the benchmarks: calibrated random weights, the synthetic test image, metrics, peak RSS.

No real VAE weights can be downloaded here. A random init with every conv rescaled on a real forward
pass (LSUV-style: unit-std outputs, residual branches at 0.3) gives activations and GroupNorm
statistics of a realistic scale and spatial variation, which plain random weights do not.
"""
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # make `klvae` importable from a checkout


def test_image(size: int, width: int | None = None, seed: int = 0) -> torch.Tensor:
    """A deterministic synthetic photo-like image [1, 3, H, W] in [-1, 1]: sky gradient, disks,
    stripes, a checkerboard, fine noise texture. Different regions have different statistics."""
    H, W = size, width or size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    y, x = yy / H, xx / W
    img = np.stack([0.3 + 0.5 * y, 0.5 + 0.3 * y, 0.9 - 0.4 * y], -1)          # sky
    ground = y > 0.6 + 0.05 * np.sin(8 * x)
    img[ground] = np.stack([0.35 + 0.1 * np.sin(40 * x), 0.55 + 0.1 * np.sin(37 * y), 0.2 + 0 * x], -1)[ground]
    for _ in range(12):                                                          # disks
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.12)
        m = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[m] = rng.uniform(0, 1, 3)
    m = (x > 0.62) & (x < 0.9) & (y > 0.1) & (y < 0.35)                          # checkerboard
    img[m] = ((((xx // 8) + (yy // 8)) % 2)[..., None] * np.ones(3))[m]
    m = (x < 0.3) & (y > 0.7)                                                    # stripes
    img[m] = (0.5 + 0.5 * np.sin(xx * 0.8))[..., None][m] * np.array([1, 0.8, 0.6])
    img += rng.normal(0, 0.02, img.shape) * (y[..., None] > 0.6)                # grass texture
    t = torch.from_numpy(np.clip(img, 0, 1)).permute(2, 0, 1)[None].float()
    return t * 2 - 1


@torch.no_grad()
def calibrate(vae, pixels: torch.Tensor, latent_channels: int):
    """Rescale every conv of a diffusers.AutoencoderKL so its outputs have unit std on real input
    (residual branches 0.3), in one forward pass per half: encoder on `pixels`, decoder on its mode."""
    import torch.nn as nn

    def hook(name):
        target = 0.3 if name.endswith(("conv2", "to_out.0", "conv_shortcut")) else 0.5 if name == "decoder.conv_out" else 1.0

        def fn(mod, inp, out):
            s = out.float().std().item()
            a = target / max(s, 1e-6)
            mod.weight.mul_(a)
            if mod.bias is not None:
                mod.bias.mul_(a)
            return out * a
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in vae.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    z = vae.encode(pixels).latent_dist.mode()
    vae.decode(z)
    for h in hooks:
        h.remove()
    return vae


def calibrated_sd_vae(family="sd1", seed=0, **overrides):
    """A diffusers AutoencoderKL of a family's full config, seeded and calibrated (cached on disk)."""
    from diffusers import AutoencoderKL as D
    from klvae.vae import preset
    from klvae.vae.checkpoint import diffusers_config

    cache = os.path.join(HERE, "out", f"calibrated_{family}_{seed}")
    if os.path.exists(os.path.join(cache, "config.json")):
        return D.from_pretrained(cache).eval()
    torch.manual_seed(seed)
    cfg = {k: v for k, v in diffusers_config(preset(family, **overrides)).items() if not k.startswith("_")}
    vae = D(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in vae.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    calibrate(vae, test_image(256, seed=seed), cfg["latent_channels"])
    vae.save_pretrained(cache)
    return vae


def psnr_vs_full(tiled, full) -> float:
    a = ((tiled.float() + 1) / 2).clamp(0, 1)
    b = ((full.float() + 1) / 2).clamp(0, 1)
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def max_abs_vs_full(tiled, full) -> float:
    return (tiled.float() - full.float()).abs().max().item()


def seam_ratio(tiled, full, boundaries_y, boundaries_x, width=2) -> float:
    """Mean |tiled - full| on pixels within `width` of a tile boundary over the mean elsewhere."""
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


def peak_rss_reset():
    """Reset this process's peak RSS (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak_rss():
    return _status("VmHWM")


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)
