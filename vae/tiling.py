"""How to tile, the plan, and running it: mode, store, bands and the memory each needs, decided
before anything runs; then `execute` runs the plan and reports.

`Tiling` holds what the caller asks for and is checked once, when it is made. `make_plan` turns a
request, an input shape and a memory budget into a `Plan`: untiled when the plain pass fits and
the caller allowed it ("auto"), else the segment engine ("exact", engine.py) with the store that
fits (the compute device, host memory, or a file in a spill folder), else "bounded" (bounded.py:
no full-size activation anywhere, statistics estimated). The memory model is closed form: the
network's steps (layers.py) are walked with their shapes (no tensors, not even on the meta
device), so a plan costs a millisecond at any size and "auto" answers at once for a 65536x65536
image. `execute(steps, x, plan)` runs a plan with the engine it names and returns the output and a
`TilingReport`: the plan plus what was measured.

Memory model (bytes above the weights and the input; measured against the process's peak RSS and
CUDA's allocator for every family in tests/test_tiling.py):
  untiled  per step (layers.py): its input, the live residual stream, the normalised copy, the
           conv output and the conv's workspace; peak over steps.
  exact    the engine's own allocations walked over the steps' descriptions (`StoreWalk`): the
           stores alive at each pass (a residual's input kept across the layers it spans, a new
           stream where the width changes) where the store is the device, plus that pass's band
           temporaries as its op declares them and, around the attention, its q/k/v on the device.
  bounded  the latent-resolution part whole, plus one band of a strip passing through the steps
           (its rows, the rows each keeps, the side halo) or the statistics mosaic's whole pass,
           whichever is larger (bounded.peak).

Sizes: `tile_size` is a tile's side in image px. Exact mode runs full-width *bands* whose values
(rows x width x channels) match a tile_size x tile_size tile of the widest activation: at 1024 px
wide, tile_size 256 gives bands of 64 rows. Bounded mode runs strips of bands within one tile's
memory. Reports say which: "16 bands of 64 rows", "3 bands x 1 strip".
"""
import inspect
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import bounded, engine, verbs
from .errors import Interrupted, KLVAEError
from .groupnorm import STATS_CHUNK
from .layers import WORKSPACE, steps_of
from .memory import PeakMeter, free_host_memory, free_memory

MODES = ("exact", "bounded", "auto")
DEFAULT_MODE = "exact"      # what Tiling() means, and what the CLI's and the nodes' tiled options default to
STORES = ("auto", "device", "host", "disk")
TILE_CANDIDATES = (4096, 2048, 1536, 1024, 768, 512, 384, 256, 128)  # image px, largest first
MAX_SIDE = 65536            # image px: beyond this nothing is planned (a 4 GP image)
UNLIMITED = 2**62           # a budget that never binds: plans a call as asked, to learn its need

__all__ = ["DEFAULT_MODE", "Interrupted", "MODES", "Plan", "Tiling", "TilingReport", "execute", "make_plan"]


def _int_or_none(name, v, minimum):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise KLVAEError(f"Tiling {name}={v!r}: expected a whole number >= {minimum} (or 0/None: choose)")
    if v == 0:
        return None
    if v < minimum:
        raise KLVAEError(f"Tiling {name}={v}: expected at least {minimum} (or 0/None: choose)")
    return v


@dataclass(frozen=True)
class Tiling:
    """How to tile. Sizes in image pixels. Checked once, here; 0 means "choose" for every size."""
    mode: str = DEFAULT_MODE            # "exact" | "bounded" | "auto" (untiled if the plan fits, else tiled)
    tile_size: int | None = None        # a tile's core side (multiple of the VAE's downscale); None: largest that fits
    overlap: int | None = None          # bounded mode's halo (a strip's sides); None: the receptive field (exact needs none)
    memory_budget: int | None = None    # bytes of device memory; None: what is free
    mosaic_size: int | None = None      # bounded mode: side, in latent px, of the statistics mosaic
    store: str = "auto"                 # exact mode: where full activations live: device, host, disk, auto
    spill_dir: str | None = None        # disk store folder; None: $KLVAE_SPILL_DIR or the system temp folder
    progress: Callable[[int, int], None] | None = None   # called with (done, total) tile steps
    interrupt: Callable[[], bool] | None = None          # truthy (or raising) stops between tile steps
    process_group: object = None        # exact mode over several processes (distributed.py); None: this one
    gather: str = "all"                 # distributed: the output on every rank, on rank 0 ("rank0"), or each rank's band

    def __post_init__(self):
        if self.mode not in MODES:
            raise KLVAEError(f"unknown tiling mode {self.mode!r}: use {', '.join(MODES)}")
        if self.store not in STORES:
            raise KLVAEError(f"unknown store {self.store!r}: use {', '.join(STORES)}")
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_("tile_size", _int_or_none("tile_size", self.tile_size, 1))
        set_("overlap", _int_or_none("overlap", self.overlap, 0))
        set_("memory_budget", _int_or_none("memory_budget", self.memory_budget, 1))
        set_("mosaic_size", _int_or_none("mosaic_size", self.mosaic_size, 4))
        for name, n_args in (("progress", 2), ("interrupt", 0)):
            fn = getattr(self, name)
            if fn is None:
                continue
            if not callable(fn):
                raise KLVAEError(f"Tiling {name} must be a callable, got {type(fn).__name__}")
            try:
                inspect.signature(fn).bind(*range(n_args))
            except TypeError:
                raise KLVAEError(f"Tiling {name} must take {n_args} arguments ({'done, total' if n_args else 'none'}), "
                                 f"got {getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}") from None
            except ValueError:
                pass  # a builtin without a signature: trust it
        if self.spill_dir is not None and not isinstance(self.spill_dir, (str, os.PathLike)):
            raise KLVAEError(f"Tiling spill_dir must be a folder path, got {type(self.spill_dir).__name__}")
        if self.gather not in ("all", "rank0", "band"):
            raise KLVAEError(f"Tiling gather={self.gather!r}: use 'all', 'rank0' or 'band'")
        if self.process_group is not None and self.mode != "exact":
            raise KLVAEError(f"Tiling(process_group=...) shards the exact mode only; got mode {self.mode!r}")

    @classmethod
    def of(cls, tiling) -> "Tiling":
        """A Tiling from what callers pass: a Tiling, a mode name, or True (the default mode)."""
        if isinstance(tiling, Tiling):
            return tiling
        if isinstance(tiling, str) and tiling in MODES:
            return cls(mode=tiling)
        if tiling is True:
            return cls()
        raise KLVAEError(f"unknown tiling {str(tiling)[:40]!r}: use None or 'none' (untiled), "
                         f"{', '.join(repr(m) for m in MODES)} "
                         f"or klvae.vae.Tiling(...)")


# ----------------------------------------------------------------------------------------------
# The plan, and the report of running it.
# ----------------------------------------------------------------------------------------------
def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB"


@dataclass
class Plan:
    """What a call will do, decided before it runs (vae.plan_decode / plan_encode)."""
    direction: str                   # "decode" | "encode"
    mode: str                        # "untiled" | "exact" | "bounded"
    tile_size: int                   # image px
    h: int                           # the latent's height and width
    w: int
    downscale: int                   # image px per latent px
    tiling: Tiling                   # the request
    grid: tuple = (1, 1)             # exact: (bands at the top resolution, 1); bounded: (bands, strips)
    predicted: int = 0               # device bytes above weights and input
    store: str | None = None         # exact: "device" | "host" | "disk"
    store_bytes: int = 0             # exact: the stores' largest total, predicted
    spill_dir: str | None = None
    flops: float = 0.0
    halo: int = 0                    # image px a band or strip reads beyond its own
    band_elems: int = 0              # exact: values per band (a tile's area of the widest activation)
    band_rows: int = 0               # exact: rows per band at the top resolution
    reach: int = 1                   # rows any op reads above and below a band (verbs.reach): the halo exchanged
    frames: int = 1                  # the latent's frames: 1 for an image
    chunks: int = 0                  # clips: the time chunks it runs in
    notes: list = field(default_factory=list)
    mosaic_lattice: tuple = None     # bounded: crop origins (ys, xs) of the statistics mosaic

    @property
    def n_tiles(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> str:
        """The layout in words: "16 bands of 64 rows", "3 bands x 2 strips", "one pass"."""
        if self.mode == "exact" and (self.n_tiles > 1 or self.store != "device"):
            n = self.grid[0]
            return f"{n} band{'s' if n > 1 else ''} of {self.band_rows} row{'s' if self.band_rows > 1 else ''}"
        if self.mode == "bounded" and self.mosaic_lattice is not None:
            return f"{self.grid[0]} bands x {self.grid[1]} strip{'s' if self.grid[1] > 1 else ''}"
        return "one pass"

    def __repr__(self):
        return f"Plan({self})"

    def __str__(self):
        return self.sentence()

    def sentence(self, store_bytes: int = 0) -> str:
        """What the plan does, in one sentence (its report's begins so, with the store bytes it measured)."""
        f = self.downscale
        store = f", {self.store} store {_gib(store_bytes or self.store_bytes)}" if self.store else ""
        if self.frames > 1 and self.mode == "untiled":  # the untiled clip: Wan's chunks, not modelled
            return (f"{self.mode} {self.direction} of {self.w * f}x{self.h * f} px x {self.frames} latent frames: "
                    f"{self.describe()}, not planned")
        if self.frames > 1:
            return (f"{self.mode} {self.direction} of {self.w * f}x{self.h * f} px x {self.frames} latent frames: "
                    f"{self.chunks} time chunks x {self.describe()}{store} (the causal convs' cached frames "
                    f"included), predicted peak {_gib(self.predicted)}")
        return (f"{self.mode} {self.direction} of {self.w * f}x{self.h * f} px: {self.describe()}{store}, "
                f"predicted peak {_gib(self.predicted)}")


@dataclass
class TilingReport:
    """What a call did (`vae.last_tiling`, after every encode and decode): its plan plus what was
    measured. The plan's fields read through (`report.mode`, `report.grid`, ...)."""
    plan: Plan
    statistics: str = ""             # where the GroupNorm statistics came from
    measured_peak: int | None = None  # device bytes, measured (CUDA allocator, or this process's RSS)
    store_bytes: int = 0             # exact: the stores' largest total, measured
    seconds: float = 0.0
    steps: int = 0                   # band steps run (what progress counts)
    notes: list = field(default_factory=list)   # the plan's notes, then the run's
    bytes_sent: int = 0              # distributed: what this rank sent to the others

    def __getattr__(self, name):
        # Only names the report lacks arrive here: the plan's (mode, grid, tile_size, store, halo...).
        if name.startswith("_") or name == "plan":
            raise AttributeError(name)
        return getattr(self.plan, name)

    @property
    def predicted_peak(self) -> int:
        return self.plan.predicted

    def __repr__(self):
        return f"TilingReport({self})"

    def __str__(self):
        peak = "" if self.measured_peak is None else f", measured {_gib(self.measured_peak)}"
        return (self.plan.sentence(self.store_bytes) + f"{peak}, {self.seconds:.1f} s"
                + "".join(f"; {n}" for n in self.notes))


# ----------------------------------------------------------------------------------------------
# Memory model: closed form over the steps.
# ----------------------------------------------------------------------------------------------
def untiled_peak(steps, B, h, w, item) -> int:
    """Peak bytes of the plain forward pass above its input (h x w latent px)."""
    return bounded.untiled_need(steps, B, h, w, item)


def exact_peaks(steps, B, h, w, item, elems, device_store: bool, chunks=None):
    """(device peak, store peak) of the segment engine with bands of `elems` values: its stores and
    band temporaries walked over the steps' descriptions on shapes alone (`StoreWalk`). chunks: a
    clip's time chunks to walk, [(t0, frames), ...] of the input (engine.run_clip: the caches made
    in the first stay for the next; the first few chunks reach the steady state)."""
    walk = StoreWalk(B, h, w, item, elems, device_store)
    for t0, T in chunks or [(0, 1)]:
        x = (None, steps[0].cin, steps[0].r_in, t0, T)  # the network's input: the caller's, not a store
        for n, s in enumerate(steps):
            last = n == len(steps) - 1
            x = walk.run(s.describe_clip() if chunks else s.describe(), x, "device" if last else None,
                         s.band_channels, free=True)
            if x[4] == 0:
                break
        walk.free(x)  # a chunk's output leaves the device as it finishes
    return int(walk.dev_peak), int(walk.store_peak)


class StoreWalk:
    """The exact engine's memory, walked as engine.run would allocate it, on shapes alone: every
    store made and freed in the same order (a residual's input kept across its branch, in-place
    adds where the engine makes them), and at each pass one band's temporaries: its input rows
    (copied unless the store is on the device), the conv output and workspace, the statistics'
    fp32 scratch, and what the op, its norm and its residual's shortcut declare (verbs.Rows.temp,
    PerPixel.temp, Attention.temp). A store is (key, channels, px per latent px, t0, frames): an
    image is one frame; a clip's chunk has its frames, and each op that reads earlier frames keeps
    a cache store of them from its first chunk on."""

    def __init__(self, B, h, w, item, elems, device_store):
        self.B, self.h, self.w, self.item, self.elems, self.device_store = B, h, w, item, elems, device_store
        self.alive, self.n = {}, 0      # key -> (bytes, on the device)
        self.dev_peak = self.store_peak = 0

    def bytes(self, c, r, T=1) -> int:
        return self.B * c * self.h * self.w * r * r * T * self.item

    def new(self, c, r, kind, t0=0, T=1):
        self.n += 1
        self.alive[self.n] = (self.bytes(c, r, T), self.device_store or kind == "device")
        self.store_peak = max(self.store_peak, sum(b for b, _ in self.alive.values()))
        return self.n, c, r, t0, T

    def free(self, x):
        self.alive.pop(x[0], None)

    def band(self, temp):
        self.dev_peak = max(self.dev_peak, sum(b for b, dev in self.alive.values() if dev) + temp)

    def run(self, d, x, kind, channels, free):
        items = verbs.sequence(d)
        for n, item in enumerate(items):
            end = n == len(items) - 1
            k, mine = kind if end else None, free or n > 0
            if isinstance(item, verbs.Residual):
                *head, last = item.branch
                h = self.run(head, x, None, channels, free=False) if head else x
                x = self.rows(last, h, k, channels, h is not x, res=item, xs=x, free_xs=mine)
            elif isinstance(item, verbs.Attention):
                x = self.attention(item, x, k, mine)
            else:
                x = self.rows(item, x, k, channels, mine)
        return x

    def rows(self, op, x, kind, channels, free, res=None, xs=None, free_xs=False):
        _, c, r, t0, T = x
        c2, r2 = op.cout or c, r * op.up // op.down
        t2, T2 = op.time(t0, T) if op.time else (t0, T)
        H, W = self.h * r2, self.w * r2
        frames = T + op.earlier  # a band's frames: its own and the cached ones
        rows = math.ceil(H / engine.band_count(H, W, channels * frames, self.elems))
        band_in = self.B * c * (rows * op.down // op.up + op.above + op.below) * self.w * r * self.item * frames
        band_out = self.B * c2 * rows * W * self.item * T2
        temp = (band_in * (1 if self.device_store else 2) + band_out * (1 + WORKSPACE)
                + min(band_out * 4 // self.item, STATS_CHUNK) + op.temp(band_in, band_out, self.item))
        if op.earlier:
            temp += band_in  # the cached frames and the chunk's, concatenated
        if isinstance(op.norm, verbs.PerPixel):
            temp += op.norm.temp(band_in, self.item)
        if res is not None and res.add is None and res.shortcut is not None:
            temp += band_out  # the shortcut's band
        inplace = (verbs.adds_in_place(res, free_xs) and xs is not x and (xs[1], xs[2], xs[4]) == (c2, r2, T2)
                   and kind is None)
        out = xs if inplace else self.new(c2, r2, kind, t2, T2)
        self.band(temp)
        if op.earlier and ("cache", op.key) not in self.alive:  # made after its first pass, kept to the end
            self.alive[("cache", op.key)] = (self.bytes(c, r, op.earlier), self.device_store)
            self.store_peak = max(self.store_peak, sum(b for b, _ in self.alive.values()))
        if res is not None and not inplace and free_xs:
            self.free(xs)
        if free:
            self.free(x)
        return out

    def attention(self, a, x, kind, free):
        _, c, r, t0, T = x
        H, W = self.h * r, self.w * r
        rows = math.ceil(H / engine.band_count(H, W, c * T, self.elems))
        band = self.B * c * rows * W * self.item * T
        out = x if free and kind is None else self.new(c, r, kind, t0, T)
        self.band(3 * self.bytes(c, r, T) + a.temp * band + 2 * band)  # q, k, v whole; a band's projections
        if out is not x and free:
            self.free(x)
        return out


def band_elems(steps, t: int) -> int:
    """A band's size for tiles of t x t latent px: the widest activation's values over that area."""
    return t * t * max(max(s.cin * s.r_in ** 2, s.cout * s.r_out ** 2) for s in steps)


def flops(steps, B, h, w) -> float:
    """Multiply-adds x 2 of every convolution and of the attention (for predicted times)."""
    return sum(s.flops(B, h * w * s.r_out ** 2) for s in steps)


# ----------------------------------------------------------------------------------------------
# Choosing a plan.
# ----------------------------------------------------------------------------------------------


def spill_folder(tiling: Tiling) -> str:
    return str(tiling.spill_dir or os.environ.get("KLVAE_SPILL_DIR") or tempfile.gettempdir())


def missing_spill_folder(folder: str) -> KLVAEError | None:
    if os.path.isdir(folder):
        return None
    what = "is a file, not a folder:" if os.path.exists(folder) else "does not exist: create it, or"
    return KLVAEError(f"spill folder {folder} {what} set Tiling(spill_dir=...) or $KLVAE_SPILL_DIR to a folder "
                      f"on a disk with room")


def check_spill_folder(folder: str, need: int) -> None:
    """Fail before any work if the disk store cannot be written or cannot hold `need` bytes."""
    if missing := missing_spill_folder(folder):
        raise missing
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"klvae")
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise KLVAEError(f"spill folder {folder} is not writable ({e.strerror or e}): set "
                         f"Tiling(spill_dir=...) or $KLVAE_SPILL_DIR to a writable folder") from e
    if free < need:
        raise KLVAEError(f"spill folder {folder} has {_gib(free)} free, the disk store needs {_gib(need)}: "
                         f"free space there, or set Tiling(spill_dir=...) or $KLVAE_SPILL_DIR to a folder on a larger disk")


def make_plan(net, direction: str, in_channels: int, shape, dtype, device, tiling: Tiling, downscale: int,
              allow_untiled: bool = False, clip=None) -> Plan:
    """Choose mode, store and tile size from the budgets, before running anything.

    net: an Encoder or Decoder; shape: (B, C, h, w) of the latent (what the bands partition).
    clip: (latent frames, the time chunks [(t0, frames), ...] of the network's input, the output's
    bytes) for a clip, which runs in exact mode (engine.run_clip); the output is in device memory
    where the store is the device or the device is the CPU, else in host memory as the chunks
    finish."""
    steps = steps_of(net.layers(), in_channels, 1 if direction == "decode" else downscale)
    B, _, h, w = shape
    f = downscale
    if h < 1 or w < 1 or B < 1:
        raise KLVAEError(f"{direction} of an empty input (batch {B}, {w * f}x{h * f} px): nothing to do")
    if max(h, w) * f > MAX_SIDE:
        raise KLVAEError(f"{direction} of {w * f}x{h * f} px: a side over {MAX_SIDE} px is beyond what klvae "
                         f"plans; split the image first")
    item = torch.empty((), dtype=dtype).element_size()
    reach = max(s.reach for s in steps)  # rows a band reads above and below its own (verbs.reach)
    budget = tiling.memory_budget or int(0.9 * free_memory(device))
    ops = flops(steps, B, h, w)
    notes = []
    if tiling.overlap is not None and tiling.mode == "exact":
        notes.append(f"overlap {tiling.overlap} px ignored: exact mode's passes read the rows they need")
    if tiling.tile_size is not None and tiling.tile_size % f:
        raise KLVAEError(f"tile_size {tiling.tile_size} is not a positive multiple of {f}: use e.g. 512")

    def plan(mode, size, store=None):
        t = max(1, size // f)
        p = Plan(direction, mode, size, h, w, f, tiling, grid=(math.ceil(h / t), math.ceil(w / t)), store=store,
                 flops=ops, notes=list(notes), reach=reach)
        if mode == "untiled":
            p.predicted = untiled_peak(steps, B, h, w, item)
        elif mode == "exact":
            p.band_elems = band_elems(steps, t)
            top = max(steps, key=lambda s: s.r_out)  # the bands at the highest resolution, as the grid
            H = h * top.r_out
            p.grid = (engine.band_count(H, w * top.r_out, top.band_channels, p.band_elems), 1)
            p.band_rows = math.ceil(H / p.grid[0])
            # distributed: a rank holds its share of the rows and the halo rows each side
            world = 1 if tiling.process_group is None else torch.distributed.get_world_size(tiling.process_group)
            hs = min(h, -(-h // world) + 2 * p.reach)
            p.predicted, p.store_bytes = exact_peaks(steps, B, hs, w, item, p.band_elems, store == "device",
                                                     chunks=clip[1][:3] if clip else None)
            if clip:
                p.frames, p.chunks = clip[0], len(clip[1])
                if store == "device" or torch.device(device).type == "cpu":
                    p.predicted += clip[2]
            p.halo = f * p.reach  # each pass reads `reach` rows above and below at its own resolution
        else:
            p.predicted = bounded.prepare(steps, p, shape, item)
        return p

    if allow_untiled and tiling.tile_size is None:
        p = plan("untiled", max(h, w) * f)
        if p.predicted <= budget:
            return p
        notes.append(f"untiled needs {_gib(p.predicted)}, over the budget {_gib(budget)}")
    sizes = [tiling.tile_size] if tiling.tile_size else [max(h, w) * f] + [s for s in TILE_CANDIDATES
                                                                           if s // f < max(h, w)]
    modes = ["exact", "bounded"] if tiling.mode == "auto" else [tiling.mode]
    if clip:
        if tiling.mode == "bounded":
            raise KLVAEError(f"{direction} of a clip in bounded mode: clips tile in exact mode only (bounded mode "
                             f"estimates statistics this network does not have): use mode='exact' or 'auto'")
        modes = ["exact"]
        if torch.device(device).type != "cpu" and clip[2] > (room := store_room("host", tiling)):
            raise KLVAEError(f"{direction} of a clip: its output needs {_gib(clip[2])} of host memory, {_gib(room)} are "
                             f"free: {direction} fewer frames per call (the clip is causal: decode its latent in parts "
                             f"that overlap by nothing, keeping the order)")
    tried = []
    for mode in modes:
        if mode == "exact":
            stores = [tiling.store] if tiling.store != "auto" else ["device", "host", "disk"]
            if torch.device(device).type != "cuda" and "host" in stores and tiling.store == "auto":
                stores.remove("host")  # on the CPU the host is the device
            for store in stores:
                room = store_room(store, tiling)
                for size in sizes:
                    p = plan(mode, size, store)
                    tried.append(p)
                    if p.predicted <= budget and (store == "device" or p.store_bytes <= room):
                        return _with_store(p, tiling)
        else:
            for size in sizes:
                p = plan(mode, size)
                tried.append(p)
                if p.predicted <= budget:
                    return p
    smallest = min(tried, key=lambda p: p.predicted)
    if tiling.tile_size is not None and tiling.mode != "auto" and (tiling.store != "auto" or tiling.mode == "bounded"):
        # The caller fixed every choice: run it, and say it may not fit.
        smallest.notes.append(f"predicted peak {_gib(smallest.predicted)} exceeds the budget {_gib(budget)}")
        return _with_store(smallest, tiling) if smallest.mode == "exact" else smallest
    fits = [p for p in tried if p.predicted <= budget]
    if fits:  # memory was not the problem: the store's room was (exact plans only reach here)
        p = min(fits, key=lambda p: p.store_bytes)
        if p.store == "disk" and (missing := missing_spill_folder(spill_folder(tiling))):
            raise missing
        room = store_room(p.store, tiling)
        place = f"the spill folder {spill_folder(tiling)}" if p.store == "disk" else "host memory"
        raise KLVAEError(f"{direction} of {w * f}x{h * f} px in exact mode needs {_gib(p.store_bytes)} in its "
                         f"{p.store} store, but {place} has {_gib(room)} free: set Tiling(spill_dir=...) "
                         f"or $KLVAE_SPILL_DIR to a folder on a larger disk, or use mode='bounded'")
    where = f" with the {smallest.store} store" if smallest.store else ""
    smaller = ("use smaller tiles, " if smallest.tile_size > TILE_CANDIDATES[-1] else "")
    raise KLVAEError(f"{direction} of {w * f}x{h * f} px needs {_gib(smallest.predicted)} of device memory even "
                     f"in {smallest.mode} mode{where} with {smallest.tile_size} px tiles, over the budget of "
                     f"{_gib(budget)}: free memory, {smaller}raise Tiling(memory_budget=...)"
                     + ("" if any(p.store == "disk" for p in tried) else ", or use mode='exact' with store='disk'"))


def store_room(store, tiling) -> int:
    """Bytes a store of this kind may take: host memory or the spill folder's free space."""
    if store == "host":
        return int(0.9 * free_host_memory())
    if store == "disk":
        try:
            return int(0.95 * shutil.disk_usage(spill_folder(tiling)).free)
        except OSError:
            return 0
    return 2**62


def _with_store(p: Plan, tiling: Tiling) -> Plan:
    if p.store == "disk":
        p.spill_dir = spill_folder(tiling)
        check_spill_folder(p.spill_dir, p.store_bytes)
    return p


# ----------------------------------------------------------------------------------------------
# Running a plan.
# ----------------------------------------------------------------------------------------------
def execute(net, x: torch.Tensor, plan: Plan, shard=None) -> tuple:
    """Run a plan of net (an Encoder or Decoder) on x: the segment engine (exact), the streaming
    engine (bounded) or the plain pass (untiled, and an exact plan of one band on the device,
    which is that pass: the module's own forward, hooks included). Returns (output, TilingReport);
    with a shard (distributed.py), this rank's rows of the output."""
    steps = steps_of(net.layers(), x.shape[1], 1 if plan.direction == "decode" else plan.downscale)
    if plan.mode == "exact" and (plan.n_tiles > 1 or plan.store != "device" or shard):
        out, measured = engine.run_segments(steps, x, plan, shard)
    elif plan.mode == "bounded":
        out, measured = bounded.run(steps, x, plan)
    else:
        progress, meter, t0 = plan.tiling.progress, PeakMeter(x.device), time.perf_counter()
        if progress:
            progress(0, 1)
        out = net(x)
        if progress:
            progress(1, 1)
        measured = dict(statistics="exact: the whole image at once", measured_peak=meter.peak(),
                        seconds=time.perf_counter() - t0, steps=1)
    measured["notes"] = list(plan.notes) + measured.get("notes", [])
    return out, TilingReport(plan, **measured)
