"""How to tile, and the plan: mode, store, tile grid and the memory each needs, decided before running.

`Tiling` holds what the caller asks for and is checked once, when it is made. `make_plan` turns a
request, an input shape and a memory budget into a `Plan`: untiled when the plain pass fits and
the caller allowed it ("auto"), else the segment engine ("exact", engine.py) with the store that
fits (the compute device, host memory, or a file in a spill folder), else "bounded" (bounded.py:
no full-size activation anywhere, statistics estimated). The memory model is closed form: the
network's layers are walked with their shapes (no tensors, not even on the meta device), so a plan
costs a millisecond at any size and "auto" answers at once for a 65536x65536 image.

Memory model (bytes above the weights and the input; measured against the process's peak RSS and
CUDA's allocator in tests/test_tiling.py):
  untiled  per layer: its input, the live residual stream, the normalised copy, the conv output
           and oneDNN's/cuDNN's workspace (one output-sized buffer, measured); peak over layers.
  exact    the stores alive at each segment (residual stream, current activation, and a new
           stream where the width changes) where the store is the device, plus one tile's
           temporaries (window, normalised copy, conv output, workspace, statistics scratch)
           and, around the attention, its q/k/v on the device.
  bounded  the latent-resolution part whole, plus one band of a strip passing through the layers
           (its rows, the rows each layer keeps, the side halo) or the statistics mosaic's whole
           pass, whichever is larger.
"""
import inspect
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from .errors import KLVAEError
from .memory import free_host_memory, free_memory
from .model import AttnBlock, Downsample, ResnetBlock, Tail, Upsample

MODES = ("exact", "bounded", "auto")
DEFAULT_MODE = "exact"      # what Tiling() means, and what the CLI's and the nodes' tiled options default to
STORES = ("auto", "device", "host", "disk")
TILE_CANDIDATES = (4096, 2048, 1536, 1024, 768, 512, 384, 256, 128)  # image px, largest first
MAX_SIDE = 65536            # image px: beyond this nothing is planned (a 4 GP image)
UNLIMITED = 2**62           # a budget that never binds: plans a call as asked, to learn its need
WORKSPACE = 1.0             # conv workspace, in units of the conv's output (oneDNN on this CPU: measured)


class Interrupted(RuntimeError):
    """Raised between tile steps when the interrupt callable says stop."""


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
        raise KLVAEError(f"unknown tiling {str(tiling)[:40]!r}: use None, {', '.join(repr(m) for m in MODES)} "
                         f"or klvae.vae.Tiling(...)")


@dataclass
class TilingReport:
    """What a tiled call did (returned in `vae.last_tiling`, read-only)."""
    direction: str                   # "decode" | "encode"
    mode: str                        # "untiled" | "exact" | "bounded"
    tile_size: int
    grid: tuple                      # (rows, cols) of tiles; bounded: (bands, strips)
    halo: int                        # image px each tile reads beyond its core (exact: per segment)
    statistics: str                  # where the GroupNorm statistics came from
    predicted_peak: int              # device bytes above the weights and the input
    store: str | None = None         # exact mode: where the full-size activations lived
    store_bytes: int = 0             # ... and their largest total
    measured_peak: int | None = None  # device bytes, measured (CUDA allocator, or this process's RSS)
    seconds: float = 0.0
    steps: int = 0                   # tile steps run (what progress counts)
    notes: list = field(default_factory=list)
    bytes_sent: int = 0              # distributed: what this rank sent to the others

    @property
    def n_tiles(self):
        return self.grid[0] * self.grid[1]


# ----------------------------------------------------------------------------------------------
# The network as a list of steps with their shapes (what both the plan and the engine walk).
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    layer: object
    cin: int
    cout: int
    r_in: int     # px per latent px of the input (decoder: 1 .. 8; encoder: 8 .. 1)
    r_out: int


def steps_of(layers, cin: int, r: int) -> list:
    out = []
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            s = Step(layer, cin, layer.out_channels, r, r)
        elif isinstance(layer, ResnetBlock):
            s = Step(layer, cin, layer.conv1.out_channels, r, r)
        elif isinstance(layer, AttnBlock):
            s = Step(layer, cin, cin, r, r)
        elif isinstance(layer, Upsample):
            s = Step(layer, cin, cin, r, 2 * r)
        elif isinstance(layer, Downsample):
            s = Step(layer, cin, cin, r, r // 2)
        elif isinstance(layer, Tail):
            s = Step(layer, cin, layer.conv.out_channels, r, r)
        else:
            raise TypeError(f"no tiling rule for {type(layer).__name__}")
        out.append(s)
        cin, r = s.cout, s.r_out
    return out


# ----------------------------------------------------------------------------------------------
# Memory model: closed form over the steps.
# ----------------------------------------------------------------------------------------------
STATS_CHUNK = 32 * 2**20  # bytes of fp32 deviations that engine.Stats.add works on at a time


def step_need(s: Step, px_in: int, px_out: int, item: int) -> int:
    """Peak bytes of one layer of the plain forward pass on px_in input pixels (batch included)."""
    i, o = s.cin * px_in * item, s.cout * px_out * item
    if isinstance(s.layer, ResnetBlock):
        # stream + norm1 copy + conv1 out + ws, then stream + h + norm2 copy + conv2 out + ws
        return int(max(2 * i + o * (1 + WORKSPACE), i + o * (3 + WORKSPACE)))
    if isinstance(s.layer, AttnBlock):
        return 5 * i  # stream, normalised copy, q, k, v (the SDPA kernel keeps the rest linear)
    if isinstance(s.layer, Upsample):
        return int(i + o * (2 + WORKSPACE))  # input, nearest copy, conv output and workspace
    return int(2 * i + o * (1 + WORKSPACE))  # conv_in, downsample, norm_out + conv_out


def untiled_peak(steps, B, h, w, item) -> int:
    """Peak bytes of the plain forward pass above its input (h x w latent px)."""
    return max(step_need(s, B * h * w * s.r_in ** 2, B * h * w * s.r_out ** 2, item) for s in steps)


def exact_peaks(steps, B, h, w, item, elems, device_store: bool):
    """(device peak, store peak) of the segment engine with bands of `elems` values."""
    dev_peak = store_peak = 0
    for n, s in enumerate(steps):
        i = B * s.cin * h * w * s.r_in ** 2 * item
        o = B * s.cout * h * w * s.r_out ** 2 * item
        last = n == len(steps) - 1
        if isinstance(s.layer, ResnetBlock):
            alive = i + o + (o if s.cin != s.cout else 0)          # stream, h, (new stream)
        elif isinstance(s.layer, AttnBlock):
            alive = i
        else:
            alive = i + (0 if last else o)                          # the result lives on the device
        # one band: its input rows (copied to the device unless the store is there), the warm
        # normalised buffer, the conv output, its workspace, the statistics' fp32 scratch
        H, W = h * s.r_out, w * s.r_out
        rows = math.ceil(H / band_count(H, W, max(s.cin, s.cout), elems))
        band_in = B * s.cin * (rows * s.r_in // s.r_out + 2) * w * s.r_in * item
        band_out = B * s.cout * rows * W * item
        temp = band_in * (1 if device_store else 2) + band_out * (1 + WORKSPACE) + min(band_out * 4 // item, STATS_CHUNK)
        if isinstance(s.layer, Upsample):
            temp += 4 * band_in                                     # the nearest-2x copy
        elif isinstance(s.layer, ResnetBlock) and s.cin != s.cout:
            temp += band_out                                        # the shortcut projection
        elif isinstance(s.layer, AttnBlock):
            temp = 3 * i + 2 * band_in + 2 * band_out               # q, k, v whole on the device
        store_peak = max(store_peak, alive)
        dev_peak = max(dev_peak, (alive if device_store else 0) + temp + (o if last else 0))
    return int(dev_peak), int(store_peak)


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


def band_elems(steps, t: int) -> int:
    """A band's size for tiles of t x t latent px: the largest activation's values over that area."""
    return t * t * max(max(s.cin * s.r_in ** 2, s.cout * s.r_out ** 2) for s in steps)


def conv_flops(steps, B, h, w) -> float:
    """Multiply-adds x 2 of every convolution and of the attention (for predicted times)."""
    f = 0.0
    for s in steps:
        px_out = B * h * w * s.r_out ** 2
        if isinstance(s.layer, ResnetBlock):
            f += 2 * px_out * 9 * (s.cin * s.cout + s.cout * s.cout) + (2 * px_out * s.cin * s.cout
                                                                        if s.cin != s.cout else 0)
        elif isinstance(s.layer, AttnBlock):
            n = h * w * s.r_out ** 2
            f += 2 * B * n * 4 * s.cin * s.cin + 4 * B * n * n * s.cin
        elif isinstance(s.layer, Tail):
            f += 2 * px_out * 9 * s.cin * s.cout
        else:
            f += 2 * px_out * 9 * s.cin * s.cout
    return f


# ----------------------------------------------------------------------------------------------
# The plan.
# ----------------------------------------------------------------------------------------------
@dataclass
class Plan:
    direction: str                   # "decode" | "encode" (for messages and reports)
    mode: str                        # "untiled" | "exact" | "bounded"
    tile_size: int                   # image px
    h: int                           # the latent's height and width
    w: int
    grid: tuple                      # exact: (bands at the top resolution, 1); bounded: (bands, strips)
    predicted: int                   # device bytes above weights and input
    store: str | None = None         # exact: "device" | "host" | "disk"
    store_bytes: int = 0
    spill_dir: str | None = None
    flops: float = 0.0
    halo: int = 0                    # image px
    downscale: int = 8               # image px per latent px
    band_elems: int = 0              # exact: values per band (a tile's area of the largest activation)
    tiling: Tiling = field(default_factory=Tiling)
    notes: list = field(default_factory=list)
    mosaic_lattice: tuple = None     # bounded: crop origins (ys, xs) of the statistics mosaic

    @property
    def n_tiles(self):
        return self.grid[0] * self.grid[1]


def _gib(b):
    return f"{b / 2**30:.2f} GiB"


def spill_folder(tiling: Tiling) -> str:
    return str(tiling.spill_dir or os.environ.get("KLVAE_SPILL_DIR") or tempfile.gettempdir())


def check_spill_folder(folder: str, need: int) -> None:
    """Fail before any work if the disk store cannot be written or cannot hold `need` bytes."""
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"klvae")
        free = shutil.disk_usage(folder).free
    except OSError as e:
        raise KLVAEError(f"spill folder {folder} is not writable ({e.strerror or e}): pass "
                         f"Tiling(spill_dir=...) or set KLVAE_SPILL_DIR to a writable folder") from e
    if free < need:
        raise KLVAEError(f"spill folder {folder} has {_gib(free)} free, the disk store needs {_gib(need)}: "
                         f"free space there or pass Tiling(spill_dir=...) on a larger disk")


def make_plan(net: nn.Module, direction: str, in_channels: int, shape, dtype, device, tiling: Tiling,
              downscale: int, allow_untiled: bool = False, bounded_peak=None) -> Plan:
    """Choose mode, store and tile size from the budgets, before running anything.

    shape: (B, C, h, w) of the latent (what the grid partitions). `bounded_peak(plan)` predicts a
    bounded plan's peak (bounded.py owns that model)."""
    B, _, h, w = shape
    f = downscale
    if h < 1 or w < 1 or B < 1:
        raise KLVAEError(f"{direction} of an empty input (batch {B}, {w * f}x{h * f} px): nothing to do")
    if max(h, w) * f > MAX_SIDE:
        raise KLVAEError(f"{direction} of {w * f}x{h * f} px: a side over {MAX_SIDE} px is beyond what klvae "
                         f"plans; split the image first")
    item = torch.empty((), dtype=dtype).element_size()
    r0 = 1 if direction == "decode" else f
    steps = steps_of(net.layers(), in_channels, r0)
    budget = tiling.memory_budget or int(0.9 * free_memory(device))
    flops = conv_flops(steps, B, h, w)
    notes = []
    if tiling.overlap is not None and tiling.mode == "exact":
        notes.append(f"overlap {tiling.overlap} px ignored: exact mode's segments read the one row they need")
    if tiling.tile_size is not None and tiling.tile_size % f:
        raise KLVAEError(f"tile_size {tiling.tile_size} is not a positive multiple of {f}: use e.g. 512")

    def plan(mode, size, store=None):
        t = max(1, size // f)
        p = Plan(direction, mode, size, h, w, (math.ceil(h / t), math.ceil(w / t)), 0, store, flops=flops,
                 downscale=f, tiling=tiling, notes=list(notes))
        if mode == "untiled":
            p.predicted = untiled_peak(steps, B, h, w, item)
        elif mode == "exact":
            p.band_elems = band_elems(steps, t)
            top = max(steps, key=lambda s: s.r_out)  # the bands at the highest resolution, as the grid
            p.grid = (band_count(h * top.r_out, w * top.r_out, max(top.cin, top.cout), p.band_elems), 1)
            # distributed: a rank holds its share of the rows and one halo row each side
            world = 1 if tiling.process_group is None else torch.distributed.get_world_size(tiling.process_group)
            hs = min(h, -(-h // world) + 2)
            p.predicted, p.store_bytes = exact_peaks(steps, B, hs, w, item, p.band_elems, store == "device")
            p.halo = f  # each segment reads one row above and below at its own resolution: <= f image px
        else:
            p.predicted = bounded_peak(p, item)
        return p

    if allow_untiled and tiling.tile_size is None:
        p = plan("untiled", max(h, w) * f)
        if p.predicted <= budget:
            return p
        notes.append(f"untiled needs {_gib(p.predicted)}, over the budget {_gib(budget)}")
    sizes = [tiling.tile_size] if tiling.tile_size else [max(h, w) * f] + [s for s in TILE_CANDIDATES
                                                                           if s // f < max(h, w)]
    modes = ["exact", "bounded"] if tiling.mode == "auto" else [tiling.mode]
    tried = []
    for mode in modes:
        if mode == "exact":
            stores = [tiling.store] if tiling.store != "auto" else ["device", "host", "disk"]
            if torch.device(device).type != "cuda" and "host" in stores and tiling.store == "auto":
                stores.remove("host")  # on the CPU the host is the device
            for store in stores:
                room = _store_room(store, device, tiling)
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
        room = _store_room(p.store, device, tiling)
        place = f"the spill folder {spill_folder(tiling)}" if p.store == "disk" else "host memory"
        raise KLVAEError(f"{direction} of {w * f}x{h * f} px in exact mode needs {_gib(p.store_bytes)} in its "
                         f"{p.store} store, but {place} has {_gib(room)} free: point Tiling(spill_dir=...) "
                         f"(--spill-dir, $KLVAE_SPILL_DIR) at a larger disk, or use mode='bounded'")
    where = f" with the {smallest.store} store" if smallest.store else ""
    raise KLVAEError(f"{direction} of {w * f}x{h * f} px needs {_gib(smallest.predicted)} of device memory even "
                     f"in {smallest.mode} mode{where} with {smallest.tile_size} px tiles, over the budget of "
                     f"{_gib(budget)}: free memory, use smaller tiles, or raise Tiling(memory_budget=...)")


def _store_room(store, device, tiling) -> int:
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
