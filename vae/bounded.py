"""Bounded mode: tiled decode/encode whose memory does not grow with the image.

No full-size activation at the high resolutions. They run in vertical *strips*, each streamed
band by band from top to bottom: every op (a 3x3 conv, a GroupNorm -> SiLU -> conv, an upsample or
downsample, a resnet block's residual) keeps the two or so rows of its input that its next output
rows need, so no row is computed twice and a band boundary is no boundary at all. Only a strip's
side edges carry a halo, the receptive field (7 latent px for the SD decoder's levels after the
latent resolution, 36 px for the encoder's levels before it); its convolutions shrink the strip's
valid columns instead of zero-padding them. A strip is as wide as one tile's memory allows with
bands of at least MIN_BAND rows: as wide as the image up to ~6000 px with 512 px tiles, so there is
usually no halo at all and the tiles cost one pass. Every pixel is exact given the statistics.

The statistics are the one thing a band cannot know: they come from a *mosaic*, a small image
stitched from 4x4 latent-px crops taken on a lattice over the whole input (a quarter of the area
at most, at most 128x128 latent px whatever the image size), run whole with exact statistics
recorded at every GroupNorm. Then every strip streams with those statistics frozen. Why a mosaic:
GroupNorm statistics depend on content, so a few whole tiles miss regions (22-36 dB measured), a
downsampled proxy is biased by the change of scale (25-30 dB; 1x1 crops, the nearest-neighbour
proxy: 22 dB); many small full-scale crops from everywhere stratify the sample. When one band
covers the image, or the mosaic would (small images), the image is its own mosaic: one pass with
exact statistics.

Everything at the latent resolution runs whole: the decoder's conv_in, mid block and first
level's resnets, the encoder's last level, mid block and output. Exact attention, exact statistics
for those norms, and no strip recomputes the part where the receptive field is widest; its memory
is a few latent-resolution activations (1/64 of the image's pixels, 512 channels for SD).
"""
import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import Scratch, Stats
from .memory import PeakMeter
from .model import AttnBlock, Decoder, Downsample, ResnetBlock, Tail, Upsample, silu_
from .tiling import Interrupted, Plan, TilingReport, step_need, steps_of, untiled_peak

# Latent px. Measured (64-channel calibrated SD decoder, 768x768, one tile, the default quarter-area
# mosaic; test image / retina / hubble / four-photo canvas, dB): 4: 38.4 / 31.7 / 33.7 / 37.7;
# 2: 41.3 / 32.4 / 34.8 / 37.6 but 33.3 against 4's 44.6 with a 64 latent px mosaic of the test
# image (the lattice's period against the content's: no size wins everywhere); 1 (the
# nearest-neighbour proxy): 22.5, 3: 34.1, 8: 34.4 on the test image. Jittered positions: 0.3-4.8 dB worse.
# What limits the estimate is the sample, not the mosaic's seams (same VAE and size, a harness that
# skips post_quant_conv, hence other baselines; test image / astronaut / coffee, dB): the *true* activations' statistics over the same quarter-area lattice of
# 4x4 cores (no seams: each core in its full context) give 39.1 / 36.4 / 34.3 against the mosaic's
# 37.7 / 37.4 / 32.6; 8x8 cores 30.8 / 31.5 / 31.7. A larger mosaic helps, unevenly (Tiling(mosaic_size=),
# 44% of the area: 44.6 / 39.0 / 39.0; 69%: 38.1 / 45.0 / 44.6): the lattice aliases with the content.
# Tried and dropped (64-channel calibrated SD decoder, 768 px; test image / astronaut / coffee / chelsea,
# dB; this mosaic 38.3 / 32.4 / 31.1 / 32.7). Any quarter-area sample is bounded: the true activations'
# statistics over 25% of the latent px at random give 42.5 / 46.4 / 40.7 / 41.5. A second pass measuring
# every norm over the whole image with the mosaic's statistics: 36.9 / 30.6 / 32.6 / 27.0, a third
# 34.1 / 30.7 / 30.1 / 27.2 (worse: a pass's measurements belong to activations normalised by the last
# pass's statistics; the mosaic's are consistent with each other). The image border sampled whole and
# weighted, crops anchored to the border, statistics on each crop's inner 2x2 only, per-crop
# statistics regressed on the crop's latent features: -7.3 to +5.3 dB against their baselines, none
# better on every image.
MOSAIC_CROP = 4
MOSAIC_CAP = 128  # latent px per side: the mosaic's decode is at most a 1024x1024 one


class Tile(NamedTuple):
    """The *valid* values of rows [y0, y1) x cols [x0, x1) of an activation that is H x W in full;
    s: its resolution in px per latent px."""
    data: torch.Tensor
    y0: int
    y1: int
    x0: int
    x1: int
    H: int
    W: int
    s: int

    def crop(self, y0, y1, x0, x1) -> "Tile":
        d = self.data[:, :, y0 - self.y0: y1 - self.y0, x0 - self.x0: x1 - self.x0]
        return Tile(d, y0, y1, x0, x1, self.H, self.W, self.s)


def conv3x3(conv, t: Tile) -> Tile:
    """3x3 conv, stride 1. Zero padding is right only where the tile meets the image border; on
    every other side the outermost pixel would need the halo, so the valid region shrinks by one."""
    top, bottom, left, right = t.y0 == 0, t.y1 == t.H, t.x0 == 0, t.x1 == t.W
    out = conv(t.data)
    h, w = out.shape[2:]
    out = out[:, :, (not top): h - (not bottom), (not left): w - (not right)]
    return Tile(out, t.y0 + (not top), t.y1 - (not bottom), t.x0 + (not left), t.x1 - (not right), t.H, t.W, t.s)


def upsample(up: Upsample, t: Tile) -> Tile:
    """Nearest 2x (a crop of the upsampled image is the upsampled crop), then its 3x3 conv."""
    u = Tile(F.interpolate(t.data, scale_factor=2.0, mode="nearest"),
             2 * t.y0, 2 * t.y1, 2 * t.x0, 2 * t.x1, 2 * t.H, 2 * t.W, 2 * t.s)
    return conv3x3(up.conv, u)


def downsample(down: Downsample, t: Tile) -> Tile:
    """LDM's downsample: pad right/bottom by one, 3x3 conv, stride 2. Output i reads input 2i..2i+2."""
    i0, j0 = (t.y0 + 1) // 2, (t.x0 + 1) // 2          # first outputs whose inputs start inside the tile
    i1 = t.H // 2 if t.y1 == t.H else (t.y1 - 1) // 2  # last valid output + 1
    j1 = t.W // 2 if t.x1 == t.W else (t.x1 - 1) // 2
    x = t.data[:, :, 2 * i0 - t.y0:, 2 * j0 - t.x0:]
    x = F.pad(x, (0, int(t.x1 == t.W), 0, int(t.y1 == t.H)))
    out = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2)[:, :, : i1 - i0, : j1 - j0]
    return Tile(out, i0, i1, j0, j1, t.H // 2, t.W // 2, t.s // 2)


# ----------------------------------------------------------------------------------------------
# Streaming: a strip of the image runs band by band. Every op keeps the few rows of its input that
# its next output rows need (two for a 3x3 conv), so no row is computed twice: the only halo left
# is across the strips' side edges, and a strip as wide as the image has none.
# ----------------------------------------------------------------------------------------------
def kept(parts, y0: int) -> Tile:
    """Rows from y0 on of consecutive row tiles, as one copy: a view would hold the whole band alive."""
    ps = [p.crop(max(y0, p.y0), p.y1, p.x0, p.x1) for p in parts if p.y1 > y0]
    return ps[-1]._replace(data=torch.cat([p.data for p in ps], dim=2), y0=ps[0].y0)


def joined(parts) -> Tile:
    return parts[0] if len(parts) == 1 else kept(parts, parts[0].y0)


class Rows:
    """One op fed consecutive rows of its input; push returns the output rows they complete.
    fn maps a Tile to the Tile of its valid outputs (conv3x3, upsample, downsample); need(o) is the
    first input row output row o reads; prep(parts) makes fn's input from the rows kept from the
    last push and the new ones (by default their concatenation). A norm op counts one step per push
    (progress, interrupt)."""

    def __init__(self, fn, need, runner=None, prep=joined):
        self.fn, self.need, self.runner, self.prep, self.buf = fn, need, runner, prep, None

    def push(self, t):
        if self.runner is not None:
            self.runner.step()
        if t is None:
            return None
        parts = [t] if self.buf is None else [self.buf, t]
        if t.y1 < t.H and t.y1 - parts[0].y0 < 4:  # too few rows for any output yet (tiny bands)
            self.buf = kept(parts, parts[0].y0)
            return None
        out = self.fn(self.prep(parts))
        self.buf = None if out.y1 == out.H else kept(parts, self.need(out.y1))
        return out


class ResRows:
    """A resnet block streamed: norm1/conv1 and norm2/conv2 as Rows, and its input rows kept until
    the residual branch has produced their outputs (two rows later). The shortcut is added part by
    part, so the block's input is never concatenated."""

    def __init__(self, block: ResnetBlock, a: Rows, b: Rows):
        self.block, self.a, self.b, self.skip = block, a, b, None

    def push(self, t):
        h = self.b.push(self.a.push(t))
        parts = [p for p in (self.skip, t) if p is not None]
        if h is None:
            self.skip = kept(parts, parts[0].y0) if parts else None
            return None
        for p in parts:
            a0, a1 = max(h.y0, p.y0), min(h.y1, p.y1)
            if a0 < a1:
                h.data[:, :, a0 - h.y0:a1 - h.y0].add_(self.block.shortcut(p.crop(a0, a1, h.x0, h.x1).data))
        self.skip = None if h.y1 == h.H else kept(parts, h.y1)
        return h


def streamed(layers, stats: list, record: bool, runner, scratch: Scratch) -> list:
    """The layers as streaming ops. Frozen statistics: the k-th GroupNorm uses stats[k]. record:
    the input is pushed whole, once, and each GroupNorm measures its own input (exact statistics
    of that input) and appends them to stats."""
    ops, k = [], 0

    def norm_conv(norm, conv):
        nonlocal k
        i, k = k, k + 1

        def prep(parts) -> Tile:
            """GroupNorm -> SiLU of the kept rows and the new ones into one warm buffer (the raw rows
            are never concatenated)."""
            if record:
                assert len(parts) == 1 and parts[0].y0 == 0 and parts[0].y1 == parts[0].H, \
                    "recording statistics needs the whole input in one push"
                st = Stats()
                st.add(parts[0].data, Scratch())  # its fp32 deviations buffer freed at once
                stats.append(st)
            scale, shift = (v.to(parts[0].data.device) for v in stats[i].affine(norm, parts[0].data.dtype))
            n = sum(p.y1 - p.y0 for p in parts)
            out, r = scratch.like("act", parts[-1].data, rows=n), 0
            for p in parts:
                torch.addcmul(shift, p.data, scale, out=out[:, :, r:r + p.y1 - p.y0])
                r += p.y1 - p.y0
            return parts[-1]._replace(data=silu_(out), y0=parts[0].y0)
        return Rows(lambda x: conv3x3(conv, x), lambda o: max(0, o - 1), runner, prep)

    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            ops.append(Rows(lambda x, c=layer: conv3x3(c, x), lambda o: max(0, o - 1)))
        elif isinstance(layer, ResnetBlock):
            a = norm_conv(layer.norm1, layer.conv1)  # first: the statistics are indexed in order
            ops.append(ResRows(layer, a, norm_conv(layer.norm2, layer.conv2)))
        elif isinstance(layer, Upsample):
            ops.append(Rows(lambda x, u=layer: upsample(u, x), lambda o: max(0, (o - 1) // 2)))
        elif isinstance(layer, Downsample):
            ops.append(Rows(lambda x, d=layer: downsample(d, x), lambda o: 2 * o))
        elif isinstance(layer, Tail):
            ops.append(norm_conv(layer.norm, layer.conv))
        else:
            raise TypeError(f"bounded tiles cannot run a {type(layer).__name__}")
    return ops


def halo_of(layers) -> int:
    """Receptive field of layers, in px of their input (SD: 7 latent px for the decoder's levels
    above the latent resolution, 36 px for the encoder's levels down to it)."""
    need = 0
    for layer in reversed(layers):
        if isinstance(layer, ResnetBlock):
            need += 2
        elif isinstance(layer, Upsample):
            need = math.ceil((need + 1) / 2)
        elif isinstance(layer, Downsample):
            need = 2 * need + 1
        else:
            need += 1
    return need


def split(net):
    """(whole-before, tiled, whole-after): everything at latent resolution runs whole (the decoder's
    conv_in, mid block and first level's resnets; the encoder's last level, mid block and tail),
    the higher resolutions in tiles. The latent-resolution part is where the receptive field is
    widest (half the decoder's halo) and its activations are the smallest: whole, its statistics
    are exact and no tile recomputes it."""
    layers = net.layers()
    a = next(i for i, l in enumerate(layers) if isinstance(l, AttnBlock))
    if isinstance(net, Decoder):  # tiles from the first upsample (after the mid block if there is none)
        i = next((i for i, l in enumerate(layers) if isinstance(l, Upsample)), a + 2)
        return layers[:i], layers[i:], []
    i = max((i for i, l in enumerate(layers) if isinstance(l, Downsample)), default=a - 2)  # tiles to the last downsample
    return [], layers[:i + 1], layers[i + 1:]


# ----------------------------------------------------------------------------------------------
# Running: the statistics (one whole pass over the mosaic), then every strip streamed band by band.
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, total, progress=None, interrupt=None):
        self.done, self.total, self.progress, self.interrupt = 0, total, progress, interrupt

    def step(self):
        if self.interrupt is not None and self.interrupt():
            raise Interrupted("tiled VAE run interrupted")
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


MIN_BAND = 8  # latent rows: thinner bands would make strips wider than they need to be


def layout(h: int, w: int, t: int, halo: int) -> tuple:
    """(bands, strips) for tiles of t latent px with `halo` latent px of context: the memory of one
    such tile, (t + 2 halo)^2 latent px, reshaped into the widest strip whose bands keep MIN_BAND
    rows. Bands cost nothing (the rows stream), a strip's side edges recompute the halo: so as few
    strips as that area allows (one, as wide as the image, up to ~6000 px wide with 512 px tiles)."""
    area = (t + 2 * halo) ** 2
    nx = 1 if w * MIN_BAND <= area else math.ceil(w / max(1, area // MIN_BAND - 2 * halo))
    cols = -(-w // nx) + (2 * halo if nx > 1 else 0)
    return math.ceil(h / max(1, min(h, area // cols))), nx


def strip_rows(steps, tiled, band: int, cols: int, full: bool, W: int):
    """(rows, cols) of each op's input in one push, in its own px: the band's rows, the two rows a
    conv keeps, and on the last band the rows the ops above still owe (their lag); the strip's
    columns with the halo its remaining layers need (or the image's width)."""
    out, lag = [], 0
    for k, s in enumerate(steps):
        rows = band * s.r_in + lag + 2
        out.append((rows, W * s.r_in if full else min(W * s.r_in, cols * s.r_in + 2 * halo_of(tiled[k:]))))
        if isinstance(s.layer, Upsample):
            lag = 2 * lag + 1
        elif isinstance(s.layer, Downsample):
            lag = lag // 2 + 1
        else:
            lag += 2 if isinstance(s.layer, ResnetBlock) else 1
    return out


def mosaic_lattice(h: int, w: int, size: int | None):
    """Crop origins (latent px) on a regular lattice, centred in their cells: by default half of
    each side (a quarter of the area), at most MOSAIC_CAP latent px per side."""
    c = MOSAIC_CROP
    if size is None:
        ny, nx = max(1, min(h // 2, MOSAIC_CAP) // c), max(1, min(w // 2, MOSAIC_CAP) // c)
    else:
        ny, nx = max(1, min(h, size) // c), max(1, min(w, size) // c)
    ys = [min(h - c, max(0, int((i + 0.5) * h / ny - c / 2))) for i in range(ny)]
    xs = [min(w - c, max(0, int((j + 0.5) * w / nx - c / 2))) for j in range(nx)]
    return ys, xs


def mosaic(x: torch.Tensor, lattice, unit: int) -> torch.Tensor:
    ys, xs = lattice
    c = MOSAIC_CROP * unit
    return torch.cat([torch.cat([x[:, :, y * unit: y * unit + c, xx * unit: xx * unit + c] for xx in xs], dim=3)
                      for y in ys], dim=2)


def plan_mosaic(p: Plan, h: int, w: int) -> None:
    """The statistics mosaic of a bounded plan. An image that one band covers, or no larger than a
    512x512 one (a quarter of the largest mosaic), is its own mosaic (lattice None): it runs whole
    with exact statistics, in no more memory than that band or a large image's mosaic takes, and
    that pass is the result (one pass). Larger images get the estimate, from a quarter of their area.
    An explicit Tiling(mosaic_size=...) always gets its mosaic."""
    if p.tiling.mosaic_size is None and (p.grid == (1, 1) or h * w <= (MOSAIC_CAP // 2) ** 2):
        p.mosaic_lattice = None
        p.grid = (1, 1)
        return
    p.mosaic_lattice = mosaic_lattice(h, w, p.tiling.mosaic_size)


def prepare(net, p: Plan, shape, in_channels: int, item: int) -> int:
    """Complete a bounded plan (halo, strips and bands, statistics mosaic); return its predicted peak."""
    B, _, h, w = shape
    before, tiled, _ = split(net)
    unit = p.downscale if before else 1       # image px per px of the tiled part's input
    px = halo_of(tiled) * unit
    if p.tiling.overlap is not None:
        if p.tiling.overlap < px:
            p.notes.append(f"overlap {p.tiling.overlap} px raised to the receptive field ({px} px): less would "
                           f"not be exact")
        px = max(px, -(-p.tiling.overlap // unit) * unit)
    p.halo = px
    p.grid = layout(h, w, max(1, p.tile_size // p.downscale), -(-px // p.downscale))
    plan_mosaic(p, h, w)
    return peak(net, p, B, h, w, in_channels, item)


def peak(net, p: Plan, B: int, h: int, w: int, in_channels: int, item: int) -> int:
    """Predicted peak of a bounded plan: the latent-resolution part whole, what stays alive while
    strips stream (its output, the result, every op's kept rows), and the larger of one band
    passing through the ops and the mosaic's whole pass."""
    before, tiled, after = split(net)
    r0 = 1 if before else p.downscale
    lat = B * net.mid.block_1.conv1.out_channels * h * w * item
    cin = before[-1].conv2.out_channels if before else in_channels
    steps = steps_of(tiled, cin, r0)
    one = kept = 0
    if p.mosaic_lattice is None:  # one whole pass
        mos = untiled_peak(steps, B, h, w, item)
    else:
        mos = untiled_peak(steps, B, *(len(v) * MOSAIC_CROP for v in p.mosaic_lattice), item)
        band = math.ceil(h / p.grid[0])
        cols = -(-w // p.grid[1])
        for s, (rows, c) in zip(steps, strip_rows(steps, tiled, band, cols, p.grid[1] == 1, w)):
            px_in = B * min(rows, h * s.r_in) * c
            one = max(one, step_need(s, px_in, px_in * s.r_out ** 2 // s.r_in ** 2, item))
            kept += B * c * s.cin * item * (6 if isinstance(s.layer, ResnetBlock) else 2)
    out = B * steps[-1].cout * h * w * steps[-1].r_out ** 2 * item
    return int(max(6 * lat, lat + out + max(one + kept, mos)))


def run(net, x: torch.Tensor, p: Plan) -> tuple:
    """The network on x in bounded mode. Returns (output, report)."""
    t0, meter = time.perf_counter(), PeakMeter(x.device)
    before, tiled, after = split(net)
    for layer in before:
        x = layer(x)
    B, _, H, W = x.shape
    r0 = 1 if before else p.downscale                  # px per latent px of the tiled part's input
    halo = p.halo // (p.downscale if before else 1)
    n_norms = sum(2 if isinstance(l, ResnetBlock) else isinstance(l, Tail) for l in tiled)
    pushes = p.grid[0] * p.grid[1] if p.mosaic_lattice is not None else 0  # bands x strips
    runner = Runner((1 + pushes) * n_norms, p.tiling.progress, p.tiling.interrupt)
    scratch, stats = Scratch(), []

    def whole(src):  # one push of the whole input, recording exact statistics of it (own buffers: freed after)
        t = Tile(src, 0, src.shape[2], 0, src.shape[3], src.shape[2], src.shape[3], r0)
        for op in streamed(tiled, stats, True, runner, Scratch()):
            t = op.push(t)
        return t.data

    if p.mosaic_lattice is None:  # the image is its own mosaic: exact statistics, one pass
        out = whole(x)
        stats_note = "exact: the whole image is the mosaic (one pass)"
    else:
        whole(mosaic(x, p.mosaic_lattice, r0))
        out = None
        ys = [i * p.h // p.grid[0] for i in range(p.grid[0] + 1)]
        xs = [j * p.w // p.grid[1] for j in range(p.grid[1] + 1)]
        for cx0, cx1 in zip(xs, xs[1:]):
            x0, x1 = max(0, cx0 * r0 - halo), min(W, cx1 * r0 + halo)
            ops = streamed(tiled, stats, False, runner, scratch)
            for y0, y1 in zip(ys, ys[1:]):
                t = Tile(x[:, :, y0 * r0:y1 * r0, x0:x1], y0 * r0, y1 * r0, x0, x1, H, W, r0)
                for op in ops:
                    t = op.push(t)
                if t is None:
                    continue
                if out is None:
                    out = torch.empty(B, t.data.shape[1], H // r0 * t.s, W // r0 * t.s, dtype=x.dtype,
                                      device=x.device, memory_format=torch.channels_last)
                out[:, :, t.y0:t.y1, cx0 * t.s:cx1 * t.s] = t.crop(t.y0, t.y1, cx0 * t.s, cx1 * t.s).data
        my, mx = p.mosaic_lattice
        area = 100 * len(my) * len(mx) * MOSAIC_CROP ** 2 / (p.h * p.w)
        stats_note = (f"estimated: mosaic of {len(my)}x{len(mx)} crops of {MOSAIC_CROP}x{MOSAIC_CROP} latent px "
                      f"({area:.0f}% of the area)")
    for layer in after:
        out = layer(out)
    rep = TilingReport(p.direction, "bounded", p.tile_size, p.grid, p.halo, stats_note, p.predicted, None, 0,
                       meter.peak(), time.perf_counter() - t0, runner.done, list(p.notes))
    return out, rep
