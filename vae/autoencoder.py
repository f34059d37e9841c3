"""AutoencoderKL: pixels -> diagonal Gaussian posterior over raw latents -> pixels.

Latents are *raw* (unscaled) everywhere in klvae, as in ComfyUI's LATENT. diffusers pipelines work
on scaled latents, `(raw - shift_factor) * scaling_factor`; `to_scaled` / `from_scaled` convert.

The class holds the model (encoder, decoder, quant convs), its posterior and the public `encode` /
`decode`. Everything else lives where its name says: files in checkpoint.py, the fp16 guard in
precision.py, the tile plan in tiling.py, exact tiles in engine.py, bounded tiles in bounded.py,
diffusers' call shapes in diffusers_compat.py.
"""
import time
from dataclasses import replace

import torch
import torch.nn as nn

from . import checkpoint, engine
from .distributed import Shard
from .config import VAEConfig, families_with
from .diffusers_compat import Decoded, DecoderOutput, DiffusersVAE, ldm_to_diffusers
from .errors import KLVAEError
from .memory import PeakMeter, free_memory, return_freed_memory_to_os
from .precision import ChunkOverflow, Guard, resolve_device, resolve_dtype
from .layers import steps_of
from .tiling import UNLIMITED, Plan, Tiling, TilingReport, make_plan


PIXEL_SLACK = 1.5  # pixels beyond +-1.5 are a wrong range (0..255), not resampling overshoot (~1.1)


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
        if generator is not None and not isinstance(generator, torch.Generator):
            raise KLVAEError(f"generator must be a torch.Generator, got {type(generator).__name__}: pass "
                             f"torch.Generator().manual_seed(n), or seed=n")
        if generator is None and seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise KLVAEError(f"seed must be a whole number from 0 to 2^64 - 1, got {str(seed)[:40]!r}")
            generator = torch.Generator("cpu").manual_seed(seed)
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class AutoencoderKL(DiffusersVAE, nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        net = config.network.module  # the family's network: model.py or model_<family>.py
        self.encoder = net.Encoder(config)
        self.decoder = net.Decoder(config)
        self.quant_conv, self.post_quant_conv = net.quant_convs(config)
        # Flux.2: running statistics of its 2x2-patchified latents (keys bn.running_mean/var), the
        # pipelines' normalisation (to_scaled); encode and decode never apply it, as in diffusers.
        self.bn = nn.BatchNorm2d(4 * z, eps=config.batch_norm_eps, affine=False) if config.batch_norm else None
        self.guard = Guard()         # the fp16/bf16 overflow guard (precision.py)
        self.tiling = None           # default tiling of encode/decode calls (enable_tiling)
        self.use_slicing = False     # one batch item at a time (enable_slicing)
        self._last_tiling = None

    @classmethod
    def load(cls, src, device="cpu", dtype="auto", family: str | None = None, config_json: dict | None = None,
             name: str | None = None) -> "AutoencoderKL":
        """A ready model (eval, no grad, channels_last) from a path, a diffusers folder or a state
        dict; `config_json`: a diffusers config for weights that come without their folder."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if device.type == "cpu":
            return_freed_memory_to_os()  # process-wide, once (memory.py): freed tensors go back to the OS
        ckpt = checkpoint.read(src, family, config_json, name)
        with torch.device("meta"):
            model = cls(ckpt.config)
        checkpoint.fill(model, ckpt, device, dtype)
        # channels_last: oneDNN and cuDNN convolve NHWC without reordering copies (measured on this
        # CPU, SD decode at 512x512: 0.64 GiB peak instead of 1.08, and 8% faster).
        channels_last(model).requires_grad_(False).eval()
        model.source_layout, model.source_name = ckpt.layout, ckpt.source.name
        # The file's other metadata (modelspec.*, a trainer's notes): save() writes it back, so a
        # conversion keeps what the file said of itself; klvae's own keys are written anew.
        model.source_metadata = {k: v for k, v in ckpt.source.metadata.items()
                                 if isinstance(k, str) and isinstance(v, str) and not k.startswith("klvae.")}
        return model

    # -- what the last tiled call did ----------------------------------------------------------
    @property
    def last_tiling(self) -> TilingReport | None:
        """What the last encode or decode did, tiled or not: its plan plus what was measured
        (`print(vae.last_tiling)` reads as a sentence). None before the first call."""
        return self._last_tiling

    @property
    def guard_log(self) -> list:
        return self.guard.log

    # -- diffusers' switches -------------------------------------------------------------------
    @property
    def use_tiling(self) -> bool:
        return self.tiling is not None

    def enable_tiling(self, tiling="exact", **options):
        """Tile every later encode/decode: a mode ("exact", "bounded", "auto") or a Tiling, plus
        Tiling fields (tile_size=512, memory_budget=...). Unlike diffusers' enable_tiling, exact
        tiles give the untiled result."""
        if tiling == "none":
            return self.disable_tiling()
        t = Tiling.of(tiling)
        unknown = sorted(set(options) - set(Tiling.__dataclass_fields__))
        if unknown:
            raise KLVAEError(f"enable_tiling got unknown option {unknown[0]!r}: use Tiling's fields "
                             f"({', '.join(Tiling.__dataclass_fields__)})")
        self.tiling = replace(t, **options) if options else t
        return self

    def disable_tiling(self):
        self.tiling = None
        return self
        return self

    def enable_slicing(self):
        self.use_slicing = True
        return self

    def disable_slicing(self):
        self.use_slicing = False
        return self

    @property
    def temperal_downsample(self) -> list:
        """Qwen-Image's pipelines read this attribute of their VAE (diffusers' spelling) for its scale factor."""
        if self.config.temporal_downsample is None:
            raise AttributeError("temperal_downsample: an attribute of VAEs that take video-shaped tensors")
        return list(self.config.temporal_downsample)

    @property
    def temporal_compression_ratio(self) -> int:
        """Frames per latent frame after the first: 2 per level that halves time (Wan 2.1: 4;
        diffusers' AutoencoderKLWan attribute of the same name)."""
        return 2 ** sum(self.temperal_downsample)

    # -- where the model lives ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    # -- checks that turn shape errors deep in a conv into one clear line ---------------------
    def check_pixels(self, x, finite: bool = True) -> None:
        _check_tensor(x, "pixels", "[B, 3, H, W] in [-1, 1]")
        B, C, H, W = x.shape
        if C != self.config.in_channels and not self._pads_alpha(C):
            fix = "drop alpha, " if C == 4 else "RGB or RGBA, " if self.config.in_channels == 4 else ""
            raise KLVAEError(f"pixels have {C} channels, this VAE encodes {self.config.in_channels}: "
                             f"pass [B, {self.config.in_channels}, H, W] ({fix}move channels to dim 1)")
        f = self.config.downscale
        if H % f or W % f or H < f or W < f:
            raise KLVAEError(f"image size {W}x{H} is not a positive multiple of {f}: crop or pad it to "
                             f"{max(f, W // f * f)}x{max(f, H // f * f)} (or {-(-W // f) * f}x{-(-H // f) * f}) "
                             f"before encoding")
        if finite:
            _check_finite(x, "pixels", "check the image source (a NaN from an earlier node?)")
            lo, hi = x.aminmax()
            if lo.item() < -PIXEL_SLACK or hi.item() > PIXEL_SLACK:
                fix = ("divide 0..255 images by 127.5 and subtract 1" if hi.item() > 2 else
                       "map [0, 1] images with x * 2 - 1; clamp resampling overshoot")
                raise KLVAEError(f"pixels range from {lo.item():.3g} to {hi.item():.3g}; klvae encodes [-1, 1]: {fix}")

    def check_latents(self, z, finite: bool = True, scaled: bool = False) -> None:
        _check_tensor(z, "latents", "[B, C, h, w]")
        c = self.config
        C, want = z.shape[1], c.scaled_channels if scaled else c.latent_channels
        if C != want:
            if c.batch_norm and C == (c.latent_channels if scaled else c.scaled_channels):
                fix = ("this is a raw latent: pass it to decode, or to_scaled first" if scaled else
                       "this is the patchified, normalised form (ComfyUI's LATENT, to_scaled's): from_scaled first")
                raise KLVAEError(f"latent has {C} channels, this {c.family} VAE's "
                                 f"{'scaled' if scaled else 'raw'} latents have {want}: {fix}")
            hint = families_with(C)
            raise KLVAEError(f"latent has {C} channels but this {c.family} VAE takes {want}: "
                             f"{C} channels suggests {hint}; decode it with a matching VAE")
        if finite:
            _check_finite(z, "latents", "the sampler diverged or the latent is corrupt; re-run the sampler "
                                        "(lower CFG or fp32) before decoding")

    # -- plans: what a call will do and how much memory it needs, decided before it runs --------
    def plan_decode(self, shape, tiling=None, output: bool = True) -> Plan:
        """The plan vae.decode(latents, tiling) runs for latents of `shape` (nothing is computed).
        tiling None: the plain pass, refused up front if it cannot fit in memory. A clip's shape
        (B, C, T, h, w), for a video network: the exact plan of its time chunks (tiling 'auto'
        or 'exact' or a Tiling; the untiled clip is not planned); output False: without the decoded
        frames (decode_clip hands them over chunk by chunk)."""
        shape, clip = self._clip_shape(shape)
        if clip:
            B, C, T, h, w = _shape(shape, "latents", self.config.latent_channels, 5)
            f, n = self.config.downscale, 1 + self.temporal_compression_ratio * (T - 1)
            out = B * self.config.out_channels * n * h * w * f * f * self.dtype.itemsize if output else 0
            return self._plan_clip(self.decoder, "decode", C, (B, C, h, w), (T, [(t, 1) for t in range(T)], out), tiling)
        B, C, h, w = _shape(shape, "latents", self.config.latent_channels)
        return self._plan(self.decoder, "decode", C, (B, C, h, w), tiling)

    def plan_encode(self, shape, tiling=None) -> Plan:
        """The plan vae.encode(pixels, tiling) runs for pixels of `shape` (a clip's: (B, C, T, H, W))."""
        shape, clip = self._clip_shape(shape)
        if isinstance(shape, (tuple, list, torch.Size)) and len(shape) > 1 and self._pads_alpha(shape[1]):
            shape = (shape[0], 4, *shape[2:])  # RGB is encoded as opaque RGBA (encode: _opaque)
        B, C, *T, H, W = _shape(shape, "pixels", self.config.in_channels, 5 if clip else 4)
        f = self.config.downscale
        if H % f or W % f:
            raise KLVAEError(f"image size {W}x{H} is not a positive multiple of {f}: plan the size you will encode")
        latent = (B, self.config.latent_channels, H // f, W // f)
        if clip:
            r = self._check_frames(T[0])
            chunks = [(0, 1)] + [(t, r) for t in range(1, T[0], r)]  # Wan's: the first frame, then r at a time
            n = 1 + (T[0] - 1) // r
            out = B * 2 * self.config.latent_channels * n * (H // f) * (W // f) * self.dtype.itemsize
            return self._plan_clip(self.encoder, "encode", C, latent, (n, chunks, out), tiling)
        return self._plan(self.encoder, "encode", C, latent, tiling)

    def _clip_shape(self, shape) -> tuple:
        """(shape, whether it is a clip's): a video network's 5-D shapes are clips' (one frame
        included), but where the network runs images only (Network.refuse_clip), one frame is an
        image's shape and more are refused."""
        if not (self.config.network.video_shaped and isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 5):
            return shape, False
        if self.config.clips:
            return shape, True
        if isinstance(shape[2], int) and shape[2] > 1:
            raise self.config.network.refuse_clip(self.config, shape[2])
        return (shape[0], shape[1], *shape[3:]), False

    def _plan_clip(self, net, direction, in_channels, shape, clip, tiling) -> Plan:
        if isinstance(tiling, Plan):
            return tiling
        tiling = untiled_if_none(tiling, None)
        if tiling is None:
            raise KLVAEError(f"an untiled clip {direction} is not planned (it runs Wan's time chunks whole): plan it "
                             f"with tiling='exact' or 'auto'")
        return make_plan(net, direction, in_channels, shape, self.dtype, self.device, Tiling.of(tiling),
                         self.config.downscale, clip=clip)

    def _plan(self, net, direction, in_channels, shape, tiling) -> Plan:
        if isinstance(tiling, Plan):
            return tiling
        tiling = untiled_if_none(tiling, None)
        t = Tiling(mode="auto", memory_budget=UNLIMITED) if tiling is None else Tiling.of(tiling)
        p = make_plan(net, direction, in_channels, shape, self.dtype, self.device, t, self.config.downscale,
                      allow_untiled=t.mode == "auto")
        if tiling is None:  # the plain pass: refuse up front what cannot fit, rather than fail in the allocator
            free = free_memory(self.device)
            if p.predicted > 1.25 * free:
                B, _, h, w = shape
                f = self.config.downscale
                raise KLVAEError(f"an untiled {direction} of {B} x {w * f}x{h * f} px needs ~{p.predicted / 2**30:.1f} "
                                 f"GiB, {free / 2**30:.1f} GiB are free: pass tiling='auto' (or 'exact')")
        return p

    # -- the two directions --------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, tiling=None, return_dict: bool = True) -> DiagonalGaussian:
        """[B, 3, H, W] in [-1, 1] -> posterior over raw latents [B, z, H/8, W/8].
        tiling: None (the enable_tiling() default; untiled unless enabled), "none" (untiled), a mode,
        a Tiling, or a Plan from plan_encode. return_dict=False: a 1-tuple, as diffusers."""
        self._offload_hook()
        pixels = self._opaque(pixels)
        if self._is_clip(pixels):
            post = DiagonalGaussian(self._sliced(self._encode_clip, pixels, untiled_if_none(tiling, self.tiling)))
            return post if return_dict else (post,)
        tiling = untiled_if_none(tiling, self.tiling)
        pixels, frames = self._one_frame(pixels, "pixels")
        self.check_pixels(pixels)
        moments = self._sliced(self._encode, pixels, tiling)
        if moments is None:
            return None
        post = DiagonalGaussian(moments.unsqueeze(2) if frames else moments)
        return post if return_dict else (post,)

    def _pads_alpha(self, channels) -> bool:
        """RGB given to an RGBA VAE (Qwen-Image 2.1's): encoded with alpha 1.0 (opaque), as ComfyUI
        and diffusers' QwenImage21Pipeline do."""
        return channels == 3 and self.config.in_channels == 4

    def _opaque(self, x):
        if torch.is_tensor(x) and x.dim() in (4, 5) and self._pads_alpha(x.shape[1]):
            return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        return x

    def _one_frame(self, t, what) -> tuple:
        """A video network's VAE (Qwen-Image's) takes video-shaped [B, C, T, H, W] as its pipelines pass
        them: an image is T = 1, run as [B, C, H, W] (the answer is given back in the shape asked in).
        (t, was 5-D)."""
        if not self.config.network.video_shaped or not torch.is_tensor(t) or t.dim() != 5:
            return t, False
        if t.shape[2] == 0:
            raise KLVAEError(f"{what} of shape {tuple(t.shape)} hold no frames (T = 0): nothing to do")
        return t[:, :, 0], True

    # -- clips: [B, C, T, H, W] with T > 1, through a video network (Wan 2.1's) -------------------
    def _is_clip(self, t) -> bool:
        clip = self.config.network.video_shaped and torch.is_tensor(t) and t.dim() == 5 and t.shape[2] > 1
        if clip and not self.config.clips:
            raise self.config.network.refuse_clip(self.config, t.shape[2])
        return clip

    def _clip_run(self, what, x: torch.Tensor, tiling, run) -> torch.Tensor:
        """A clip through the network along time. Untiled (tiling None): chunk by chunk as Wan
        runs it (its network's causal_chunks: every causal layer keeps the frames the next chunk
        reads), so memory holds one chunk's activations and the caches, not the clip's. Tiled:
        the same chunks, each run band by band by the exact engine (engine.run_clip) from stores
        of the plan's kind, every causal conv's cached frames a store too; each chunk's frames
        leave the device as it finishes (into host memory where the plan's store is not the
        device). In fp16, a chunk that overflows re-runs the clip with the residual stream scaled
        (precision.Guard.run_clip); otherwise a non-finite output is one error."""
        B, C, T, H, W = x.shape
        f = self.config.downscale
        plan = None if tiling is None else (self.plan_decode if what == "decode" else self.plan_encode)(x.shape, tiling)

        def attempt(net, rescue):
            if plan is not None:  # (run_clip measures its own peak)
                return self._clip_exact(what, x, plan, net=net, rescue=rescue)
            t0, meter = time.perf_counter(), PeakMeter(self.device)
            out = run(x.to(self.device, self.dtype), net, rescue)
            h, w = (H, W) if what == "decode" else (H // f, W // f)
            frames = T if what == "decode" else 1 + (T - 1) // self.temporal_compression_ratio
            untiled = Plan(what, "untiled", max(h, w) * f, h, w, f, Tiling(mode="auto"), frames=frames)
            return out, TilingReport(untiled, statistics="none needed: per-pixel norms", measured_peak=meter.peak(),
                                     seconds=time.perf_counter() - t0, steps=1,
                                     notes=[f"a clip of {T} frames, untiled, in time chunks"])
        out, report = self.guard.run_clip(self.decoder if what == "decode" else self.encoder, self.dtype, attempt, what)
        self._last_tiling = report
        if out is None:  # distributed, gather="rank0", on another rank
            return None
        if not torch.isfinite(out).all():
            raise KLVAEError(f"{what} of a clip gave non-finite values in {str(self.dtype)[6:]}: the input is out of "
                             f"range, or the dtype overflowed (load the VAE in bf16 or fp32)")
        return out

    def _clip_exact(self, what, x: torch.Tensor, plan: Plan, write=None, net=None, rescue=False) -> tuple:
        """engine.run_clip over the plan's time chunks: decode one latent frame at a time into the
        output (on the device, or in host memory where the plan's store is not the device), or
        hand each chunk's frames to write(t0, frames) (decode_clip); encode Wan's chunks (the first
        frame, then 4) into moments on the device. Distributed (Tiling(process_group=...)): every
        rank runs its rows of every chunk; each chunk's rows are gathered as Tiling(gather=...)
        asks as it finishes (the whole output on every rank, on rank 0 only, or each rank's rows);
        a non-finite value on any rank ends every rank with the same error. net: the decoder or
        encoder, or its stream-scaled copy; rescue: a non-finite chunk raises ChunkOverflow (the
        guard's, fp16)."""
        B, _, T, H, W = x.shape
        shard = None
        if plan.tiling.process_group is not None:
            shard = Shard(plan.tiling.process_group, H // (1 if what == "decode" else plan.downscale), plan.tiling.gather)
            shard.check_same_input(x)
        if what == "decode":
            steps, net_in = steps_of((net or self.decoder).layers(), x.shape[1], 1), self.post_quant_conv
            starts = list(range(T)) + [T]
            n, shape = 1 + self.temporal_compression_ratio * (T - 1), (B, self.config.out_channels, H * plan.downscale,
                                                               W * plan.downscale)
            where = self.device if plan.store == "device" else "cpu"
        else:
            steps, net_in = steps_of((net or self.encoder).layers(), x.shape[1], plan.downscale), None
            r = self.temporal_compression_ratio
            starts = [0] + list(range(1, T + 1, r))
            n, shape, where = plan.frames, (B, 2 * self.config.latent_channels, H // plan.downscale,
                                            W // plan.downscale), self.device
        rows = shape[2]  # the whole output's
        if shard and shard.gather == "band":
            lo, hi = shard.rows(rows)
            shape = (*shape[:2], hi - lo, shape[3])
        none_here = write is not None or (shard is not None and shard.gather == "rank0" and shard.rank != 0)
        out = None if none_here else torch.empty(shape[0], shape[1], n, *shape[2:], dtype=self.dtype, device=where)

        def chunks():
            for a, b in zip(starts, starts[1:]):
                c = x[:, :, a:b].to(self.device, self.dtype)
                yield a, (net_in(c) if net_in is not None else c)

        def emit(t0, y):
            if what == "encode":
                y = self.quant_conv(y)
            if shard:  # every rank decides alike, then the chunk's rows are gathered
                bad = shard.all_gather(torch.isfinite(y).all().logical_not().to(torch.uint8).reshape(1))
                if any(b.item() for b in bad):
                    if rescue:
                        raise ChunkOverflow
                    ranks = [r for r, b in enumerate(bad) if b.item()]
                    raise KLVAEError(f"{what} of a clip gave NaN/Inf from frame {t0} on rank(s) {ranks} of {shard.size}: "
                                     f"the input is out of range, or the dtype overflowed (load the VAE in bf16 or fp32)")
                if shard.gather != "band":
                    y = shard.gather_rows(y, rows, to_all=shard.gather == "all", dim=3)
                    if y is None:
                        return
            elif rescue and not torch.isfinite(y).all():
                raise ChunkOverflow
            if write:
                _check_finite_frames(y, t0)
                write(t0, y.to("cpu", torch.float32))
            else:
                out[:, :, t0:t0 + y.shape[2]].copy_(y)
        measured = engine.run_clip(steps, chunks(), plan, emit, self.device, self.dtype, shard)
        if shard:
            measured["notes"].append(f"sent {shard.bytes_sent / 2**20:.1f} MiB to the other ranks")
        measured["notes"] = list(plan.notes) + measured["notes"] + (
            ["frames into host memory as each chunk finished"] if where == "cpu" and self.device.type != "cpu" else [])
        return out, TilingReport(plan, **measured)

    @torch.inference_mode()
    def decode_clip(self, latents: torch.Tensor, write, tiling="auto") -> TilingReport:
        """A clip's raw latents [B, z, T, h, w] decoded chunk by chunk, each chunk's frames handed to
        write(t0, frames) as it finishes (frames: [B, 3, n, 8h, 8w] in [-1, 1], fp32 on the CPU,
        the clip's frames t0 .. t0 + n - 1), so that nothing holds the whole clip: for clips whose
        frames do not fit in memory (the CLI writes them to disk this way). tiling: "auto", "exact"
        or a Tiling (the exact engine, planned; the plan leaves the output out). The report:
        last_tiling. A non-finite frame stops the run with one error; in fp16, where the guard can
        rescue it, the clip runs again from its start with the residual stream scaled, and write
        receives the frames again from frame 0."""
        if not self._is_clip(latents):
            raise KLVAEError(f"decode_clip takes a clip's latents [B, {self.config.latent_channels}, T > 1, h, w] of a "
                             f"video VAE; got {tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__}"
                             f"{'' if self.config.network.video_shaped else f' for a {self.config.family} VAE'}: "
                             f"use decode")
        if not callable(write):
            raise KLVAEError(f"decode_clip's write must be a callable (t0, frames), got {type(write).__name__}")
        self._offload_hook()
        self.check_latents(latents[:, :, 0], finite=False)
        _check_finite(latents, "latents", "the sampler diverged or the latent is corrupt; re-run the sampler "
                                          "(lower CFG or fp32) before decoding")
        plan = self.plan_decode(latents.shape, tiling, output=False)
        _, self._last_tiling = self.guard.run_clip(
            self.decoder, self.dtype, lambda net, rescue: self._clip_exact("decode", latents, plan, write, net, rescue),
            "decode")
        return self._last_tiling

    def _check_frames(self, T: int) -> int:
        r = self.temporal_compression_ratio
        if (T - 1) % r:
            raise KLVAEError(f"a clip of {T} frames: this VAE encodes 1 + {r}k frames (1, {1 + r}, {1 + 2 * r}, ...); "
                             f"trim it to {1 + (T - 1) // r * r} frames or pad it to {1 + -(-(T - 1) // r) * r}")
        return r

    def _decode_clip(self, latents, tiling) -> torch.Tensor:
        """Raw latents [B, z, T, h, w] -> frames [B, 3, 1 + 4(T - 1), 8h, 8w], clamped to [-1, 1]."""
        self.check_latents(latents[:, :, 0], finite=False)
        _check_finite(latents, "latents", "the sampler diverged or the latent is corrupt; re-run the sampler "
                                          "(lower CFG or fp32) before decoding")
        return self._clip_run("decode", latents, tiling, self._decode_chunks)

    def _decode_chunks(self, z: torch.Tensor, net, rescue: bool) -> torch.Tensor:
        """One latent frame at a time (diffusers' and Wan's chunking) through net (the decoder or
        its stream-scaled copy), each chunk's frames written into the output as it finishes."""
        T, out, t = z.shape[2], None, 0
        z = z.contiguous(memory_format=torch.channels_last_3d)  # frames fold into images as views (ops.fold)
        with self.config.network.module.causal_chunks(net):
            for i in range(T):
                y = net(self.post_quant_conv(z[:, :, i:i + 1]))
                if rescue and not torch.isfinite(y).all():
                    raise ChunkOverflow
                if out is None:
                    n = 1 + self.temporal_compression_ratio * (T - 1)
                    out = y.new_empty(y.shape[0], y.shape[1], n, *y.shape[3:])
                out[:, :, t:t + y.shape[2]] = y
                t += y.shape[2]
        return out

    def _encode_clip(self, pixels, tiling) -> torch.Tensor:
        """Frames [B, 3, 1 + 4k, H, W] in [-1, 1] -> moments [B, 2z, 1 + k, H/8, W/8]."""
        self._check_frames(pixels.shape[2])
        self.check_pixels(pixels.transpose(1, 2).flatten(0, 1))  # every frame, as images
        return self._clip_run("encode", pixels, tiling, self._encode_chunks)

    def _encode_chunks(self, x: torch.Tensor, net, rescue: bool) -> torch.Tensor:
        """The first frame, then 4 frames at a time (Wan's chunking: each chunk makes one latent
        frame), through net (the encoder or its stream-scaled copy)."""
        r = self.temporal_compression_ratio
        bounds = [0, 1] + list(range(1 + r, x.shape[2] + 1, r))
        x = x.contiguous(memory_format=torch.channels_last_3d)  # frames fold into images as views (ops.fold)
        parts = []
        with self.config.network.module.causal_chunks(net):
            for a, b in zip(bounds, bounds[1:]):
                parts.append(self.quant_conv(net(x[:, :, a:b])))
                if rescue and not torch.isfinite(parts[-1]).all():
                    raise ChunkOverflow
        return torch.cat(parts, dim=2)

    def _sliced(self, run, x, tiling):
        """run(x, tiling), one batch item at a time when slicing is on (diffusers' enable_slicing).
        None where every item is None: distributed, gather="rank0", on another rank."""
        if not (self.use_slicing and x.shape[0] > 1):
            return run(x, tiling)
        parts = [run(item, tiling) for item in x.split(1)]
        return None if parts[0] is None else torch.cat(parts)

    def _encode(self, pixels, tiling) -> torch.Tensor:
        plan = self.plan_encode(pixels.shape, tiling)
        # [-1, 1] pixels are cast once, here; callers map from [0, 1] in fp32 first (no banding).
        x = pixels.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        moments = self._run(self.encoder, x, plan)
        if moments is None:  # distributed, gather="rank0", on another rank
            return None
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        self._check_output(moments, pixels, "encode")
        return moments.contiguous()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tiling=None, return_dict: bool | None = None, generator=None):
        """Raw latents [B, z, h, w] -> pixels [B, 3, 8h, 8w] in [-1, 1] (not clamped).
        tiling: None (the enable_tiling() default), "none" (untiled), a mode, a Tiling, or a Plan
        from plan_decode.
        return_dict: None gives the tensor (which also answers `.sample`); True an object with
        `.sample` and `[0]`, False a 1-tuple (diffusers' call shapes; `generator` is unused)."""
        self._offload_hook()
        if self._is_clip(latents):
            x = self._sliced(self._decode_clip, latents, untiled_if_none(tiling, self.tiling))
            return x.as_subclass(Decoded) if return_dict is None else DecoderOutput(x) if return_dict else (x,)
        tiling = untiled_if_none(tiling, self.tiling)
        latents, frames = self._one_frame(latents, "latents")
        self.check_latents(latents)
        x = self._sliced(self._decode, latents, tiling)
        if x is None:
            return None
        x = x.unsqueeze(2) if frames else x
        return x.as_subclass(Decoded) if return_dict is None else DecoderOutput(x) if return_dict else (x,)

    def _decode(self, latents, tiling) -> torch.Tensor:
        plan = self.plan_decode(latents.shape, tiling)
        z = latents.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        out = self._run(self.decoder, z, plan)
        if out is None:
            return None
        self._check_output(out, latents, "decode")
        return out.contiguous()  # None: distributed, gather="rank0", another rank

    def _run(self, net, x, plan: Plan) -> torch.Tensor:
        """net on x as planned (tiling.execute), through the precision guard; the report goes to
        last_tiling. Distributed: every rank runs its band (the guard's decisions are the same on
        every rank), then the output is gathered as Tiling(gather=...) asks (None off rank 0 for
        "rank0")."""
        shard = None
        if plan.tiling.process_group is not None:
            shard = Shard(plan.tiling.process_group, x.shape[2] // (1 if plan.direction == "decode" else plan.downscale),
                          plan.tiling.gather)
            shard.check_same_input(x)
        out, report = self.guard.run(net, x, plan, shard)
        if shard:
            f = plan.downscale
            H = x.shape[2] * f if plan.direction == "decode" else x.shape[2] // f  # the whole output's rows
            if shard.gather != "band":
                out = shard.gather_rows(out, H, to_all=shard.gather == "all")
            report.bytes_sent = shard.bytes_sent
            report.notes.append(f"sent {shard.bytes_sent / 2**20:.1f} MiB to the other ranks")
        self._last_tiling = report
        return out

    def _check_output(self, out, x, direction) -> None:
        """A finite input that drives fp32 past its range (latents of 1e37, say) gives NaN/Inf
        pixels: one error that says where the input is out of range, never a NaN image. (In fp16 and
        bf16 the guard has already re-run what overflowed, in fp32 at last.)"""
        if out.dtype != torch.float32:
            return
        bad = ~torch.isfinite(out).flatten(1).all(1)
        if not bad.any():
            return
        c, big = self.config, x.abs().max().item()
        if direction == "decode":
            typical = 5 / c.scaling_factor + abs(c.shift_factor)  # scaled latents are ~N(0, 1): |z| < 5
            where = (f"the latent's largest magnitude is {big:.3g}, while a sampler's raw latents for this {c.family} "
                     f"VAE stay within about +-{typical:.3g} (5 / scaling_factor): check the latent (scaled twice? "
                     f"a diverged sampler?)")
        else:
            where = f"the pixels reach {big:.3g}: check the image (klvae encodes pixels in [-1, 1])"
        raise KLVAEError(f"{direction} output is NaN/Inf in fp32 for batch items {bad.nonzero().flatten().tolist()[:8]}: "
                         + where)

    def forward(self, pixels, generator=None):
        """Round trip through the posterior mode (or a sample when a generator is given)."""
        post = self.encode(pixels)
        return self.decode(post.sample(generator) if generator is not None else post.mode())

    # -- latent conventions --------------------------------------------------------------------
    def _offset_gain(self, like: torch.Tensor):
        """scaled = (raw - offset) * gain: shift/scale, or per-channel latents_mean/std when stated."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            view = lambda v: torch.tensor(v, device=like.device, dtype=like.dtype).view(1, -1, *[1] * (like.dim() - 2))
            return view(c.latents_mean), c.scaling_factor / view(c.latents_std)
        return c.shift_factor, c.scaling_factor

    def to_scaled(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latent -> what the family's diffusers pipelines hand their denoiser: (raw - shift) * scale;
        Flux.2: 2x2 patchify [B, 32, h, w] -> [B, 128, h/2, w/2], then (z - running_mean) /
        sqrt(running_var + eps) (Flux2Pipeline._patchify_latents and the normalisation after it)."""
        self.check_latents(self._one_frame(raw, "latents")[0], finite=False)
        if self.bn is not None:
            mean, std = self._bn_stats(raw)
            return (patchify(raw) - mean) / std
        offset, gain = self._offset_gain(raw)
        return (raw - offset) * gain

    def from_scaled(self, scaled: torch.Tensor) -> torch.Tensor:
        """The inverse of to_scaled: scaled / scale + shift; Flux.2: z * std + mean, then unpatchify."""
        self.check_latents(self._one_frame(scaled, "latents")[0], finite=False, scaled=True)
        if self.bn is not None:
            mean, std = self._bn_stats(scaled)
            return unpatchify(scaled * std + mean)
        offset, gain = self._offset_gain(scaled)
        return scaled / gain + offset

    def _bn_stats(self, like):
        f = dict(device=like.device, dtype=like.dtype)
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(**f)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1).double() + self.bn.eps).to(**f)
        return mean, std

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self, *args, layout: str = "ldm", **kwargs):
        """Weights with the keys ComfyUI saves and loads (layout 'ldm', the default: LDM's for the
        SD-style families, the original releases' for Qwen-Image and HunyuanImage) or diffusers' keys
        (layout='diffusers')."""
        sd = super().state_dict(*args, **kwargs)
        if layout == "ldm":
            to_file = self.config.network.to_file
            return to_file(sd) if to_file is not None else sd
        if layout == "diffusers":
            return ldm_to_diffusers(sd, self.config.arch)
        raise KLVAEError(f"unknown layout {layout!r}: use 'ldm' or 'diffusers'")

    def save(self, path, layout: str = "ldm") -> None:
        """Write a .safetensors file (or, for layout='diffusers' and a folder path, a diffusers folder)."""
        checkpoint.save_vae(self, path, layout=layout)


def untiled_if_none(tiling, default):
    """A call's tiling: "none" is the plain pass even when enable_tiling() set a default; None
    takes the default (diffusers' convention)."""
    if isinstance(tiling, str) and tiling == "none":
        return None
    return default if tiling is None else tiling


def channels_last(module: nn.Module) -> nn.Module:
    """Every 4-D weight in channels_last memory (oneDNN and cuDNN convolve NHWC without reordering
    copies); a 5-D one (Wan's 3-D kernels [O, I, k, kh, kw]) time-major, each time slice a
    channels_last 2-D kernel: a frame's conv and a clip's 2-D convs over its time slices
    (ops.TimeSlices) read them as views, with no copy of the weights per run."""
    for p in module.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        elif p.dim() == 5:
            p.data = p.data.permute(2, 0, 3, 4, 1).contiguous().permute(1, 4, 0, 2, 3)
    return module


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 4C, h/2, w/2], channel c*4 + 2*i + j from pixel (2y+i, 2x+j) (Flux.2's order)."""
    B, C, h, w = z.shape
    if h % 2 or w % 2:
        raise KLVAEError(f"a Flux.2 latent of {w}x{h} cannot be patchified 2x2: its sides must be even "
                         f"(images in multiples of 16 px)")
    return z.view(B, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, h // 2, w // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    B, C4, h, w = z.shape
    return z.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, h * 2, w * 2)


def load_vae(src, device="cpu", dtype="auto", family: str | None = None) -> AutoencoderKL:
    """A ready AutoencoderKL (eval, no grad) from a path, a diffusers folder or a state dict.

    device: "auto" | "cpu" | "gpu" | "cuda:N"; dtype: "auto" (bf16 on GPUs that have it, fp16 on
    older ones, fp32 on the CPU) | "fp32" | "fp16" | "bf16"; family: a name of config.FAMILIES
    ("sd1", "sdxl", ...) when the file cannot say. On glibc, the first CPU model fixes malloc's mmap threshold so that
    freed activations go back to the OS (memory.py; KLVAE_KEEP_MALLOC=1 opts out)."""
    return AutoencoderKL.load(src, device, dtype, family)


def _shape(shape, what, channels, dims: int = 4) -> tuple:
    """A plan's shape argument: four (a clip's: five) positive whole numbers, with this VAE's channel count."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or len(shape) != dims or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        names = "(B, C, H, W), four" if dims == 4 else "(B, C, T, H, W), five"
        raise KLVAEError(f"shape {str(shape)[:60]} is not the shape of {what}: pass {names} positive whole "
                         f"numbers (e.g. tensor.shape)")
    if shape[1] != channels:
        raise KLVAEError(f"{what} of shape {tuple(shape)} have {shape[1]} channels, this VAE's have {channels}")
    return tuple(shape)


def _check_tensor(t, what, expected) -> None:
    if not torch.is_tensor(t) or t.dim() != 4:
        got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
        raise KLVAEError(f"{what} must be a 4-D tensor {expected}, got {got}")
    if not t.is_floating_point():
        raise KLVAEError(f"{what} are {t.dtype}, not floating point: convert them with .float()")
    if min(t.shape) < 1:
        raise KLVAEError(f"{what} of shape {tuple(t.shape)} are empty: nothing to do")


def _check_finite_frames(y, t0) -> None:
    bad = ~torch.isfinite(y).flatten(3).all(3).any(1)  # [B, n]: a frame with a NaN/Inf in any channel
    if bad.any():
        t = t0 + int(bad.any(0).nonzero()[0])
        raise KLVAEError(f"decoded frame {t} is NaN/Inf: the latent is out of range, or the dtype overflowed (load "
                         f"the VAE in bf16 or fp32)")


def _check_finite(t, what, fix) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        raise KLVAEError(f"{what} contain {int(bad.sum())} NaN/Inf values of {t.numel()}: {fix}")
