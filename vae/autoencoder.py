"""AutoencoderKL: pixels -> diagonal Gaussian posterior over raw latents -> pixels.

Latents are *raw* (unscaled) everywhere in klvae, as in ComfyUI's LATENT. diffusers pipelines work
on scaled latents, `(raw - shift_factor) * scaling_factor`; `to_scaled` / `from_scaled` convert.

The same object also serves as a diffusers pipeline's `vae` (`pipe.vae = load_vae(...)`): it takes
the call shapes pipelines use (`encode(x).latent_dist`, `decode(z, return_dict=False)[0]`,
`config.scaling_factor`, `enable_tiling()`, ...), backed by klvae's own model and tiling.
"""
import copy
import math
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

from .config import FAMILIES_BY_CHANNELS, VAEConfig
from .errors import KLVAEError
from .memory import return_freed_memory_to_os
from .model import Decoder, Encoder, stream_scaled


class Decoded(NamedTuple):
    """decode(..., return_dict=True): `.sample` and `[0]` both give the pixels, as diffusers' DecoderOutput."""
    sample: torch.Tensor


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):   # [B, 2*z, h, w]
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        # Same clamp as LDM and diffusers: keeps exp() finite for untrained or odd weights.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @property
    def var(self):
        return self.std * self.std

    @property
    def latent_dist(self) -> "DiagonalGaussian":
        """diffusers' `vae.encode(x).latent_dist`: the posterior is its own output object."""
        return self

    def mode(self) -> torch.Tensor:
        """The argmax latent: the mean, deterministic (what ComfyUI's VAEEncode and IC-Light use)."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """mean + std * eps with eps from `generator` (or a fresh one seeded with `seed`).

        The noise is drawn on the generator's device in the moments' dtype, as diffusers'
        randn_tensor does, so the same generator gives the same latent in both libraries.
        """
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # SD3 and Flux.1 have no quant convs; absent modules mean absent keys (strict loading).
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if config.use_post_quant_conv else None
        self.last_tiling = None  # what the last tiled call did (a tiling.TilingReport)
        self.tiling = None       # default tiling of encode/decode calls (enable_tiling)
        self.use_slicing = False  # one batch item at a time (enable_slicing)
        # The precision guard (see _guarded); guard_log keeps every recovery's one-line report.
        self.guard = True
        self.guard_log = []
        self._guard_scale, self._guard_nets, self._guard_warned = {}, {}, False

    # -- diffusers' switches -------------------------------------------------------------------
    @property
    def use_tiling(self) -> bool:
        return self.tiling is not None

    def enable_tiling(self, tiling="exact", **options):
        """Tile every later encode/decode: a mode ("exact", "bounded", "auto") or a Tiling, plus
        Tiling fields (tile_size=512, memory_budget=...). Unlike diffusers' enable_tiling, exact
        tiles give the untiled result."""
        from .tiling import Tiling
        t = Tiling.of(tiling)
        if options:
            from dataclasses import replace
            t = replace(t, **options)
        self.tiling = t
        return self

    def disable_tiling(self):
        self.tiling = None
        return self

    def enable_slicing(self):
        self.use_slicing = True
        return self

    def disable_slicing(self):
        self.use_slicing = False
        return self

    # -- where the model lives ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    # -- checks that turn shape errors deep in a conv into one clear line ---------------------
    def check_pixels(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.dim() != 4:
            raise KLVAEError(f"pixels must be a 4-D tensor [B, 3, H, W] in [-1, 1], got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        B, C, H, W = x.shape
        if C != self.config.in_channels:
            raise KLVAEError(f"pixels have {C} channels, this VAE encodes {self.config.in_channels}: "
                             f"pass [B, {self.config.in_channels}, H, W] (drop alpha, move channels to dim 1)")
        f = self.config.downscale
        if H % f or W % f:
            raise KLVAEError(f"image size {W}x{H} is not a multiple of {f}: crop or pad it to "
                             f"{W // f * f}x{H // f * f} (or {-(-W // f) * f}x{-(-H // f) * f}) before encoding")
        self._check_finite(x, "pixels", "check the image source (a NaN from an earlier node?)")

    def check_latents(self, z: torch.Tensor) -> None:
        if not torch.is_tensor(z) or z.dim() != 4:
            raise KLVAEError(f"latents must be a 4-D tensor [B, C, h, w], got "
                             f"{tuple(z.shape) if torch.is_tensor(z) else type(z).__name__}")
        C, want = z.shape[1], self.config.latent_channels
        if C != want:
            hint = FAMILIES_BY_CHANNELS.get(C, "another model family")
            raise KLVAEError(f"latent has {C} channels but this {self.config.family} VAE takes {want}: "
                             f"{C} channels suggests {hint}; decode it with a matching VAE")
        self._check_finite(z, "latents", "the sampler diverged or the latent is corrupt; re-run the sampler "
                                         "(lower CFG or fp32) before decoding")

    @staticmethod
    def _check_finite(t, what, fix):
        bad = ~torch.isfinite(t)
        if bad.any():
            raise KLVAEError(f"{what} contain {int(bad.sum())} NaN/Inf values of {t.numel()}: {fix}")

    # -- the two directions --------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, tiling=None, return_dict: bool = True) -> DiagonalGaussian:
        """[B, 3, H, W] in [-1, 1] -> posterior over raw latents [B, z, H/8, W/8].
        tiling None: the enable_tiling() default (untiled unless enabled). return_dict=False:
        a 1-tuple, as diffusers."""
        tiling = tiling if tiling is not None else self.tiling
        if self.use_slicing and pixels.shape[0] > 1:
            posts = [self.encode(p, tiling) for p in pixels.split(1)]
            post = DiagonalGaussian(torch.cat([p.moments for p in posts]))
            return post if return_dict else (post,)
        post = self._encode(pixels, tiling)
        return post if return_dict else (post,)

    def _encode(self, pixels, tiling) -> DiagonalGaussian:
        self.check_pixels(pixels)
        if self.device.type == "cpu":
            return_freed_memory_to_os()
        # [-1, 1] pixels are cast once, here; callers map from [0, 1] in fp32 first (no banding).
        x = pixels.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        moments = self._guarded("encoder", x, tiling)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments.contiguous())

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tiling=None, return_dict: bool | None = None, generator=None):
        """Raw latents [B, z, h, w] -> pixels [B, 3, 8h, 8w] in [-1, 1] (not clamped).
        tiling None: the enable_tiling() default. return_dict: None gives the tensor; True an
        object with `.sample`, False a 1-tuple (diffusers' call shapes; `generator` is unused)."""
        tiling = tiling if tiling is not None else self.tiling
        if self.use_slicing and latents.shape[0] > 1:
            x = torch.cat([self.decode(z, tiling) for z in latents.split(1)])
        else:
            x = self._decode(latents, tiling)
        return x if return_dict is None else Decoded(x) if return_dict else (x,)

    def _decode(self, latents, tiling) -> torch.Tensor:
        self.check_latents(latents)
        if self.device.type == "cpu":
            return_freed_memory_to_os()
        z = latents.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self._guarded("decoder", z, tiling).contiguous()

    # -- the precision guard -------------------------------------------------------------------
    def _run(self, name, x, tiling, net=None):
        """The encoder or decoder (or a stand-in for it) on x, untiled or tiled."""
        net = net if net is not None else getattr(self, name)
        if tiling is None:
            self.last_tiling = None
            return net(x)
        from .tiling import tiled_decode, tiled_encode
        return (tiled_decode if name == "decoder" else tiled_encode)(self, x, tiling, net)

    def _guarded(self, name, x, tiling):
        """Low-precision runs never hand back NaN/Inf. fp16 overflows (SDXL's decoder exceeds
        65504) are re-run per batch item with the residual stream scaled down by 2^-6, then 2^-12
        (model.stream_scaled: exact, same fp16 speed); only if that fails, in fp32. Once a scale
        worked, later calls start with it. One host sync per call (the finiteness check)."""
        if x.dtype not in (torch.float16, torch.bfloat16) or not self.guard:
            return self._run(name, x, tiling)
        scale = self._guard_scale.get(name)
        out = self._run(name, x, tiling, self._scaled(name, scale) if scale else None)
        bad = ~torch.isfinite(out).flatten(1).all(1)
        if not bad.any():
            return out
        t0, idx = time.perf_counter(), bad.nonzero().flatten()
        ladder = [s for s in (2.0**-6, 2.0**-12) if x.dtype == torch.float16 and (scale is None or s < scale)]
        how = None
        for s in ladder + ["fp32"]:
            xs = x[idx]
            if s == "fp32":
                net = getattr(self, name)
                fixed = self._run(name, xs.float(), tiling, copy.deepcopy(net).float()).to(out.dtype)
            else:
                fixed = self._run(name, xs, tiling, self._scaled(name, s))
            ok = torch.isfinite(fixed).flatten(1).all(1)
            out[idx[ok]] = fixed[ok]
            idx = idx[~ok]
            if s != "fp32" and ok.all():
                self._guard_scale[name] = s  # what the rest of this session's calls start with
            if not len(idx):
                how = s
                break
        if len(idx):
            raise KLVAEError(f"{name} output is non-finite for batch items {idx.tolist()} even in fp32: the input "
                             f"is degenerate (check it for huge values), not a precision problem")
        what = (f"re-ran them with the residual stream scaled by 2^{int(math.log2(how))} (exact: GroupNorm "
                f"removes the scale; later {x.dtype} calls start scaled, at no extra cost)") if how != "fp32" \
            else "re-ran them in fp32 (the stream could not be rescaled into range)"
        msg = (f"klvae: {x.dtype} {name} produced non-finite values in {int(bad.sum())} of {len(bad)} batch "
               f"items; {what}; cost {time.perf_counter() - t0:.1f} s")
        if not self._guard_warned:
            warnings.warn(msg, stacklevel=4)
            self._guard_warned = True
        self.guard_log.append(msg)
        return out

    def _scaled(self, name, s):
        net, cached = getattr(self, name), self._guard_nets.get((name, s))
        w, cw = net.conv_in.weight, cached.conv_in.weight if cached is not None else None
        if cw is None or cw.dtype != w.dtype or cw.device != w.device:  # rebuilt after .to()
            cached = self._guard_nets[(name, s)] = stream_scaled(net, s)
        return cached

    def forward(self, pixels, generator=None):
        """Round trip through the posterior mode (or a sample when a generator is given)."""
        post = self.encode(pixels)
        return self.decode(post.sample(generator) if generator is not None else post.mode())

    # -- latent conventions --------------------------------------------------------------------
    def _offset_gain(self, like: torch.Tensor):
        """scaled = (raw - offset) * gain: shift/scale, or per-channel latents_mean/std when stated."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            view = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
            return view(c.latents_mean), c.scaling_factor / view(c.latents_std)
        return c.shift_factor, c.scaling_factor

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent (ComfyUI LATENT) -> diffusers' scaled latent: (raw - shift) * scale."""
        offset, gain = self._offset_gain(raw)
        return (raw - offset) * gain

    def from_scaled(self, scaled: torch.Tensor) -> torch.Tensor:
        """diffusers' scaled latent -> raw latent: scaled / scale + shift."""
        offset, gain = self._offset_gain(scaled)
        return scaled / gain + offset

    # -- diffusers interop ---------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, dvae, device=None, dtype=None) -> "AutoencoderKL":
        """A klvae copy of a diffusers.AutoencoderKL: every weight, its config (scale, shift,
        latents_mean/std, force_upcast), its device and dtype unless given."""
        from .checkpoint import load_vae, source_from_dict
        src = source_from_dict(dvae.state_dict(), name=f"diffusers {type(dvae).__name__}")
        src.diffusers_config = dict(dvae.config)
        return load_vae(src, device=device or dvae.device, dtype=dtype or dvae.dtype)

    def to_diffusers(self):
        """A diffusers.AutoencoderKL with the same weights (bit-exact) and config, offline."""
        from diffusers import AutoencoderKL as DAutoencoderKL

        from .checkpoint import diffusers_config
        cfg = {k: v for k, v in diffusers_config(self.config).items() if not k.startswith("_")}
        with torch.device("meta"):
            d = DAutoencoderKL(**cfg)
        sd = {k: v.contiguous() for k, v in self.state_dict(layout="diffusers").items()}
        d.load_state_dict(sd, strict=True, assign=True)
        return d.eval().requires_grad_(False)

    def save_pretrained(self, folder) -> None:
        """A diffusers folder (config.json + diffusion_pytorch_model.safetensors); what a
        pipeline's save_pretrained calls on its components."""
        self.save(folder, layout="diffusers")

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args, layout: str = "ldm", **kwargs):
        """Weights with LDM keys (default, what ComfyUI saves) or diffusers keys (layout='diffusers')."""
        sd = super().state_dict(*args, **kwargs)
        if layout == "ldm":
            return sd
        from .checkpoint import ldm_to_diffusers
        if layout == "diffusers":
            return ldm_to_diffusers(sd)
        raise KLVAEError(f"unknown layout {layout!r}: use 'ldm' or 'diffusers'")

    def save(self, path, layout: str = "ldm") -> None:
        """Write a .safetensors file (or, for layout='diffusers' and a folder path, a diffusers folder)."""
        from .checkpoint import save_vae
        save_vae(self, path, layout=layout)
