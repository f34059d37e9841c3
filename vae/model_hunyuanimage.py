"""HunyuanImage-2.1's VAE: a 2-D KL autoencoder with 32x downscaling and 64 latent channels, whose
resolution changes are pixel shuffles with parameter-free shortcuts.

The network is model.py's SD-style one with four layer types swapped:

  layer type                   what it does                                          its Step
  ShuffleDownsample            3x3 conv to out/4 channels, 2x2 space-to-channel;     ShuffleDownStep
                               shortcut: the input's channel-group mean, shuffled
  ShuffleUpsample              3x3 conv to 4*out channels, channel-to-space;         ShuffleUpStep
                               shortcut: the input repeated over channels, shuffled
  EncoderOut (encoder tail)    norm_out -> SiLU -> conv_out, plus the mean of each   EncoderOutStep
                               group of input channels (one group per moment)
  DecoderIn (decoder conv_in)  conv_in plus the latent repeated over channels        DecoderInStep

Everything else is model.py's: ResnetBlock (GroupNorm, 32 groups), AttnBlock (q, k, v, proj_out
1x1 convs), Mid, Level, Tail (the decoder's output). No quant convs, no latent shift.

Both shuffles rearrange a conv output *and* a shortcut of the same input in the same way, so each
resample is "conv(x) + shortcut(x) at one resolution, then a rearrangement" (the channel mean of
the shuffled input equals the shuffle of the mean over groups of consecutive input channels, since
a group never straddles two of the 2x2 offsets). That makes them a conv plus a per-pixel linear map
to the tiled engines, which only have to keep whole 2x2 cells together.

Attribute names are ComfyUI's checkpoint keys for this VAE (which are the original release's, after
its `vae.` prefix): `encoder.down.{i}.block.{j}.*`, `encoder.down.{i}.downsample.conv.*`,
`{n}.mid.block_1/attn_1/block_2.*`, `{n}.norm_out.*`, `{n}.conv_out.*`, `decoder.conv_in.*`,
`decoder.up.{i}.block.{j}.*`, `decoder.up.{i}.upsample.conv.*`. Unlike SD's, the decoder's `up.0`
is its LOWEST resolution (ComfyUI and diffusers agree on that order). diffusers'
AutoencoderKLHunyuanImage stores the same tensors in flat lists (`down_blocks.{k}`, `up_blocks.{k}`,
resnets and resamples interleaved): `diffusers_to_comfy` / `comfy_to_diffusers` map every key.
"""
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import verbs
from .config import Family, Network, register_network
from .diffusers_compat import ArchNames
from .errors import KLVAEError
from .layers import WORKSPACE, Step, _scale, register
from .model import Level, Mid, Normalize, ResnetBlock, Tail
from .ops import Tile, conv3x3, silu_
from .verbs import GroupNorm

# diffusers' HunyuanImagePipeline divides latents by vae.config.scaling_factor, which the released
# diffusers config sets to 0.75289 (written by diffusers' scripts/convert_hunyuan_image_to_diffusers.py);
# ComfyUI's latent_formats.HunyuanImage21.scale_factor is the same number. There is no shift.
SCALING_FACTOR = 0.75289
SAMPLE_SIZE = 384  # the released diffusers config's sample_size (only its own tiling threshold reads it)


@dataclass(frozen=True)
class HunyuanImageShape:
    """The shape of a HunyuanImage VAE (defaults: the released HunyuanImage-2.1 one)."""
    block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    num_res_blocks: int = 2         # encoder; the decoder has one more per level
    latent_channels: int = 64
    downscale: int = 32             # 2 ** (levels that resample), from the first level on
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    match_channels: bool = True     # the resamples change the width (else the next level's first resnet does)


def levels_that_resample(cfg) -> int:
    """log2 of the downscale, after checking that cfg describes a network both references can build:
    widths GroupNorm divides, resamples whose shortcut groups divide evenly, and moments (latent
    channels) that split the last width into whole channel groups."""
    widths = tuple(cfg.block_out_channels)
    depth = int(cfg.downscale).bit_length() - 1
    if cfg.downscale < 1 or 2 ** depth != cfg.downscale or depth > len(widths) - 1:
        raise KLVAEError(f"downscale {cfg.downscale}: expected a power of two with at most one resample per level "
                         f"but the last ({len(widths)} levels: up to {2 ** (len(widths) - 1)})")
    if any(w % cfg.norm_groups for w in widths):
        raise KLVAEError(f"norm_groups {cfg.norm_groups} does not divide every width of {widths}")
    rw = widths[::-1]
    for i in range(depth):
        a, b = widths[i], widths[i + 1] if cfg.match_channels else widths[i]
        if b % 4 or (4 * a) % b:
            raise KLVAEError(f"encoder level {i}: a pixel-shuffle downsample from {a} to {b} channels averages "
                             f"whole groups of 4 x {a} / {b} input channels into a conv of {b} / 4 channels: both "
                             f"must be whole")
        a, b = rw[i], rw[i + 1] if cfg.match_channels else rw[i]
        if (4 * b) % a:
            raise KLVAEError(f"decoder level {i}: a pixel-shuffle upsample from {a} to {b} channels repeats each input "
                             f"channel 4 x {b} / {a} times: that must be whole")
    z = cfg.latent_channels
    if widths[-1] % (2 * z):
        raise KLVAEError(f"the last width {widths[-1]} is not a multiple of 2 x {z} latent channels: the encoder's "
                         f"output shortcut averages whole channel groups into each moment")
    return depth


# ----------------------------------------------------------------------------------------------
# The shuffles and shortcuts. Channel order (ComfyUI's and diffusers', the same weights): the 2x2
# offset is the OUTER index, channel (2 * dy + dx) * C + c; torch's pixel_(un)shuffle puts it inner.
# ----------------------------------------------------------------------------------------------
def space_to_channel(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w]; pixel (2i + dy, 2j + dx) of channel c -> channel (2dy + dx) C + c."""
    B, C, H, W = x.shape
    return x.view(B, C, H // 2, 2, W // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(B, 4 * C, H // 2, W // 2)


def channel_to_space(x: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w], the inverse of space_to_channel."""
    B, C4, h, w = x.shape
    return x.view(B, 2, 2, C4 // 4, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, C4 // 4, 2 * h, 2 * w)


def channel_mean(x: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over each run of `group` consecutive channels: [B, C, H, W] -> [B, C / group, H, W]."""
    B, C, H, W = x.shape
    return x.view(B, C // group, group, H, W).mean(2)


def add_repeated(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h + x.repeat_interleave(r, dim=1) with r = channels of h / channels of x, without making the
    repeat: h's channel c * r + t gets x's channel c. In place where no backward pass needs h."""
    B, C, H, W = x.shape
    v = h.view(B, C, h.shape[1] // C, H, W)  # splitting the channel dim is a view whatever the strides
    if h.requires_grad:
        return (v + x.unsqueeze(2)).reshape(h.shape)
    v.add_(x.unsqueeze(2))
    return h


def _plus(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return h.add_(r) if not h.requires_grad else h + r


# ----------------------------------------------------------------------------------------------
# The new layer types.
# ----------------------------------------------------------------------------------------------
class ShuffleDownsample(nn.Module):
    """Half the resolution: a 3x3 conv to out/4 channels plus the mean over groups of 4*in/out input
    channels (the same out/4 channels), then 2x2 space-to-channel. Key: `downsample.conv`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.group = 4 * in_channels // out_channels
        self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)

    def forward(self, x):
        return space_to_channel(_plus(self.conv(x), channel_mean(x, self.group)))


class ShuffleUpsample(nn.Module):
    """Twice the resolution: a 3x3 conv to 4*out channels plus the input with each channel repeated
    4*out/in times, then channel-to-space. Key: `upsample.conv`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)

    def forward(self, x):
        return channel_to_space(add_repeated(self.conv(x), x))


class EncoderOut:
    """norm_out -> SiLU -> conv_out, plus the input's mean over each group of channels (one group per
    output channel). Not a module: its parts are the encoder's own attributes (keys
    `encoder.norm_out.*`, `encoder.conv_out.*`); the shortcut's gain is the encoder's `skip_gain`."""

    def __init__(self, net: "Encoder"):
        self.net, self.norm, self.conv = net, net.norm_out, net.conv_out
        self.group = net.norm_out.num_channels // net.conv_out.out_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        r = channel_mean(x, self.group)
        return r if self.net.skip_gain == 1.0 else r.mul_(self.net.skip_gain)

    def __call__(self, x):
        return _plus(self.conv(silu_(self.norm(x))), self.shortcut(x))


class DecoderIn:
    """conv_in plus the latent with each channel repeated width/latent times. Not a module: the conv
    is the decoder's `conv_in` (key `decoder.conv_in.*`); the shortcut's gain is the decoder's
    `skip_gain`."""

    def __init__(self, net: "Decoder"):
        self.net, self.conv = net, net.conv_in

    def add_skip(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h (conv_in's output rows) plus the shortcut of z (the same rows of the latent)."""
        return add_repeated(h, z if self.net.skip_gain == 1.0 else z * self.net.skip_gain)

    def shortcut(self, z: torch.Tensor) -> torch.Tensor:
        r = z.repeat_interleave(self.conv.out_channels // self.conv.in_channels, dim=1)
        return r if self.net.skip_gain == 1.0 else r.mul_(self.net.skip_gain)

    def __call__(self, z):
        return self.add_skip(self.conv(z), z)


# ----------------------------------------------------------------------------------------------
# The networks.
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        depth = levels_that_resample(cfg)
        widths, g = tuple(cfg.block_out_channels), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        ch = widths[0]
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(ch if j == 0 else w, w, g) for j in range(cfg.num_res_blocks)]
            ch, resample = w, None
            if i < depth:
                # the released VAE widens in the resample, so every resnet keeps its width
                nxt = widths[i + 1] if cfg.match_channels else w
                resample, ch = ShuffleDownsample(w, nxt), nxt
            self.down.append(Level(blocks, resample, "downsample"))
        self.mid = Mid(ch, g)
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar
        # The output shortcut's gain: 1, or 1/s in a copy whose residual stream is s times smaller
        # (precision.stream_scaled): the shortcut reads the stream, the moments must not change.
        self.skip_gain = 1.0

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run."""
        steps = [self.conv_in]
        for level in self.down:
            steps += list(level.block)
            if hasattr(level, "downsample"):
                steps.append(level.downsample)
        return steps + [self.mid.block_1, self.mid.attn_1, self.mid.block_2, EncoderOut(self)]

    def forward(self, x):                       # [B, 3, H, W] -> [B, 2*z, H/f, W/f]
        for layer in self.layers():
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        depth = levels_that_resample(cfg)
        widths, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_groups  # from the latent resolution up
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        self.up = nn.ModuleList()  # index 0: the LOWEST resolution (ComfyUI's and diffusers' order)
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(ch if j == 0 else w, w, g) for j in range(cfg.num_res_blocks + 1)]
            ch, resample = w, None
            if i < depth:
                nxt = widths[i + 1] if cfg.match_channels else w
                resample, ch = ShuffleUpsample(w, nxt), nxt
            self.up.append(Level(blocks, resample, "upsample"))
        self.norm_out = Normalize(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        # conv_in's shortcut gain: 1, or s in a stream-scaled copy (its output is the residual stream).
        self.skip_gain = 1.0

    def layers(self) -> list:
        """Every step in order: what forward runs, and what the tiled engines run."""
        steps = [DecoderIn(self), self.mid.block_1, self.mid.attn_1, self.mid.block_2]
        for level in self.up:
            steps += list(level.block)
            if hasattr(level, "upsample"):
                steps.append(level.upsample)
        return steps + [Tail(self.norm_out, self.conv_out)]

    def forward(self, z):                       # [B, z, h, w] -> [B, 3, f*h, f*w]
        for layer in self.layers():
            z = layer(z)
        return z


# ----------------------------------------------------------------------------------------------
# Tiles: a region of a resample's input -> the region of its output that is valid. Shared by the
# exact engine (full-width bands) and bounded mode (rows of a strip). Coordinates are the whole
# image's, so a region that starts on an odd row or column still shuffles whole 2x2 cells.
# ----------------------------------------------------------------------------------------------
def down_tile(down: ShuffleDownsample, t: Tile) -> Tile:
    """Output (i, j) is the 2x2 cell of conv rows 2i, 2i+1 (input rows 2i-1 .. 2i+2): only cells
    whose four conv outputs are all valid come out."""
    c = conv3x3(down.conv, t)
    i0, i1, j0, j1 = (c.y0 + 1) // 2, c.y1 // 2, (c.x0 + 1) // 2, c.x1 // 2
    h = c.crop(2 * i0, 2 * i1, 2 * j0, 2 * j1).data
    h = _plus(h, channel_mean(t.crop(2 * i0, 2 * i1, 2 * j0, 2 * j1).data, down.group))
    return Tile(space_to_channel(h), i0, i1, j0, j1, t.H // 2, t.W // 2, t.s // 2)


def up_tile(up: ShuffleUpsample, t: Tile) -> Tile:
    """Conv row i becomes output rows 2i and 2i+1: every valid conv pixel gives a valid 2x2 cell."""
    c = conv3x3(up.conv, t)
    h = add_repeated(c.data, t.crop(c.y0, c.y1, c.x0, c.x1).data)
    return Tile(channel_to_space(h), 2 * c.y0, 2 * c.y1, 2 * c.x0, 2 * c.x1, 2 * t.H, 2 * t.W, 2 * t.s)


# ----------------------------------------------------------------------------------------------
# Their Steps (layers.py's API).
# ----------------------------------------------------------------------------------------------
class ShuffleDownStep(Step):
    """3x3 conv + channel-mean shortcut at the input resolution, then 2x2 space-to-channel. No norm."""
    keeps = 3  # an output row reads input rows 2i-1 .. 2i+2: up to three held between pushes

    def shape(self):
        return self.layer.out_channels, self.r_in // 2

    @property
    def band_channels(self):
        return max(4 * self.cin, self.cout)  # an output row reads two input rows of twice the width

    def need(self, px_in, px_out, item):
        i, o = self.cin * px_in * item, self.cout * px_out * item
        return int(i + o * (2 + WORKSPACE))  # input, conv output and workspace, then its shuffled copy

    def describe(self):
        # output rows [y0, y1) are the cells of conv rows 2y0 .. 2y1, which read input rows 2y0-1 .. 2y1.
        # Streamed, every push completes a cell: bounded.Rows holds pushes of fewer than four rows,
        # and the rows it keeps start at an odd row (need: 2o - 1), so the conv's valid rows start
        # on a cell's first row.
        return verbs.rows(lambda t: down_tile(self.layer, t), self.cout, down=2, above=1, below=1,
                          temp=lambda band_in, band_out, item: 2 * band_out)  # the mean, the shuffle

    @torch.no_grad()
    def scale_stream(self, s):
        # Maps the stream to itself: the conv is linear (its bias scales) and the channel mean is
        # linear and homogeneous (it scales with its input by itself).
        _scale(self.layer.conv, s, weight=False)


class ShuffleUpStep(Step):
    """3x3 conv + repeat shortcut at the input resolution, then channel-to-space. No norm."""

    def shape(self):
        return self.layer.out_channels, 2 * self.r_in

    def need(self, px_in, px_out, item):
        i, o = self.cin * px_in * item, self.cout * px_out * item
        return int(i + o * (2 + WORKSPACE))  # input, conv output (4*out channels: o) and workspace, the shuffle

    def describe(self):
        # output rows [y0, y1) come from the input rows whose 2x2 cells cover them, plus the conv's row
        return verbs.rows(lambda t: up_tile(self.layer, t), self.cout, up=2, above=1, below=1,
                          temp=lambda band_in, band_out, item: band_out)  # the shuffled copy

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.conv, s, weight=False)  # maps the stream to itself; the repeat scales by itself


class EncoderOutStep(Step):
    """norm_out -> SiLU -> conv_out plus the channel-group mean of its input: the encoder's output."""
    keeps = 4

    def shape(self):
        return self.layer.conv.out_channels, self.r_in

    def need(self, px_in, px_out, item):
        i, o = self.cin * px_in * item, self.cout * px_out * item
        return int(2 * i + o * (2 + WORKSPACE))  # input, its normalised copy, conv output and workspace, the mean

    def describe(self):
        tail = self.layer
        return verbs.residual([verbs.conv(tail.conv, GroupNorm(tail.norm))], shortcut=tail.shortcut)

    @torch.no_grad()
    def scale_stream(self, s):
        # Reads the stream twice: through norm_out (eps * s^2 makes it scale-free) and through the
        # channel mean, which would carry the scale into the moments: its gain undoes it.
        self.layer.norm.eps *= s * s
        self.layer.net.skip_gain /= s


class DecoderInStep(Step):
    """conv_in plus the latent repeated over channels: writes the residual stream from the latent."""
    keeps = 4  # the conv's two rows, and the latent rows its shortcut still owes

    def shape(self):
        return self.layer.conv.out_channels, self.r_in

    def describe(self):
        return verbs.residual([verbs.conv(self.layer.conv)], add=self.layer.add_skip)

    @torch.no_grad()
    def scale_stream(self, s):
        # Writes the stream from outside it (the latent is never scaled): both of its terms scale.
        _scale(self.layer.conv, s)
        self.layer.net.skip_gain *= s


register(ShuffleDownsample, ShuffleDownStep)
register(ShuffleUpsample, ShuffleUpStep)
register(EncoderOut, EncoderOutStep)
register(DecoderIn, DecoderInStep)


# ----------------------------------------------------------------------------------------------
# Keys: diffusers' AutoencoderKLHunyuanImage <-> ComfyUI (the module names above).
# diffusers flattens each level list: `encoder.down_blocks.{k}` runs through level 0's resnets,
# level 0's downsample, level 1's resnets, ... (the decoder's `up_blocks.{k}` likewise from the
# lowest resolution, the same level order as ComfyUI's `up.{i}`); a resample is the entry with a
# bare `conv`. Inside: mid `resnets.0/1` = `block_1/2`, attention `to_q/to_k/to_v/proj` =
# `q/k/v/proj_out` (all 1x1 convs in both), `conv_shortcut` = `nin_shortcut`.
# ----------------------------------------------------------------------------------------------
_LIST = {"encoder": ("down", "downsample", "down_blocks"), "decoder": ("up", "upsample", "up_blocks")}
_MID = (("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1."),
        ("mid.attn_1.norm.", "mid_block.attentions.0.norm."), ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
        ("mid.attn_1.k.", "mid_block.attentions.0.to_k."), ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
        ("mid.attn_1.proj_out.", "mid_block.attentions.0.proj."))
_SAME = ("conv_in.", "norm_out.", "conv_out.")
_RESNET_PARTS = ("norm1.", "conv1.", "norm2.", "conv2.")


def _resnet_part(rest: str, to_diffusers: bool):
    """A resnet's own key tail in the other layout (None: not a resnet part)."""
    a, b = ("nin_shortcut.", "conv_shortcut.") if to_diffusers else ("conv_shortcut.", "nin_shortcut.")
    if rest.startswith(_RESNET_PARTS):
        return rest
    return b + rest[len(a):] if rest.startswith(a) else None


def _other(key: str, to_diffusers: bool):
    """A key outside the level lists in the other layout, or None."""
    net, _, rest = key.partition(".")
    if net not in _LIST:
        return None
    if rest.startswith(_SAME) and rest.count(".") == 1:
        return key
    for comfy, diffusers in _MID:
        src, dst = (comfy, diffusers) if to_diffusers else (diffusers, comfy)
        if rest.startswith(src):
            tail = rest[len(src):]
            dots = 0  # a tensor name (weight, bias) after a norm or a conv
            if src.endswith((".block_1.", ".block_2.", ".resnets.0.", ".resnets.1.")):
                tail, dots = _resnet_part(tail, to_diffusers), 1  # the resnet's part, then its tensor
            return None if tail is None or tail.count(".") != dots else f"{net}.{dst}{tail}"
    return None


def _unknown(key: str, layout: str) -> KLVAEError:
    return KLVAEError(f"{key[:80]} is not a key of a HunyuanImage VAE in the {layout} layout")


def comfy_to_diffusers(keys) -> dict:
    """{ComfyUI key: diffusers key} for every key (a KLVAEError names the first one that is neither)."""
    keys = list(keys)
    entries = {net: set() for net in _LIST}   # (level, 0, block) for a resnet, (level, 1, 0) for the resample
    parsed = {}
    for k in keys:
        out = _other(k, True)
        if out is not None:
            parsed[k] = out
            continue
        net = k.partition(".")[0]
        if net not in _LIST:
            raise _unknown(k, "ComfyUI")
        lst, resample, _ = _LIST[net]
        m = re.fullmatch(rf"{net}\.{lst}\.(\d+)\.(?:block\.(\d+)\.(.+)|{resample}\.(conv\.[^.]+))", k)
        if m is None or (m[2] is not None and (_resnet_part(m[3], True) is None or m[3].count(".") != 1)):
            raise _unknown(k, "ComfyUI")
        entry = (int(m[1]), 0, int(m[2])) if m[2] is not None else (int(m[1]), 1, 0)
        entries[net].add(entry)
        parsed[k] = (net, entry, _resnet_part(m[3], True) if m[2] is not None else m[4])
    flat = {net: {e: n for n, e in enumerate(sorted(es))} for net, es in entries.items()}
    out = {}
    for k, v in parsed.items():
        if isinstance(v, str):
            out[k] = v
        else:
            net, entry, tail = v
            out[k] = f"{net}.{_LIST[net][2]}.{flat[net][entry]}.{tail}"
    return out


def diffusers_to_comfy(keys) -> dict:
    """{diffusers key: ComfyUI key} for every key. Which flat entries belong to which level is read
    from the keys: a resample ends a level; a level without one ends after as many resnets as the
    first level has (every level has the same number)."""
    keys = list(keys)
    parsed, kinds = {}, {net: {} for net in _LIST}
    for k in keys:
        out = _other(k, False)
        if out is not None:
            parsed[k] = out
            continue
        net = k.partition(".")[0]
        if net not in _LIST:
            raise _unknown(k, "diffusers")
        m = re.fullmatch(rf"{net}\.{_LIST[net][2]}\.(\d+)\.(.+)", k)
        if m is None:
            raise _unknown(k, "diffusers")
        n, tail = int(m[1]), m[2]
        if re.fullmatch(r"conv\.[^.]+", tail):
            kind = "resample"
        elif _resnet_part(tail, False) is not None and tail.count(".") == 1:
            kind = "resnet"
        else:
            raise _unknown(k, "diffusers")
        if kinds[net].setdefault(n, kind) != kind:
            raise KLVAEError(f"{k[:80]}: {net} entry {n} holds both resnet and resample keys: the file is damaged")
        parsed[k] = (net, n, tail)
    where = {}
    for net, kind in kinds.items():
        if sorted(kind) != list(range(len(kind))):
            raise KLVAEError(f"{net}.{_LIST[net][2]} skips an index ({sorted(kind)[:12]}...): the file is damaged")
        order = [kind[n] for n in range(len(kind))]
        per_level = order.index("resample") if "resample" in order else len(order)
        level = block = 0
        for n, kd in enumerate(order):
            if kd == "resample":
                where[net, n] = (level, None)
                level, block = level + 1, 0
                continue
            if block == per_level:  # a level that does not resample ends here
                level, block = level + 1, 0
            where[net, n] = (level, block)
            block += 1
    out = {}
    for k, v in parsed.items():
        if isinstance(v, str):
            out[k] = v
            continue
        net, n, tail = v
        lst, resample, _ = _LIST[net]
        level, block = where[net, n]
        out[k] = (f"{net}.{lst}.{level}.{resample}.{tail}" if block is None
                  else f"{net}.{lst}.{level}.block.{block}.{_resnet_part(tail, False)}")
    return out


# ----------------------------------------------------------------------------------------------
# Config from a checkpoint's shapes, and diffusers' config.json.
# ----------------------------------------------------------------------------------------------
def config_from_shapes(shape, keys) -> dict:
    """The HunyuanImageShape fields of a ComfyUI-keyed checkpoint: shape(key) -> the tensor's shape.
    GroupNorm's group count leaves no trace in shapes: 32, as released."""
    keys = set(keys)

    def dims(k, n=4):
        if k not in keys:
            raise KLVAEError(f"HunyuanImage VAE incomplete: {k} is missing")
        s = tuple(shape(k))
        if len(s) != n or min(s) < 1:
            raise KLVAEError(f"{k} has shape {s}, not a {n}-D kernel: the file is damaged")
        return s

    def indices(pattern):
        return sorted({int(m[1]) for k in keys if (m := re.match(pattern, k))})

    levels = indices(r"^encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise KLVAEError(f"encoder levels {levels[:12]}: expected 0, 1, ... (the file is damaged or not a VAE)")
    widths = tuple(dims(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(len(levels)))
    num_res = len(indices(r"^encoder\.down\.0\.block\.(\d+)\."))
    down = indices(r"^encoder\.down\.(\d+)\.downsample\.")
    up = indices(r"^decoder\.up\.(\d+)\.upsample\.")
    depth = len(down)
    if down != list(range(depth)) or up != down:
        raise KLVAEError(f"resampling levels: encoder {down}, decoder {up}: expected the same first levels in both")
    match = all(4 * dims(f"encoder.down.{i}.downsample.conv.weight")[0] == widths[i + 1] for i in range(depth))
    z2, top = dims("encoder.conv_out.weight")[0], dims("encoder.conv_out.weight")[1]
    z, dec_top = dims("decoder.conv_in.weight")[1], dims("decoder.conv_in.weight")[0]
    dec_res = len(indices(r"^decoder\.up\.0\.block\.(\d+)\."))
    if z2 != 2 * z or top != widths[-1] or dec_top != widths[-1] or dec_res != num_res + 1:
        raise KLVAEError(f"encoder and decoder disagree (moments {z2} for {z} latent channels, widths {top}/{dec_top} "
                         f"at the latent resolution, {num_res}/{dec_res} resnets per level): not one HunyuanImage VAE")
    cfg = dict(block_out_channels=widths, num_res_blocks=num_res, latent_channels=z, downscale=2 ** depth,
               in_channels=dims("encoder.conv_in.weight")[1], out_channels=dims("decoder.conv_out.weight")[0],
               norm_groups=32, match_channels=match)
    levels_that_resample(HunyuanImageShape(**cfg))  # the widths must make a network both references build
    return cfg


def diffusers_config(cfg) -> dict:
    """The config.json diffusers' AutoencoderKLHunyuanImage.from_pretrained needs (the released one
    for the default shape)."""
    depth = levels_that_resample(cfg)
    if cfg.norm_groups != 32:
        raise KLVAEError(f"norm_groups {cfg.norm_groups}: diffusers' AutoencoderKLHunyuanImage has 32 groups built in")
    widths = tuple(cfg.block_out_channels)
    for seq in (widths, widths[::-1]):  # encoder, decoder
        # A level's first resnet changes width unless a matching resample before it already did.
        if any(seq[i - 1] != seq[i] and not (i - 1 < depth and cfg.match_channels) for i in range(1, len(seq))):
            raise KLVAEError(f"widths {widths} with {depth} resampling levels (match_channels={cfg.match_channels}) "
                             f"need a resnet that changes width, which diffusers' HunyuanImage resnet cannot run (it "
                             f"applies conv_shortcut to its branch, not its input): ComfyUI's layout only")
    return {"_class_name": "AutoencoderKLHunyuanImage", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.num_res_blocks,
            "spatial_compression_ratio": cfg.downscale, "sample_size": SAMPLE_SIZE,
            "scaling_factor": getattr(cfg, "scaling_factor", SCALING_FACTOR),
            "downsample_match_channel": cfg.match_channels, "upsample_match_channel": cfg.match_channels}


def quant_convs(cfg) -> tuple:
    """AutoencoderKL's quant convs: this family has none."""
    return None, None


def _renamed(sd: dict, names: dict) -> dict:
    return {names[k]: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# The family and its registration (config.Network).
# ----------------------------------------------------------------------------------------------
def read(name: str, shape, keys: dict, layout: str) -> tuple:
    """A file's VAE keys ({key after any prefix: the file's key}) in its layout -> ({klvae key: the
    file's key}, VAEConfig fields)."""
    names = keys if layout == "ldm" else {new: keys[old] for old, new in diffusers_to_comfy(keys).items()}
    fields = config_from_shapes(lambda k: shape(names[k]), names.keys())
    widths = fields.pop("block_out_channels")
    if fields.pop("downscale") != 2 ** (len(widths) - 1):
        raise KLVAEError(f"{name}: a HunyuanImage VAE that resamples at fewer levels than it has is not supported "
                         f"(the released one resamples at each of its 6 levels but the last)")
    if any(w % widths[0] for w in widths):
        raise KLVAEError(f"{name}: level widths {widths} are not multiples of the first")
    fields.update(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths))
    return names, fields


# HunyuanImage-2.1: GroupNorm resnets, 32x down by space-to-channel, 64 latent channels.
FAMILY = Family("hunyuanimage", 64, SCALING_FACTOR, 0.0, False, "HunyuanImage-2.1 (32x, 64 channels)",
                arch="hunyuanimage", shape=(("ch", 128), ("ch_mult", (1, 2, 4, 4, 8, 8))))
# Its markers: ComfyUI's layout (an SD decoder's up.0 never upsamples) and diffusers' (flat
# down_blocks: resnets and resamples in one list).
register_network(Network("hunyuanimage", sys.modules[__name__], (FAMILY,),
                 markers=(("ldm", "decoder.up.0.upsample.conv.weight"), ("diffusers", "encoder.down_blocks.0.norm1.weight")),
                 read=read, diffusers=ArchNames(classes=("AutoencoderKLHunyuanImage",), config=diffusers_config,
                                                to_diffusers=lambda sd: _renamed(sd, comfy_to_diffusers(sd)),
                                                from_diffusers=lambda sd: _renamed(sd, diffusers_to_comfy(sd)))))
