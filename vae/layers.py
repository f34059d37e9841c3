"""The layer types: everything the planner, both tiled engines and the fp16 guard know about a layer.

A network (model.py's Encoder and Decoder) is a list of layers (`net.layers()`); `steps_of` wraps
each in the `Step` class registered for its type, with its input width and resolution. A Step
answers for its layer type alone:

  describe   what it computes, once, in the verbs of verbs.py (conv, rows, residual, attention):
             the exact engine, the distributed run and bounded mode interpret it; the halo, the
             lag, the rows a band reads around it (`reach`), whether it reads the image's
             statistics and how many norms it applies are read off it here
  shape      its output channels and resolution (px per latent px)
  memory     the untiled pass's peak (`need`) and the rows bounded mode keeps (`keeps`); the
             exact engine's stores and band temporaries are walked over the description
             (tiling.StoreWalk), each op declaring its own temporaries
  FLOPs      for predicted times
  scale_stream  what the fp16 guard scales in a stream-scaled copy (precision.py)

The planner, the memory model, both engines and the guard are plain loops over steps; no layer
type loops over bands or touches an engine.

Adding a layer type (a new family's block): write its nn.Module, subclass Step with the answers
above, `register(Module, ItsStep)`. Nothing else changes: see docs/architecture.md, "Adding a layer type".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import verbs
from .model import AttnBlock, Downsample, ResnetBlock, Tail, Upsample
from .ops import Tile, conv3x3
from .verbs import GroupNorm

WORKSPACE = 1.0  # a conv's workspace, in units of its output (oneDNN on the CPU: measured)


class Step:
    """One layer of a network as the planner and the engines see it. Defaults: a 3x3 conv that
    keeps the width and resolution, reads no statistics, and whose output the engine stores."""
    keeps = 2             # bounded mode: input rows held between pushes, as rows of cin channels

    def __init__(self, layer, cin: int, r_in: int):
        self.layer, self.cin, self.r_in = layer, cin, r_in
        self.cout, self.r_out = self.shape()
        # read off the description (made again where it runs: it may hold weights made for the run)
        d = self.describe()
        self.reads_stats = verbs.reads_stats(d)   # the step before measures its output's statistics
        self.is_global = any(isinstance(o, verbs.Attention) for o in verbs.ops(d))  # bounded mode runs it whole
        self.norms = sum(o.norm is not None for o in verbs.ops(d))  # bounded mode: progress steps per push
        self.reach = verbs.reach(d)                # rows a band reads above and below its own

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

    def flops(self, B: int, n: int) -> float:
        """Multiply-adds x 2 for B items of n output pixels each."""
        return 2.0 * B * n * 9 * self.cin * self.cout

    def halo(self, need: int) -> int:
        """The context (px of this step's input) that `need` px of context at its output takes."""
        return verbs.context(self.describe(), need)

    def lag(self, lag: int) -> int:
        """Rows of its output a streamed step still owes when its input's last rows have arrived,
        given the lag of the rows it is fed."""
        return verbs.lag(self.describe(), lag)

    # -- what it computes --------------------------------------------------------------------------
    def describe(self):
        """The layer in verbs (verbs.py): what every engine runs."""
        return verbs.conv(self.layer)

    def describe_clip(self):
        """The layer on a time chunk of a clip (engine.run_clip), in verbs with time (verbs.causal_conv,
        Rows.time); None: a layer type of an image network."""
        return None

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
    keeps = 6

    def shape(self):
        return self.layer.conv1.out_channels, self.r_in

    def need(self, px_in, px_out, item):
        i, o = self.cin * px_in * item, self.cout * px_out * item
        # stream + norm1 copy + conv1 out + ws, then stream + h + norm2 copy + conv2 out + ws
        return int(max(2 * i + o * (1 + WORKSPACE), i + o * (3 + WORKSPACE)))

    def flops(self, B, n):
        f = 2.0 * B * n * 9 * (self.cin * self.cout + self.cout * self.cout)
        return f + (2.0 * B * n * self.cin * self.cout if self.cin != self.cout else 0)

    def describe(self):
        block = self.layer
        return verbs.residual([verbs.conv(block.conv1, GroupNorm(block.norm1)),
                               verbs.conv(block.conv2, GroupNorm(block.norm2))], shortcut=block.nin_shortcut)

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

    def shape(self):
        return self.cin, self.r_in

    def need(self, px_in, px_out, item):
        return 5 * self.cin * px_in * item  # stream, normalised copy, q, k, v (SDPA keeps the rest linear)

    def flops(self, B, n):
        return 2.0 * B * n * 4 * self.cin * self.cin + 4.0 * B * n * n * self.cin

    def describe(self):
        attn = self.layer
        return verbs.attention(GroupNorm(attn.norm, act=False), lambda hn: (attn.q(hn), attn.k(hn), attn.v(hn)),
                               attn.proj_out)

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.proj_out, s)
        self.layer.norm.eps *= s * s


def upsample_rows(fn, cout: int) -> verbs.Rows:
    """A nearest 2x then a 3x3 conv as a row op: output rows [y0, y1) read the low-resolution rows
    covering [y0 - 1, y1 + 1)."""
    return verbs.rows(fn, cout, up=2, exact_span=lambda y0, y1: ((y0 - 1) // 2, (y1 + 2) // 2),
                      exact_context=lambda need: math.ceil((need + 1) / 2), exact_lag=lambda lag: 2 * lag + 1,
                      temp=lambda band_in, band_out, item: 4 * band_in)  # the 2x copy


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

    def describe(self):
        return upsample_rows(lambda t: upsample(self.layer, t), self.cout)

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

    def describe(self):
        # output row i reads input rows 2i .. 2i+2
        return verbs.rows(lambda t: downsample(self.layer, t), self.cout, down=2, above=0, below=1)

    @torch.no_grad()
    def scale_stream(self, s):
        _scale(self.layer.conv, s, weight=False)  # maps the stream to itself


class TailStep(Step):
    """norm_out -> SiLU -> conv_out: the network's output (on the device, whatever the store)."""

    def shape(self):
        return self.layer.conv.out_channels, self.r_in

    def describe(self):
        return verbs.conv(self.layer.conv, GroupNorm(self.layer.norm))

    @torch.no_grad()
    def scale_stream(self, s):
        self.layer.norm.eps *= s * s  # reads the stream


class SpanStep(Step):
    """A residual around several layers (the blocks of Wan 2.2's and Qwen-Image 2.1's VAEs):
    `x + shortcut(x)` around the block's own layers (`layer.layers()`: resnets, a resample...), the
    shortcut a map of the block's input that may resample (a space-to-channel mean, a channel
    repeat then channel-to-space). A family's block subclasses this and says `shortcut()` in verbs
    (None, a per-pixel callable, or a verbs.rows op that reads no row beyond a band's own cells);
    the engines keep the block's input alive across the inner layers, and the planner prices it.
    Everything else comes from the inner layers' own Steps."""

    def __init__(self, layer, cin: int, r_in: int):
        self.inner = steps_of(layer.layers(), cin, r_in)
        super().__init__(layer, cin, r_in)

    def shortcut(self):
        raise NotImplementedError  # a subclass says its block's shortcut

    def clip_shortcut(self):
        """The shortcut on a clip's time chunk (its Tile's t0 says where the chunk starts); a family
        whose blocks run clips says it."""
        raise NotImplementedError

    def describe(self):
        return self._span([s.describe() for s in self.inner], self.shortcut())

    def describe_clip(self):
        inner = [s.describe_clip() for s in self.inner]
        return None if any(d is None for d in inner) else self._span(inner, self.clip_shortcut())

    def _span(self, branch: list, shortcut):
        if not isinstance(verbs.sequence(branch[-1])[-1], verbs.Rows):
            # the engines add a residual's shortcut in its branch's last row pass; a branch that ends
            # in a resnet (Wan 2.2's last encoder level) gets one that passes its rows through
            branch.append(verbs.rows(lambda t: t._replace(data=t.data.clone()), self.cout, above=0, below=0))
        return verbs.residual(branch, shortcut=shortcut)

    def shape(self):
        return self.inner[-1].cout, self.inner[-1].r_out

    @property
    def band_channels(self):
        return max(s.band_channels for s in self.inner)

    def _at(self, s, px: int) -> int:
        """px at the block's input resolution -> at s's input resolution."""
        return px * s.r_in ** 2 // self.r_in ** 2

    def need(self, px_in, px_out, item):
        # the block's input stays alive under every inner layer's own peak
        return self.cin * px_in * item + max(
            s.need(self._at(s, px_in), self._at(s, px_in) * s.r_out ** 2 // s.r_in ** 2, item) for s in self.inner)

    def flops(self, B, n):
        return sum(s.flops(B, n * s.r_out ** 2 // self.r_out ** 2) for s in self.inner)

    @property
    def keeps(self):
        # every inner op's held rows, as rows of the block's input, plus the shortcut's held input
        return sum(s.keeps * s.cin * s.r_in for s in self.inner) // (self.cin * self.r_in) + 2

    @torch.no_grad()
    def scale_stream(self, s):
        # The branch maps the stream to itself (each inner layer scales as it would outside the
        # block); a linear, homogeneous shortcut (a mean, a repeat) scales with its input by itself.
        for step in self.inner:
            step.scale_stream(s)


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
