"""Precision: which device and dtype a VAE runs in, and the fp16/bf16 overflow guard.

One place decides the dtype (`resolve_dtype`); everything else asks here. The guard (`Guard`)
makes sure a low-precision run never hands back NaN/Inf: SDXL's decoder, for one, has residual
activations above fp16's 65504.
"""
import copy
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn

from .config import FLOATS
from .errors import KLVAEError
from .layers import steps_of
from .tiling import execute

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles, or AVX-512 BF16 instructions), from
    /proc/cpuinfo's flags; elsewhere bf16 is emulated and several times slower than fp32
    (measurements: docs/precision.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


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
    with eps*s^2 equals GroupNorm(x) with eps. So the layers that write into the stream scale
    their output, the maps of the stream to itself their bias, and the norms reading it their
    eps by s^2: each layer type knows which of its parts are which (`Step.scale_stream`). With s a
    power of two the weight scaling is exact in every float format (bar subnormals, which keep the
    same absolute precision). This is what lets an fp16 decoder whose activations exceed 65504
    (SDXL's) run in fp16 without a fine-tuned "fp16-fix" VAE.
    """
    c = copy.deepcopy(net)
    for step in steps_of(c.layers(), 1, 1):  # the layer types only: widths and resolutions do not matter here
        step.scale_stream(s)
    return c


def _user_level() -> int:
    """The stacklevel of the first frame outside klvae's library (and torch's inference_mode
    wrapper): the guard's one warning points at the user's call, however deep the path to it."""
    here, level, f = os.path.dirname(os.path.abspath(__file__)), 1, sys._getframe(1)
    while f is not None and (os.path.dirname(os.path.abspath(f.f_code.co_filename)) == here
                             or f.f_code.co_filename.endswith(os.path.join("torch", "utils", "_contextlib.py"))):
        f, level = f.f_back, level + 1
    return level


class ChunkOverflow(Exception):
    """A clip's chunk came out non-finite in fp16: raised inside the run, caught by Guard.run_clip."""


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

    def run(self, net: nn.Module, x: torch.Tensor, plan, shard=None) -> tuple:
        """execute(plan) of net on x -> (output, report), the output never non-finite for a finite input."""
        what = "decoder" if plan.direction == "decode" else "encoder"
        if x.dtype not in (torch.float16, torch.bfloat16) or not self.enabled:
            return execute(net, x, plan, shard)
        scale = self.scale.get(net)
        out, report = execute(self.scaled(net, scale) if scale else net, x, plan, shard)
        bad = ~torch.isfinite(out).flatten(1).all(1)
        if not bad.any():
            return out, report
        t0, idx = time.perf_counter(), bad.nonzero().flatten()
        ladder = [s for s in self.LADDER if x.dtype == torch.float16 and (scale is None or s < scale)]
        how = None
        for s in ladder + [None]:
            xs = x[idx]
            if s:
                fixed = execute(self.scaled(net, s), xs, plan, shard)[0]
            else:
                fixed = execute(copy.deepcopy(net).float(), xs.float(), plan, shard)[0].to(out.dtype)
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
        self._said(f"klvae: {x.dtype} {what} produced non-finite values in {int(bad.sum())} of {len(bad)} batch "
                   f"items; {done}; cost {time.perf_counter() - t0:.1f} s", report)
        return out, report

    def _said(self, msg: str, report) -> None:
        """A recovery: one warning per model (at the user's line), every one in the log and the report."""
        if not self._warned:
            warnings.warn(msg, stacklevel=_user_level())
            self._warned = True
        self.log.append(msg)
        report.notes.append(msg)

    def run_clip(self, net: nn.Module, dtype, attempt, what: str) -> tuple:
        """A whole clip through net: attempt(net, rescue) -> (output, report), where rescue says
        whether a non-finite chunk should raise ChunkOverflow (fp16 with the guard on) rather than
        end the run with the caller's error. A chunk depends on every earlier one through the
        causal caches, so the rescue runs the clip again from its start with the residual stream
        scaled by 2^-6, then 2^-12 (remembered for later calls, as for images). No fp32 rung: the
        clip's stores and caches are in the model's dtype; one that overflows even scaled is one
        error that says to load the VAE in bf16 or fp32."""
        rescue = dtype == torch.float16 and self.enabled
        scale = self.scale.get(net) if rescue else None
        t0 = time.perf_counter()
        for s in [scale] + [s for s in self.LADDER if rescue and (scale is None or s < scale)]:
            try:
                out, report = attempt(self.scaled(net, s) if s else net, rescue)
            except ChunkOverflow:
                continue
            if s != scale:  # rescued
                self.scale[net] = s
                self._said(f"klvae: fp16 {what} of a clip produced non-finite values; re-ran the clip with the residual "
                           f"stream scaled by 2^{int(math.log2(s))} (exact: the norms remove the scale; later fp16 calls "
                           f"start scaled, at no extra cost); cost {time.perf_counter() - t0:.1f} s in all", report)
            return out, report
        raise KLVAEError(f"fp16 {what} of a clip overflowed even with the residual stream scaled by 2^-12: the input "
                         f"is out of range, or this VAE needs more range than fp16 has (load it in bf16 or fp32)")

    def scaled(self, net: nn.Module, s: float) -> nn.Module:
        """The stream-scaled copy of `net`, made once (again after the model moved or changed dtype)."""
        cached = self._copies.get((net, s))
        w = net.conv_in.weight
        if cached is None or cached.conv_in.weight.dtype != w.dtype or cached.conv_in.weight.device != w.device:
            cached = self._copies[(net, s)] = stream_scaled(net, s)
        return cached
