"""Precision: which device and dtype a VAE runs in, and the fp16/bf16 overflow guard.

One place decides the dtype (`resolve_dtype`); everything else asks here. The guard (`Guard`)
makes sure a low-precision run never hands back NaN/Inf: SDXL's decoder, for one, has residual
activations above fp16's 65504.
"""
import copy
import math
import time
import warnings

import torch
import torch.nn as nn

from .errors import KLVAEError
from .model import AttnBlock, Downsample, ResnetBlock, Upsample

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    if not isinstance(device, (str, torch.device)):
        raise KLVAEError(f"device {device!r} is not a device: use 'auto', 'cpu', 'gpu' or 'cuda:N'")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise KLVAEError(f"unknown device {str(device)[:40]!r}: use 'auto', 'cpu', 'gpu' or 'cuda:N'") from e
    if device.type not in ("cpu", "cuda"):
        raise KLVAEError(f"device {device} is not supported: klvae computes on 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KLVAEError(f"device {device} requested but this machine has no usable CUDA device: use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise KLVAEError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_dtype(dtype, device) -> torch.dtype:
    """'auto': bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOATS:
            raise KLVAEError(f"dtype {dtype} cannot run a VAE: use fp32, fp16 or bf16")
        return dtype
    if dtype in (None, "auto"):
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise KLVAEError(f"unknown dtype {str(dtype)[:40]!r}: use one of auto, fp32, fp16, bf16") from None


@torch.no_grad()
def stream_scaled(net: nn.Module, s: float) -> nn.Module:
    """A copy of an Encoder or Decoder whose residual stream is `s` times smaller, same outputs.

    Why it is exact: every consumer of the residual stream is a GroupNorm, and GroupNorm(s*x)
    with eps*s^2 equals GroupNorm(x) with eps. So the convs that write into the stream (conv_in,
    each resnet's conv2, attention's proj_out) get weight and bias times s, the convs that map the
    stream to itself (nin_shortcut, up/downsample) get bias times s, and the norms reading it get
    eps times s^2. With s a power of two the weight scaling is exact in every float format (bar
    subnormals, which keep the same absolute precision). This is what lets an fp16 decoder whose
    activations exceed 65504 (SDXL's) run in fp16 without a fine-tuned "fp16-fix" VAE.
    """
    c = copy.deepcopy(net)

    def scale(conv, weight=True):
        if weight:
            conv.weight.copy_((conv.weight.float() * s).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.copy_((conv.bias.float() * s).to(conv.bias.dtype))

    scale(c.conv_in)
    for m in c.modules():
        if isinstance(m, ResnetBlock):
            scale(m.conv2)
            m.norm1.eps *= s * s
            if m.nin_shortcut is not None:
                scale(m.nin_shortcut, weight=False)
        elif isinstance(m, AttnBlock):
            scale(m.proj_out)
            m.norm.eps *= s * s
        elif isinstance(m, (Upsample, Downsample)):
            scale(m.conv, weight=False)
    c.norm_out.eps *= s * s
    return c


class Guard:
    """The overflow guard of one model, with what it remembers.

    After a fp16/bf16 run of the encoder or decoder, one `isfinite` reduction per batch item (the
    only host sync it adds). Items with any non-finite value are re-run with the residual stream
    scaled down by 2^-6, then 2^-12 (`stream_scaled`: exact, same fp16 speed); only if that fails,
    in fp32. A scale that worked is remembered per network, so later calls start with it; one
    warning per model says what happened and what it cost, and `log` keeps every report.
    """
    LADDER = (2.0**-6, 2.0**-12)

    def __init__(self):
        self.enabled = True
        self.log = []          # one line per recovery
        self.scale = {}        # network -> the stream scale later calls start with
        self._copies = {}      # (network, scale) -> its stream-scaled copy
        self._warned = False

    def run(self, net: nn.Module, x: torch.Tensor, run, what: str) -> torch.Tensor:
        """run(net_or_stand_in, x) -> output, never non-finite for a finite input."""
        if x.dtype not in (torch.float16, torch.bfloat16) or not self.enabled:
            return run(net, x)
        scale = self.scale.get(net)
        out = run(self.scaled(net, scale) if scale else net, x)
        bad = ~torch.isfinite(out).flatten(1).all(1)
        if not bad.any():
            return out
        t0, idx = time.perf_counter(), bad.nonzero().flatten()
        ladder = [s for s in self.LADDER if x.dtype == torch.float16 and (scale is None or s < scale)]
        how = None
        for s in ladder + [None]:
            xs = x[idx]
            fixed = run(self.scaled(net, s), xs) if s else run(copy.deepcopy(net).float(), xs.float()).to(out.dtype)
            ok = torch.isfinite(fixed).flatten(1).all(1)
            out[idx[ok]] = fixed[ok]
            idx = idx[~ok]
            if s and ok.all():
                self.scale[net] = s
            if not len(idx):
                how = s or "fp32"
                break
        if len(idx):
            raise KLVAEError(f"{what} output is non-finite for batch items {idx.tolist()} even in fp32: the input "
                             f"is degenerate (check it for huge values), not a precision problem")
        done = (f"re-ran them with the residual stream scaled by 2^{int(math.log2(how))} (exact: GroupNorm "
                f"removes the scale; later {x.dtype} calls start scaled, at no extra cost)") if how != "fp32" \
            else "re-ran them in fp32 (the stream could not be rescaled into range)"
        msg = (f"klvae: {x.dtype} {what} produced non-finite values in {int(bad.sum())} of {len(bad)} batch "
               f"items; {done}; cost {time.perf_counter() - t0:.1f} s")
        if not self._warned:
            warnings.warn(msg, stacklevel=5)
            self._warned = True
        self.log.append(msg)
        return out

    def scaled(self, net: nn.Module, s: float) -> nn.Module:
        """The stream-scaled copy of `net`, made once (again after the model moved or changed dtype)."""
        cached = self._copies.get((net, s))
        w = net.conv_in.weight
        if cached is None or cached.conv_in.weight.dtype != w.dtype or cached.conv_in.weight.device != w.device:
            cached = self._copies[(net, s)] = stream_scaled(net, s)
        return cached
