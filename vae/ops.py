"""What both tiled engines are made of (exact: engine.py, bounded: bounded.py).

- `Tile`: rows [y0, y1) x columns [x0, x1) of an activation that is H x W in full, and `conv3x3`,
  the one place that knows a 3x3 convolution's halo: it pads only where the region meets the image
  border (where the untiled conv pads too) and marks one row or column less valid on every other
  side. The exact engine's full-width bands and bounded mode's strips are both Tiles.
- `normed`: a GroupNorm's scale and shift (from groupnorm.Stats) and SiLU applied to a band, in a
  warm buffer (`Scratch`).
- `Progress`: one step per band pass, the caller's progress callback and interrupt check.
"""
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import Interrupted

def silu_(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when nothing needs the input for a backward pass."""
    return F.silu(x, inplace=not x.requires_grad)


class Tile(NamedTuple):
    """The *valid* values of rows [y0, y1) x cols [x0, x1) of an activation that is H x W in full;
    s: its resolution in px per latent px. A clip's tile has frames, data [B, C, past + T, rows,
    cols]: `past` frames before the chunk's own T (a causal op's cache), the first own frame being
    frame `t0` of the clip at this activation's frame rate."""
    data: torch.Tensor
    y0: int
    y1: int
    x0: int
    x1: int
    H: int
    W: int
    s: int
    t0: int = 0
    past: int = 0

    def crop(self, y0, y1, x0, x1) -> "Tile":
        d = self.data[..., y0 - self.y0: y1 - self.y0, x0 - self.x0: x1 - self.x0]
        return self._replace(data=d, y0=y0, y1=y1, x0=x0, x1=x1)

    def rows(self, y0, y1) -> torch.Tensor:
        """Rows [y0, y1) over the tile's columns, as a tensor."""
        return self.data[..., y0 - self.y0: y1 - self.y0, :]


def conv3x3(conv: nn.Conv2d, t: Tile) -> Tile:
    """A 3x3 conv, stride 1, of a tile. Zero padding is right only where the tile meets the image
    border; on every other side the outermost pixel would need the halo, so the valid region
    shrinks by one. Padding is the conv's own (no padded copy), and where a side needs none its
    row or column is not computed at all (a band in the middle of the image: no wasted rows).
    A clip's tile (5-D data) takes a k x 3 x 3 kernel over its frames (conv: a TimeSlices),
    unpadded in time (the caller has put the k - 1 frames before each output's in front: `causal`)."""
    top, bottom, left, right = t.y0 == 0, t.y1 == t.H, t.x0 == 0, t.x1 == t.W
    ph, pw = int(top or bottom), int(left or right)
    if t.data.dim() == 5:
        out = conv_over_time(t.data, conv.slices, conv.bias, padding=(ph, pw))
    else:
        out = F.conv2d(t.data, conv.weight, conv.bias, padding=(ph, pw))
    h, w = out.shape[-2:]
    # with padding, output row i is input row i; without, input row i + 1
    out = out[..., ph and not top: h - (ph and not bottom), pw and not left: w - (pw and not right)]
    return t._replace(data=out, y0=t.y0 + (not top), y1=t.y1 - (not bottom), x0=t.x0 + (not left),
                      x1=t.x1 - (not right), past=0)


class TimeSlices:
    """A 3-D conv's kernel [O, I, k, kh, kw] as its k time slices, each a channels-last 2-D kernel:
    what conv_over_time convolves with. Views of a loaded model's weights (autoencoder.channels_last
    stores them so); copies, made once per run, of weights in another layout."""

    def __init__(self, conv: nn.Conv3d):
        self.conv, self.bias, self.out_channels = conv, conv.bias, conv.out_channels

    @functools.cached_property
    def slices(self) -> list:
        return [time_slice(self.conv.weight, i) for i in range(self.conv.weight.shape[2])]


def time_slice(w: torch.Tensor, i: int) -> torch.Tensor:
    """Time slice i of a 3-D kernel as a channels-last 2-D kernel (a view where it is one already)."""
    return w[:, :, i].contiguous(memory_format=torch.channels_last)


def conv_over_time(x: torch.Tensor, slices, bias, stride: int = 1, padding=(0, 0)) -> torch.Tensor:
    """A 3-D conv of x [B, C, F, H, W], unpadded in time (stride in time `stride`, spatial padding
    `padding`, stride 1), as k 2-D convs of the frames folded into the batch, summed. Why not
    F.conv3d: on the CPU, for many band shapes (96 channels x 4 frames x 32 x 256 px, measured:
    docs/measurements.md) it takes a slow path that is ~4x slower than these 2-D convs and makes a
    column buffer ~20x the band; the 2-D convs take oneDNN's channels-last path at every shape."""
    k, B = len(slices), x.shape[0]
    T = (x.shape[2] - k) // stride + 1
    out = None
    for i, w in enumerate(slices):
        y = F.conv2d(fold(x[:, :, i:i + stride * (T - 1) + 1:stride]), w, bias if i == 0 else None, padding=padding)
        out = y if out is None else out.add_(y)
    return unfold(out, B)


def cat_frames(parts) -> torch.Tensor:
    """Clips [B, C, T_i, H, W] one after the other along time, channels last (torch.cat gives a
    channels-first result where a part of one frame is ambiguous: every later 2-D conv over a time
    slice would then copy its input, 16% of a decode's time, measured)."""
    B, C, _, H, W = parts[0].shape
    out = parts[0].new_empty(B, sum(p.shape[2] for p in parts), H, W, C).permute(0, 4, 1, 2, 3)
    t = 0
    for p in parts:
        out[:, :, t:t + p.shape[2]] = p
        t += p.shape[2]
    return out


def interleave_halves(y: torch.Tensor) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W], channels last: frame t's channels [0, C) become frame
    2t, its [C, 2C) frame 2t + 1 (the time upsample of Wan's decoders). One copy straight into the
    channels-last order: the reshape-permute-reshape it replaces left the chunks after the first
    channels first, so the 2-D convs after it copied their input again (Wan 2.2, 2 CPU cores: a
    9-frame decode's copies 0.8 -> 0.6 s of ~14 s; a 17-frame 448x256 decode 108.8 -> 107.1 s)."""
    B, C2, T, H, W = y.shape
    out = y.new_empty(B, T, 2, H, W, C2 // 2)
    out.copy_(y.reshape(B, 2, C2 // 2, T, H, W).permute(0, 3, 1, 4, 5, 2))
    return out.view(B, 2 * T, H, W, C2 // 2).permute(0, 4, 1, 2, 3)


def fold(t: torch.Tensor) -> torch.Tensor:
    """A clip's [B, C, T, h, w] as T images [B * T, C, h, w] (a view of a channels-last chunk)."""
    return t.transpose(1, 2).flatten(0, 1) if t.dim() == 5 else t


def unfold(t: torch.Tensor, B: int) -> torch.Tensor:
    """fold's inverse."""
    return t.unflatten(0, (B, -1)).transpose(1, 2)


def causal(t: Tile, n: int) -> Tile:
    """A clip's tile with exactly n frames before its own: zero frames in front where fewer are
    cached (the clip's start: a causal conv's zero padding), the oldest dropped where more are."""
    if t.past >= n:
        return t._replace(data=t.data[:, :, t.past - n:], past=n)
    return t._replace(data=cat_frames([zero_frames(t.data, n - t.past), t.data]), past=n)


def zero_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """n zero frames shaped as x's, channels last (cat_frames: why)."""
    B, C, _, H, W = x.shape
    return x.new_zeros(B, n, H, W, C).permute(0, 4, 1, 2, 3)


class Scratch:
    """Reused buffers for a band's temporaries. A fresh large tensor costs a page-faulting pass
    over its memory (the normalised copy of a 128-channel 256x512 band: 41 ms fresh, 9 ms into a
    warm buffer, measured), which would otherwise double the engines' non-conv time."""

    def __init__(self):
        self.flat = {}

    def like(self, name: str, x: torch.Tensor, dtype=None, rows=None) -> torch.Tensor:
        """A channels-last buffer shaped as x, or as x with `rows` rows (contents undefined), reused
        across bands."""
        dtype = dtype or x.dtype
        B, C, H, W = x.shape
        H = H if rows is None else rows
        n = B * C * H * W
        f = self.flat.get(name)
        if f is None or f.numel() < n or f.dtype != dtype or f.device != x.device:
            f = self.flat[name] = torch.empty(n, dtype=dtype, device=x.device)
        return f[:n].view(B, H, W, C).permute(0, 3, 1, 2)


def normed(parts, affine, scratch: Scratch, act: bool = True) -> torch.Tensor:
    """GroupNorm (given statistics) -> SiLU of consecutive row bands, into one warm buffer (the
    raw rows are never concatenated): one multiply-add per part, then SiLU in place. The result
    is valid until the next call's."""
    parts = [parts] if torch.is_tensor(parts) else parts
    scale, shift = (v.to(parts[0].device) for v in affine)
    out, r = scratch.like("act", parts[-1], rows=sum(p.shape[2] for p in parts)), 0
    for p in parts:
        torch.addcmul(shift, p, scale, out=out[:, :, r:r + p.shape[2]])
        r += p.shape[2]
    return silu_(out) if act else out


class Progress:
    """Counts band passes: calls progress(done, total) after each and checks the interrupt before."""

    def __init__(self, total: int, progress=None, interrupt=None):
        self.done, self.total, self.progress, self.interrupt = 0, total, progress, interrupt

    def step(self) -> None:
        if self.interrupt is not None and self.interrupt():
            raise Interrupted("tiled VAE run interrupted")
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
