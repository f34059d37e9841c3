"""The KL autoencoder's encoder and decoder, in plain torch.

Attribute names are the LDM checkpoint keys (`encoder.down.0.block.1.norm2.weight`,
`decoder.mid.attn_1.q.weight`, ...), so an LDM/ComfyUI state dict loads with strict=True and
diffusers files are renamed once, in checkpoint.py. One architecture serves SD1.x/2.x, SDXL, SD3
and Flux.1; only the widths and the latent channel count differ (see config.py).

Inference only: activations are updated in place where autograd is off, and each block frees
its intermediates as soon as it can, which is most of the memory win over the references.
"""
import sys

import torch.nn as nn
import torch.nn.functional as F

from .config import Family, Network, VAEConfig, register_network
from .diffusers_compat import SD_NAMES
from .groupnorm import GroupNorm
from .ops import silu_


def Normalize(channels: int, groups: int = 32) -> GroupNorm:
    # eps=1e-6 as in LDM and diffusers' VAE (not torch's default 1e-5).
    return GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only blocks that change width have a shortcut projection (key: nin_shortcut).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def shortcut(self, x):
        return x if self.nin_shortcut is None else self.nin_shortcut(x)

    def forward(self, x):
        h = self.conv1(silu_(self.norm1(x)))
        h = self.conv2(silu_(self.norm2(h)))
        return h.add_(self.shortcut(x)) if not h.requires_grad else h + self.shortcut(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions (head dim = channels: 512)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = Normalize(channels, groups)
        # 1x1 convs as in LDM; diffusers stores the same weights as Linear (2-D), see checkpoint.py.
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1, HW, C], contiguous: on the CPU a transposed view sends SDPA to its math path, which
        # materialises the HW x HW matrix (2.3 GB at 1024x1024, measured); contiguous inputs take the
        # flash kernel (37 MB, 2.4x faster). On CUDA, head dim 512 runs the memory-efficient kernel.
        q, k, v = (m(h).flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for m in (self.q, self.k, self.v))
        del h
        h = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        h = self.proj_out(h)
        return h.add_(x) if not h.requires_grad else h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads only right and bottom, so the stride-2 grid starts at the top-left pixel.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """The latent-resolution middle: resnet, global self-attention, resnet (run by layers())."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)


class Level(nn.Module):
    """One resolution level: `block` (resnets), then `downsample` or `upsample` (absent at the end)."""

    def __init__(self, blocks, resample=None, resample_name=None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            setattr(self, resample_name, resample)


class Tail:
    """norm_out -> SiLU -> conv_out, the last step of either network. Not a module: its two
    parts are the network's own attributes (keys `decoder.norm_out.*`, `decoder.conv_out.*`)."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv2d):
        self.norm, self.conv = norm, conv

    def __call__(self, x):
        return self.conv(silu_(self.norm(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.block_out_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        w_in = cfg.ch
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(w_in if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(w), "downsample"))
            w_in = w
        self.mid = Mid(w_in, g)
        self.norm_out = Normalize(w_in, g)
        self.conv_out = nn.Conv2d(w_in, 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the segment engine runs tile by tile."""
        steps = [self.conv_in]
        for level in self.down:
            steps += list(level.block)
            if hasattr(level, "downsample"):
                steps.append(level.downsample)
        return steps + [self.mid.block_1, self.mid.attn_1, self.mid.block_2, Tail(self.norm_out, self.conv_out)]

    def forward(self, x):                       # [B, 3, H, W] -> [B, 2*z, H/8, W/8]
        for layer in self.layers():
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, g = cfg.decoder_block_out_channels, cfg.norm_groups  # Flux.2's small decoder: narrower
        w = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, w, 3, padding=1)
        self.mid = Mid(w, g)
        # Built from the lowest resolution up, stored with index 0 = highest resolution (LDM keys).
        levels = []
        for i in reversed(range(len(widths))):
            blocks = [ResnetBlock(w if j == 0 else widths[i], widths[i], g) for j in range(cfg.num_res_blocks + 1)]
            w = widths[i]
            levels.insert(0, Level(blocks, Upsample(w) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(w, g)
        self.conv_out = nn.Conv2d(w, cfg.out_channels, 3, padding=1)

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the segment engine runs tile by tile."""
        steps = [self.conv_in, self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for level in reversed(self.up):
            steps += list(level.block)
            if hasattr(level, "upsample"):
                steps.append(level.upsample)
        return steps + [Tail(self.norm_out, self.conv_out)]

    def forward(self, z):                       # [B, z, h, w] -> [B, 3, 8h, 8w]
        for layer in self.layers():
            z = layer(z)
        return z


def quant_convs(cfg: VAEConfig) -> tuple:
    """The 1x1 convs around the latent (quant_conv 2z -> 2z, post_quant_conv z -> z); SD3 and Flux.1
    have none: absent modules mean absent keys (strict loading)."""
    z = cfg.latent_channels
    return (nn.Conv2d(2 * z, 2 * z, 1) if cfg.use_quant_conv else None,
            nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None)


# ----------------------------------------------------------------------------------------------
# The SD-style network's families and its registration (config.Network).
# ----------------------------------------------------------------------------------------------
PRESETS = (
    Family("sd1", 4, 0.18215, 0.0, True, "Stable Diffusion 1.x/2.x",
           metadata_words=("stable-diffusion-v1", "sd_v1", "v2"),
           file_names=r"sd15|sd-?1|sd_?v?1|sd2|vae-ft-(mse|ema)|kl-f8|orangemix|anything"),
    Family("sdxl", 4, 0.13025, 0.0, True, "SDXL (overflows fp16 in the decoder)", True, sample_size=1024,
           metadata_words=("xl",), file_names=r"sdxl|(^|[^a-z])xl([^a-z]|$)|pony|illustrious"),
    Family("sd3", 16, 1.5305, 0.0609, False, "Stable Diffusion 3 / 3.5", metadata_words=("sd3", "stable-diffusion-3"),
           file_names=r"sd3|sd35|sd_3"),
    Family("flux", 16, 0.3611, 0.1159, False, "Flux.1", metadata_words=("flux",), file_names=r"flux|(^|/)ae\.safetensors"),
    # Flux.2: no scale or shift; its pipelines normalise 2x2-patchified latents with the VAE's
    # BatchNorm running statistics instead (to_scaled / from_scaled).
    Family("flux2", 32, 1.0, 0.0, True, "Flux.2 (BatchNorm-normalised 2x2 patches)", batch_norm=True,
           file_names=r"flux[._-]?2"),
)
register_network(Network("sd", sys.modules[__name__], PRESETS, diffusers=SD_NAMES))
