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

Several processes: with a `Shard` (distributed.py) each rank computes its own band of rows at
every resolution, its stores hold those rows and the one halo row on each side, which the
neighbouring ranks send before each segment; statistics, attention keys/values and the result
are gathered. Nothing else changes.
"""
import errno
import os
import shutil
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import Shard
from .errors import KLVAEError
from .memory import PeakMeter
from .model import AttnBlock, Downsample, ResnetBlock, Tail, Upsample, silu_
from .tiling import STATS_CHUNK, Interrupted, Plan, TilingReport, band_rows, steps_of


# ----------------------------------------------------------------------------------------------
# Statistics: per (batch item, channel) count, mean and sum of squared deviations.
# ----------------------------------------------------------------------------------------------
class Stats:
    """Exactly additive over any partition of the pixels (Chan et al.'s pairwise update), in float64.
    Each chunk of a band contributes its own mean and squared deviations about it (two passes over
    rows that are in cache), so no precision is lost when a channel's mean dwarfs its spread."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: torch.Tensor, scratch: "Scratch") -> None:     # y: [B, C, rows, W]
        """y's per-channel statistics added, STATS_CHUNK bytes of fp32 deviations at a time: the
        four passes over a chunk (mean, deviations, square, sum) then hit the cache, not memory
        (a 128 MiB band: 40 ms against 62 ms in one piece, here)."""
        B, C, H, W = y.shape
        rows = max(1, STATS_CHUNK // max(1, B * C * W * 4))
        for a in range(0, H, rows):
            self._add(y[:, :, a:a + rows], scratch)

    def _add(self, y: torch.Tensor, scratch: "Scratch") -> None:
        n = y.shape[2] * y.shape[3]
        if n == 0:
            return
        mean = y.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
        d = torch.sub(y, mean, out=scratch.like("stats", y, torch.float32)).square_()
        self.merge(n, mean.flatten(1).double(), d.sum(dim=(2, 3)).double())

    def merge(self, n, mean, m2) -> None:
        """Add another part's count, per-channel means and squared deviations (Chan's update)."""
        if n == 0:
            return
        if self.mean is None or self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def affine(self, norm: nn.GroupNorm, dtype) -> tuple:
        """GroupNorm as x * scale + shift with these statistics: ([B, C, 1, 1], [B, C, 1, 1])."""
        B, C = self.mean.shape
        G = norm.num_groups
        cm, cm2 = self.mean.view(B, G, C // G), self.m2.view(B, G, C // G)
        gmean = cm.mean(-1, keepdim=True)
        gvar = (cm2.sum(-1, keepdim=True) + self.n * (cm - gmean).square().sum(-1, keepdim=True)) / (self.n * C // G)
        rstd = torch.rsqrt(gvar + norm.eps)                                    # [B, G, 1]
        w = norm.weight.to(rstd.device, torch.float64).view(1, G, C // G)
        b = norm.bias.to(rstd.device, torch.float64).view(1, G, C // G)
        scale = (rstd * w).reshape(B, C, 1, 1)
        shift = (b - gmean * rstd * w).reshape(B, C, 1, 1)
        return scale.to(dtype), shift.to(dtype)


class Scratch:
    """Reused buffers for a band's temporaries. A fresh large tensor costs a page-faulting pass
    over its memory (on this CPU the normalised copy takes 41 ms fresh, 9 ms into a warm buffer,
    for a 128-channel 256x512 band), which would otherwise double the engine's non-conv time."""

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


def normed(x: torch.Tensor, affine, scratch: Scratch, act: bool = True) -> torch.Tensor:
    """GroupNorm (given statistics) -> SiLU of a band: one multiply-add into a warm buffer, then
    SiLU in place. The result is valid until the next band's."""
    scale, shift = affine
    h = torch.addcmul(shift.to(x.device), x, scale.to(x.device), out=scratch.like("act", x))
    return silu_(h) if act else h


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
                         f"made read-only during the run?): pass Tiling(spill_dir=...) (--spill-dir, $KLVAE_SPILL_DIR) "
                         f"for a writable folder, or use mode='bounded'") from e
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=(nbytes,))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise KLVAEError(f"spill folder {folder} is full: the disk store needs {nbytes / 2**20:.1f} MiB more for its next "
                             f"activation, {_free_mib(folder)} MiB are free (it filled up during the run): free space there, "
                             f"pass Tiling(spill_dir=...) (--spill-dir, $KLVAE_SPILL_DIR) on a larger disk, or use "
                             f"mode='bounded'") from e
        raise KLVAEError(f"disk store in the spill folder {folder} failed ({e.strerror or e}): pass "
                         f"Tiling(spill_dir=...) for another folder, or use mode='bounded'") from e
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
# One segment: bands of output rows, each from its input rows plus a one-row halo.
# ----------------------------------------------------------------------------------------------
def conv_rows(conv: nn.Conv2d, h: torch.Tensor, a: int, b: int, H: int, y0: int, y1: int) -> torch.Tensor:
    """Rows [y0, y1) of a 3x3, stride-1, zero-padded conv of an activation with H rows, from h =
    its rows [a, b) over the full width (a <= y0 - 1 unless a == 0, b >= y1 + 1 unless b == H).
    The conv pads left/right itself (the image border); it pads top/bottom too only when the band
    touches the top or bottom, and the row it then computes needlessly at the other end is cut."""
    edge = a == 0 or b == H
    out = F.conv2d(h, conv.weight, conv.bias, padding=(1 if edge else 0, 1))
    first = a if edge else a + 1
    return out[:, :, y0 - first: y1 - first]


class Context:
    """What every segment of one call shares: the plan, its bands, the stores, progress."""

    def __init__(self, plan: Plan, device, dtype, shard=None):
        self.plan, self.device, self.dtype, self.shard = plan, device, dtype, shard
        t = plan.tiling
        self.progress, self.interrupt = t.progress, t.interrupt
        self.done, self.total = 0, 0
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
        band copies into it (0.17 s vs 0.06 s per 512 MiB here). A disk store is not reused."""
        self.alive.pop(id(s), None)
        if s.kind != "disk":
            self.spare = s

    def put(self, out, y0: int, y: torch.Tensor, st) -> None:
        """One band's result: written to its store (out None: already updated in place), added to the
        next norm's statistics (st None: no norm reads it), the step counted."""
        if out is not None:
            out.write(y0, y)
        if st is not None:
            st.add(y, self.scratch)
        self.step()

    def step(self) -> None:
        if self.interrupt is not None and self.interrupt():
            raise Interrupted("tiled VAE run interrupted")
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def segment_conv(ctx, conv: nn.Conv2d, x: Store, r: int, affine=None, stats=True, kind=None) -> tuple:
    """out = conv(act(norm(x))) (or conv(x) without a norm), band by band; with out's statistics."""
    B, C, H, W = x.shape
    ctx.exchange(x)
    out = ctx.new(B, conv.out_channels, H, W, kind)
    st = Stats()
    for y0, y1 in ctx.bands(H, W, max(C, conv.out_channels)):
        a, b = max(0, y0 - 1), min(H, y1 + 1)
        h = x.rows(a, b)
        if affine is not None:
            h = normed(h, affine, ctx.scratch)
        y = conv_rows(conv, h, a, b, H, y0, y1)
        del h
        ctx.put(out, y0, y, st if stats else None)
        del y
    return out, (ctx.merge(st) if stats else st)


def segment_resnet(ctx, block: ResnetBlock, x: Store, sx: Stats, r: int, stats: bool) -> tuple:
    B, _, H, W = x.shape
    h, sh = segment_conv(ctx, block.conv1, x, r, sx.affine(block.norm1, ctx.dtype))
    aff = sh.affine(block.norm2, ctx.dtype)
    del sh
    # The residual stream is updated in place when the width stays; a new stream where it changes.
    out = x if block.nin_shortcut is None else ctx.new(B, block.conv2.out_channels, H, W)
    ctx.exchange(h)
    st = Stats()
    for y0, y1 in ctx.bands(H, W, max(x.shape[1], block.conv2.out_channels)):
        a, b = max(0, y0 - 1), min(H, y1 + 1)
        y = conv_rows(block.conv2, normed(h.rows(a, b), aff, ctx.scratch), a, b, H, y0, y1)
        if out is x:
            y = x.add_(y0, y)
        else:
            y = y.add_(block.nin_shortcut(x.rows(y0, y1)))
        ctx.put(None if out is x else out, y0, y, st if stats else None)
        del y
    if out is not x:
        ctx.free(x)
    ctx.free(h)  # last: the spare for the next resnet's h
    return out, (ctx.merge(st) if stats else st)


def segment_attention(ctx, attn: AttnBlock, x: Store, sx: Stats, r: int) -> tuple:
    """Global single-head attention over all positions, written band by band. q, k, v live on the
    device token-major ([B, H, W, C], which is also [B, 1, H*W, C] for SDPA); each band of queries
    attends over every key, then proj_out and the residual are added to the stream in place.
    Distributed: each rank projects its own rows; the keys and values are gathered from all ranks."""
    B, C, H, W = x.shape
    lo, hi = ctx.own(H)
    aff = sx.affine(attn.norm, ctx.dtype)
    ctx.spare = None  # q, k and v are not stores: no spare held under them
    q, k, v = (torch.empty(B, hi - lo, W, C, dtype=ctx.dtype, device=ctx.device) for _ in range(3))
    for y0, y1 in ctx.bands(H, W, C):
        hn = normed(x.rows(y0, y1), aff, ctx.scratch, act=False)
        for proj, dst in ((attn.q, q), (attn.k, k), (attn.v, v)):
            dst[:, y0 - lo:y1 - lo] = proj(hn).permute(0, 2, 3, 1)
        del hn
        ctx.step()
    if ctx.shard:
        k, v = (ctx.shard.gather_rows(t, H, dim=1) for t in (k, v))
    kk, vv = k.view(B, 1, H * W, C), v.view(B, 1, H * W, C)
    st = Stats()
    for y0, y1 in ctx.bands(H, W, C):
        o = F.scaled_dot_product_attention(q[:, y0 - lo:y1 - lo].reshape(B, 1, -1, C), kk, vv)
        o = attn.proj_out(o.view(B, y1 - y0, W, C).permute(0, 3, 1, 2))
        ctx.put(None, y0, x.add_(y0, o), st)
        del o
    return x, ctx.merge(st)


def segment_upsample(ctx, up: Upsample, x: Store, r: int) -> tuple:
    """Nearest 2x then a 3x3 conv, at the doubled resolution (no norm before it)."""
    B, C, H, W = x.shape
    ctx.exchange(x)
    out = ctx.new(B, C, 2 * H, 2 * W)
    st = Stats()
    for y0, y1 in ctx.bands(2 * H, 2 * W, C):
        la, lb = max(0, (y0 - 1) // 2), min(H, (y1 + 2) // 2)   # low-res rows covering [y0-1, y1+1)
        h = F.interpolate(x.rows(la, lb), scale_factor=2.0, mode="nearest")
        y = conv_rows(up.conv, h, 2 * la, 2 * lb, 2 * H, y0, y1)
        del h
        ctx.put(out, y0, y, st)
        del y
    ctx.free(x)
    return out, ctx.merge(st)


def segment_downsample(ctx, down: Downsample, x: Store, r: int) -> tuple:
    """LDM's downsample: zero pad right and bottom by one, 3x3 conv with stride 2. Output row i
    reads input rows 2i .. 2i+2."""
    B, C, H, W = x.shape
    ctx.exchange(x)
    out = ctx.new(B, C, H // 2, W // 2)
    st = Stats()
    for y0, y1 in ctx.bands(H // 2, W // 2, 4 * C):
        a, b = 2 * y0, min(H, 2 * y1 + 1)
        h = F.pad(x.rows(a, b), (0, 1, 0, 2 * y1 + 1 - b))
        y = F.conv2d(h, down.conv.weight, down.conv.bias, stride=2)
        del h
        ctx.put(out, y0, y, st)
        del y
    ctx.free(x)
    return out, ctx.merge(st)


def run_segments(net: nn.Module, x: torch.Tensor, plan: Plan, shard: Shard | None = None) -> tuple:
    """The whole network on x, segment by segment. Returns (output on the device, report);
    with a shard, this rank's rows of the output (non-finite values in an item on any rank make
    that item non-finite on every rank, so that the precision guard decides the same everywhere).

    A run that fails (a full spill disk, an interrupt, a dead rank) gives its memory back before
    the error leaves: its stores live in the frames of the traceback, which would keep them (and a
    spill file's mapping) until the cyclic garbage collector runs; those frames are cleared."""
    meter = PeakMeter(x.device, anon=plan.store == "disk")
    try:
        return _run_segments(net, x, plan, shard, meter)
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


def _run_segments(net, x, plan, shard, meter) -> tuple:
    t0 = time.perf_counter()
    steps = steps_of(net.layers(), x.shape[1], 1 if plan.direction == "decode" else plan.downscale)
    B, _, H, W = x.shape
    h, w = H // steps[0].r_in, W // steps[0].r_in
    ctx = Context(plan, x.device, x.dtype, shard)
    ctx.total = sum(len(band_rows(h * s.r_out, w * s.r_out, max(s.cin, s.cout), plan.band_elems,
                                  *ctx.own(h * s.r_out)))
                    * (2 if isinstance(s.layer, (ResnetBlock, AttnBlock)) else 1) for s in steps)
    cur, st = Store.of(x), None
    for n, s in enumerate(steps):
        layer, r = s.layer, s.r_in
        # The statistics of a segment's output feed the next norm; an up/downsample has none.
        nxt = steps[n + 1].layer if n + 1 < len(steps) else None
        want = nxt is not None and not isinstance(nxt, (Upsample, Downsample))
        if isinstance(layer, nn.Conv2d):
            new, st = segment_conv(ctx, layer, cur, r, stats=want)
            ctx.free(cur)
            cur = new
        elif isinstance(layer, ResnetBlock):
            cur, st = segment_resnet(ctx, layer, cur, st, r, stats=want)
        elif isinstance(layer, AttnBlock):
            cur, st = segment_attention(ctx, layer, cur, st, r)
        elif isinstance(layer, Upsample):
            cur, st = segment_upsample(ctx, layer, cur, r)
        elif isinstance(layer, Downsample):
            cur, st = segment_downsample(ctx, layer, cur, r)
        elif isinstance(layer, Tail):  # the result: on the device, whatever the store
            new, _ = segment_conv(ctx, layer.conv, cur, r, st.affine(layer.norm, ctx.dtype), stats=False,
                                  kind="device")
            ctx.free(cur)
            cur = new
    out = cur.t
    notes = list(plan.notes)
    if shard:
        lo, hi = shard.rows(cur.H)
        out = cur.rows(lo, hi)
        bad = shard.all_gather((~torch.isfinite(out).flatten(1).all(1)).to(torch.uint8))
        out[torch.stack(bad).amax(0).bool()] = float("nan")
        notes.append(f"rank {shard.rank} of {shard.size}: rows {lo}..{hi} of {cur.H}")
    report = TilingReport(plan.direction, "exact", plan.tile_size, plan.grid, plan.halo,
                          f"exact: whole-image sums over {plan.grid[0]} bands at every GroupNorm"
                          + (f", all-gathered from {shard.size} ranks" if shard else ""), plan.predicted,
                          plan.store, ctx.store_peak, meter.peak(), time.perf_counter() - t0, ctx.done, notes,
                          shard.bytes_sent if shard else 0)
    return out, report
