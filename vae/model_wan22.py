"""Wan 2.2's VAE and Qwen-Image 2.1's: residual blocks across several layers, 16x, in plain torch.

The family
----------
Two VAEs of one design, the successor of Wan 2.1's (model_qwenimage.py), whose pieces they reuse
(causal convs, RMS norms, residual and attention blocks, resamples, the head):
  * Wan 2.2's (Wan2.2-TI2V-5B, FastWan 2.2): diffusers AutoencoderKLWan(is_residual=True,
    patch_size=2), ComfyUI comfy/ldm/wan/vae2_2.py, the original release's wan2.2_vae.safetensors.
    Pixels go in and out as 2x2 patches in channels (12 = 3 x 4) around 4 levels (8x) of causal
    3-D convs: 16x in space, 4x in time, 48 latent channels; encoder base width 160, decoder 256.
  * Qwen-Image 2.1's (diffusers AutoencoderKLQwenImage21; qwen_image_2.1_vae_bf16.safetensors, the
    Wan 2.2 key layout with a time kernel of 1, which is how ComfyUI tells it apart): RGBA in and
    out, no patches, 5 levels (16x) of 2-D convs, 64 latent channels; encoder 96, decoder 144. An
    image VAE: one frame.
What is new against Wan 2.1: every level is one block, `x + shortcut(x)` around its resnets and its
resample, the shortcut a map without weights:
  * down (AvgDown3D): 2x2 cells (and frame pairs) into channels, then the mean of each run of
    `group` consecutive channels;
  * up (DupUp3D): every channel repeated, then channels back into 2x2 cells (and frame pairs);
and the decoder's upsample convs keep the width (Wan 2.1's halve it). The last decoder level has
no upsample and no shortcut: its resnets are plain layers.

Images: T = 1
-------------
As for Wan 2.1, a lone frame runs the 2-D network of each kernel's last time slice (model_qwenimage:
Frame). The shortcuts' time axis meets the causal padding: the down shortcut of a level that halves
time pads one zero frame before the lone one (so half of each mean's values are zeros), and the up
shortcut of a level that doubles time keeps the second of the two frames it makes (Wan's first
chunk drops the first). On one frame both are maps of whole 2x2 cells (`avg_down`, `dup_up`): row
ops with no halo, which the exact engine, bounded mode and the distributed run take as they are
(layers.SpanStep keeps the block's input alive across its layers).

Clips (Wan 2.2's): T > 1, in causal time
----------------------------------------
The pieces run clips as Wan 2.1's do (causal convs with their caches, the decoder's frame doubling,
the encoder's stride-2 time conv). The shortcuts are maps within frame groups, so they need no
cache: the down shortcut of the clip's first chunk puts the zero frame before its first frame, and
every later chunk must start on a frame pair (Wan's encode chunks of 1, 4, 4, ... frames do; other
chunkings are one error); the up shortcut drops the first frame of the clip's first chunk. Each
block knows whether its chunk is the first: `cache` in a chunked untiled run (causal_chunks), the
Tile's t0 in the exact engine (engine.run_clip), which runs the blocks' clip descriptions
(SpanStep.describe_clip) band by band like Wan 2.1's layers. Qwen-Image 2.1's network has no time
axis: its clips are refused in one line (refuse_clip).

Layer types -> Steps (registered at the bottom of this file)
------------------------------------------------------------
  Patchify, Unpatchify  PatchifyStep, UnpatchifyStep  2x2 patches to channels and back: row ops over whole cells
  DownBlock             DownBlockStep (SpanStep)       the level's layers + AvgDown3D (a row op, or per pixel)
  UpBlock               UpBlockStep (SpanStep)         the level's layers + DupUp3D (a row op)
and model_qwenimage's Steps for the causal convs, resnets, attention, resamples and head.
"""
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import model_qwenimage as wan21, verbs
from .config import Family, Network, register_network
from .diffusers_compat import ArchNames
from .errors import KLVAEError
from .layers import SpanStep, Step, register
from .model_qwenimage import (QUANT, RESAMPLE_LEAVES, RESNET_LEAVES, AttentionBlock, CausalConv3d, DownResample, Head,
                              Layered, QuantConv, ResidualBlock, UpResample, causal_chunks, from_original, per_frame,
                              shared_to_diffusers, shared_to_original, to_original)
from .ops import Tile, fold, unfold

# The latent statistics their pipelines normalise with: Wan 2.2's (its diffusers config.json, ComfyUI's
# latent_formats.Wan22) and Qwen-Image 2.1's (AutoencoderKLQwenImage21's config).
WAN22_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
              0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
              -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
              -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
             0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
             0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
             0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)
QI21_MEAN = (0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
             0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
             -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
             0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
             -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
             0.5547, -1.7121, -0.1562, 0.0304)
QI21_STD = (3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904, 2.8778,
            3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489, 3.4896, 3.8513,
            3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467, 3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063,
            5.1125, 3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875, 3.9624, 4.0168, 3.5643, 4.0550,
            5.5614, 4.2963, 4.4080, 3.4959, 3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161)


# ----------------------------------------------------------------------------------------------
# The pieces.
# ----------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C p p, H/p, W/p]: pixel (y p + q, x p + r) of channel c -> channel
    (c p + r) p + q (Wan's order: the column's offset before the row's)."""
    B, C, H, W = x.shape
    return x.view(B, C, H // p, p, W // p, p).permute(0, 1, 5, 3, 2, 4).reshape(B, C * p * p, H // p, W // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of patchify: [B, C p p, h, w] -> [B, C, h p, w p]."""
    B, Cpp, h, w = x.shape
    return x.view(B, Cpp // (p * p), p, p, h, w).permute(0, 1, 4, 3, 5, 2).reshape(B, Cpp // (p * p), h * p, w * p)


class Patchify(nn.Module):
    """Wan 2.2's input: 2x2 pixel patches into channels (no weights)."""

    def __init__(self, channels: int, p: int):
        super().__init__()
        self.p, self.out_channels = p, channels * p * p

    def forward(self, x):
        return per_frame(self, x) if x.dim() == 5 else patchify(x, self.p)


class Unpatchify(nn.Module):
    """Wan 2.2's output: channels back into 2x2 pixel patches (no weights)."""

    def __init__(self, channels: int, p: int):
        super().__init__()
        self.p, self.out_channels = p, channels // (p * p)

    def forward(self, x):
        return per_frame(self, x) if x.dim() == 5 else unpatchify(x, self.p)


def avg_down(x: torch.Tensor, cout: int, ft: int, fs: int, first: bool = True) -> torch.Tensor:
    """AvgDown3D: [B, C, T, H, W] -> [B, cout, T', H/fs, W/fs] (an image [B, C, H, W]: one frame).
    Each group of ft frames and fs x fs cell goes into channels (value (c, t, i, j) at index
    ((c ft + t) fs + i) fs + j), then the mean of each run of C ft fs fs / cout consecutive values.
    The clip's first group is ft - 1 zero frames and its first frame (Wan pads the front); `first`:
    x starts the clip, else it must start on a group (Wan's chunks of 1, 4, 4, ... frames do)."""
    image = x.dim() == 4
    x = x[:, :, None] if image else x
    B, C, T, H, W = x.shape
    lead = ft - 1 if first else 0
    if (T + lead) % ft:
        raise KLVAEError(f"a time chunk of {T} frames {'at the clip start' if first else 'after it'} does not hold whole "
                         f"groups of {ft} frames for Wan 2.2's shortcut: chunk clips as Wan does (1, 4, 4, ... frames)")
    if lead:
        x = torch.cat([x.new_zeros(B, C, lead, H, W), x], dim=2)
    n, h, w = (T + lead) // ft, H // fs, W // fs
    u = x.reshape(B, C, n, ft, h, fs, w, fs).permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, cout, -1, n, h, w).mean(2)
    return u[:, :, 0] if image else u


def dup_up(x: torch.Tensor, cout: int, ft: int, fs: int, first: bool = True) -> torch.Tensor:
    """DupUp3D: [B, C, T, h, w] -> [B, cout, T ft, fs h, fs w] (an image [B, C, h, w]: one frame).
    Every channel repeated cout ft fs fs / C times (value k of the repeat is channel k // repeats),
    the values read as (c, t, i, j) at index ((c ft + t) fs + i) fs + j: ft frames of fs x fs cells
    for each frame. `first`: x starts the clip, whose first ft - 1 frames Wan drops (a lone frame
    keeps the last of its ft). Gathers the channels each frame needs: no repeat is made."""
    image = x.dim() == 4
    x = x[:, :, None] if image else x
    B, C, T, h, w = x.shape
    repeats = cout * ft * fs * fs // C
    k = torch.arange(cout * fs * fs, device=x.device)
    frames = []
    for t in range(ft - 1 if image else 0, ft):  # a lone frame: only the frame that is kept
        src = ((k // (fs * fs) * ft + t) * fs * fs + k % (fs * fs)) // repeats
        y = fold(x).index_select(1, src)
        frames.append(unfold(F.pixel_shuffle(y, fs) if fs > 1 else y, B))
    if image:
        return frames[0][:, :, 0]
    y = torch.stack(frames, dim=3).reshape(B, cout, T * ft, fs * h, fs * w)
    return y[:, :, ft - 1:] if first else y


def _shortcut_fits(cin: int, cout: int, factor: int, what: str) -> None:
    """The shortcut's values must split into whole runs (AvgDown3D) or whole repeats (DupUp3D)."""
    a, b = (cin * factor, cout) if what == "down" else (cout * factor, cin)
    if a % b:
        raise KLVAEError(f"a {what} block from {cin} to {cout} channels has no {'AvgDown3D' if what == 'down' else 'DupUp3D'} "
                         f"shortcut ({a} values per cell do not split into {b} channels): not a Wan 2.2-style VAE")


class DownBlock(nn.Module):
    """An encoder level (encoder.downsamples.N): its resnets and, but at the last level, its
    downsample (keys downsamples.J), plus the shortcut AvgDown3D of the block's input."""

    def __init__(self, cin: int, cout: int, n: int, temporal: bool, down: bool, kt: int):
        super().__init__()
        blocks = [ResidualBlock(cin if j == 0 else cout, cout, kt) for j in range(n)]
        if down:
            blocks.append(DownResample(cout, temporal, kt))
        self.downsamples = nn.Sequential(*blocks)
        self.cin, self.cout, self.ft, self.fs = cin, cout, 2 if temporal else 1, 2 if down else 1
        _shortcut_fits(cin, cout, self.ft * self.fs ** 2, "down")

    cache = None  # chunked clips (causal_chunks): () before the first chunk, then True

    def layers(self) -> list:
        return list(self.downsamples)

    def shortcut(self, x: torch.Tensor, first: bool = True) -> torch.Tensor:
        return avg_down(x, self.cout, self.ft, self.fs, first)

    def forward(self, x):
        return _block(self, x)


class UpBlock(nn.Module):
    """A decoder level (decoder.upsamples.N): its resnets and, but at the last level, its upsample
    keeping the width (keys upsamples.J), plus the shortcut DupUp3D where it upsamples."""

    def __init__(self, cin: int, cout: int, n: int, temporal: bool, up: bool, kt: int):
        super().__init__()
        blocks = [ResidualBlock(cin if j == 0 else cout, cout, kt) for j in range(n)]
        if up:
            blocks.append(UpResample(cout, temporal, out=cout, kt=kt))
        self.upsamples = nn.Sequential(*blocks)
        self.up, self.cin, self.cout, self.ft = up, cin, cout, 2 if temporal else 1
        if up:
            _shortcut_fits(cin, cout, self.ft * 4, "up")

    cache = None  # chunked clips (causal_chunks): () before the first chunk, then True

    def layers(self) -> list:
        return list(self.upsamples)

    def shortcut(self, x: torch.Tensor, first: bool = True) -> torch.Tensor:
        return dup_up(x, self.cout, self.ft, 2, first)

    def forward(self, x):
        return _block(self, x, shortcut=self.up)


def _block(block, x: torch.Tensor, shortcut: bool = True) -> torch.Tensor:
    """A level's layers, plus its shortcut of x. In a chunked clip (block.cache not None) the shortcut
    knows whether x is the clip's first chunk."""
    first = x.dim() == 4 or block.cache in (None, ())
    if x.dim() == 5 and block.cache is not None:
        block.cache = True
    h = x
    for layer in block.layers():
        h = layer(h)
    if not shortcut:
        return h
    return h.add_(block.shortcut(x, first)) if not h.requires_grad else h + block.shortcut(x, first)


def refuse_clip(cfg, frames: int) -> KLVAEError | None:
    """Why a clip of `frames` frames is not run (AutoencoderKL asks before anything runs): Qwen-Image
    2.1's 2-D network has no time axis; Wan 2.2's runs clips (None)."""
    if cfg.time_kernel == 1:
        return KLVAEError(f"Qwen-Image 2.1's VAE is an image VAE (2-D convolutions): it takes one frame, not {frames}; "
                          f"encode or decode the frames as a batch of images")
    return None


# ----------------------------------------------------------------------------------------------
# The networks.
# ----------------------------------------------------------------------------------------------
class Encoder(Layered):
    """[B, C, H, W] -> [B, 2z, H/16, W/16] (mean and logvar, before the quant conv)."""

    def __init__(self, cfg):
        super().__init__()
        p, kt, levels = cfg.patch_size, cfg.time_kernel, len(cfg.ch_mult)
        dims = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]
        self.patch = Patchify(cfg.in_channels, p) if p > 1 else None
        self.conv1 = CausalConv3d(cfg.in_channels * p * p, dims[0], 3, kt)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, i < levels - 1 and cfg.temporal_downsample[i],
                      i < levels - 1, kt) for i in range(levels)])
        w = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(w, w, kt), AttentionBlock(w), ResidualBlock(w, w, kt))
        self.head = Head(w, 2 * cfg.latent_channels, kt=kt)

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run band by band."""
        return [*([self.patch] if self.patch is not None else []), self.conv1, *self.downsamples, *self.middle,
                self.head]


class Decoder(Layered):
    """[B, z, h, w] (after the quant conv) -> [B, C, 16h, 16w] in [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        p, kt, mult = cfg.patch_size, cfg.time_kernel, tuple(cfg.ch_mult)
        dims = [(cfg.decoder_ch or cfg.ch) * m for m in (mult[-1],) + mult[::-1]]  # from the latent resolution up
        temporal, levels = tuple(cfg.temporal_downsample)[::-1], len(mult)
        self.conv1 = CausalConv3d(cfg.latent_channels, dims[0], 3, kt)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], kt), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], kt))
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, i < levels - 1 and temporal[i], i < levels - 1, kt)
            for i in range(levels)])
        self.head = Head(dims[-1], cfg.out_channels * p * p, clamp=True, kt=kt)
        self.unpatch = Unpatchify(cfg.out_channels * p * p, p) if p > 1 else None

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run band by band (the
        last level, with no shortcut, as its plain layers)."""
        blocks = [layer for b in self.upsamples for layer in ([b] if b.up else b.layers())]
        return [self.conv1, *self.middle, *blocks, self.head, *([self.unpatch] if self.unpatch is not None else [])]



def quant_convs(cfg) -> tuple:
    """AutoencoderKL's quant_conv and post_quant_conv for this family."""
    return QuantConv(2 * cfg.latent_channels), QuantConv(cfg.latent_channels)


# ----------------------------------------------------------------------------------------------
# The layer types as the planner, the tiled engines and the fp16 guard see them.
# ----------------------------------------------------------------------------------------------
def _cells(t: Tile, p: int) -> Tile:
    """The tile cropped to whole p x p cells (a bounded-mode strip may start inside one)."""
    y0, y1, x0, x1 = -(-t.y0 // p) * p, t.y1 // p * p, -(-t.x0 // p) * p, t.x1 // p * p
    return t.crop(y0, y1, x0, x1)


def _down(t: Tile, data: torch.Tensor, p: int) -> Tile:
    return t._replace(data=data, y0=t.y0 // p, y1=t.y1 // p, x0=t.x0 // p, x1=t.x1 // p, H=t.H // p, W=t.W // p,
                      s=t.s // p)


def _up(t: Tile, data: torch.Tensor, p: int) -> Tile:
    return t._replace(data=data, y0=t.y0 * p, y1=t.y1 * p, x0=t.x0 * p, x1=t.x1 * p, H=t.H * p, W=t.W * p, s=t.s * p)


class PatchifyStep(Step):
    """2x2 patches into channels: each output row from its own two input rows (no halo)."""

    def shape(self):
        return self.layer.out_channels, self.r_in // self.layer.p

    def need(self, px_in, px_out, item):
        return 2 * self.cin * px_in * item  # its input and the permuted copy

    def flops(self, B, n):
        return 0.0

    def describe(self):
        p = self.layer.p

        def fn(t: Tile) -> Tile:
            t = _cells(t, p)
            return _down(t, patchify(t.data, p), p)
        return verbs.rows(fn, self.cout, down=p, above=0, below=0)

    def describe_clip(self):
        return self.describe()  # frame by frame: the engine folds a chunk's frames into the batch

    def scale_stream(self, s):
        pass  # a permutation of the pixels: nothing to scale


class UnpatchifyStep(Step):
    """Channels back into 2x2 patches: each pair of output rows from one input row (no halo)."""

    def shape(self):
        return self.layer.out_channels, self.r_in * self.layer.p

    def need(self, px_in, px_out, item):
        return 2 * self.cin * px_in * item

    def flops(self, B, n):
        return 0.0

    def describe(self):
        p = self.layer.p
        return verbs.rows(lambda t: _up(t, unpatchify(t.data, p), p), self.cout, up=p, above=0, below=0)

    def describe_clip(self):
        return self.describe()  # frame by frame

    def scale_stream(self, s):
        pass  # the network's output, permuted


class DownBlockStep(SpanStep):
    """An encoder level: its layers' own Steps inside a residual whose shortcut is AvgDown3D, a row
    op over whole 2x2 cells (a mean over channels alone at the last level, or none where it is the
    identity)."""

    def shortcut(self):
        b = self.layer
        if b.fs == 1:
            return None if b.cin == b.cout and b.ft == 1 else (lambda x: avg_down(x, b.cout, b.ft, 1))

        def fn(t: Tile) -> Tile:  # an image's rows, or a clip chunk's (its first frame at t.t0)
            t = _cells(t, 2)
            return _down(t, b.shortcut(t.data, first=t.t0 == 0), 2)
        return verbs.rows(fn, b.cout, down=2, above=0, below=0)

    def clip_shortcut(self):
        if self.layer.fs == 1 and self.layer.ft > 1:
            raise KLVAEError("a level that halves time but not space has no Wan 2.2 shortcut")
        return self.shortcut()


class UpBlockStep(SpanStep):
    """A decoder level that upsamples: its layers' own Steps inside a residual whose shortcut is
    DupUp3D, a row op (each input row makes two output rows, no halo)."""

    def shortcut(self):
        b = self.layer
        return verbs.rows(lambda t: _up(t, b.shortcut(t.data, first=t.t0 == 0), 2), b.cout, up=2, above=0, below=0)

    def clip_shortcut(self):
        return self.shortcut()  # an image's rows, or a clip chunk's (its first frame at t.t0)


for _module, _step in ((Patchify, PatchifyStep), (Unpatchify, UnpatchifyStep), (DownBlock, DownBlockStep),
                       (UpBlock, UpBlockStep)):
    register(_module, _step)


# ----------------------------------------------------------------------------------------------
# Keys: the original release's (= ComfyUI's, this module's) and diffusers' (AutoencoderKLWan with
# is_residual, AutoencoderKLQwenImage21). The leaves are Wan 2.1's (model_qwenimage).
# ----------------------------------------------------------------------------------------------
_LEVEL = {"encoder": ("downsamples", "down_blocks", "downsampler"), "decoder": ("upsamples", "up_blocks", "upsampler")}


def _unknown(k: str, layout: str) -> KLVAEError:
    return KLVAEError(f"key {k[:100]!r} is not a Wan 2.2 / Qwen-Image 2.1 VAE key in the {layout} layout")


def _to_diffusers_key(k: str) -> str:
    if k in QUANT:
        return QUANT[k]
    net, _, rest = k.partition(".")
    if net not in _LEVEL:
        raise _unknown(k, "original")
    if shared := shared_to_diffusers(net, rest):
        return shared
    ours, blocks, resample = _LEVEL[net]
    if m := re.fullmatch(rf"{ours}\.(\d+)\.{ours}\.(\d+)\.(.+)", rest):
        i, j, leaf = m[1], m[2], m[3]
        if leaf in RESNET_LEAVES:
            return f"{net}.{blocks}.{i}.resnets.{j}.{RESNET_LEAVES[leaf]}"
        if leaf in RESAMPLE_LEAVES:
            return f"{net}.{blocks}.{i}.{resample}.{leaf}"
    raise _unknown(k, "original")


def _to_original_key(k: str, resnets: dict) -> str:
    """resnets: (network, level) -> resnets in that level (its resample follows them)."""
    quant, resnet = {v: k for k, v in QUANT.items()}, {v: k for k, v in RESNET_LEAVES.items()}
    if k in quant:
        return quant[k]
    net, _, rest = k.partition(".")
    if net not in _LEVEL:
        raise _unknown(k, "diffusers")
    if shared := shared_to_original(net, rest):
        return shared
    ours, blocks, resample = _LEVEL[net]
    if (m := re.fullmatch(rf"{blocks}\.(\d+)\.resnets\.(\d+)\.(.+)", rest)) and m[3] in resnet:
        return f"{net}.{ours}.{m[1]}.{ours}.{m[2]}.{resnet[m[3]]}"
    if (m := re.fullmatch(rf"{blocks}\.(\d+)\.{resample}\.(.+)", rest)) and m[2] in RESAMPLE_LEAVES:
        return f"{net}.{ours}.{m[1]}.{ours}.{resnets.get((net, m[1]), 0)}.{m[2]}"
    raise _unknown(k, "diffusers")


def original_to_diffusers(sd: dict) -> dict:
    """Original/ComfyUI keys -> diffusers' (the same tensors): {en,de}coder.conv1 <-> conv_in,
    {en,de}coder.{down,up}samples.I.{down,up}samples.J <-> {down,up}_blocks.I.resnets.J (resnet
    leaves as Wan 2.1's) or .{down,up}sampler (the level's last J), the middles, heads and quant
    convs as Wan 2.1's."""
    return {_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_original(sd: dict) -> dict:
    """The inverse of original_to_diffusers (the same tensors)."""
    resnets = {}
    for k in sd:
        if m := re.fullmatch(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\..+", k):
            resnets[(m[1], m[2])] = max(resnets.get((m[1], m[2]), 0), int(m[3]) + 1)
    return {_to_original_key(k, resnets): v for k, v in sd.items()}


def to_diffusers(sd: dict) -> dict:
    """klvae's keys -> diffusers'. Qwen-Image 2.1's diffusers class has 2-D convs: its kernels lose
    the time axis of 1 that this module (and the original files) keep."""
    out = original_to_diffusers(to_original(sd))
    if "encoder.conv_in.weight" in out and out["encoder.conv_in.weight"].shape[2] == 1:
        out = {k: v.squeeze(2) if v.dim() == 5 else v for k, v in out.items()}
    return out


def config_from_shapes(shape, keys) -> dict:
    """The network's shape (VAEConfig fields, and its family) from original-layout tensor shapes.
    shape: key -> its shape; keys: the keys present. The time kernel from encoder.conv1 (1:
    Qwen-Image 2.1's 2-D network, no patches, as ComfyUI tells them apart; 3: Wan 2.2's, pixels
    in 2x2 patches), the widths from each level's first resnet, the resnets per level from the
    first level, the temporal flags from the time_convs present, z from decoder.conv1."""
    keys = set(keys)
    need = ("encoder.conv1.weight", "decoder.conv1.weight", "decoder.head.2.weight", "encoder.head.2.weight",
            "decoder.head.0.gamma")
    missing = [k for k in need if k not in keys]
    if missing:
        raise KLVAEError(f"Wan 2.2 / Qwen-Image 2.1 VAE weights incomplete: missing {', '.join(missing)}")
    conv1 = shape("encoder.conv1.weight")
    kt = conv1[2] if len(conv1) == 5 else 1
    if kt not in (1, 3):
        raise KLVAEError(f"encoder.conv1 has a time kernel of {kt}: Wan 2.2's is 3, Qwen-Image 2.1's 1")
    p = 1 if kt == 1 else 2
    ch, packed = conv1[:2]
    z = shape("decoder.conv1.weight")[1]
    if packed % (p * p) or shape("decoder.head.2.weight")[0] % (p * p):
        raise KLVAEError(f"encoder.conv1 takes {packed} channels: not whole 2x2 patches of pixels, as Wan 2.2's VAE has")
    if shape("encoder.head.2.weight")[0] != 2 * z:
        raise KLVAEError(f"the encoder's head gives {shape('encoder.head.2.weight')[0]} channels, the decoder takes "
                         f"{z}: expected twice as many (mean and logvar)")
    levels = sorted({int(m[1]) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise KLVAEError("the encoder's levels are missing or not numbered 0, 1, 2, ...: the file is damaged")
    per = len({m[1] for k in keys if (m := re.match(r"encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.", k))})
    if per < 1:
        raise KLVAEError("the encoder's first level has no resnets: the file is damaged")
    widths = [shape(f"encoder.downsamples.{i}.downsamples.0.residual.6.weight")[0]
              if f"encoder.downsamples.{i}.downsamples.0.residual.6.weight" in keys else 0 for i in levels]
    if any(w <= 0 or w % ch for w in widths):
        raise KLVAEError(f"level widths {widths} are not multiples of the first width {ch}: the file is damaged")
    temporal = tuple(f"encoder.downsamples.{i}.downsamples.{per}.time_conv.weight" in keys for i in levels[:-1])
    top, bottom = shape("decoder.conv1.weight")[0], shape("decoder.head.0.gamma")[0]
    mult = tuple(w // ch for w in widths)
    dec = bottom // mult[0] if bottom % mult[0] == 0 else 0
    if not dec or top != dec * mult[-1]:
        raise KLVAEError(f"the decoder's widths ({top} at the latent, {bottom} at the pixels) do not fit the "
                         f"encoder's level multiples {mult}: not a Wan 2.2-style VAE")
    return dict(ch=ch, ch_mult=mult, num_res_blocks=per, latent_channels=z, in_channels=packed // (p * p),
                out_channels=shape("decoder.head.2.weight")[0] // (p * p), temporal_downsample=temporal,
                decoder_ch=None if dec == ch else dec, patch_size=p, time_kernel=kt,
                family="qwenimage21" if kt == 1 else "wan22")


def diffusers_config(cfg) -> dict:
    """The config.json of diffusers' class for this network: AutoencoderKLQwenImage21 for the 2-D
    network (time kernel 1), AutoencoderKLWan(is_residual=True) otherwise. Latent statistics where
    the family states them."""
    p = cfg.patch_size
    out = {"_class_name": "AutoencoderKLQwenImage21" if cfg.time_kernel == 1 else "AutoencoderKLWan",
           "base_dim": cfg.ch, "decoder_base_dim": cfg.decoder_ch or cfg.ch, "z_dim": cfg.latent_channels,
           "dim_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks, "attn_scales": [],
           "temperal_downsample": list(cfg.temporal_downsample), "dropout": 0.0, "is_residual": True,
           "in_channels": cfg.in_channels * p * p, "out_channels": cfg.out_channels * p * p,
           "patch_size": p if p > 1 else None, "scale_factor_temporal": 2 ** sum(cfg.temporal_downsample),
           "scale_factor_spatial": cfg.downscale}
    if cfg.latents_mean is not None:
        out["latents_mean"], out["latents_std"] = list(cfg.latents_mean), list(cfg.latents_std)
    return out


def pipeline_names(cfg) -> dict:
    """What the pipelines read of the config that klvae's own VAEConfig names differently."""
    return {"scale_factor_spatial": cfg.downscale, "scale_factor_temporal": 2 ** sum(cfg.temporal_downsample),
            "z_dim": cfg.latent_channels, "patch_size": cfg.patch_size if cfg.patch_size > 1 else None}


# ----------------------------------------------------------------------------------------------
# The family and its registration (config.Network).
# ----------------------------------------------------------------------------------------------
def read(name: str, shape, keys: dict, layout: str) -> tuple:
    """A file's VAE keys ({key after any prefix: the file's key}) in its layout -> ({klvae key: the
    file's key}, the network's shape fields and its family)."""
    original = keys if layout == "original" else diffusers_to_original(keys)
    return from_original(original), config_from_shapes(lambda k: shape(original[k]), original.keys())


def check(cfg) -> None:
    wan21.check(cfg)  # the temporal flags, as Wan 2.1's
    if cfg.patch_size not in (1, 2) or cfg.time_kernel not in (1, 3):
        raise KLVAEError(f"patch_size {cfg.patch_size} and time_kernel {cfg.time_kernel}: Wan 2.2's VAE has 2 and 3, "
                         f"Qwen-Image 2.1's 1 and 1")


WAN22 = Family("wan22", 48, 1.0, 0.0, True, "Wan 2.2 (TI2V-5B, FastWan 2.2; images, 16x)", arch="wan22",
               latents_mean=WAN22_MEAN, latents_std=WAN22_STD,
               shape=(("ch", 160), ("decoder_ch", 256), ("temporal_downsample", (False, True, True)),
                      ("patch_size", 2), ("time_kernel", 3)),
               file_names=r"wan2[._]?2.*vae|vae.*wan2[._]?2")
QWENIMAGE21 = Family("qwenimage21", 64, 1.0, 0.0, True, "Qwen-Image 2.1 (RGBA images, 16x)", arch="wan22",
                     latents_mean=QI21_MEAN, latents_std=QI21_STD, sample_size=1024,
                     shape=(("ch", 96), ("decoder_ch", 144), ("ch_mult", (1, 2, 4, 8, 8)),
                            ("temporal_downsample", (False, True, True, True)), ("time_kernel", 1),
                            ("in_channels", 4), ("out_channels", 4)),
                     file_names=r"qwen.?image.?2\.?1")
register_network(Network("wan22", sys.modules[__name__], (WAN22, QWENIMAGE21),
                 markers=(("original", "decoder.upsamples.0.upsamples.0.residual.0.gamma"),
                          ("diffusers", "encoder.down_blocks.0.resnets.0.norm1.gamma")),
                 read=read, to_file=to_original, video_shaped=True, group_norms=False, check=check,
                 narrow=wan21.narrow, refuse_clip=refuse_clip,
                 diffusers=ArchNames(classes=("AutoencoderKLWan", "AutoencoderKLQwenImage21"), config=diffusers_config,
                                     to_diffusers=to_diffusers,
                                     from_diffusers=lambda sd: from_original(diffusers_to_original(sd)),
                                     read=pipeline_names)))

__all__ = ["Encoder", "Decoder", "causal_chunks", "quant_convs"]
