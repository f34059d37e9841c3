"""Helpers shared by the tests, the benchmarks and the demo: metrics, a synthetic test image and
seeded VAEs (no real VAE weights can be downloaded here).

Metrics use the names the whole project uses: `psnr_vs_full` (PSNR in dB, pixels in [-1, 1]
mapped to [0, 1] and clamped), `max_abs_vs_full`, `seam_ratio`.

Weights: diffusers' own init of a family's config plus seeded noise on norms and biases
(`diffusers_vae`: no layer is an identity, so a mistake in a GroupNorm affine or a bias cannot
hide), optionally *calibrated* (`calibrate`: every conv rescaled on a real forward pass,
LSUV-style, to unit-std outputs with residual branches at 0.3), which gives activations and
GroupNorm statistics of a realistic scale and spatial variation that plain random weights lack.
"""
import json
import os
import socket
import warnings

import numpy as np
import torch
import torch.nn as nn

from .vae import load_vae, preset
from .vae.metrics import max_abs_vs_full, psnr_vs_full, seam_ratio, worst_frame_psnr  # noqa: F401 (re-exported for the tests)
from .vae.diffusers_compat import diffusers_config

NARROW = dict(ch=32, ch_mult=(1, 2, 2, 2))  # same structure as the families, 1/4 width: fast tests


# -- metrics: the product's own (klvae.vae.metrics) ------------------------------------------------
psnr = psnr_vs_full  # the same measure against any reference (an input image, an fp32 run)


# -- processes ----------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the only address tests and benchmarks use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a test picture -------------------------------------------------------------------------------------
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


test_image.__test__ = False  # not a pytest test, despite its name


# -- seeded VAEs ------------------------------------------------------------------------------------------
def diffusers_vae(family="sd1", seed=0, noise=0.1, **overrides):
    """A diffusers.AutoencoderKL (AutoencoderKLFlux2 for flux2) of a family's config, optionally
    narrowed, with seeded weights: diffusers' init, plus `noise` x N(0, 1) on every norm and bias
    (and, for Flux.2, latent BatchNorm statistics that are not the identity)."""
    import diffusers  # optional dependency (tests, benchmarks)

    cfg = diffusers_config(preset(family, **overrides))
    torch.manual_seed(seed)
    vae = getattr(diffusers, cfg["_class_name"])(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(noise * torch.randn(p.shape, generator=g))
        if getattr(vae, "bn", None) is not None:
            vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.running_mean.shape, generator=g))
            vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


@torch.no_grad()
def calibrate(vae, pixels: torch.Tensor):
    """Rescale every conv of a diffusers VAE so its outputs have unit std on real input (residual
    branches 0.3), in one forward pass per half: encoder on `pixels`, decoder on its mode. The Wan
    classes (Qwen-Image's, Wan 2.2's, Qwen-Image 2.1's) take [B, C, T, H, W] and have 3-D convs: one
    frame, and those too; Qwen-Image 2.1's takes RGBA (opaque here)."""
    video = type(vae).__name__ in ("AutoencoderKLQwenImage", "AutoencoderKLQwenImage21", "AutoencoderKLWan")
    if vae.config.get("in_channels", 3) == 4:  # Qwen-Image 2.1's RGBA: opaque
        pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
    pixels = pixels[:, :, None] if video else pixels

    def hook(name):
        target = 0.3 if name.endswith(("conv2", "to_out.0", "conv_shortcut", ".proj")) else \
            0.5 if name == "decoder.conv_out" else 1.0

        def fn(mod, inp, out):
            a = target / max(out.float().std().item(), 1e-6)
            mod.weight.mul_(a)
            if mod.bias is not None:
                mod.bias.mul_(a)
            return out * a
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in vae.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear))]
    vae.decode(vae.encode(pixels).latent_dist.mode())
    for h in hooks:
        h.remove()
    return vae


def calibrated_vae(family="sd1", seed=0, image_size=64, cache=None, **overrides):
    """diffusers_vae(...) calibrated on test_image(image_size); cached as a diffusers folder when
    `cache` names one (the full-width benchmark VAE takes a minute to make)."""
    import diffusers  # optional dependency (tests, benchmarks)
    if cache and os.path.exists(os.path.join(cache, "config.json")):
        with open(os.path.join(cache, "config.json")) as f:
            cls = getattr(diffusers, json.load(f)["_class_name"])
        return cls.from_pretrained(cache).eval()
    vae = calibrate(diffusers_vae(family, seed, **overrides), test_image(image_size, seed=seed))
    if cache:
        vae.save_pretrained(cache)
    return vae


def klvae_from(dvae, family=None, **kw):
    """klvae's AutoencoderKL with a diffusers model's (or a state dict's) weights; the family
    ambiguity warning is expected here and silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_vae(dvae if isinstance(dvae, dict) else dvae.state_dict(), family=family, **kw)


# -- a network whose residuals span several layers (the engines' test of verbs.residual) ----------------
# Wan 2.2's and Qwen-Image 2.1's blocks are `x + shortcut(x)` around two or three resnets and a
# resample, the shortcut a space-to-channel mean (down) or a channel repeat then channel-to-space
# (up). This network has such blocks in both directions, with GroupNorm resnets ("group": the
# exact engine carries statistics through the block) or RMS-norm ones ("rms": nothing is
# estimated, so bounded mode streams exactly too).
class SpanBlock(nn.Module):
    """x + shortcut(x) around two resnets and a 2x resample (`up` or down)."""

    def __init__(self, cin: int, cout: int, up: bool, kind: str):
        super().__init__()
        from .vae import model, model_qwenimage as qi
        resnet = (lambda a, b: model.ResnetBlock(a, b, 4)) if kind == "group" else qi.ResidualBlock
        self.up, self.cin, self.cout = up, cin, cout
        self.resnets = nn.ModuleList([resnet(cin, cout), resnet(cout, cout)])
        self.resample = model.Upsample(cout) if up else model.Downsample(cout)

    def layers(self) -> list:
        return [*self.resnets, self.resample]

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        from .vae.model_hunyuanimage import channel_mean, channel_to_space, space_to_channel
        if self.up:
            return channel_to_space(x.repeat_interleave(4 * self.cout // self.cin, dim=1))
        return channel_mean(space_to_channel(x), 4 * self.cin // self.cout)

    def forward(self, x):
        h = x
        for layer in self.layers():
            h = layer(h)
        return h + self.shortcut(x)


def _span_step():
    """SpanBlock's Step: its shortcut in verbs, a row op over whole 2x2 cells (no halo)."""
    from .vae import layers, verbs
    from .vae.ops import Tile

    class SpanBlockStep(layers.SpanStep):
        def shortcut(self):
            block = self.layer
            if block.up:
                def fn(t: Tile) -> Tile:
                    return Tile(block.shortcut(t.data), 2 * t.y0, 2 * t.y1, 2 * t.x0, 2 * t.x1, 2 * t.H, 2 * t.W, 2 * t.s)
                return verbs.rows(fn, self.cout, up=2, above=0, below=0)

            def fn(t: Tile) -> Tile:  # whole cells only: a strip may start on an odd column
                y0, y1, x0, x1 = t.y0 + t.y0 % 2, t.y1 - t.y1 % 2, t.x0 + t.x0 % 2, t.x1 - t.x1 % 2
                return Tile(block.shortcut(t.crop(y0, y1, x0, x1).data), y0 // 2, y1 // 2, x0 // 2, x1 // 2,
                            t.H // 2, t.W // 2, t.s // 2)
            return verbs.rows(fn, self.cout, down=2, above=0, below=0)
    layers.register(SpanBlock, SpanBlockStep)


class SpanNet(nn.Module):
    """decode: latent [B, z, h, w] -> [B, 3, 4h, 4w]; encode: [B, 3, H, W] -> [B, 2z, H/4, W/4]."""

    def __init__(self, direction: str, kind: str = "group", z: int = 4, seed: int = 0):
        super().__init__()
        from .vae import model, model_qwenimage as qi
        _span_step()
        torch.manual_seed(seed)
        group = kind == "group"
        resnet = (lambda a, b: model.ResnetBlock(a, b, 4)) if group else qi.ResidualBlock
        attn = (lambda c: model.AttnBlock(c, 4)) if group else qi.AttentionBlock
        if direction == "decode":
            self.conv_in = nn.Conv2d(z, 16, 3, padding=1)
            body = [resnet(16, 16), attn(16), SpanBlock(16, 8, True, kind), SpanBlock(8, 8, True, kind)]
            cout, self.downscale = 3, 1
        else:
            self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
            body = [SpanBlock(8, 16, False, kind), SpanBlock(16, 16, False, kind), resnet(16, 16), attn(16)]
            cout, self.downscale = 2 * z, 4
        self.body = nn.ModuleList(body)
        width = 8 if direction == "decode" else 16
        if group:
            self.norm_out, self.conv_out = model.Normalize(width, 4), nn.Conv2d(width, cout, 3, padding=1)
            self.tail = model.Tail(self.norm_out, self.conv_out)
        else:
            self.tail = qi.Head(width, cout)
        with torch.no_grad():  # no identity layers: every norm and bias is seeded noise
            for name, p in self.named_parameters():
                if name.endswith("bias") or "norm" in name or "gamma" in name:
                    p.add_(torch.randn_like(p) * 0.1)

    def layers(self) -> list:
        return [self.conv_in, *self.body, self.tail]

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x
