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

What the statistics' estimate is worth, and what was tried to do better: docs/measurements.md.

Everything at the latent resolution runs whole: the decoder's conv_in, mid block and first
level's resnets, the encoder's last level, mid block and output. Exact attention, exact statistics
for those norms, and no strip recomputes the part where the receptive field is widest; its memory
is a few latent-resolution activations (1/64 of the image's pixels, 512 channels for SD).
"""
import math
import time

import torch

from .errors import KLVAEError
from .groupnorm import Stats
from .memory import PeakMeter
from . import verbs
from .ops import Progress, Scratch, Tile, normed

MOSAIC_CROP = 4   # latent px: each crop's side (why 4: docs/measurements.md)
MOSAIC_CAP = 128  # latent px per side: the mosaic's decode is at most a 1024x1024 one
MIN_BAND = 8      # latent rows: thinner bands would make strips wider than they need to be


# ----------------------------------------------------------------------------------------------
# Streaming: a strip of the image runs band by band. Every op keeps the few rows of its input that
# its next output rows need (two for a 3x3 conv), so no row is computed twice: the only halo left
# is across the strips' side edges, and a strip as wide as the image has none.
# ----------------------------------------------------------------------------------------------
def rows_from(parts, y0: int) -> Tile:
    """Rows from y0 on of consecutive row tiles, as one copy: a view would hold the whole band alive."""
    ps = [p.crop(max(y0, p.y0), p.y1, p.x0, p.x1) for p in parts if p.y1 > y0]
    return ps[-1]._replace(data=torch.cat([p.data for p in ps], dim=2), y0=ps[0].y0)


def joined(parts) -> Tile:
    return parts[0] if len(parts) == 1 else rows_from(parts, parts[0].y0)


class Rows:
    """One op fed consecutive rows of its input; push returns the output rows they complete.
    fn maps a Tile to the Tile of its valid outputs (conv3x3, an upsample, a downsample); need(o)
    is the first input row output row o reads; prep(parts) makes fn's input from the rows held
    from the last push and the new ones (by default their concatenation). An op that normalises
    counts one progress step per push."""

    def __init__(self, fn, need, progress: Progress | None = None, prep=joined):
        self.fn, self.need, self.progress, self.prep, self.held = fn, need, progress, prep, None

    def push(self, t):
        if self.progress is not None:
            self.progress.step()
        if t is None:
            return None
        parts = [t] if self.held is None else [self.held, t]
        if t.y1 < t.H and t.y1 - parts[0].y0 < 4:  # too few rows for any output yet (tiny bands)
            self.held = rows_from(parts, parts[0].y0)
            return None
        out = self.fn(self.prep(parts))
        keep = self.need(out.y1)
        # an op that reads no row beyond its outputs' own (a per-cell shortcut) may keep none
        self.held = None if out.y1 == out.H or keep >= parts[-1].y1 else rows_from(parts, keep)
        return out


class Chain:
    """Ops one after the other: what one op completes is pushed into the next."""

    def __init__(self, ops: list):
        self.ops = ops

    def push(self, t):
        for op in self.ops:
            t = op.push(t)
        return t


class Residual:
    """A residual streamed: the branch's ops, and the shortcut's rows (its input's, or a resampling
    shortcut's outputs) held until the branch has produced the same rows (a few rows later: the
    branch reads around its rows, the shortcut does not). `add(y, p)` adds held shortcut rows p
    into branch rows y in place; parts are added one by one, so the block's input is never
    concatenated."""

    def __init__(self, branch, shortcut, add):
        self.branch, self.shortcut, self.add, self.parts = branch, shortcut, add, []

    def push(self, t):
        h = self.branch.push(t)
        s = t if self.shortcut is None else self.shortcut.push(t)
        if s is not None:
            self.parts.append(s)
        if h is None:
            return None
        for p in self.parts:
            a0, a1 = max(h.y0, p.y0), min(h.y1, p.y1)
            if a0 < a1:
                self.add(h.data[:, :, a0 - h.y0:a1 - h.y0], p.crop(a0, a1, h.x0, h.x1).data)
        rest = [p for p in self.parts if p.y1 > h.y1]
        self.parts = [rows_from(rest, h.y1)] if rest and h.y1 < h.H else []
        return h


class Streamer:
    """Builds bounded mode's streamed ops from a layer's description (verbs.py). Frozen statistics:
    the k-th GroupNorm met uses stats[k]. record: the input is pushed whole, once, and each
    GroupNorm measures its own input (exact statistics of that input) and appends them to stats."""

    def __init__(self, stats: list, record: bool, progress: Progress, scratch: Scratch):
        self.stats, self.record, self.progress, self.scratch, self.k = stats, record, progress, scratch, 0

    def build(self, d):
        ops = [self.one(item) for item in verbs.sequence(d)]
        return ops[0] if len(ops) == 1 else Chain(ops)

    def one(self, item):
        if isinstance(item, verbs.Attention):
            raise KLVAEError("bounded mode streams the layers after the attention, never the attention itself")
        if isinstance(item, verbs.Residual):
            branch = self.build(item.branch)  # first: the statistics are indexed in order
            sc = item.shortcut
            shortcut = self.one(sc) if isinstance(sc, verbs.Rows) else None
            if item.add is not None:
                add = item.add
            elif sc is None or isinstance(sc, verbs.Rows):
                add = lambda y, p: y.add_(p)
            else:
                add = lambda y, p: y.add_(sc(p))
            return Residual(branch, shortcut, add)
        norm = item.norm
        if norm is None:
            return Rows(item.fn, item.need)
        if isinstance(norm, verbs.PerPixel):
            def prep(parts) -> Tile:
                data = norm.fn([p.data for p in parts], self.scratch)
                return parts[-1]._replace(data=data, y0=parts[0].y0)
            return Rows(item.fn, item.need, self.progress, prep)
        i, self.k = self.k, self.k + 1  # GroupNorm -> (SiLU): the normalised rows go into one warm buffer

        def prep(parts) -> Tile:
            if self.record:
                if len(parts) != 1 or parts[0].y0 != 0 or parts[0].y1 != parts[0].H:
                    raise KLVAEError("bounded mode: recording statistics needs the whole input in one push")
                st = Stats()
                st.add(parts[0].data)  # its fp32 deviations buffer freed at once
                self.stats.append(st)
            data = normed([p.data for p in parts], self.stats[i].affine(norm.norm, parts[0].data.dtype),
                          self.scratch, act=norm.act)
            return parts[-1]._replace(data=data, y0=parts[0].y0)
        return Rows(item.fn, item.need, self.progress, prep)


def halo_of(steps) -> int:
    """Receptive field of steps, in px of their input (SD: 7 latent px for the decoder's levels
    above the latent resolution, 36 px for the encoder's levels down to it)."""
    need = 0
    for s in reversed(steps):
        need = s.halo(need)
    return need


def split(steps, direction: str):
    """(whole-before, tiled, whole-after): everything at latent resolution runs whole (the decoder's
    conv_in, mid block and first level's resnets; the encoder's last level, mid block and tail),
    the higher resolutions in tiles. The latent-resolution part is where the receptive field is
    widest (half the decoder's halo) and its activations are the smallest: whole, its statistics
    are exact and no tile recomputes it. A network without resolution changes tiles what follows
    (decode) or precedes (encode) its mid block."""
    changes = [i for i, s in enumerate(steps) if s.r_out != s.r_in]
    glob = [i for i, s in enumerate(steps) if s.is_global]
    if direction == "decode":  # tiles from the first upsample
        i = changes[0] if changes else (glob[-1] + 2 if glob else 0)
        return steps[:i], steps[i:], []
    i = changes[-1] if changes else (glob[0] - 2 if glob else len(steps) - 1)  # tiles to the last downsample
    return [], steps[:i + 1], steps[i + 1:]


# ----------------------------------------------------------------------------------------------
# Planning: strips and bands, the statistics mosaic, the peak.
# ----------------------------------------------------------------------------------------------
def layout(h: int, w: int, t: int, halo: int) -> tuple:
    """(bands, strips) for tiles of t latent px with `halo` latent px of context: the memory of one
    such tile, (t + 2 halo)^2 latent px, reshaped into the widest strip whose bands keep MIN_BAND
    rows. Bands cost nothing (the rows stream), a strip's side edges recompute the halo: so as few
    strips as that area allows (one, as wide as the image, up to ~6000 px wide with 512 px tiles)."""
    area = (t + 2 * halo) ** 2
    nx = 1 if w * MIN_BAND <= area else math.ceil(w / max(1, area // MIN_BAND - 2 * halo))
    cols = -(-w // nx) + (2 * halo if nx > 1 else 0)
    return math.ceil(h / max(1, min(h, area // cols))), nx


def strip_rows(steps, band: int, cols: int, full: bool, W: int):
    """(rows, cols) of each step's input in one push, in its own px: the band's rows, the two rows
    a conv keeps, and on the last band the rows the steps above still owe (their lag); the strip's
    columns with the halo its remaining steps need (or the image's width)."""
    out, lag = [], 0
    for k, s in enumerate(steps):
        out.append((band * s.r_in + lag + 2,
                    W * s.r_in if full else min(W * s.r_in, cols * s.r_in + 2 * halo_of(steps[k:]))))
        lag = s.lag(lag)
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


def plan_mosaic(p, h: int, w: int, needs_stats: bool = True) -> None:
    """The statistics mosaic of a bounded plan. An image that one band covers, or no larger than a
    512x512 one (a quarter of the largest mosaic), is its own mosaic (lattice None): it runs whole
    with exact statistics, in no more memory than that band or a large image's mosaic takes, and
    that pass is the result (one pass). Larger images get the estimate, from a quarter of their area.
    An explicit Tiling(mosaic_size=...) always gets its mosaic."""
    if not needs_stats:  # per-pixel norms only (Qwen-Image): nothing to estimate, the strips are exact as they are
        p.mosaic_lattice = None if p.grid == (1, 1) else ()
        return
    if p.tiling.mosaic_size is None and (p.grid == (1, 1) or h * w <= (MOSAIC_CAP // 2) ** 2):
        p.mosaic_lattice = None
        p.grid = (1, 1)
        return
    p.mosaic_lattice = mosaic_lattice(h, w, p.tiling.mosaic_size)


def prepare(steps, p, shape, item: int) -> int:
    """Complete a bounded plan (halo, strips and bands, statistics mosaic); return its predicted peak."""
    B, _, h, w = shape
    before, tiled, _ = split(steps, p.direction)
    unit = p.downscale // tiled[0].r_in       # image px per px of the tiled part's input
    px = halo_of(tiled) * unit
    if p.tiling.overlap is not None:
        if p.tiling.overlap < px:
            p.notes.append(f"overlap {p.tiling.overlap} px raised to the receptive field ({px} px): less would "
                           f"not be exact")
        px = max(px, -(-p.tiling.overlap // unit) * unit)
    p.halo = px
    p.grid = layout(h, w, max(1, p.tile_size // p.downscale), -(-px // p.downscale))
    plan_mosaic(p, h, w, needs_stats=any(s.reads_stats for s in tiled))
    return peak(steps, p, B, h, w, item)


def untiled_need(steps, B, h, w, item) -> int:
    """Peak bytes of the plain pass of steps over h x w latent px."""
    return max(s.need(B * h * w * s.r_in ** 2, B * h * w * s.r_out ** 2, item) for s in steps)


def peak(steps, p, B: int, h: int, w: int, item: int) -> int:
    """Predicted peak of a bounded plan: the latent-resolution part whole, what stays alive while
    strips stream (its output, the result, every op's held rows), and the larger of one band
    passing through the ops and the mosaic's whole pass."""
    before, tiled, after = split(steps, p.direction)
    whole = before + after
    lat = max((B * max(s.cin, s.cout) * h * w * s.r_in ** 2 * item for s in whole), default=0)
    one = held = 0
    if p.mosaic_lattice is None:  # one whole pass
        mos = untiled_need(tiled, B, h, w, item)
    else:
        mos = untiled_need(tiled, B, *(len(v) * MOSAIC_CROP for v in p.mosaic_lattice), item) if p.mosaic_lattice else 0
        band = math.ceil(h / p.grid[0])
        cols = -(-w // p.grid[1])
        for s, (rows, c) in zip(tiled, strip_rows(tiled, band, cols, p.grid[1] == 1, w)):
            px_in = B * min(rows, h * s.r_in) * c
            one = max(one, s.need(px_in, px_in * s.r_out ** 2 // s.r_in ** 2, item))
            held += B * c * s.cin * item * s.keeps
    out = B * tiled[-1].cout * h * w * tiled[-1].r_out ** 2 * item
    return int(max(6 * lat, lat + out + max(one + held, mos)))


# ----------------------------------------------------------------------------------------------
# Running: the statistics (one whole pass over the mosaic), then every strip streamed band by band.
# ----------------------------------------------------------------------------------------------
def run(steps, x: torch.Tensor, p) -> tuple:
    """The steps on x in bounded mode. Returns (output, what was measured: a dict for the report)."""
    t0, meter = time.perf_counter(), PeakMeter(x.device)
    before, tiled, after = split(steps, p.direction)
    for s in before:
        x = s.layer(x)
    B, _, H, W = x.shape
    r0 = tiled[0].r_in                                  # px per latent px of the tiled part's input
    halo = p.halo // (p.downscale // r0)
    pushes = p.grid[0] * p.grid[1] if p.mosaic_lattice is not None else 0  # bands x strips
    passes = pushes + (p.mosaic_lattice != ())  # the mosaic's (or the whole image's) pass, then the strips'
    progress = Progress(passes * sum(s.norms for s in tiled), p.tiling.progress, p.tiling.interrupt)
    scratch, stats = Scratch(), []

    def whole(src):  # one push of the whole input, recording exact statistics of it (own buffers: freed after)
        t = Tile(src, 0, src.shape[2], 0, src.shape[3], src.shape[2], src.shape[3], r0)
        streamer = Streamer(stats, True, progress, Scratch())
        for op in [streamer.build(s.describe()) for s in tiled]:
            t = op.push(t)
        return t.data

    if p.mosaic_lattice is None:  # the image is its own mosaic: exact statistics, one pass
        out = whole(x)
        note = "exact: the whole image is the mosaic (one pass)"
    else:
        if p.mosaic_lattice:
            whole(mosaic(x, p.mosaic_lattice, r0))
        out = None
        ys = [i * p.h // p.grid[0] for i in range(p.grid[0] + 1)]
        xs = [j * p.w // p.grid[1] for j in range(p.grid[1] + 1)]
        for cx0, cx1 in zip(xs, xs[1:]):
            x0, x1 = max(0, cx0 * r0 - halo), min(W, cx1 * r0 + halo)
            streamer = Streamer(stats, False, progress, scratch)
            ops = [streamer.build(s.describe()) for s in tiled]
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
        if p.mosaic_lattice:
            my, mx = p.mosaic_lattice
            area = 100 * len(my) * len(mx) * MOSAIC_CROP ** 2 / (p.h * p.w)
            note = (f"estimated: mosaic of {len(my)}x{len(mx)} crops of {MOSAIC_CROP}x{MOSAIC_CROP} latent px "
                    f"({area:.0f}% of the area)")
        else:
            note = "exact: no statistics shared between pixels (per-pixel norms), strips streamed"
    for s in after:
        out = s.layer(out)
    return out, dict(statistics=note, measured_peak=meter.peak(), seconds=time.perf_counter() - t0,
                     steps=progress.done)
