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
* A pass (norm -> SiLU -> conv, or an up/downsample, or the attention's projections) runs band
  by band: it reads its band's rows plus the rows its op declares above and below (one for a 3x3
  conv) from the input store, applies the norm with the *whole image's* statistics, convolves,
  writes the band into the output store,
  and adds the band's per-channel count, mean and squared deviations to the next norm's statistics
  (Chan's parallel combination in float64: the bands partition the image, so these are the whole
  image's statistics, exactly, not an average of per-band ones).
* The halo is one row per pass (the 3x3 conv), not the ~104 px receptive field from the latent
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

What a layer type computes is its own description (`Step.describe`, in the verbs of verbs.py);
this module interprets descriptions: one band loop for every row op (`row_pass`: a conv after
its norm, a resample, a pixel shuffle; in a residual's last op, the shortcut added as each band is
written), one for the global attention (`attention_pass`), and residuals that keep their input
store alive across the layers they span (`residual_pass`). Each op's band reads the rows its
description declares (`Rows.span`), not an assumed one row. Plus the machinery: stores, the bands
of an activation, statistics passed along, progress.

Several processes: with a `Shard` (distributed.py) each rank computes its own band of rows at
every resolution, its stores hold those rows and the halo rows on each side (`verbs.reach` of the
network: one for 3x3 convs), which the neighbouring ranks send before each pass; statistics,
attention keys/values and the result are gathered. Nothing else changes.
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
import torch.nn.functional as F

from .errors import KLVAEError
from .groupnorm import Stats
from .memory import PeakMeter
from . import verbs
from .ops import Progress, Scratch, Tile, cat_frames, fold, normed, unfold


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
    """A full-size activation on the compute device, in host memory, or in a memory-mapped file:
    [B, C, H, W], or [B, C, T, H, W] with a time extent (frames), channels last.

    `rows(a, b)` gives rows [a, b) (of every frame) on the compute device (a view where the store
    is there); `write` and `add_` put a band back. Row numbers are the whole activation's; a store
    may hold only some of them (`held`: a rank's band and its halo rows, distributed.py). A clip's
    store holds a time chunk: its frames are the clip's from `t0` on (at its own frame rate)."""
    t0 = 0

    def __init__(self, kind: str, shape, dtype, device, spill_dir=None, held=None):
        B, C, *frames, H, W = shape  # frames: [] for an image, [T] for a clip
        self.kind, self.shape, self.device, self.H = kind, tuple(shape), device, H
        self.key = (kind, self.shape, held)  # Context.new reuses a freed store of the same key
        self.top, bottom = held or (0, H)
        H = bottom - self.top
        self.nbytes = B * C * math.prod(frames) * H * W * torch.empty((), dtype=dtype).element_size()
        last = (0, len(frames) + 3, *range(1, len(frames) + 3))  # [B, (T,) H, W, C] -> [B, C, (T,) H, W]
        if kind == "disk":
            raw = spill_file(spill_dir, self.nbytes)
            self.t = torch.from_numpy(raw).view(dtype).view(B, *frames, H, W, C).permute(*last)
        elif kind == "host":
            pin = torch.device(device).type == "cuda"
            self.t = torch.empty(B, *frames, H, W, C, dtype=dtype, pin_memory=pin).permute(*last)
        else:
            self.t = torch.empty(B, *frames, H, W, C, dtype=dtype, device=device).permute(*last)

    @classmethod
    def of(cls, t: torch.Tensor) -> "Store":
        """An existing device tensor (the network's input) as a store."""
        s = cls.__new__(cls)
        s.kind, s.shape, s.device, s.H, s.top, s.t0 = "device", tuple(t.shape), t.device, t.shape[-2], 0, 0
        s.key = None  # the caller's tensor: never reused for another activation
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        s.nbytes, s.t = t.numel() * t.element_size(), t.contiguous(memory_format=fmt)
        return s

    @property
    def whole(self) -> bool:
        return self.top == 0 and self.t.shape[-2] == self.H

    def rows(self, a: int, b: int) -> torch.Tensor:
        v = self.t.narrow(-2, a - self.top, b - a)
        return v if self.kind == "device" or (self.kind == "disk" and self.device.type == "cpu") else \
            v.to(self.device, non_blocking=True)

    def write(self, a: int, y: torch.Tensor) -> None:
        self.t.narrow(-2, a - self.top, y.shape[-2]).copy_(y, non_blocking=True)

    def add_(self, a: int, y: torch.Tensor) -> torch.Tensor:
        """Rows [a, a + len) += y (the residual add), returning the updated rows on the device."""
        if self.t.device == y.device:
            return self.t.narrow(-2, a - self.top, y.shape[-2]).add_(y)
        y = y.add_(self.rows(a, a + y.shape[-2]))
        self.write(a, y)
        return y


# ----------------------------------------------------------------------------------------------
# What every pass of one call shares.
# ----------------------------------------------------------------------------------------------
class Context:
    """What every pass of one call shares: the plan, its bands, the stores, progress."""

    def __init__(self, plan, device, dtype, shard=None):
        self.plan, self.device, self.dtype, self.shard = plan, device, dtype, shard
        self.reach = plan.reach  # rows above and below a band that the network's ops read (verbs.reach)
        if shard and shard.h // shard.size < self.reach:
            raise KLVAEError(f"{shard.size} ranks for a latent of {shard.h} rows: this network reads {self.reach} rows "
                             f"beyond a band, so each rank needs at least {self.reach}: use at most "
                             f"{shard.h // self.reach} ranks")
        self.progress = Progress(0, plan.tiling.progress, plan.tiling.interrupt)
        self.store_peak = 0
        self.alive = {}
        self.spare = None  # the last freed store, for the next one of its shape
        self.scratch = Scratch()
        self.caches = {}   # clips: op key -> [store of its last input frames, how many are valid]

    def own(self, H: int) -> tuple:
        """The rows of an H-row activation this process computes (all of them, or its rank's band)."""
        return self.shard.rows(H) if self.shard else (0, H)

    def bands(self, H: int, W: int, C: int):
        """Near-equal full-width bands of this process's rows of an H x W x C activation, each
        within the plan's band size."""
        return band_rows(H, W, C, self.plan.band_elems, *self.own(H))

    def exchange(self, store: Store) -> None:
        """Make the rows above and below this process's rows readable (from the neighbouring ranks)."""
        if self.shard and not store.whole:
            self.shard.exchange(store, self.reach)

    def merge(self, st: Stats) -> Stats:
        """The whole image's statistics from every rank's part (rank order: the same on every rank)."""
        if not self.shard or st.mean is None:
            return st
        packed = torch.stack([torch.full_like(st.mean, float(st.n)), st.mean, st.m2])
        whole = Stats()
        for part in self.shard.all_gather(packed):
            whole.merge(int(part[0, 0, 0].item()), part[1], part[2])
        return whole

    def new(self, shape, kind=None, t0: int = 0) -> Store:
        """A store of shape [B, C, H, W] or [B, C, T, H, W] (a chunk of a clip, from frame t0)."""
        held = self.shard.held(shape[-2], self.reach) if self.shard else None
        kind = kind or self.plan.store
        s, self.spare = self.spare, None
        if s is None or s.key != (kind, tuple(shape), held):
            s = None  # a spare that does not fit is freed before the allocation: it never adds to the peak
            s = Store(kind, shape, self.dtype, self.device, self.plan.spill_dir, held)
        s.t0 = t0
        self.alive[id(s)] = s.nbytes
        self.store_peak = max(self.store_peak, sum(self.alive.values()))
        return s

    def free(self, s: Store) -> None:
        """s is no longer read. Its memory serves the next store of its shape (the resnets of a
        level): a fresh allocation of host memory page-faults on first write, ~2x the cost of the
        band copies into it (docs/measurements.md). A disk store too: each new spill file's pages
        fault into the page cache on first write; reusing the mapping halves the bytes dirtied."""
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

    def window(self, x: Store, a: int, b: int) -> Tile:
        """Rows [a, b) of x (clipped to the image), full width."""
        a, b = max(0, a), min(x.H, b)
        return Tile(x.rows(a, b), a, b, 0, x.shape[-1], x.H, x.shape[-1], 1, t0=x.t0)

    # -- clips: each causal op's earlier frames, kept across time chunks --------------------------
    def earlier(self, op, t: Tile, a: int, b: int) -> Tile:
        """t (rows [a, b) of op's input) with the cached frames before x's first in front (Tile.past of them)."""
        c = self.caches.get(op.key)
        if c is None or c[1] == 0:
            return t
        store, k = c
        past = self.window(store, a, b).data[:, :, op.earlier - k:]
        return t._replace(data=cat_frames([past, t.data]), past=k)

    def remember(self, op, x: Store) -> None:
        """After op's pass over the chunk x: keep the last op.earlier frames of its input so far."""
        e, T = op.earlier, x.shape[2]
        c = self.caches.get(op.key)
        if c is None:  # made once, kept to the end of the clip: counted in the stores' peak
            B, C, _, H, W = x.shape
            c = self.caches[op.key] = [self.new((B, C, e, H, W)), 0]
        s, k = c
        # the rows the cache holds (distributed: a rank's band and its halo; x may be the whole
        # chunk input, which every rank has)
        src = x.t.narrow(-2, s.top - x.top, s.t.shape[-2])
        if T >= e:
            s.t.copy_(src[:, :, T - e:])
        else:  # slide: the newest e - T cached frames move to the front, then x's frames
            keep = min(k, e - T)
            if keep:
                s.t[:, :, e - T - keep:e - T] = s.t[:, :, e - keep:].clone()
            s.t[:, :, e - T:] = src
        c[1] = min(e, k + T)


# ----------------------------------------------------------------------------------------------
# The interpreter of a layer's description (verbs.py): one band loop for every row op, one for the
# attention. A residual keeps its input store alive across its branch and adds its shortcut in the
# branch's last pass (in place into the stream where nothing else reads it).
# ----------------------------------------------------------------------------------------------
def run(ctx: Context, d, x: Store, st, want: bool, kind, channels: int, free: bool = True) -> tuple:
    """The description d over the store x (st: x's statistics where d normalises its input first)
    -> (output store, its statistics when `want`). kind: the output's store ("device" for the
    network's output); channels: values per pixel that set a band's rows; free: x may be freed
    (and updated in place) once read: False while an enclosing residual still needs it."""
    items = verbs.sequence(d)
    for n, item in enumerate(items):
        end = n == len(items) - 1
        w = want if end else verbs.reads_stats(items[n + 1])
        k = kind if end else None
        mine = free or n > 0
        if isinstance(item, verbs.Residual):
            x, st = residual_pass(ctx, item, x, st, w, k, channels, mine)
        elif isinstance(item, verbs.Attention):
            x, st = attention_pass(ctx, item, x, st, w, k, mine)
        else:
            x, st = row_pass(ctx, item, x, st, w, k, channels, mine)
    return x, st


def _normed(ctx, norm, data, aff):
    if isinstance(norm, verbs.GroupNorm):
        return normed(data, aff, ctx.scratch, act=norm.act)
    return norm.fn(data, ctx.scratch) if norm is not None else data


def row_pass(ctx, op, x: Store, st, want, kind, channels, free, res=None, xs=None, free_xs=False) -> tuple:
    """out = op(x), band by band over the output: each band reads op.span of x (its halo),
    normalised as op says. In a residual's last pass (res), the shortcut of xs (the residual's
    input) is added to each band: in place into xs where the shapes agree and nothing else reads
    it, else into a new store. A clip's chunk (5-D stores): an op that reads earlier frames gets
    them from its cache in front of each band, and keeps its input's last frames for the next chunk."""
    B, C, *T, H, W = x.shape
    H2, W2 = op.size(H, W)
    t0, frames = x.t0, T
    if T and op.time is not None:
        t0, T2 = op.time(x.t0, T[0])
        frames = [T2]
    shape = (B, op.cout, *frames, H2, W2)
    ctx.exchange(x)
    aff = st.affine(op.norm.norm, ctx.dtype) if isinstance(op.norm, verbs.GroupNorm) else None
    inplace = (verbs.adds_in_place(res, free_xs) and xs is not x and xs.shape == shape and kind in (None, xs.kind))
    if res is not None and isinstance(res.shortcut, verbs.Rows) and verbs.reach(res.shortcut):
        ctx.exchange(xs)
    out = xs if inplace else ctx.new(shape, kind, t0)
    stats = Stats()
    band_frames = T[0] + op.earlier if T else 1  # a band holds every frame of its rows, and the cached ones
    for y0, y1 in ctx.bands(H2, W2, channels * band_frames):
        a, b = op.span(y0, y1)
        t = ctx.window(x, a, b)
        if op.earlier:
            t = ctx.earlier(op, t, a, b)
        y = _apply(ctx, op, t, aff).rows(y0, y1)
        del t
        if inplace:
            y = xs.add_(y0, y)
        elif res is not None:
            y = _add_shortcut(ctx, res, xs, y0, y1, y)
        ctx.put(None if inplace else out, y0, y, stats if want else None)
        del y
    if op.earlier:
        ctx.remember(op, x)
    if res is not None and not inplace and free_xs:
        ctx.free(xs)
    if free:
        ctx.free(x)  # last: the spare for the next store of its shape (the next resnet's h)
    return out, (ctx.merge(stats) if want else None)


def _apply(ctx, op, t: Tile, aff) -> Tile:
    """op's norm, then op.fn, on a tile. A clip's frames are normalised as images (per-pixel norms),
    and an op that does not mix frames runs on them as images too."""
    if t.data.dim() == 4:
        return op.fn(t._replace(data=_normed(ctx, op.norm, t.data, aff)))
    B = t.data.shape[0]
    data = t.data if op.norm is None else unfold(_normed(ctx, op.norm, fold(t.data), aff), B)
    if op.earlier or op.time is not None:
        return op.fn(t._replace(data=data))
    y = op.fn(t._replace(data=fold(data)))
    return y._replace(data=unfold(y.data, B))


def _add_shortcut(ctx, res, xs: Store, y0: int, y1: int, y: torch.Tensor) -> torch.Tensor:
    if res.add is not None:
        return res.add(y, xs.rows(y0, y1))
    sc = res.shortcut
    if isinstance(sc, verbs.Rows):
        return y.add_(sc.fn(ctx.window(xs, *sc.span(y0, y1))).rows(y0, y1))
    return y.add_(xs.rows(y0, y1) if sc is None else sc(xs.rows(y0, y1)))


def residual_pass(ctx, res, x: Store, st, want, kind, channels, free) -> tuple:
    """branch(x) + shortcut(x): x stays alive (and unchanged) across the branch; the branch's last
    row op adds the shortcut as it writes its bands."""
    *head, last = res.branch
    if not isinstance(last, verbs.Rows):
        raise KLVAEError("a residual's branch must end in a row op (verbs.rows / verbs.conv): "
                         f"this one ends in {type(last).__name__}")
    h, hst = x, st
    if head:
        h, hst = run(ctx, head, x, st, verbs.reads_stats(last), None, channels, free=False)
    return row_pass(ctx, last, h, hst, want, kind, channels, free=h is not x, res=res, xs=x, free_xs=free)


def attention_pass(ctx, a, x: Store, st, want, kind, free) -> tuple:
    """q, k, v live on the device token-major ([B, H, W, C], which is also [B, 1, H*W, C] for
    SDPA); each band of queries attends over every key, then the projection is added to the
    stream (in place where nothing else reads it). Distributed: each rank projects its own rows;
    the keys and values are gathered from all ranks. A clip's chunk: each frame over its own pixels
    (the frames folded into the batch)."""
    B, C, *T, H, W = x.shape
    n = B * (T[0] if T else 1)
    lo, hi = ctx.own(H)
    aff = st.affine(a.norm.norm, ctx.dtype) if isinstance(a.norm, verbs.GroupNorm) else None
    ctx.spare = None  # q, k and v are not stores: no spare held under them
    q, k, v = (torch.empty(n, hi - lo, W, C, dtype=ctx.dtype, device=ctx.device) for _ in range(3))
    bands = ctx.bands(H, W, C * n // B)
    for y0, y1 in bands:
        parts = a.qkv(_normed(ctx, a.norm, fold(x.rows(y0, y1)), aff))
        for part, dst in zip(parts, (q, k, v)):
            dst[:, y0 - lo:y1 - lo] = part.permute(0, 2, 3, 1)
        del parts
        ctx.progress.step()
    if ctx.shard:
        k, v = (ctx.shard.gather_rows(t, H, dim=1) for t in (k, v))
    kk, vv = k.view(n, 1, H * W, C), v.view(n, 1, H * W, C)
    out = x if free and kind in (None, x.kind) else ctx.new(x.shape, kind, x.t0)
    stats = Stats()
    for y0, y1 in bands:
        o = F.scaled_dot_product_attention(q[:, y0 - lo:y1 - lo].reshape(n, 1, -1, C), kk, vv)
        o = a.proj(o.view(n, y1 - y0, W, C).permute(0, 3, 1, 2))
        o = unfold(o, B) if T else o
        if out is x:
            o = x.add_(y0, o)
            ctx.put(None, y0, o, stats if want else None)
        else:
            o = o.add_(x.rows(y0, y1))
            ctx.put(out, y0, o, stats if want else None)
        del o
    del q, k, v, kk, vv
    if out is not x and free:
        ctx.free(x)
    return out, (ctx.merge(stats) if want else None)


def band_passes(ctx: Context, d, H: int, W: int, C: int, channels: int) -> int:
    """Progress steps the description takes over an H x W x C input (what `run` will count)."""
    n = 0
    for item in verbs.sequence(d):
        if isinstance(item, verbs.Residual):
            n += band_passes(ctx, item.branch, H, W, C, channels)
            H, W = _size(item.branch, H, W)
            C = _channels(item.branch, C)
        elif isinstance(item, verbs.Attention):
            n += 2 * len(ctx.bands(H, W, C))
        else:
            H, W = item.size(H, W)
            C = item.cout or C
            n += len(ctx.bands(H, W, channels))
    return n


def _size(d, H, W):
    up, down = verbs.ratio(d)
    return H * up // down, W * up // down


def _channels(d, C):
    for o in verbs.ops(d):
        if isinstance(o, verbs.Rows) and o.cout:
            C = o.cout
    return C


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
    ctx.progress.total = sum(band_passes(ctx, s.describe(), h * s.r_in, w * s.r_in, s.cin, s.band_channels)
                             for s in steps)
    cur, st = Store.of(x), None
    for n, s in enumerate(steps):
        last = n == len(steps) - 1
        # a pass measures its output's statistics when the next step normalises its input
        cur, st = run(ctx, s.describe(), cur, st, want=not last and steps[n + 1].reads_stats,
                      kind="device" if last else None, channels=s.band_channels)
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


# ----------------------------------------------------------------------------------------------
# Clips: the same passes, one time chunk after another.
# ----------------------------------------------------------------------------------------------
def run_clip(steps, chunks, plan, emit, device, dtype, shard=None) -> dict:
    """A clip through the steps' clip descriptions (Step.describe_clip), one time chunk after
    another: chunks yields (t0, the chunk's input frames [B, C, T, h, w] on the device); each
    chunk runs as the image passes do, band by band through stores of the plan's kind, every op
    that reads earlier frames taking them from its cache (a store of its input's last frames,
    kept from chunk to chunk). emit(t0, frames) receives each chunk's output (on the device) as
    it finishes. The chunks' outputs, in order, are the whole clip's: exactly the untiled
    causal decode, however the clip is chunked. Returns what was measured (as run_segments).
    With a shard (distributed.py), every rank runs every chunk over its own rows: its stores and
    caches hold its band and the halo rows, exchanged with its neighbours before each pass reads
    them (the cached frames' halo rows come with the frames they were cut from); emit gets this
    rank's rows of each chunk's output."""
    meter = PeakMeter(device, anon=plan.store == "disk")
    try:
        return _run_clip(steps, chunks, plan, emit, device, dtype, meter, shard)
    except BaseException as e:
        release_frames(e)
        raise
    finally:
        meter.stop()


def _run_clip(steps, chunks, plan, emit, device, dtype, meter, shard) -> dict:
    t0 = time.perf_counter()
    ctx = Context(plan, device, dtype, shard)
    ctx.progress = Progress(0, None, plan.tiling.interrupt)  # the caller's progress counts chunks
    descriptions = [s.describe_clip() for s in steps]
    n = rows = 0
    for n, (f0, x) in enumerate(chunks, 1):
        cur = Store.of(x)
        cur.t0 = f0
        for i, (s, d) in enumerate(zip(steps, descriptions)):
            last = i == len(steps) - 1
            cur, _ = run(ctx, d, cur, None, want=False, kind="device" if last else None, channels=s.band_channels)
            if cur.shape[2] == 0:  # a stride-2 time conv that completed no window: nothing further this chunk
                break
        else:
            emit(cur.t0, cur.rows(*shard.rows(cur.H)) if shard else cur.t)
            rows = cur.H
        ctx.free(cur)
        del cur
        if plan.tiling.progress is not None:
            plan.tiling.progress(n, plan.chunks)
    caches = sum(c[0].nbytes for c in ctx.caches.values())
    notes = [f"the causal convs' cached frames: {caches / 2**20:.0f} MiB"]
    if shard:
        lo, hi = shard.rows(rows)
        notes.append(f"rank {shard.rank} of {shard.size}: rows {lo}..{hi} of {rows}")
    return dict(statistics="none needed: per-pixel norms", store_bytes=ctx.store_peak, measured_peak=meter.peak(),
                seconds=time.perf_counter() - t0, steps=ctx.progress.done, notes=notes,
                bytes_sent=shard.bytes_sent if shard else 0)
