"""The verbs a layer type describes its computation in. Every engine interprets that one description.

A layer type (layers.Step and its subclasses in the family modules) says what it computes once,
as data built from five verbs; it never loops over bands itself:

  conv(c, norm)          a 3x3 convolution, after a norm (and SiLU) or none
  rows(fn, cout, ...)    any op whose output rows come from a few input rows around them (an
                         upsample, a downsample, a pixel shuffle): fn maps a Tile to the Tile of
                         the outputs it determines, and the op declares what it reads around a band
  residual(branch, shortcut)  the branch (a list of descriptions: ops, whole layers, nested
                         residuals) plus a shortcut of its input: identity, a per-pixel map, an
                         adder, or a resampling row op (space-to-channel mean, channel repeat)
  attention(norm, qkv, proj)  global single-head self-attention, added to its input
  [a, b, ...]            one after the other

Norms: `GroupNorm(norm)` (the statistics of the whole image: the engines measure them where the
op's input is made and pass them along), `PerPixel(fn)` (an RMS norm: each band on its own).

What reads a description (each in one place):
  engine.py      the exact engine and the distributed run: one band loop for every row op, one for
                 the attention; a residual keeps its input store alive across its branch
  bounded.py     bounded mode: each row op a streamed op holding the rows it needs, residuals
                 adding their shortcut's streamed rows as the branch's rows arrive
  tiling.py      the exact engine's memory (StoreWalk): the same stores, walked on shapes
  layers.Step    halo, lag, norms, whether statistics are read, the rows a band reads beyond its
                 own (the planner's and the halo exchange's reach)

Each op declares what it needs around a band: `above` / `below` input rows beyond the band's
own (or an exact `span`), and the temporaries it makes per band (`temp`). The planner, both
engines and the distributed halo exchange read them from here.

Time (clips, [B, C, T, H, W], run chunk by chunk along time by engine.run_clip): an op that
mixes frames says how many `earlier` input frames it reads before a chunk's own (a causal
3x3x3 conv: 2), the cache's `key`, and, where it changes the frame count, `time`: (t0, T) of
its input -> (t0, T) of its output (t0: the chunk's first frame in the clip). Its fn gets a Tile
with those earlier frames in front (Tile.past of them: fewer at the clip's start) and the chunk's
place (Tile.t0). Every other op runs frame by frame: the engine folds the frames into the batch.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .ops import TimeSlices, causal, conv3x3


class GroupNorm(NamedTuple):
    """Normalise with the whole image's statistics of the op's input (then SiLU when act)."""
    norm: object  # an nn.GroupNorm
    act: bool = True


class PerPixel(NamedTuple):
    """A per-pixel norm (RMS): fn(parts, scratch) normalises consecutive row bands into one buffer
    from scratch (ops.Scratch), valid until its next use. No statistics cross pixels. temp(band,
    item): the bytes of temporaries it makes over a band of that many bytes (the memory model)."""
    fn: Callable
    temp: Callable = lambda band, item: 0


@dataclass(frozen=True)
class Rows:
    """An op whose output rows [y0, y1) come from input rows span(y0, y1) (unclamped: the engines
    clamp to the image). up / down: output rows per input row, input rows per output row."""
    fn: Callable              # Tile of (normalised) input rows -> Tile of the valid outputs (new tensors: a residual's shortcut is added into them)
    cout: int
    up: int = 1
    down: int = 1
    above: int = 1            # input rows above the band's own that its first output row reads
    below: int = 1
    earlier: int = 0          # clips: input frames before a chunk's own that it reads (a causal conv's cache)
    time: Callable | None = None  # clips: (t0, T) of its input's frames -> its output's; None: the same frames
    key: object = None        # clips: what names its cache of earlier frames across chunks (its layer)
    norm: object = None       # GroupNorm, PerPixel or None
    exact_span: Callable | None = None     # (y0, y1) -> input rows, where above/below over-read
    exact_context: Callable | None = None  # need -> input context, where the formula over-counts
    exact_lag: Callable | None = None      # lag -> rows owed, likewise
    temp: Callable = lambda band_in, band_out, item: 0  # bytes of its own temporaries per band (the memory model)

    def span(self, y0: int, y1: int) -> tuple:
        if self.exact_span is not None:
            return self.exact_span(y0, y1)
        return y0 * self.down // self.up - self.above, -(-y1 * self.down // self.up) + self.below

    def need(self, o: int) -> int:
        """The first input row output row o reads (bounded mode keeps the rows from there on)."""
        return max(0, self.span(o, o + 1)[0])

    def context(self, need: int) -> int:
        """Input px of context that `need` px of context at the output takes."""
        if self.exact_context is not None:
            return self.exact_context(need)
        return -(-need * self.down // self.up) + max(self.above, self.below)

    def lag(self, lag: int) -> int:
        """Output rows still owed when the input's last rows arrive, given the input's lag."""
        if self.exact_lag is not None:
            return self.exact_lag(lag)
        return -(-(lag + self.below) * self.up // self.down)

    def size(self, H: int, W: int) -> tuple:
        return H * self.up // self.down, W * self.up // self.down


@dataclass(frozen=True)
class Residual:
    """branch(x) + shortcut(x). shortcut: None (x itself), a per-pixel callable (a 1x1 conv, a
    channel mean), a Rows (a resampling shortcut: it reads no rows beyond a band's own cells), or
    `add`: add(y, x_rows) adds the shortcut of x's rows into y in place (a channel repeat that
    need not be made)."""
    branch: tuple
    shortcut: object = None
    add: Callable | None = None


@dataclass(frozen=True)
class Attention:
    """Single-head self-attention over every pixel, added to its input. qkv(hn) -> (q, k, v), each
    [B, C, rows, W] of the normalised rows hn; proj(o) -> what is added, o [B, C, rows, W]."""
    norm: object              # GroupNorm(norm, act=False) or PerPixel
    qkv: Callable
    proj: Callable
    temp: int = 2             # bands of temporaries beside q, k, v (the normalised band, its projections)


def conv(c, norm=None) -> Rows:
    """A 3x3 conv, stride 1, padding 1 (c: anything with weight, bias and out_channels), after `norm`."""
    return Rows(lambda t: conv3x3(c, t), c.out_channels, norm=norm)


def causal_conv(c, norm=None) -> Rows:
    """A causal k x 3 x 3 conv over a clip's frames (c: weight [O, I, k, 3, 3]), after `norm`: each
    output frame reads its own input frame and the k - 1 before it (zeros before the clip's first)."""
    k, slices = c.weight.shape[2], TimeSlices(c)
    return Rows(lambda t: conv3x3(slices, causal(t, k - 1)), c.out_channels, norm=norm, earlier=k - 1, key=c)


def rows(fn, cout: int, **how) -> Rows:
    return Rows(fn, cout, **how)


def residual(branch, shortcut=None, add=None) -> Residual:
    """branch: one description or a list of them (sequences are flattened)."""
    return Residual(tuple(item for d in sequence(branch) for item in sequence(d)), shortcut, add)


def attention(norm, qkv, proj, temp: int = 2) -> Attention:
    return Attention(norm, qkv, proj, temp)


# ----------------------------------------------------------------------------------------------
# What the planner and the engines read off a description.
# ----------------------------------------------------------------------------------------------
def sequence(d) -> list:
    return list(d) if isinstance(d, (list, tuple)) else [d]


def ops(d):
    """Every Rows and Attention in execution order (a residual's branch, then its shortcut)."""
    for item in sequence(d):
        if isinstance(item, Residual):
            yield from ops(item.branch)
            if isinstance(item.shortcut, Rows):
                yield item.shortcut
        else:
            yield item


def first(d):
    """The op that reads a description's input first (and normalises it, if any op does)."""
    item = sequence(d)[0]
    return first(item.branch) if isinstance(item, Residual) else item


def reads_stats(d) -> bool:
    """Its input is normalised with whole-image statistics: whoever makes it measures them."""
    return isinstance(first(d).norm, GroupNorm)


def reach(d) -> int:
    """The most rows above or below its own that any op reads from its input (the halo a
    distributed rank receives from each neighbour, and a band's extra rows in the memory model)."""
    return max((max(o.above, o.below) for o in ops(d) if isinstance(o, Rows)), default=0)


def context(d, need: int) -> int:
    """Receptive field: the input px of context that `need` px at the output takes."""
    for item in reversed(sequence(d)):
        if isinstance(item, Residual):
            sc = item.shortcut.context(need) if isinstance(item.shortcut, Rows) else need
            need = max(context(item.branch, need), sc)
        elif isinstance(item, Rows):
            need = item.context(need)
    return need


def lag(d, owed: int) -> int:
    """Rows of its output a streamed description still owes when its input's last rows arrive."""
    for item in sequence(d):
        if isinstance(item, Residual):
            owed = lag(item.branch, owed)
        elif isinstance(item, Rows):
            owed = item.lag(owed)
    return owed


def adds_in_place(res, free: bool) -> bool:
    """A residual's last op adds into its input's store (the engine, and the memory model's walk of
    it): the shortcut is the input itself and nothing else reads the input afterwards. (The store's
    shape and kind must agree too; each caller checks them in its own terms.)"""
    return res is not None and res.shortcut is None and res.add is None and free


def ratio(d) -> tuple:
    """(up, down): its output rows per input row, as a fraction."""
    up = down = 1
    for item in sequence(d):
        if isinstance(item, Residual):
            u, dn = ratio(item.branch)
            up, down = up * u, down * dn
        elif isinstance(item, Rows):
            up, down = up * item.up, down * item.down
    return up, down
