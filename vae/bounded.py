"""Bounded mode: tiled decode/encode whose memory does not grow with the image.

No full-size activation at the high resolutions: each tile runs alone through them, carrying a
halo equal to their receptive field (7 latent px for the SD decoder's levels after the latent
resolution, 36 px for the encoder's levels before it), and its convolutions shrink the tile's valid
region instead of zero-padding it, so every pixel it returns is exact given the statistics. The
statistics are the one thing a lone tile cannot know: they come from a *mosaic*, a small image
stitched from 4x4 latent-px crops taken on a lattice over the whole input (a quarter of the area
at most, at most 128x128 latent px whatever the image size), run with exact statistics shared by
the mosaic's tiles and recorded at every GroupNorm. Then every tile streams with those statistics
frozen. Why a mosaic: GroupNorm statistics depend on content, so a few whole tiles miss regions
(22-36 dB measured), a downsampled proxy is biased by the change of scale (25-30 dB; 1x1 crops,
the nearest-neighbour proxy: 22 dB); many small full-scale crops from everywhere stratify the
sample. When the mosaic would cover the image itself (small images) the image is its own mosaic:
the statistics are exact.

Everything at the latent resolution runs whole: the decoder's conv_in, mid block and first
level's resnets, the encoder's last level, mid block and output. Exact attention, exact statistics
for those norms, and no tile recomputes the part where the receptive field is widest; its memory
is a few latent-resolution activations (1/64 of the image's pixels, 512 channels for SD).
"""
import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import Scratch, Stats, normed
from .memory import PeakMeter
from .model import AttnBlock, Decoder, Downsample, ResnetBlock, Tail, Upsample
from .tiling import Interrupted, Plan, TilingReport, step_need, steps_of, tile_grid, untiled_peak

# Latent px. Measured (64-channel calibrated SD decoder, 768x768, one tile, the default quarter-area
# mosaic; test image / retina / hubble / four-photo canvas, dB): 4: 38.4 / 31.7 / 33.7 / 37.7;
# 2: 41.3 / 32.4 / 34.8 / 37.6 but 33.3 against 4's 44.6 with a 64 latent px mosaic of the test
# image (the lattice's period against the content's: no size wins everywhere); 1 (the
# nearest-neighbour proxy): 22.5, 3: 34.1, 8: 34.4 on the test image. Jittered positions: 0.3-4.8 dB worse.
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

    @property
    def nbytes(self):
        return self.data.numel() * self.data.element_size()


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
# GroupNorm with statistics from outside the tile: the segment engine's exactly additive Stats.
# ----------------------------------------------------------------------------------------------
def core_stats(t: Tile, core) -> Stats:
    """Statistics of the tile's core region (the cores partition the image, so they add up). Its
    fp32 deviations buffer is freed at once, not kept warm: a tile's widest activation (256
    channels at full resolution in SD's decoder) would otherwise stay allocated beside the
    normalised copy and the conv output (measured: 1.36 -> 1.11 GiB peak, 1024x1024 decode, 512 px tiles)."""
    cy0, cy1, cx0, cx1 = (c * t.s for c in core)
    st = Stats()
    st.add(t.crop(cy0, cy1, cx0, cx1).data, Scratch())
    return st


def combine(parts) -> Stats:
    st = Stats()
    for p in parts:
        st.merge(p.n, p.mean, p.m2)
    return st


def norm_act_conv(norm, conv, t: Tile, core, scratch: Scratch):
    """GroupNorm (statistics from outside) -> SiLU -> 3x3 conv, as a generator pausing at the norm.
    Normalised into the shared scratch buffer: safe, the conv consumes it before the next yield."""
    st = yield core_stats(t, core)
    return conv3x3(conv, t._replace(data=normed(t.data, st.affine(norm, t.data.dtype), scratch)))


def tile_layers(layers, t: Tile, core, scratch: Scratch):
    """Run layers on one tile, pausing at every GroupNorm for the statistics."""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            t = conv3x3(layer, t)
        elif isinstance(layer, ResnetBlock):
            h = yield from norm_act_conv(layer.norm1, layer.conv1, t, core, scratch)
            h = yield from norm_act_conv(layer.norm2, layer.conv2, h, core, scratch)
            x = t.crop(h.y0, h.y1, h.x0, h.x1).data
            t = h._replace(data=h.data.add_(layer.shortcut(x)))
        elif isinstance(layer, Upsample):
            t = upsample(layer, t)
        elif isinstance(layer, Downsample):
            t = downsample(layer, t)
        elif isinstance(layer, Tail):
            t = yield from norm_act_conv(layer.norm, layer.conv, t, core, scratch)
        else:
            raise TypeError(f"bounded tiles cannot run a {type(layer).__name__}")
    return t


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
# Running tiles: together (mosaic, shared statistics) or streamed (frozen statistics).
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

    def joint(self, gens, record):
        """Advance all generators together; at each GroupNorm combine their core sums (recorded)."""
        needs = [next(g) for g in gens]
        while True:
            st = combine(needs)
            record.append(st)
            results, nxt = [], []
            for g in gens:
                self.step()
                try:
                    nxt.append(g.send(st))
                except StopIteration as stop:
                    results.append(stop.value)
            if results:
                return results
            needs = nxt

    def stream(self, gen, stats):
        next(gen)
        for st in stats:
            self.step()
            try:
                gen.send(st)
            except StopIteration as stop:
                return stop.value
        raise AssertionError("tile has more GroupNorms than the recorded statistics")


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
    """The statistics mosaic of a bounded plan. An image no larger than a 512x512 one (a quarter of
    the largest mosaic) is its own mosaic (lattice None): its tiles run together with exact
    statistics, in less memory than a large image's mosaic takes, and their outputs are the
    result (no second pass). Larger images get the estimate, from a quarter of their area."""
    if p.tiling.mosaic_size is None and h * w <= (MOSAIC_CAP // 2) ** 2:
        p.mosaic_lattice, p.mosaic_cores = None, p.cores
        return
    ys, xs = p.mosaic_lattice = mosaic_lattice(h, w, p.tiling.mosaic_size)
    p.mosaic_cores, _ = tile_grid(len(ys) * MOSAIC_CROP, len(xs) * MOSAIC_CROP, max(1, p.tile_size // p.downscale))


def prepare(net, p: Plan, shape, in_channels: int, item: int) -> int:
    """Complete a bounded plan (its halo and statistics mosaic) and return its predicted peak."""
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
    plan_mosaic(p, h, w)
    return peak(net, p, B, h, w, in_channels, item)


def peak(net, p: Plan, B: int, h: int, w: int, in_channels: int, item: int) -> int:
    """Predicted peak of a bounded plan: the latent-resolution part whole, what stays alive while
    tiles run (its output, the result), and the larger of one tile streaming (its valid region
    shrinking layer by layer) and the mosaic's tiles running together."""
    before, tiled, after = split(net)
    r0 = 1 if before else p.downscale
    lat = B * net.mid.block_1.conv1.out_channels * h * w * item
    cin = before[-1].conv2.out_channels if before else in_channels
    steps = steps_of(tiled, cin, r0)
    t = max(1, p.tile_size // p.downscale)
    one = 0
    for k, s in enumerate(steps):
        side_in = min(max(h, w) * s.r_in, t * s.r_in + 2 * halo_of(tiled[k:]))
        side_out = min(max(h, w) * s.r_out, t * s.r_out + 2 * halo_of(tiled[k + 1:]))
        one = max(one, step_need(s, B * side_in ** 2, B * side_out ** 2, item))
    if p.mosaic_lattice is None:
        mh, mw = h, w
    else:
        mh, mw = (len(v) * MOSAIC_CROP for v in p.mosaic_lattice)
    mos = untiled_peak(steps, B, mh, mw, item)
    out = B * steps[-1].cout * h * w * steps[-1].r_out ** 2 * item
    return int(max(6 * lat, lat + out + max(one, mos)))


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
    tiles = len(p.cores) + (len(p.mosaic_cores) if p.mosaic_lattice is not None else 0)
    runner = Runner(tiles * n_norms, p.tiling.progress, p.tiling.interrupt)
    scratch = Scratch()

    def start(src, core):
        Hs, Ws = src.shape[2:]
        y0, y1 = max(0, core[0] * r0 - halo), min(Hs, core[1] * r0 + halo)
        x0, x1 = max(0, core[2] * r0 - halo), min(Ws, core[3] * r0 + halo)
        return tile_layers(tiled, Tile(src[:, :, y0:y1, x0:x1], y0, y1, x0, x1, Hs, Ws, r0), core, scratch)

    stats, out = [], None

    def write(core, t):
        nonlocal out
        s = t.s
        if out is None:
            out = torch.empty(B, t.data.shape[1], H // r0 * s, W // r0 * s, dtype=x.dtype, device=x.device,
                              memory_format=torch.channels_last)
        y0, y1, x0, x1 = (c * s for c in core)
        out[:, :, y0:y1, x0:x1] = t.crop(y0, y1, x0, x1).data

    if p.mosaic_lattice is None:  # the image is its own mosaic: exact statistics, one pass
        for core, t in zip(p.cores, runner.joint([start(x, c) for c in p.cores], stats)):
            write(core, t)
        stats_note = f"exact: the whole image is the mosaic ({len(p.cores)} tiles run together)"
    else:
        m = mosaic(x, p.mosaic_lattice, r0)
        runner.joint([start(m, c) for c in p.mosaic_cores], stats)
        del m
        for core in p.cores:
            write(core, runner.stream(start(x, core), stats))
        ys, xs = p.mosaic_lattice
        area = 100 * len(ys) * len(xs) * MOSAIC_CROP ** 2 / (p.h * p.w)
        stats_note = (f"estimated: mosaic of {len(ys)}x{len(xs)} crops of {MOSAIC_CROP}x{MOSAIC_CROP} latent px "
                      f"({area:.0f}% of the area)")
    for layer in after:
        out = layer(out)
    rep = TilingReport(p.direction, "bounded", p.tile_size, p.grid, p.halo, stats_note, p.predicted, None, 0,
                       meter.peak(), time.perf_counter() - t0, runner.done, list(p.notes))
    return out, rep