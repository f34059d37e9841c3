"""The Qwen-Image VAE (Wan 2.1's video VAE architecture) for images and clips, in plain torch.

The family
----------
Qwen-Image decodes with Wan 2.1's causal video VAE, fine-tuned: diffusers calls it
AutoencoderKLQwenImage, the original release and ComfyUI WanVAE (ComfyUI's
qwen_image_vae.safetensors has the original keys). 16 latent channels, 8x spatial compression, 4x
temporal (1 + 4k frames -> 1 + k latents). What differs from the SD-style VAE of model.py:
  * RMS norms instead of GroupNorm: x / ||x|| over the channels of each pixel, times sqrt(C) and a
    per-channel gamma. No statistic is shared between pixels, so a band of rows is normalised
    on its own: exact tiling needs only the convolutions' one-row halos and the global attention,
    and bounded mode is exact too (its statistics mosaic has nothing to estimate).
  * causal 3-D convolutions (kernels [O, I, 3, 3, 3]; shortcuts and quant convs [O, I, 1, 1, 1]);
  * one attention block in each middle, single-head over each frame, q, k and v from one 1x1 conv;
  * the decoder's upsample convs halve the width (the next level starts at half its width);
  * the decoder's output is clamped to [-1, 1] (diffusers' decode does it; ComfyUI clamps the
    same pixels after mapping them to [0, 1]).

Attribute names are the original release's keys (= ComfyUI's): `encoder.conv1`,
`encoder.downsamples.N.residual.{0,2,3,6}`, `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`,
top-level `conv1` / `conv2` (the quant convs), `decoder.upsamples.N.resample.1`, ...; weights keep
their 3-D shapes, so a video checkpoint loads as it is and video can come later without another
loader. diffusers' names map both ways: `diffusers_to_original` / `original_to_diffusers`.

Images: T = 1, run in 2-D
-------------------------
A causal conv pads its input with 2p leading frames of zeros and none after (p = 1 for the 3x3x3
convs), so at T = 1 the one output frame is the kernel over [0, 0, x]: its first two time slices
multiply zeros and the result is the 2-D conv of x with `weight[:, :, -1]` (the spatial padding
is the same 1 px). A 1x1x1 conv has only that slice. The temporal resample convs (`time_conv`)
never meet the first frame: the reference decoder marks its cache "Rep" on the first chunk and
skips them, the encoder only fills its cache. The attention is per frame and the RMS norm per
pixel either way. So a single frame is a plain 2-D network: `Encoder` and `Decoder` take and
return [B, C, H, W], as model.py's do.

Clips: T > 1, in causal time
----------------------------
Given [B, C, T, H, W] the same modules run the clip: causal convs with their zero frames before the
first, the decoder's time conv making two frames of every frame but the first, the encoder's
stride-2 time conv after the first frame, attention per frame. Whole, or chunk by chunk along time
inside `causal_chunks(net)`, where each causal layer keeps the frames of its input the next chunk
reads (Wan's and diffusers' feat_cache): the chunks, in order, are the whole clip. Every 3-D conv
runs as 2-D convs over its time slices (ops.conv_over_time). Tiled, the Steps' `describe_clip`
says the same in verbs with time (causal convs, the decoder's frame doubling, the encoder's stride-2
time conv) and engine.run_clip runs each chunk band by band, the caches in stores.

Layer types -> Steps (layers.py; registered at the bottom of this file)
------------------------------------------------------------------------
  CausalConv3d     CausalConvStep   the networks' conv1: a 3x3 conv with the last time slice
  ResidualBlock    ResidualStep     RMS norm -> SiLU -> conv, twice, plus the shortcut
  AttentionBlock   AttentionStep    RMS norm, to_qkv, single-head attention over every pixel, proj
  UpResample       UpStep           nearest-exact 2x, 3x3 conv to half the width
  DownResample     DownResampleStep LDM's pad right/bottom + 3x3 stride 2 (layers.DownsampleStep); clips: the time conv
  Head             HeadStep         RMS norm -> SiLU -> conv (decoder: then the clamp)
None of them reads statistics: the RMS norm is a per-pixel norm of the verbs (`rms`: verbs.PerPixel),
which every engine applies band by band.
"""
import contextlib
import dataclasses
import functools
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import verbs
from .config import Family, Network, register_network
from .diffusers_compat import ArchNames
from .errors import KLVAEError
from .layers import WORKSPACE, DownsampleStep, ResnetStep, Step, _scale, register, upsample_rows
from .ops import (Tile, TimeSlices, cat_frames, causal, conv3x3, conv_over_time, interleave_halves, silu_, time_slice,
                  zero_frames)
from .verbs import PerPixel

# Qwen-Image's per-channel latent statistics (its VAE's config.json, ComfyUI's latent_formats.Wan21):
# its pipelines hand the denoiser (raw - mean) / std.
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class QwenImageShape:
    """The network's shape: what Encoder and Decoder read from a cfg (the released VAE by default)."""
    ch: int = 96                                    # base_dim
    ch_mult: tuple = (1, 2, 4, 4)                   # dim_mult
    num_res_blocks: int = 2                         # encoder; the decoder has one more per level
    latent_channels: int = 16                       # z_dim
    in_channels: int = 3
    out_channels: int = 3
    temporal_downsample: tuple = (False, True, True)  # per level transition (the decoder's reversed)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# ----------------------------------------------------------------------------------------------
# The pieces.
# ----------------------------------------------------------------------------------------------
class Frame:
    """The 2-D conv a causal conv is on a first frame: what ops.conv3x3 reads from a conv. Its
    weight, the kernel's last time slice (ops.time_slice: a view of a loaded model's weight), is
    read on first use: once per run of the layer, not per band, and not when only the planner looks."""

    def __init__(self, conv: nn.Conv3d):
        self.conv, self.bias, self.out_channels = conv, conv.bias, conv.out_channels

    @functools.cached_property
    def weight(self) -> torch.Tensor:
        return time_slice(self.conv.weight, -1)


class CausalConv3d(nn.Conv3d):
    """Wan's causal conv (k x k x k): forward takes and returns an image [B, C, H, W] or a clip
    [B, C, T, H, W]. The weight keeps the checkpoint's [O, I, k, k, k]. On an image it is the 2-D
    conv with the kernel's last time slice (`frame`): the causal padding puts k - 1 zero frames
    before a lone frame, so only that slice meets data. On a clip, k - 1 zero frames go before
    the first, none after: output frame t reads input frames t - k + 1 .. t."""

    cache = None  # None: a whole clip; in a chunked run (causal_chunks), the input frames the next chunk reads

    def __init__(self, in_channels: int, out_channels: int, k: int, kt: int | None = None):
        super().__init__(in_channels, out_channels, (k if kt is None else kt, k, k))  # kt 1: Qwen-Image 2.1's 2-D convs

    def frame(self) -> Frame:
        """The 2-D conv this is on a first frame."""
        return Frame(self)

    def forward(self, x):
        if x.dim() == 5:  # as 2-D convs over the time slices (ops.conv_over_time: why not F.conv3d)
            kt, p = self.kernel_size[0], self.kernel_size[1] // 2
            if kt == 1 or self.cache is None:
                x = cat_frames([zero_frames(x, kt - 1), x]) if kt > 1 else x
            else:
                x = cat_frames([_earlier(self.cache, x, kt - 1), x])  # this chunk after the frames before it
                self.cache = x[:, :, -(kt - 1):].clone()
            return conv_over_time(x, TimeSlices(self).slices, self.bias, padding=(p, p))
        f = self.frame()
        return F.conv2d(x, f.weight, f.bias, padding=self.kernel_size[1] // 2)


def _earlier(cache, x: torch.Tensor, n: int) -> torch.Tensor:
    """The n frames before chunk x: the cache, or zeros before a clip's first chunk."""
    if isinstance(cache, torch.Tensor):
        return cache
    return zero_frames(x, n)



@contextlib.contextmanager
def causal_chunks(*nets):
    """Run clips through nets chunk by chunk along time: every causal layer keeps the frames of its
    input that the next chunk's first frames read (Wan's feat_cache, held by the layer), so the
    chunks' outputs, in order, are the whole clip's. Caches are dropped on leaving. (A layer with
    state across chunks says so with a class attribute `cache = None`: Wan 2.2's blocks too.)"""
    layers = [m for net in nets for m in net.modules() if hasattr(m, "cache")]
    for m in layers:
        m.cache = ()  # streaming, nothing seen yet
    try:
        yield
    finally:
        for m in layers:
            m.cache = None


class QuantConv(CausalConv3d):
    """The quant convs, 1x1x1 (top-level conv1, 2z -> 2z after the encoder, and conv2, z -> z before
    the decoder; diffusers' quant_conv and post_quant_conv): [C, C, 1, 1, 1] weights, 2-D forward."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 1)


class RMSNorm(nn.Module):
    """Wan's RMS_norm: x / max(||x||, eps) * sqrt(C) * gamma, the norm over the channels of each
    pixel. gamma keeps the checkpoint's shape: [C, 1, 1, 1] in the residual blocks and heads,
    [C, 1, 1] in the attention. No released checkpoint has a bias."""

    def __init__(self, channels: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((channels, 1, 1) if images else (channels, 1, 1, 1)))
        self.eps = 1e-12  # F.normalize's: a floor under the norm itself, not under its square

    def gain(self, dtype, dims: int = 4) -> torch.Tensor:
        """sqrt(C) * gamma as one [C, 1, 1] factor ([C, 1, 1, 1] for a clip's 5 dims): one multiply
        per value, not two."""
        C = self.gamma.shape[0]
        return (self.gamma.float().view(C, *[1] * (dims - 2)) * C ** 0.5).to(dtype)

    def forward(self, x):
        return rms_silu(self, x, act=False)


def rms_into(norm: RMSNorm, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """norm(x) written into out (x's shape, any layout). The norm and the division run in fp32
    whatever x's dtype, rounded once into out, as diffusers normalises fp16/bf16 (a sum of C
    squares leaves fp16's range long before the activations do). torch.div computes in the
    promoted fp32 and casts on writing: CUDA kernels cast on the fly, the CPU takes fp32
    temporaries of the band (_rms_temp counts them)."""
    n = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(norm.eps)
    torch.div(x, n, out=out)
    return out.mul_(norm.gain(out.dtype, x.dim()))


def rms_silu(norm: RMSNorm, parts, scratch=None, act: bool = True) -> torch.Tensor:
    """RMS norm (then SiLU) of consecutive row bands of one activation, into one buffer: a
    warm one from `scratch` (ops.Scratch, valid until its next use) in the tiled engines, a new
    one without. Per pixel, so the parts are normalised on their own: no statistics to pass."""
    parts = [parts] if torch.is_tensor(parts) else parts
    if scratch is not None:
        out = scratch.like("act", parts[-1], rows=sum(p.shape[2] for p in parts))
    else:
        (x,) = parts  # the untiled forward: one whole activation, its layout kept
        out = torch.empty_like(x)
    r = 0
    for p in parts:
        rms_into(norm, p, out[:, :, r:r + p.shape[2]])
        r += p.shape[2]
    return silu_(out) if act else out


class ResidualBlock(nn.Module):
    """RMS norm -> SiLU -> conv1 -> RMS norm -> SiLU -> conv2, plus the shortcut (a 1x1x1 conv
    where the width changes). Keys: residual.0 (norm1), residual.2 (conv1), residual.3 (norm2),
    residual.6 (conv2): 1 and 4 are the SiLUs and 5 the dropout, which hold nothing."""

    def __init__(self, in_channels: int, out_channels: int, kt: int = 3):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_channels), nn.SiLU(), CausalConv3d(in_channels, out_channels, 3, kt),
            RMSNorm(out_channels), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_channels, out_channels, 3, kt))
        self.shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    @property
    def norm1(self) -> RMSNorm:
        return self.residual[0]

    @property
    def conv1(self) -> CausalConv3d:
        return self.residual[2]

    @property
    def norm2(self) -> RMSNorm:
        return self.residual[3]

    @property
    def conv2(self) -> CausalConv3d:
        return self.residual[6]

    def skip(self, x):
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x):
        h = self.conv1(rms_silu(self.norm1, x))
        h = self.conv2(rms_silu(self.norm2, h))
        return h.add_(self.skip(x)) if not h.requires_grad else h + self.skip(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w pixels of each frame (head dim = channels): RMS
    norm, q, k, v from one 1x1 conv (channels [0, C), [C, 2C), [2C, 3C) of to_qkv), proj."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels, images=True)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        if x.dim() == 5:  # a clip: each frame attends over its own pixels
            return per_frame(self, x)
        B, C, H, W = x.shape
        qkv = self.to_qkv(rms_silu(self.norm, x, act=False))
        # [B, 1, HW, C], contiguous (model.AttnBlock: a transposed view sends the CPU's SDPA to its
        # math path, which materialises the HW x HW matrix)
        q, k, v = (t.flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for t in qkv.chunk(3, dim=1))
        del qkv
        h = F.scaled_dot_product_attention(q, k, v)
        del q, k, v
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))
        return h.add_(x) if not h.requires_grad else h + x


def per_frame(layer, x: torch.Tensor) -> torch.Tensor:
    """A 2-D layer on every frame of a clip [B, C, T, H, W]."""
    B, C, T, H, W = x.shape
    y = layer(x.transpose(1, 2).reshape(B * T, C, H, W))
    return y.view(B, T, *y.shape[1:]).transpose(1, 2)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """The reference's nearest-exact 2x. At exactly 2x every pixel becomes a 2x2 block (the same as
    "nearest"), so a band's upsampling is the upsampled band's; diffusers' round trip through
    fp32 around it changes nothing (a copy is exact in any dtype)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class UpResample(nn.Module):
    """Nearest-exact 2x, then a 3x3 conv to half the width (resample.1; Wan 2.2's to `out`). Where the level doubles
    frames, time_conv ([2C, C, 3, 1, 1]) makes two frames of every frame but the first (a causal
    conv over frames 1.. with two zero frames before them, as Wan's decoder runs it chunk by chunk:
    its first chunk skips it, its second starts it afresh)."""

    def __init__(self, channels: int, temporal: bool, out: int | None = None, kt: int = 3):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                      nn.Conv2d(channels, channels // 2 if out is None else out, 3, padding=1))
        if temporal:
            self.time_conv = nn.Conv3d(channels, 2 * channels, (kt, 1, 1))

    @property
    def conv(self) -> nn.Conv2d:
        return self.resample[1]

    cache = None  # chunked runs: () before the first frame, then the time conv's last two input frames

    def forward(self, x):
        if x.dim() == 5:
            if hasattr(self, "time_conv"):
                x = self.doubled(x)
            return per_frame(lambda f: self.conv(upsample2x(f)), x)
        return self.conv(upsample2x(x))

    def doubled(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, C, T', H, W]: the clip's first frame as it is, every later frame
        twice (channels [0, C) and [C, 2C) of the causal time conv's output)."""
        head = None
        if not isinstance(self.cache, torch.Tensor):  # the clip's first frame is in x
            head, x = x[:, :, :1], x[:, :, 1:]
            if self.cache is not None:
                self.cache = zero_frames(x, 2)
        if x.shape[2]:
            if self.cache is None:
                x = cat_frames([zero_frames(x, 2), x])
            else:
                x = cat_frames([self.cache, x])
                self.cache = x[:, :, -2:].clone()
            y = conv_over_time(x, TimeSlices(self.time_conv).slices, self.time_conv.bias)
            x = interleave_halves(y)
        return x if head is None else cat_frames([head, x])


class DownResample(nn.Module):
    """Zero pad right and bottom, 3x3 conv, stride 2 (resample.1): LDM's downsample. Where the
    level halves frames, time_conv ([C, C, 3, 1, 1], stride 2 in time, no padding) runs over every
    frame after the spatial conv and its outputs follow the first frame, kept as it is (Wan's
    encoder keeps its first chunk's frame and prepends each chunk with the last frame before it)."""

    def __init__(self, channels: int, temporal: bool, kt: int = 3):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))
        if temporal:
            self.time_conv = nn.Conv3d(channels, channels, (kt, 1, 1), stride=(2, 1, 1))

    @property
    def conv(self) -> nn.Conv2d:
        """The stride-2 conv, where layers.downsample (and so DownsampleStep) reads it."""
        return self.resample[1]

    cache = None  # chunked runs: () before the first frame, then the frames the next window starts from

    def forward(self, x):
        if x.dim() == 5:
            y = per_frame(self.resample, x)
            return self.halved(y) if hasattr(self, "time_conv") else y
        return self.resample(x)

    def halved(self, y: torch.Tensor) -> torch.Tensor:
        """The first frame, then the time conv's windows over frames 0-2, 2-4, 4-6, ..."""
        first = not isinstance(self.cache, torch.Tensor)
        frames = y if first else cat_frames([self.cache, y])
        n = (frames.shape[2] - 1) // 2  # whole windows
        tc = self.time_conv
        out = ([y[:, :, :1]] if first else []) + (
            [conv_over_time(frames[:, :, :2 * n + 1], TimeSlices(tc).slices, tc.bias, stride=2)] if n else [])
        if self.cache is not None:
            self.cache = frames[:, :, 2 * n:].clone()
        return cat_frames(out) if out else y[:, :, :0]


class Head(nn.Sequential):
    """RMS norm -> SiLU -> 3x3x3 causal conv (keys head.0, head.2), the last step of either
    network; the decoder's clamps its output to [-1, 1], as diffusers' decode does."""

    def __init__(self, in_channels: int, out_channels: int, clamp: bool = False, kt: int = 3):
        super().__init__(RMSNorm(in_channels), nn.SiLU(), CausalConv3d(in_channels, out_channels, 3, kt))
        self.clamp_output = clamp

    @property
    def norm(self) -> RMSNorm:
        return self[0]

    @property
    def conv(self) -> CausalConv3d:
        return self[2]

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        # NaN stays NaN (the fp16 guard still sees it); +-Inf become +-1, what fp32 gives there too
        return y.clamp_(-1.0, 1.0) if self.clamp_output else y

    def forward(self, x):
        return self.finish(self.conv(rms_silu(self.norm, x)))


# ----------------------------------------------------------------------------------------------
# The networks.
# ----------------------------------------------------------------------------------------------
class Layered(nn.Module):
    """A network that is its layers() in order (Wan 2.1's and Wan 2.2's encoders and decoders), its
    first conv `conv1`."""

    @property
    def conv_in(self) -> CausalConv3d:
        """The first conv under the name klvae's guard and AutoencoderKL read dtype and device from."""
        return self.conv1

    def forward(self, x):
        for layer in self.layers():
            x = layer(x)
        return x


class Encoder(Layered):
    """[B, 3, H, W] -> [B, 2z, H/8, W/8] (mean and logvar, before the quant conv)."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        self.conv1 = CausalConv3d(cfg.in_channels, dims[0], 3)
        blocks = []
        for i, (w_in, w) in enumerate(zip(dims[:-1], dims[1:])):
            blocks += [ResidualBlock(w_in if j == 0 else w, w) for j in range(cfg.num_res_blocks)]
            if i != len(cfg.ch_mult) - 1:
                blocks.append(DownResample(w, cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*blocks)  # flat: the keys count blocks and resamples together
        w = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(w, w), AttentionBlock(w), ResidualBlock(w, w))
        self.head = Head(w, 2 * cfg.latent_channels)

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run band by band."""
        return [self.conv1, *self.downsamples, *self.middle, self.head]


class Decoder(Layered):
    """[B, z, h, w] (after the quant conv) -> [B, 3, 8h, 8w] in [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        mult = tuple(cfg.ch_mult)
        dims = [cfg.ch * m for m in (mult[-1],) + mult[::-1]]  # from the latent resolution up
        temporal = tuple(cfg.temporal_downsample)[::-1]
        self.conv1 = CausalConv3d(cfg.latent_channels, dims[0], 3)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks, w = [], dims[0]
        for i, out in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(w, out))
                w = out
            if i != len(mult) - 1:
                blocks.append(UpResample(out, temporal[i]))
                w = out // 2  # the upsample conv halves the width: the next level starts there
        self.upsamples = nn.Sequential(*blocks)
        self.head = Head(w, cfg.out_channels, clamp=True)

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run band by band."""
        return [self.conv1, *self.middle, *self.upsamples, self.head]


class QwenImageVAE(nn.Module):
    """The whole checkpoint, original/ComfyUI keys (load_state_dict(strict=True) takes the file):
    encoder, conv1 (the quant conv, 2z -> 2z), conv2 (the post-quant conv, z -> z), decoder."""

    def __init__(self, cfg):
        super().__init__()
        z = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.conv1 = QuantConv(2 * z)
        self.conv2 = QuantConv(z)
        self.decoder = Decoder(cfg)

    def moments(self, x):
        """[B, 3, H, W] in [-1, 1] -> [B, 2z, H/8, W/8]: the posterior's mean, then its logvar."""
        return self.conv1(self.encoder(x))

    def decode(self, z):
        """Raw latents [B, z, h, w] -> pixels [B, 3, 8h, 8w], clamped to [-1, 1]."""
        return self.decoder(self.conv2(z))


# ----------------------------------------------------------------------------------------------
# The layer types as the planner, both tiled engines and the fp16 guard see them.
# ----------------------------------------------------------------------------------------------
def _rms_temp(band_in: int, item: int) -> int:
    """Band bytes an RMS norm adds to a conv's temporaries: its fp32 per-pixel norms (1/C of the
    band: ignored) and, below fp32, two fp32 copies of the band (rms_into's input and result in
    fp32 before the cast, on the CPU; an upper bound on the GPU)."""
    return 2 * band_in * 4 // item if item < 4 else 0


def rms(norm: RMSNorm, act: bool = True) -> PerPixel:
    """The RMS norm (then SiLU) as a per-pixel norm of the verbs: each band normalised on its own."""
    return PerPixel(lambda parts, scratch: rms_silu(norm, parts, scratch, act=act), temp=_rms_temp)


class CausalConvStep(Step):
    """A causal 3x3x3 conv on one frame (each network's conv1, no norm before it): the 3x3 conv
    with the kernel's last time slice. Writes the residual stream."""

    def describe(self):
        return verbs.conv(self.layer.frame())

    def describe_clip(self):
        return verbs.causal_conv(self.layer)

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer, s)  # its output is the stream


class ResidualStep(ResnetStep):
    """RMS norm -> SiLU -> conv1 -> RMS norm -> SiLU -> conv2, plus the shortcut: the GroupNorm resnet's
    shape, cost, halo and lag (ResnetStep), plus the RMS norm's fp32 temporaries. Per-pixel norms:
    each band is normalised on its own, nothing measured between the passes."""

    def need(self, px_in, px_out, item):
        return super().need(px_in, px_out, item) + _rms_temp(max(self.cin * px_in, self.cout * px_out) * item, item)

    def describe(self):
        block = self.layer
        return verbs.residual([verbs.conv(block.conv1.frame(), rms(block.norm1)),
                               verbs.conv(block.conv2.frame(), rms(block.norm2))], shortcut=block.shortcut)

    def describe_clip(self):
        block = self.layer  # the shortcut, a 1x1x1 conv, maps a clip's rows as they are
        return verbs.residual([verbs.causal_conv(block.conv1, rms(block.norm1)),
                               verbs.causal_conv(block.conv2, rms(block.norm2))], shortcut=block.shortcut)

    @torch.no_grad()
    def scale_stream(self, s):
        # The stream's readers: norm1 (RMS: norm(s x) with eps * s is norm(x) with eps, as
        # F.normalize's eps floors the norm itself) and the shortcut (linear: only its bias
        # scales); conv2 writes into it. conv1's input is normalised, norm2 reads conv1's output.
        block = self.layer
        _scale(block.conv2, s)
        block.norm1.eps *= s
        if block.shortcut is not None:
            _scale(block.shortcut, s, weight=False)


class AttentionStep(Step):
    """Single-head self-attention over every pixel of the frame (the middle's): global."""

    def shape(self):
        return self.cin, self.r_in

    def need(self, px_in, px_out, item):
        return 6 * self.cin * px_in * item  # stream, normalised copy, qkv, q, k, v (SDPA keeps the rest linear)

    def flops(self, B, n):
        return 2.0 * B * n * 4 * self.cin * self.cin + 4.0 * B * n * n * self.cin

    def describe(self):
        attn = self.layer
        # temporaries: the normalised band, its qkv (three bands), the attended band
        return verbs.attention(rms(attn.norm, act=False), lambda hn: attn.to_qkv(hn).chunk(3, dim=1), attn.proj, temp=5)

    def describe_clip(self):
        return self.describe()  # each frame over its own pixels: the engine folds frames into the batch

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.proj, s)   # writes into the stream
        self.layer.norm.eps *= s     # reads it (F.normalize's eps floors the norm: scales by s)


def upsample(up: UpResample, t: Tile) -> Tile:
    """Nearest-exact 2x of a tile (a region of the upsampled image is the upsampled region), then its conv."""
    u = Tile(upsample2x(t.data), 2 * t.y0, 2 * t.y1, 2 * t.x0, 2 * t.x1, 2 * t.H, 2 * t.W, 2 * t.s)
    return conv3x3(up.conv, u)


class UpStep(Step):
    """Nearest-exact 2x, then a 3x3 conv that halves the width (no norm before it)."""

    def shape(self):
        return self.layer.conv.out_channels, 2 * self.r_in

    def need(self, px_in, px_out, item):
        # its input, the 2x copy (input width at the output resolution), the conv's output and workspace
        return int(self.cin * (px_in + px_out) * item + self.cout * px_out * item * (1 + WORKSPACE))

    def describe(self):
        return upsample_rows(lambda t: upsample(self.layer, t), self.cout)

    def describe_clip(self):
        up = self.layer
        if not hasattr(up, "time_conv"):
            return self.describe()
        tc = TimeSlices(up.time_conv)
        return [verbs.rows(lambda t: doubled(tc, t), self.cin, above=0, below=0, earlier=2, key=up.time_conv,
                           time=lambda t0, T: (0, 2 * T - 1) if t0 == 0 else (2 * t0 - 1, 2 * T)),
                self.describe()]

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.conv, s, weight=False)  # maps the stream to itself
        if hasattr(self.layer, "time_conv"):  # so does the time conv before it (clips: images skip it)
            _scale(self.layer.time_conv, s, weight=False)


def doubled(time_conv: TimeSlices, t: Tile) -> Tile:
    """UpResample's time conv on a clip's tile (UpResample.doubled, band by band): the clip's first
    frame as it is; every later frame becomes two (channels [0, C) and [C, 2C) of the causal
    [3, 1, 1] conv over the frames after the first, zeros before frame 1)."""
    x, past, head = t.data, t.past, None
    if t.t0 - past == 0:  # frame 0 is here: it passes, and the time conv's frames start after it
        head = x[:, :, :1] if t.t0 == 0 else None
        x, past = x[:, :, 1:], max(0, past - 1)
    n = x.shape[2] - past
    if n:
        y = conv_over_time(causal(t._replace(data=x, past=past), 2).data, time_conv.slices, time_conv.bias)
        y = interleave_halves(y)
        x = y if head is None else cat_frames([head, y])
    else:
        x = head
    return t._replace(data=x, past=0)


class DownResampleStep(DownsampleStep):
    """LDM's stride-2 3x3 conv on every frame; on clips, where the level halves time, then the
    stride-2 time conv (DownResample.halved)."""

    @torch.no_grad()
    def scale_stream(self, s):
        super().scale_stream(s)
        if hasattr(self.layer, "time_conv"):  # maps the stream to itself after the conv (clips only)
            _scale(self.layer.time_conv, s, weight=False)

    def describe_clip(self):
        down = self.layer
        if not hasattr(down, "time_conv"):
            return self.describe()
        tc = TimeSlices(down.time_conv)

        def time(t0, T):
            j0, j1 = max(1, -(-t0 // 2)), (t0 + T - 1) // 2
            return (0, 1 + max(0, j1)) if t0 == 0 else (j0, max(0, j1 - j0 + 1))
        return [self.describe(),
                verbs.rows(lambda t: halved(tc, t), self.cout, above=0, below=0, earlier=2,
                           key=down.time_conv, time=time)]


def halved(time_conv: TimeSlices, t: Tile) -> Tile:
    """DownResample's time conv on a clip's tile: output frame 0 is input frame 0; output j >= 1 is
    the conv over input frames 2j - 2 .. 2j (stride 2). A chunk makes the outputs whose last input
    frame is one of its own; the earlier frames (Tile.past) hold the rest of their windows."""
    x, past, t0 = t.data, t.past, t.t0
    T, first = x.shape[2] - past, t0 - past
    out = [x[:, :, past:past + 1]] if t0 == 0 else []
    j0, j1 = max(1, -(-t0 // 2)), (t0 + T - 1) // 2
    if j1 >= j0:
        out.append(conv_over_time(x[:, :, 2 * j0 - 2 - first:2 * j1 - first + 1], time_conv.slices, time_conv.bias,
                                  stride=2))
    # a new tensor, never a view of the input: a residual's shortcut is added into it in place (Wan 2.2's
    # levels), and the input's frames are this op's cache for the next chunk
    data = cat_frames(out) if out else x[:, :, :0]
    return t._replace(data=data, past=0)


class HeadStep(Step):
    """RMS norm -> SiLU -> conv: the network's output (on the device, whatever the store);
    the decoder's then clamps (per pixel: band by band, the untiled result)."""

    def shape(self):
        return self.layer.conv.out_channels, self.r_in

    def describe(self):
        head, conv = self.layer, self.layer.conv.frame()

        def fn(t: Tile) -> Tile:
            out = conv3x3(conv, t)
            return out._replace(data=head.finish(out.data))  # the clamp: per pixel, band by band
        return verbs.rows(fn, self.cout, norm=rms(head.norm))

    def describe_clip(self):
        head = self.layer
        op = verbs.causal_conv(head.conv, rms(head.norm))
        return dataclasses.replace(op, fn=lambda t: (o := op.fn(t))._replace(data=head.finish(o.data)))

    @torch.no_grad()
    def scale_stream(self, s):
        self.layer.norm.eps *= s  # reads the stream; its output is the network's


for _module, _step in ((CausalConv3d, CausalConvStep), (ResidualBlock, ResidualStep), (AttentionBlock, AttentionStep),
                       (UpResample, UpStep), (DownResample, DownResampleStep), (Head, HeadStep)):
    register(_module, _step)


# ----------------------------------------------------------------------------------------------
# Keys: the original release's (= ComfyUI's, this module's) and diffusers' AutoencoderKLQwenImage's.
# ----------------------------------------------------------------------------------------------
# A residual block's leaves (original -> diffusers); the attention's and a resample's are the same in both.
RESNET_LEAVES = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
                 "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                 "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
ATTENTION_LEAVES = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
RESAMPLE_LEAVES = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")
HEAD_LEAVES = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight", "head.2.bias": "conv_out.bias"}
QUANT = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
         "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
_INV = lambda d: {v: k for k, v in d.items()}


WAN22 = ("this is Wan 2.2's VAE (residual blocks across several layers, 48 latent channels, 16x, patchified), "
         "a different architecture from Wan 2.1's / Qwen-Image's: model_wan22 reads it (load_vae does)")


def _unknown(k: str, layout: str) -> KLVAEError:
    return KLVAEError(f"key {k[:100]!r} is not a Qwen-Image / Wan 2.1 VAE key in the {layout} layout "
                      f"(attention inside the levels, attn_scales, is not supported: no released VAE has it)")


def _decoder_stride(keys, layout: str):
    """Entries per decoder level in the original flat `decoder.upsamples.N` (its resnets and its
    upsample: num_res_blocks + 2), from either layout's keys; None for a decoder with one level."""
    if layout == "original":
        ups = [int(m[1]) for k in keys if (m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.resample\.1\.weight", k))]
        return min(ups) + 1 if ups else None
    res = [int(m[1]) for k in keys if (m := re.fullmatch(r"decoder\.up_blocks\.0\.resnets\.(\d+)\..+", k))]
    has_up = any(k.startswith("decoder.up_blocks.0.upsamplers.") for k in keys)
    return max(res) + 2 if res and has_up else None


def shared_to_diffusers(net: str, rest: str) -> str | None:
    """A key of {en,de}coder.<rest> that Wan 2.1's and Wan 2.2's layouts share (the input conv, the
    middle, the head), original -> diffusers; None for the others."""
    if rest in ("conv1.weight", "conv1.bias"):
        return f"{net}.conv_in.{rest[6:]}"
    if rest in HEAD_LEAVES:
        return f"{net}.{HEAD_LEAVES[rest]}"
    if m := re.fullmatch(r"middle\.(\d+)\.(.+)", rest):
        n, leaf = int(m[1]), m[2]
        if n == 1 and leaf in ATTENTION_LEAVES:
            return f"{net}.mid_block.attentions.0.{leaf}"
        if n in (0, 2) and leaf in RESNET_LEAVES:
            return f"{net}.mid_block.resnets.{n // 2}.{RESNET_LEAVES[leaf]}"
    return None


def shared_to_original(net: str, rest: str) -> str | None:
    """shared_to_diffusers' inverse (diffusers' {en,de}coder.<rest> -> the original key), None for the others."""
    head, resnet = _INV(HEAD_LEAVES), _INV(RESNET_LEAVES)
    if rest in ("conv_in.weight", "conv_in.bias"):
        return f"{net}.conv1.{rest[8:]}"
    if rest in head:
        return f"{net}.{head[rest]}"
    if (m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest)) and m[1] in ATTENTION_LEAVES:
        return f"{net}.middle.1.{m[1]}"
    if (m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest)) and m[2] in resnet:
        return f"{net}.middle.{2 * int(m[1])}.{resnet[m[2]]}"
    return None


def _to_diffusers_key(k: str, stride) -> str:
    if k in QUANT:
        return QUANT[k]
    net, _, rest = k.partition(".")
    if net not in ("encoder", "decoder"):
        raise _unknown(k, "original")
    if shared := shared_to_diffusers(net, rest):
        return shared
    if net == "encoder" and (m := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest)):
        n, leaf = int(m[1]), m[2]
        if leaf in RESNET_LEAVES:
            return f"encoder.down_blocks.{n}.{RESNET_LEAVES[leaf]}"
        if leaf in RESAMPLE_LEAVES:
            return f"encoder.down_blocks.{n}.{leaf}"
    if net == "decoder" and (m := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest)):
        n, leaf = int(m[1]), m[2]
        i, j = divmod(n, stride) if stride else (0, n)
        if leaf in RESNET_LEAVES and (stride is None or j < stride - 1):
            return f"decoder.up_blocks.{i}.resnets.{j}.{RESNET_LEAVES[leaf]}"
        if leaf in RESAMPLE_LEAVES and stride and j == stride - 1:
            return f"decoder.up_blocks.{i}.upsamplers.0.{leaf}"
    raise _unknown(k, "original")


def _to_original_key(k: str, stride) -> str:
    quant, resnet = _INV(QUANT), _INV(RESNET_LEAVES)
    if k in quant:
        return quant[k]
    net, _, rest = k.partition(".")
    if net not in ("encoder", "decoder"):
        raise _unknown(k, "diffusers")
    if shared := shared_to_original(net, rest):
        return shared
    if net == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)):
        if m[2] in resnet:
            return f"encoder.downsamples.{m[1]}.{resnet[m[2]]}"
        if m[2] in RESAMPLE_LEAVES:
            return f"encoder.downsamples.{m[1]}.{m[2]}"
    if net == "decoder" and (m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)):
        i, j, leaf = int(m[1]), int(m[2]), m[3]
        if leaf in resnet and (stride is None and i == 0 or stride and j < stride - 1):
            return f"decoder.upsamples.{i * (stride or 0) + j}.{resnet[leaf]}"
    if net == "decoder" and (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest)):
        if m[2] in RESAMPLE_LEAVES and stride:
            return f"decoder.upsamples.{int(m[1]) * stride + stride - 1}.{m[2]}"
    raise _unknown(k, "diffusers")


def original_to_diffusers(sd: dict) -> dict:
    """A state dict with original/ComfyUI keys -> diffusers AutoencoderKLQwenImage's (same tensors).

    encoder.conv1 <-> encoder.conv_in, encoder.downsamples.N <-> encoder.down_blocks.N (resnet
    leaves residual.0/2/3/6, shortcut <-> norm1, conv1, norm2, conv2, conv_shortcut; resample.1
    and time_conv as they are), {en,de}coder.middle.0/1/2 <-> mid_block.resnets.0 /
    attentions.0 / resnets.1, head.0/head.2 <-> norm_out/conv_out, top-level conv1/conv2 <->
    quant_conv/post_quant_conv, and decoder.upsamples.N <-> decoder.up_blocks.i.resnets.j (N =
    i * (num_res_blocks + 2) + j) or decoder.up_blocks.i.upsamplers.0 (the level's last N)."""
    stride = _decoder_stride(sd.keys(), "original")
    return {_to_diffusers_key(k, stride): v for k, v in sd.items()}


def diffusers_to_original(sd: dict) -> dict:
    """The inverse of original_to_diffusers (the same tensors)."""
    if any(re.search(r"\.(avg_shortcut|upsampler)\.|^encoder\.down_blocks\.\d+\.resnets\.", k) for k in sd):
        raise KLVAEError(WAN22)  # AutoencoderKLWan(is_residual=True): residual up/down blocks
    stride = _decoder_stride(sd.keys(), "diffusers")
    return {_to_original_key(k, stride): v for k, v in sd.items()}


def config_from_shapes(shape, keys) -> dict:
    """The network's shape (QwenImageShape's fields) from original-layout tensor shapes.
    shape: key -> its shape; keys: the keys present. The base width from encoder.conv1, the
    level widths from each encoder level's first conv2, the residual blocks counted before the
    first downsample, the temporal flags from the time_convs present, z from decoder.conv1."""
    keys = set(keys)
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in keys:
        raise KLVAEError(WAN22)
    need = ("encoder.conv1.weight", "decoder.conv1.weight", "decoder.head.2.weight", "encoder.head.2.weight")
    missing = [k for k in need if k not in keys]
    if missing:
        raise KLVAEError(f"Qwen-Image VAE weights incomplete: missing {', '.join(missing)}")
    ch, in_ch = shape("encoder.conv1.weight")[:2]
    z = shape("decoder.conv1.weight")[1]
    out_ch = shape("decoder.head.2.weight")[0]
    if shape("encoder.head.2.weight")[0] != 2 * z:
        raise KLVAEError(f"the encoder's head gives {shape('encoder.head.2.weight')[0]} channels, the decoder takes "
                         f"{z}: expected twice as many (mean and logvar)")
    entries = sorted({int(m[1]) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    if entries != list(range(len(entries))) or not entries:
        raise KLVAEError("the encoder's downsamples are missing or not numbered 0, 1, 2, ...: the file is damaged")
    downs = [n for n in entries if f"encoder.downsamples.{n}.resample.1.weight" in keys]
    per = downs[0] if downs else len(entries)          # residual blocks per level
    levels = len(downs) + 1
    if per < 1 or len(entries) != levels * per + len(downs) or downs != [(i + 1) * (per + 1) - 1 for i in range(len(downs))]:
        raise KLVAEError(f"the encoder's levels are irregular (downsamples at {downs} of {len(entries)} entries)")
    widths = [shape(f"encoder.downsamples.{i * (per + 1)}.residual.6.weight")[0] for i in range(levels)]
    if any(w % ch for w in widths):
        raise KLVAEError(f"level widths {widths} are not multiples of the first width {ch}")
    temporal = tuple(f"encoder.downsamples.{n}.time_conv.weight" in keys for n in downs)
    head = shape("decoder.head.0.gamma")[0] if "decoder.head.0.gamma" in keys else widths[0]
    if shape("decoder.conv1.weight")[0] != widths[-1] or head != widths[0]:
        raise KLVAEError(f"the decoder's widths ({shape('decoder.conv1.weight')[0]} at the latent) do not mirror the "
                         f"encoder's {widths}: not a Wan 2.1-style VAE")
    return dict(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=per, latent_channels=z,
                in_channels=in_ch, out_channels=out_ch, temporal_downsample=temporal)


def diffusers_config(cfg) -> dict:
    """The config.json diffusers' AutoencoderKLQwenImage needs for a network of this shape.
    input_channels (also its output's) only where it is not 3, as in the released config; the
    latent statistics are Qwen-Image's where the latent has its 16 channels."""
    if cfg.in_channels != cfg.out_channels:
        raise KLVAEError(f"diffusers' AutoencoderKLQwenImage decodes to its input's channels: {cfg.in_channels} in, "
                         f"{cfg.out_channels} out has no diffusers config")
    out = {"_class_name": "AutoencoderKLQwenImage", "base_dim": cfg.ch, "z_dim": cfg.latent_channels,
           "dim_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks, "attn_scales": [],
           "temperal_downsample": list(cfg.temporal_downsample), "dropout": 0.0}
    if cfg.in_channels != 3:
        out["input_channels"] = cfg.in_channels
    if cfg.latent_channels == len(LATENTS_MEAN):
        out["latents_mean"], out["latents_std"] = list(LATENTS_MEAN), list(LATENTS_STD)
    return out


# ----------------------------------------------------------------------------------------------
# klvae's AutoencoderKL names the quant convs quant_conv / post_quant_conv for every family; this
# family's own files (and ComfyUI) call them top-level conv1 / conv2.
# ----------------------------------------------------------------------------------------------
KLVAE_QUANT = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}


def to_original(sd: dict) -> dict:
    """klvae's keys -> the original/ComfyUI layout (the quant convs' top-level names)."""
    return {next((o + k[len(n):] for o, n in KLVAE_QUANT.items() if k.startswith(n)), k): v for k, v in sd.items()}


def from_original(sd: dict) -> dict:
    """The original/ComfyUI layout -> klvae's keys."""
    return {next((n + k[len(o):] for o, n in KLVAE_QUANT.items() if k.startswith(o)), k): v for k, v in sd.items()}


def pipeline_names(cfg) -> dict:
    """What Wan's pipelines read of AutoencoderKLWan's config (WanPipeline, WanImageToVideoPipeline), which
    AutoencoderKLQwenImage's config.json (the one klvae writes) does not hold."""
    return {"scale_factor_spatial": cfg.downscale, "scale_factor_temporal": 2 ** sum(cfg.temporal_downsample)}


def quant_convs(cfg) -> tuple:
    """AutoencoderKL's quant_conv and post_quant_conv for this family."""
    return QuantConv(2 * cfg.latent_channels), QuantConv(cfg.latent_channels)


# ----------------------------------------------------------------------------------------------
# The family and its registration (config.Network).
# ----------------------------------------------------------------------------------------------
def read(name: str, shape, keys: dict, layout: str) -> tuple:
    """A file's VAE keys ({key after any prefix: the file's key}) in its layout -> ({klvae key: the
    file's key}, the network's shape fields)."""
    original = keys if layout == "original" else diffusers_to_original(keys)
    return from_original(original), config_from_shapes(lambda k: shape(original[k]), original.keys())


def check(cfg) -> None:
    t = cfg.temporal_downsample
    if not isinstance(t, tuple) or len(t) != len(cfg.ch_mult) - 1 or not all(isinstance(b, bool) for b in t):
        raise KLVAEError(f"temporal_downsample {str(t)[:60]}: this VAE (Wan's) needs one flag (True/False) per level "
                         f"transition, {len(cfg.ch_mult) - 1} here")


def narrow(cfg, overrides: dict) -> dict:
    """The released flags belong to the released levels; a narrowed test network keeps the last ones it has room for."""
    if "ch_mult" in overrides and "temporal_downsample" not in overrides:
        levels = len(overrides["ch_mult"])
        t = cfg.temporal_downsample
        overrides["temporal_downsample"] = t[len(t) - levels + 1:] if levels > 1 else ()
    return overrides


# Qwen-Image (and its Edit models) and Wan 2.1's video: the same causal video VAE, on images (T = 1) and clips.
FAMILY = Family("qwenimage", 16, 1.0, 0.0, True, "Qwen-Image and Wan 2.1 (images, and clips of 1 + 4k frames)",
                arch="qwenimage",
                latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
                shape=(("ch", 96), ("temporal_downsample", (False, True, True))))
register_network(Network("qwenimage", sys.modules[__name__], (FAMILY,),
                 markers=(("original", "decoder.upsamples.0.residual.0.gamma"),  # Wan 2.2's levels nest: model_wan22
                          ("diffusers", "encoder.down_blocks.0.norm1.gamma")),
                 read=read, to_file=to_original, video_shaped=True, group_norms=False, check=check, narrow=narrow,
                 diffusers=ArchNames(classes=("AutoencoderKLQwenImage", "AutoencoderKLWan"), config=diffusers_config,
                                     to_diffusers=lambda sd: original_to_diffusers(to_original(sd)),
                                     from_diffusers=lambda sd: from_original(diffusers_to_original(sd)),
                                     read=pipeline_names)))
