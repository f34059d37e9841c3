"""The segment engine: exact tiled encode and decode at about one untiled pass of compute.

Why segments
------------
A VAE is a chain of GroupNorms, each followed by a SiLU and one 3x3 convolution (or, around a
width change, an upsample or downsample conv, or the mid-block attention). GroupNorm normalises
every channel group by the mean and variance over the *whole image*, so it is a global barrier;
everything between two barriers is local: one 3x3 conv reads one pixel around each output.

So the engine runs the network layer by layer instead of tile by tile from the input:
* Every activation at a barrier exists once, in a **store** (`Store`: the compute device, host
  memory, or a memory-mapped file in a spill folder).
* A segment (norm -> SiLU -> conv, or an up/downsample, or the attention's projections) runs band
  by band: it reads its band's rows plus one row above and below from the input store, applies
  the norm with the *whole image's* statistics, convolves, writes the band into the output store,
  and adds the band's per-channel count, mean and squared deviations to the next norm's statistics
  (Chan's parallel combination in float64: the bands partition the image, so these are the whole
  image's statistics, exactly, not an average of per-band ones).
* The halo is one row per segment (the 3x3 conv), not the ~104 px receptive field from the latent
  up that tile-by-tile execution recomputes: compute is one untiled pass plus a few rows.
* Bands span the full width: rows of a channels-last activation are contiguous, so a band is one
  slice of memory (a view on the device, one sequential read from host memory or disk), and the
  conv's own zero padding is right at the left and right image borders.
* The mid-block attention stays global: its q, k and v are written band by band to the device,
  then each band of queries attends over all keys (SDPA: memory linear in the tokens), and
  proj_out plus the residual are added band by band.
* Alive at once: the residual stream, the current activation (and a new stream where a resnet
  changes width), one band's temporaries; around the attention, q, k and v at latent resolution.

Exactness: the results equal the untiled pass up to float summation order (the tests hold
max |tiled - untiled| <= 1e-4 on every shape and family).

What each layer type does in a segment is its own (`Step.segment` in layers.py); this module is
the machinery they share: stores, the bands of an activation, statistics passed along, progress.

Several processes: with a `Shard` (distributed.py) each rank computes its own band of rows at
every resolution, its stores hold those rows and the one halo row on each side, which the
neighbouring ranks send before each segment; statistics, attention keys/values and the result
are gathered. Nothing else changes.
"""
import errno
import math
import os
import shutil
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn as nn

from .errors import KLVAEError
from .groupnorm import Stats
from .memory import PeakMeter
from .ops import Progress, Scratch, Tile, conv3x3, normed


# ----------------------------------------------------------------------------------------------
# Bands: near-equal full-width row ranges within a number of values.
# ----------------------------------------------------------------------------------------------
def band_count(H: int, W: int, C: int, elems: int) -> int:
    """How many full-width bands of at most `elems` values (at least one row) cover H rows of W x C."""
    return math.ceil(H / max(1, min(H, elems // max(1, W * C))))


def band_rows(H: int, W: int, C: int, elems: int, lo: int = 0, hi: int | None = None):
    """Near-equal full-width bands of an H x W x C activation with at most `elems` values each
    (at least one row), partitioning its rows [lo, hi) (all H by default): [(y0, y1), ...]."""
    hi = H if hi is None else hi
    n = band_count(hi - lo, W, C, elems)
    ys = [lo + i * (hi - lo) // n for i in range(n + 1)]
    return [(ys[i], ys[i + 1]) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Stores: a full-size activation [B, C, H, W] (channels last), read and written in row bands.
# ----------------------------------------------------------------------------------------------
def spill_file(folder: str, nbytes: int) -> np.memmap:
    """nbytes of a new file in `folder`, every block reserved, memory-mapped. The file is unlinked
    as soon as it is mapped: nothing is left behind however the process ends, and the page cache,
    not this process's heap, holds the data.

    Why reserve: a file made sparse (ftruncate) gets its blocks on first write, through the mapping;
    when the disk has filled up meanwhile (another job, another decode sharing the folder) that
    write is a SIGBUS that kills the process, a ComfyUI server with it. posix_fallocate takes the
    blocks now (the C library writes them where the filesystem cannot reserve), so a full disk is
    ENOSPC here, between bands, and one KLVAEError."""
    try:
        fd, path = tempfile.mkstemp(prefix="klvae-store-", suffix=".bin", dir=folder)
    except OSError as e:
        raise KLVAEError(f"cannot create the disk store in the spill folder {folder} ({e.strerror or e}; removed or "
                         f"made read-only during the run?): set Tiling(spill_dir=...) or $KLVAE_SPILL_DIR "
                         f"to a writable folder, or use mode='bounded'") from e
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise KLVAEError(f"spill folder {folder} is full: the disk store needs {nbytes / 2**20:.1f} MiB more for its next "
                             f"activation, {_free_mib(folder)} MiB are free (it filled up during the run): free space there, "
                             f"set Tiling(spill_dir=...) or $KLVAE_SPILL_DIR to a folder on a larger disk, or use "
                             f"mode='bounded'") from e
        raise KLVAEError(f"disk store in the spill folder {folder} failed ({e.strerror or e}): set "
                         f"Tiling(spill_dir=...) or $KLVAE_SPILL_DIR to another folder, or use mode='bounded'") from e
    finally:
        os.close(fd)
        os.unlink(path)


def _free_mib(folder) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f}"
    except OSError:
        return "?"


class Store:
    """A full-size activation on the compute device, in host memory, or in a memory-mapped file.

    `rows(a, b)` gives rows [a, b) on the compute device (a view where the store is there);
    `write` and `add_` put a band back. Row numbers are the whole activation's; a store may hold
    only some of them (`held`: a rank's band and its halo rows, distributed.py)."""

    def __init__(self, kind: str, shape, dtype, device, spill_dir=None, held=None):
        B, C, H, W = shape
        self.kind, self.shape, self.device, self.H = kind, tuple(shape), device, H
        self.key = (kind, self.shape, held)  # Context.new reuses a freed store of the same key
        self.top, bottom = held or (0, H)
        H = bottom - self.top
        self.nbytes = B * C * H * W * torch.empty((), dtype=dtype).element_size()
        if kind == "disk":
            raw = spill_file(spill_dir, self.nbytes)
            self.t = torch.from_numpy(raw).view(dtype).view(B, H, W, C).permute(0, 3, 1, 2)
        elif kind == "host":
            pin = torch.device(device).type == "cuda"
            self.t = torch.empty(B, H, W, C, dtype=dtype, pin_memory=pin).permute(0, 3, 1, 2)
        else:
            self.t = torch.empty(B, C, H, W, dtype=dtype, device=device, memory_format=torch.channels_last)

    @classmethod
    def of(cls, t: torch.Tensor) -> "Store":
        """An existing device tensor (the network's input) as a store."""
        s = cls.__new__(cls)
        s.kind, s.shape, s.device, s.H, s.top = "device", tuple(t.shape), t.device, t.shape[2], 0
        s.key = None  # the caller's tensor: never reused for another activation
        s.nbytes, s.t = t.numel() * t.element_size(), t.contiguous(memory_format=torch.channels_last)
        return s

    @property
    def whole(self) -> bool:
        return self.top == 0 and self.t.shape[2] == self.H

    def rows(self, a: int, b: int) -> torch.Tensor:
        v = self.t[:, :, a - self.top:b - self.top]
        return v if self.kind == "device" or (self.kind == "disk" and self.device.type == "cpu") else \
            v.to(self.device, non_blocking=True)

    def write(self, a: int, y: torch.Tensor) -> None:
        self.t[:, :, a - self.top:a - self.top + y.shape[2]].copy_(y, non_blocking=True)

    def add_(self, a: int, y: torch.Tensor) -> torch.Tensor:
        """Rows [a, a + len) += y (the residual add), returning the updated rows on the device."""
        if self.t.device == y.device:
            return self.t[:, :, a - self.top:a - self.top + y.shape[2]].add_(y)
        y = y.add_(self.rows(a, a + y.shape[2]))
        self.write(a, y)
        return y


# ----------------------------------------------------------------------------------------------
# What every segment of one call shares, and the pass most of them are.
# ----------------------------------------------------------------------------------------------
class Context:
    """What every segment of one call shares: the plan, its bands, the stores, progress."""

    def __init__(self, plan, device, dtype, shard=None):
        self.plan, self.device, self.dtype, self.shard = plan, device, dtype, shard
        self.progress = Progress(0, plan.tiling.progress, plan.tiling.interrupt)
        self.store_peak = 0
        self.alive = {}
        self.spare = None  # the last freed store, for the next one of its shape
        self.scratch = Scratch()

    def own(self, H: int) -> tuple:
        """The rows of an H-row activation this process computes (all of them, or its rank's band)."""
        return self.shard.rows(H) if self.shard else (0, H)

    def bands(self, H: int, W: int, C: int):
        """Near-equal full-width bands of this process's rows of an H x W x C activation, each
        within the plan's band size."""
        return band_rows(H, W, C, self.plan.band_elems, *self.own(H))

    def exchange(self, store: Store) -> None:
        """Make the one row above and below this process's rows readable (from the neighbouring ranks)."""
        if self.shard and not store.whole:
            self.shard.exchange(store)

    def merge(self, st: Stats) -> Stats:
        """The whole image's statistics from every rank's part (rank order: the same on every rank)."""
        if not self.shard or st.mean is None:
            return st
        packed = torch.stack([torch.full_like(st.mean, float(st.n)), st.mean, st.m2])
        whole = Stats()
        for part in self.shard.all_gather(packed):
            whole.merge(int(part[0, 0, 0].item()), part[1], part[2])
        return whole

    def new(self, B, C, H, W, kind=None) -> Store:
        held = self.shard.held(H) if self.shard else None
        kind = kind or self.plan.store
        s, self.spare = self.spare, None
        if s is None or s.key != (kind, (B, C, H, W), held):
            s = None  # a spare that does not fit is freed before the allocation: it never adds to the peak
            s = Store(kind, (B, C, H, W), self.dtype, self.device, self.plan.spill_dir, held)
        self.alive[id(s)] = s.nbytes
        self.store_peak = max(self.store_peak, sum(self.alive.values()))
        return s

    def free(self, s: Store) -> None:
        """s is no longer read. Its memory serves the next store of its shape (the resnets of a
        level): a fresh allocation of host memory page-faults on first write, ~2x the cost of the
        band copies into it (0.17 s vs 0.06 s per 512 MiB, measured). A disk store too: each new
        spill file's pages fault into the page cache on first write, which made the disk store
        1.14x the device store on a 1024^2 Qwen-Image decode; reusing the mapping halves the bytes
        dirtied (2.81 -> 1.46 GiB) and brings it to 1.02x (docs/measurements.md)."""
        self.alive.pop(id(s), None)
        self.spare = s

    def put(self, out, y0: int, y: torch.Tensor, st) -> None:
        """One band's result: written to its store (out None: already updated in place), added to the
        next norm's statistics (st None: no norm reads it), the step counted."""
        if out is not None:
            out.write(y0, y)
        if st is not None:
            st.add(y, self.scratch)
        self.progress.step()

    def window(self, x: Store, y0: int, y1: int, halo: int = 1) -> Tile:
        """Rows [y0, y1) of x and `halo` rows on each side (fewer at the image border), full width."""
        a, b = max(0, y0 - halo), min(x.H, y1 + halo)
        return Tile(x.rows(a, b), a, b, 0, x.shape[3], x.H, x.shape[3], 1)


def conv_pass(ctx: Context, conv: nn.Conv2d, x: Store, affine=None, stats: bool = True, kind=None, pre=None) -> tuple:
    """out = conv(SiLU(norm(x))) with the norm's whole-image `affine` (or conv(x) without one, or
    conv(pre(x)) for a per-pixel `pre`, such as an RMS norm and SiLU), band by band, each reading one
    halo row above and below; returns (out, out's statistics)."""
    B, C, H, W = x.shape
    ctx.exchange(x)
    cout = conv.weight.shape[0]
    out = ctx.new(B, cout, H, W, kind)
    st = Stats()
    for y0, y1 in ctx.bands(H, W, max(C, cout)):
        t = ctx.window(x, y0, y1)
        if affine is not None:
            t = t._replace(data=normed(t.data, affine, ctx.scratch))
        elif pre is not None:
            t = t._replace(data=pre(t.data))
        y = conv3x3(conv, t).rows(y0, y1)
        del t
        ctx.put(out, y0, y, st if stats else None)
        del y
    return out, (ctx.merge(st) if stats else st)


def rows_pass(ctx: Context, x: Store, cout: int, size: tuple, band_channels: int, rows_in, op, want: bool,
              kind=None) -> tuple:
    """out = op(x) at another resolution (an upsample, a downsample), band by band: output rows
    [y0, y1) of the `size` (H, W) output come from op(Tile of x's rows rows_in(y0, y1)); returns (out,
    out's statistics when `want`). x is freed: nothing reads it afterwards."""
    B, _, H, W = x.shape
    H2, W2 = size
    ctx.exchange(x)
    out = ctx.new(B, cout, H2, W2, kind)
    st = Stats()
    for y0, y1 in ctx.bands(H2, W2, band_channels):
        a, b = rows_in(y0, y1)
        y = op(Tile(x.rows(a, b), a, b, 0, W, H, W, 1)).rows(y0, y1)
        ctx.put(out, y0, y, st if want else None)
        del y
    ctx.free(x)
    return out, ctx.merge(st)


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------
def run_segments(steps, x: torch.Tensor, plan, shard=None) -> tuple:
    """The steps (layers.steps_of) on x, segment by segment. Returns (output on the device, what
    was measured: a dict for the report); with a shard, this rank's rows of the output (non-finite
    values in an item on any rank make that item non-finite on every rank, so that the precision
    guard decides the same everywhere).

    A run that fails (a full spill disk, an interrupt, a dead rank) gives its memory back before
    the error leaves: its stores live in the frames of the traceback, which would keep them (and a
    spill file's mapping) until the cyclic garbage collector runs; those frames are cleared."""
    meter = PeakMeter(x.device, anon=plan.store == "disk")
    try:
        return _run_segments(steps, x, plan, shard, meter)
    except BaseException as e:
        release_frames(e)
        raise
    finally:
        meter.stop()


def release_frames(e: BaseException) -> None:
    """Drop the locals of the finished frames in e's traceback and in those of its causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


def _run_segments(steps, x, plan, shard, meter) -> tuple:
    t0 = time.perf_counter()
    B, _, H, W = x.shape
    h, w = H // steps[0].r_in, W // steps[0].r_in
    ctx = Context(plan, x.device, x.dtype, shard)
    ctx.progress.total = sum(s.passes * len(band_rows(h * s.r_out, w * s.r_out, s.band_channels, plan.band_elems,
                                                      *ctx.own(h * s.r_out))) for s in steps)
    cur, st = Store.of(x), None
    for n, s in enumerate(steps):
        last = n == len(steps) - 1
        # a segment measures its output's statistics when the next step normalises its input
        cur, st = s.segment(ctx, cur, st, want=not last and steps[n + 1].reads_stats, last=last)
    out = cur.t
    notes = []
    if shard:
        lo, hi = shard.rows(cur.H)
        out = cur.rows(lo, hi)
        bad = shard.all_gather((~torch.isfinite(out).flatten(1).all(1)).to(torch.uint8))
        out[torch.stack(bad).amax(0).bool()] = float("nan")
        notes.append(f"rank {shard.rank} of {shard.size}: rows {lo}..{hi} of {cur.H}")
    statistics = ("exact: whole-image sums over the bands at every GroupNorm"
                  + (f", all-gathered from {shard.size} ranks" if shard else "")
                  if any(s.reads_stats for s in steps) else "none needed: no layer normalises over the image")
    return out, dict(statistics=statistics,
                     store_bytes=ctx.store_peak, measured_peak=meter.peak(), seconds=time.perf_counter() - t0,
                     steps=ctx.progress.done, notes=notes, bytes_sent=shard.bytes_sent if shard else 0)
