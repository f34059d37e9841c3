"""The layer types: everything the planner, both tiled engines and the fp16 guard know about a layer.

A network (model.py's Encoder and Decoder) is a list of layers (`net.layers()`); `steps_of` wraps
each in the `Step` class registered for its type, with its input width and resolution. A Step
answers for its layer type alone:

  shape      its output channels and resolution (px per latent px)
  memory     the untiled pass's peak (`need`), what the exact engine keeps alive and its band
             temporaries (`exact_alive`, `exact_temp`), the rows bounded mode keeps (`keeps`)
  FLOPs      for predicted times
  halo, lag  the context it needs from its input, and the rows it owes when streaming
  segment    how the exact engine runs it over a store, band by band (engine.py's machinery)
  stream     how bounded mode runs it over rows pushed top to bottom (bounded.py's machinery)
  scale_stream  what the fp16 guard scales in a stream-scaled copy (precision.py)

The planner, the memory model, both engines and the guard are plain loops over steps.

Adding a layer type (a new family's block): write its nn.Module, subclass Step with the answers
above, `register(Module, ItsStep)`. Nothing else changes: see docs/architecture.md, "Adding a layer type".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bounded import Streamer
from .engine import Context, Store, conv_pass, rows_pass
from .errors import KLVAEError
from .groupnorm import STATS_CHUNK, Stats
from .model import AttnBlock, Downsample, ResnetBlock, Tail, Upsample
from .ops import Tile, conv3x3, normed

WORKSPACE = 1.0  # a conv's workspace, in units of its output (oneDNN on the CPU: measured)


class Step:
    """One layer of a network as the planner and the engines see it. Defaults: a 3x3 conv that
    keeps the width and resolution, reads no statistics, and whose output the engine stores."""
    passes = 1            # exact engine: band passes over the activation (progress steps per band)
    norms = 0             # GroupNorms it applies (bounded mode: progress steps per pushed band)
    reads_stats = False   # it normalises its input first: the step before measures its output's statistics
    is_global = False     # it mixes the whole image (attention): bounded mode runs it whole
    keeps = 2             # bounded mode: input rows held between pushes, as rows of cin channels

    def __init__(self, layer, cin: int, r_in: int):
        self.layer, self.cin, self.r_in = layer, cin, r_in
        self.cout, self.r_out = self.shape()

    def __repr__(self):
        return f"{type(self).__name__}({self.cin}->{self.cout} ch, x{self.r_in}->x{self.r_out})"

    # -- shape and cost --------------------------------------------------------------------------
    def shape(self) -> tuple:
        """(output channels, output px per latent px)."""
        return self.layer.out_channels, self.r_in

    @property
    def band_channels(self) -> int:
        """Values per output pixel that a band of this step holds at once (sets the band's rows)."""
        return max(self.cin, self.cout)

    def need(self, px_in: int, px_out: int, item: int) -> int:
        """Peak bytes of the plain forward pass over px_in input pixels (batch included): its
        input, the conv's output and the conv's workspace."""
        return int(2 * self.cin * px_in * item + self.cout * px_out * item * (1 + WORKSPACE))

    def exact_alive(self, i: int, o: int, last: bool) -> int:
        """Store bytes alive during the exact segment: its input and output (i, o: full size)."""
        return i + (0 if last else o)

    def exact_temp(self, band_in: int, band_out: int, i: int, item: int, device_store: bool) -> int:
        """Device bytes of one band's temporaries: its input rows (copied unless the store is on
        the device), the warm normalised buffer, the conv output and workspace, the statistics'
        fp32 scratch."""
        return int(band_in * (1 if device_store else 2) + band_out * (1 + WORKSPACE)
                   + min(band_out * 4 // item, STATS_CHUNK))

    def flops(self, B: int, n: int) -> float:
        """Multiply-adds x 2 for B items of n output pixels each."""
        return 2.0 * B * n * 9 * self.cin * self.cout

    def halo(self, need: int) -> int:
        """The context (px of this step's input) that `need` px of context at its output takes."""
        return need + 1

    def lag(self, lag: int) -> int:
        """Rows of its output a streamed step still owes when its input's last rows have arrived,
        given the lag of the rows it is fed."""
        return lag + 1

    # -- runners ---------------------------------------------------------------------------------
    def segment(self, ctx: Context, x: Store, st: Stats, want: bool, last: bool) -> tuple:
        """Exact engine: the layer over the store x, band by band -> (output store, its statistics
        when `want`)."""
        out, st = conv_pass(ctx, self.layer, x, stats=want, kind="device" if last else None)
        ctx.free(x)
        return out, st

    def stream(self, s: Streamer):
        """Bounded mode: an op that takes the layer's input rows and returns the output rows they complete."""
        return s.conv(self.layer)

    # -- the fp16 guard ------------------------------------------------------------------------
    @torch.no_grad()
    def scale_stream(self, s: float) -> None:
        """Make this layer of a stream-scaled copy (precision.stream_scaled): a conv that writes
        the residual stream from outside it scales weight and bias by s."""
        _scale(self.layer, s)


def _scale(conv, s, weight=True):
    if weight:
        conv.weight.copy_((conv.weight.float() * s).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((conv.bias.float() * s).to(conv.bias.dtype))


class ResnetStep(Step):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the shortcut (projected where the width changes)."""
    passes, norms, reads_stats, keeps = 2, 2, True, 6

    def shape(self):
        return self.layer.conv1.out_channels, self.r_in

    def need(self, px_in, px_out, item):
        i, o = self.cin * px_in * item, self.cout * px_out * item
        # stream + norm1 copy + conv1 out + ws, then stream + h + norm2 copy + conv2 out + ws
        return int(max(2 * i + o * (1 + WORKSPACE), i + o * (3 + WORKSPACE)))

    def exact_alive(self, i, o, last):
        return i + o + (o if self.cin != self.cout else 0)   # stream, h, (a new stream)

    def exact_temp(self, band_in, band_out, i, item, device_store):
        extra = band_out if self.cin != self.cout else 0      # the shortcut projection
        return super().exact_temp(band_in, band_out, i, item, device_store) + extra

    def flops(self, B, n):
        f = 2.0 * B * n * 9 * (self.cin * self.cout + self.cout * self.cout)
        return f + (2.0 * B * n * self.cin * self.cout if self.cin != self.cout else 0)

    def halo(self, need):
        return need + 2

    def lag(self, lag):
        return lag + 2

    def segment(self, ctx, x, st, want, last):
        block = self.layer
        B, _, H, W = x.shape
        h, sh = conv_pass(ctx, block.conv1, x, st.affine(block.norm1, ctx.dtype))
        aff = sh.affine(block.norm2, ctx.dtype)
        del sh
        # The residual stream is updated in place when the width stays; a new stream where it changes.
        out = x if block.nin_shortcut is None else ctx.new(B, self.cout, H, W)
        ctx.exchange(h)
        st = Stats()
        for y0, y1 in ctx.bands(H, W, self.band_channels):
            t = ctx.window(h, y0, y1)
            y = conv3x3(block.conv2, t._replace(data=normed(t.data, aff, ctx.scratch))).rows(y0, y1)
            del t
            if out is x:
                y = x.add_(y0, y)
            else:
                y = y.add_(block.nin_shortcut(x.rows(y0, y1)))
            ctx.put(None if out is x else out, y0, y, st if want else None)
            del y
        if out is not x:
            ctx.free(x)
        ctx.free(h)  # last: the spare for the next resnet's h
        return out, (ctx.merge(st) if want else st)

    def stream(self, s):
        block = self.layer
        a = s.norm_conv(block.norm1, block.conv1)  # first: the statistics are indexed in order
        b = s.norm_conv(block.norm2, block.conv2)
        return s.residual(a, b, shortcut=block.shortcut)

    @torch.no_grad()
    def scale_stream(self, s):
        # Every reader of the stream is a GroupNorm (eps * s^2 makes it scale-free) or a map of the
        # stream to itself (the shortcut: linear, so only its bias scales); conv2 writes into it.
        _scale(self.layer.conv2, s)
        self.layer.norm1.eps *= s * s
        if self.layer.nin_shortcut is not None:
            _scale(self.layer.nin_shortcut, s, weight=False)


class AttnStep(Step):
    """Single-head self-attention over every position of the image (the mid block's)."""
    passes, norms, reads_stats, is_global = 2, 1, True, True

    def shape(self):
        return self.cin, self.r_in

    def need(self, px_in, px_out, item):
        return 5 * self.cin * px_in * item  # stream, normalised copy, q, k, v (SDPA keeps the rest linear)

    def exact_alive(self, i, o, last):
        return i

    def exact_temp(self, band_in, band_out, i, item, device_store):
        return 3 * i + 2 * band_in + 2 * band_out  # q, k, v whole on the device

    def flops(self, B, n):
        return 2.0 * B * n * 4 * self.cin * self.cin + 4.0 * B * n * n * self.cin

    def segment(self, ctx, x, st, want, last):
        """q, k, v live on the device token-major ([B, H, W, C], which is also [B, 1, H*W, C] for
        SDPA); each band of queries attends over every key, then proj_out and the residual are added
        to the stream in place. Distributed: each rank projects its own rows; the keys and values
        are gathered from all ranks."""
        attn = self.layer
        B, C, H, W = x.shape
        lo, hi = ctx.own(H)
        aff = st.affine(attn.norm, ctx.dtype)
        ctx.spare = None  # q, k and v are not stores: no spare held under them
        q, k, v = (torch.empty(B, hi - lo, W, C, dtype=ctx.dtype, device=ctx.device) for _ in range(3))
        for y0, y1 in ctx.bands(H, W, C):
            hn = normed(x.rows(y0, y1), aff, ctx.scratch, act=False)
            for proj, dst in ((attn.q, q), (attn.k, k), (attn.v, v)):
                dst[:, y0 - lo:y1 - lo] = proj(hn).permute(0, 2, 3, 1)
            del hn
            ctx.progress.step()
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

    def stream(self, s):
        raise KLVAEError("bounded mode streams the layers after the attention, never the attention itself")

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.proj_out, s)
        self.layer.norm.eps *= s * s


def upsample(up: Upsample, t: Tile) -> Tile:
    """Nearest 2x (a region of the upsampled image is the upsampled region), then its 3x3 conv."""
    u = Tile(F.interpolate(t.data, scale_factor=2.0, mode="nearest"),
             2 * t.y0, 2 * t.y1, 2 * t.x0, 2 * t.x1, 2 * t.H, 2 * t.W, 2 * t.s)
    return conv3x3(up.conv, u)


class UpsampleStep(Step):
    """Nearest 2x, then a 3x3 conv (no norm before it)."""

    def shape(self):
        return self.cin, 2 * self.r_in

    def need(self, px_in, px_out, item):
        return int(self.cin * px_in * item + self.cout * px_out * item * (2 + WORKSPACE))  # input, the 2x copy

    def exact_temp(self, band_in, band_out, i, item, device_store):
        return super().exact_temp(band_in, band_out, i, item, device_store) + 4 * band_in  # the 2x copy

    def halo(self, need):
        return math.ceil((need + 1) / 2)

    def lag(self, lag):
        return 2 * lag + 1

    def segment(self, ctx, x, st, want, last):
        _, C, H, W = x.shape
        low = lambda y0, y1: (max(0, (y0 - 1) // 2), min(H, (y1 + 2) // 2))  # low-res rows covering [y0-1, y1+1)
        return rows_pass(ctx, x, C, (2 * H, 2 * W), self.band_channels, low, lambda t: upsample(self.layer, t), want,
                         "device" if last else None)

    def stream(self, s):
        return s.op(lambda t: upsample(self.layer, t), need=lambda o: max(0, (o - 1) // 2))

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.conv, s, weight=False)  # maps the stream to itself


def downsample(down: Downsample, t: Tile) -> Tile:
    """LDM's downsample: pad right/bottom by one, 3x3 conv, stride 2. Output i reads input 2i..2i+2."""
    i0, j0 = (t.y0 + 1) // 2, (t.x0 + 1) // 2          # first outputs whose inputs start inside the tile
    i1 = t.H // 2 if t.y1 == t.H else (t.y1 - 1) // 2  # last valid output + 1
    j1 = t.W // 2 if t.x1 == t.W else (t.x1 - 1) // 2
    x = t.data[:, :, 2 * i0 - t.y0:, 2 * j0 - t.x0:]
    x = F.pad(x, (0, int(t.x1 == t.W), 0, int(t.y1 == t.H)))
    out = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2)[:, :, : i1 - i0, : j1 - j0]
    return Tile(out, i0, i1, j0, j1, t.H // 2, t.W // 2, t.s // 2)


class DownsampleStep(Step):
    """LDM's stride-2 3x3 conv, padded right and bottom only (no norm before it)."""

    def shape(self):
        return self.cin, self.r_in // 2

    @property
    def band_channels(self):
        return 4 * self.cin  # an output row reads two input rows of twice the width

    def halo(self, need):
        return 2 * need + 1

    def lag(self, lag):
        return lag // 2 + 1

    def segment(self, ctx, x, st, want, last):
        _, C, H, W = x.shape
        high = lambda y0, y1: (2 * y0, min(H, 2 * y1 + 1))  # output row i reads input rows 2i .. 2i+2
        return rows_pass(ctx, x, C, (H // 2, W // 2), self.band_channels, high, lambda t: downsample(self.layer, t),
                         want, "device" if last else None)

    def stream(self, s):
        return s.op(lambda t: downsample(self.layer, t), need=lambda o: 2 * o)

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.conv, s, weight=False)  # maps the stream to itself


class TailStep(Step):
    """norm_out -> SiLU -> conv_out: the network's output (on the device, whatever the store)."""
    norms, reads_stats = 1, True

    def shape(self):
        return self.layer.conv.out_channels, self.r_in

    def segment(self, ctx, x, st, want, last):
        out, _ = conv_pass(ctx, self.layer.conv, x, st.affine(self.layer.norm, ctx.dtype), stats=False,
                           kind="device" if last else None)
        ctx.free(x)
        return out, None

    def stream(self, s):
        return s.norm_conv(self.layer.norm, self.layer.conv)

    @torch.no_grad()
    def scale_stream(self, s):
        self.layer.norm.eps *= s * s  # reads the stream


STEPS = {nn.Conv2d: Step, ResnetBlock: ResnetStep, AttnBlock: AttnStep, Upsample: UpsampleStep,
         Downsample: DownsampleStep, Tail: TailStep}


def register(layer_type: type, step_type: type) -> None:
    """Teach the planner, the engines and the guard a new layer type (a family's own block)."""
    STEPS[layer_type] = step_type


def steps_of(layers, cin: int, r: int) -> list:
    """The layers as Steps, each with its input channels and resolution (r: px per latent px of
    the first layer's input; decoder 1, encoder the downscale)."""
    out = []
    for layer in layers:
        step_type = next((STEPS[t] for t in type(layer).__mro__ if t in STEPS), None)
        if step_type is None:
            raise TypeError(f"no Step registered for {type(layer).__name__}: see layers.register")
        s = step_type(layer, cin, r)
        out.append(s)
        cin, r = s.cout, s.r_out
    return out
