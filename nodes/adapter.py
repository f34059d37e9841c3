"""The VAE object klvae's nodes pass along a ComfyUI graph, and the work behind each node.

No ComfyUI import here. The host's services (progress bar, interruption check, memory manager,
device and dtype choice) come in through a `Host`; nodes/host.py hands in ComfyUI's, the default
`Host()` is plain torch (scripts, tests). So everything a node does runs and is tested without a
ComfyUI install, and nodes/host.py stays a thin schema layer.

`KLVAE` duck-types the methods ComfyUI's core nodes call on their own `comfy.sd.VAE` (`encode`,
`decode`, `encode_tiled`, `decode_tiled`, `spacial_compression_*`, `get_sd`, `downscale_ratio`...),
so a klvae VAE can be wired into VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled,
VAEEncodeForInpaint or a checkpoint saver. The conventions are core's: IMAGE is [B, H, W, C] in
[0, 1] on the host's intermediate device, LATENT holds raw (unscaled) latents (Flux.2: core's form,
the 2x2-patchified, BatchNorm-normalised 128-channel latent at 1/16, which the library calls
`to_scaled`; the library and CLI keep diffusers' raw 32-channel form), and images whose
sides are not multiples of 8 are centre-cropped as core does.
"""
import dataclasses
import functools
import logging
import warnings
import weakref

import torch

from ..vae import DEFAULT_MODE, FAMILIES, KLVAEError, Tiling, load_vae, resolve_device, resolve_dtype
from ..vae.errors import reworded
from ..vae.tiling import UNLIMITED

log = logging.getLogger("klvae")

POSTERIORS = ("argmax", "sample")

# The library's errors name its Python arguments; in a graph the same advice names inputs and settings.
API_TO_NODES = ((r"Tiling\(spill_dir=\.\.\.\) or \$KLVAE_SPILL_DIR", "the KLVAE_SPILL_DIR environment variable "
                 "(before ComfyUI starts)"),
                (r"mode='exact' with store='disk'", "tiling 'exact' (its plan moves to the disk store)"),
                (r"mode='(exact|bounded|auto)'", r"tiling '\1'"),
                (r"pass tiling='auto' \(or 'exact'\)", "use VAE Decode (Tiled, klvae) with tiling 'auto'"),
                (r", raise Tiling\(memory_budget=\.\.\.\)", ""), (r"Tiling overlap=", "overlap "))


def in_node_words(fn):
    """A KLVAEError raised inside `fn` re-worded for a graph (inputs, not Python arguments)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KLVAEError as e:
            said = reworded(str(e), API_TO_NODES)
            if said == str(e):
                raise
            raise KLVAEError(said) from e
    return run


class Host:
    """What the host application provides. These defaults are plain torch without a host."""

    def device(self, choice: str) -> torch.device:
        return resolve_device(choice)

    def offload_device(self, device: torch.device) -> torch.device:
        return device

    def dtype(self, choice: str, device: torch.device) -> torch.dtype:
        return resolve_dtype(choice, device)

    def output_device(self) -> torch.device:
        return torch.device("cpu")

    def manage(self, vae: "KLVAE"):
        """A handle for the host's memory manager (ComfyUI: a ModelPatcher), or None."""
        return None

    def load(self, vae: "KLVAE", need: int) -> int | None:
        """Make room for `need` bytes, put the weights on the compute device; return the memory
        budget for the call in bytes (None: let klvae ask the device)."""
        return None

    def progress(self):
        """A callable (done, total) for the host's progress bar, or None."""
        return None

    def interrupt(self):
        """A callable that raises (or returns True) when the user cancelled, or None."""
        return None


PLAIN = Host()


class KLVAE:
    """A klvae AutoencoderKL dressed as the host's VAE type."""

    def __init__(self, model, host: Host = PLAIN, name: str = "", device: torch.device | None = None):
        self.model, self.host, self.name = model, host, name
        cfg = model.config
        self.load_device = device or model.device  # where it computes; the weights may rest elsewhere
        # Attributes core nodes read on their own VAE objects.
        # Flux.2's graph latent is patchified 2x2: 16x smaller, 4x the channels (core's VAE does the same)
        self.downscale_ratio = self.upscale_ratio = cfg.downscale * (2 if cfg.batch_norm else 1)
        self.latent_channels = cfg.scaled_channels
        # Qwen-Image's LATENT is ComfyUI's Wan 2.1 form, [B, 16, T, h, w] (T = 1 for an image), Wan 2.2's
        # [B, 48, T, h, w]; Qwen-Image 2.1's 2-D network (time kernel 1) has core's image form [B, 64, h, w]
        self.video_shaped = cfg.clips
        self.latent_dim = 3 if self.video_shaped else 2
        self.output_channels = cfg.out_channels
        self.crop_input = True
        # a video network's IMAGE batch is the frames of one clip (core's WanVAE: not_video False)
        self.not_video = not self.video_shaped
        self.extra_1d_channel = None
        self.disable_offload = False
        self.patcher = host.manage(self)

    def __repr__(self):
        c = self.model.config
        return f"KLVAE({self.name or c.family}, {c.latent_channels} latent channels, {self.model.dtype}, {self.model.device})"

    @property
    def device(self):
        return self.load_device

    @property
    def vae_dtype(self):
        return self.model.dtype

    @property
    def output_device(self):
        return self.host.output_device()

    # -- what klvae's nodes call ---------------------------------------------------------------
    @in_node_words
    def encode_latent(self, image: torch.Tensor, posterior: str = "argmax", seed: int = 0,
                      tiling: Tiling | None = None) -> torch.Tensor:
        """IMAGE [B, H, W, C] in [0, 1] -> the graph's latent [B, z, H/8, W/8] (posterior mode or seeded
        sample; Flux.2: patchified and normalised, [B, 128, H/16, W/16], as core's VAE gives). A
        video network (Wan 2.1's, Qwen-Image's) takes the batch as the frames of one clip, as core's
        WanVAE does: N frames -> [1, 16, 1 + (N - 1) // 4, h, w] (frames past the last whole 4 are
        left out, as core leaves them, and the log says so); one image is T = 1. An RGBA VAE (Qwen-Image
        2.1's) encodes an IMAGE's alpha, and RGB as opaque, as core pads it."""
        if posterior not in POSTERIORS:
            raise KLVAEError(f"unknown posterior {posterior!r}: use 'argmax' (the mode) or 'sample' (seeded)")
        image = _as_image(image)
        x = self.vae_encode_crop_pixels(image)[..., :self.model.config.in_channels]  # RGBA VAEs keep alpha (RGB: opaque)
        # To [-1, 1] in fp32 before any cast to a low-precision compute dtype (less banding).
        x = x.movedim(-1, 1).to(torch.float32) * 2.0 - 1.0
        self.model.check_pixels(x, finite=False)  # clear shape errors before the host moves models
        if self.video_shaped and x.shape[0] > 1:
            r = self.model.temporal_compression_ratio
            n = 1 + (x.shape[0] - 1) // r * r
            if n != x.shape[0]:
                log.info("klvae: %d frames encode as %d (1 + %dk): the last %d left out, as core's VAE Encode does",
                         x.shape[0], n, r, x.shape[0] - n)
            x = x[:n].movedim(0, 1).unsqueeze(0)  # the frames of one clip: [1, 3, n, H, W]
        post = self.model.encode(x, tiling=self._plan(self.model.plan_encode, x.shape, tiling))
        log.info("klvae %s", self.model.last_tiling)
        z = post.mode() if posterior == "argmax" else post.sample(seed=seed)
        if self.model.bn is not None:
            z = self.model.to_scaled(z)
        if self.video_shaped and z.dim() == 4:
            z = z.unsqueeze(2)  # one frame
        return z.to(self.output_device, torch.float32)

    @in_node_words
    def decode_image(self, latent: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
        """The graph's latent [B, z, h, w] -> IMAGE [B, 8h, 8w, 3] in [0, 1] (Flux.2: [B, 128, h, w] -> 16h x 16w).
        A video network's [B, 16, T, h, w] -> its frames [B * (1 + 4(T - 1)), 8h, 8w, 3], as core's VAE
        Decode gives them: exact in time and space, each chunk's frames off the device as it finishes.
        An RGBA VAE (Qwen-Image 2.1's) gives a 4-channel IMAGE, as core does (its Split Image with Alpha
        node makes the MASK)."""
        clip = False
        if torch.is_tensor(latent) and latent.dim() == 5:
            if not self.video_shaped:
                raise KLVAEError(f"latent of shape {tuple(latent.shape)} is video-shaped (Qwen-Image's or Wan's [B, C, T, "
                                 f"h, w]); this {self.model.config.family} VAE takes [B, C, h, w]: decode it with the "
                                 f"VAE of the model that made it")
            clip = latent.shape[2] > 1
            latent = latent if clip else latent[:, :, 0]
        if self.model.bn is not None:
            latent = self.model.from_scaled(latent)
        self.model.check_latents(latent[:, :, 0] if clip else latent, finite=False)  # NaNs are checked once, in the call
        x = self.model.decode(latent, tiling=self._plan(self.model.plan_decode, latent.shape, tiling))
        log.info("klvae %s", self.model.last_tiling)
        img = ((x.to(self.output_device, torch.float32) + 1.0) / 2.0).clamp_(0.0, 1.0)
        if clip:  # [B, 3, T, H, W] -> frames [B * T, H, W, 3]
            return img.permute(0, 2, 3, 4, 1).reshape(-1, *img.shape[-2:], img.shape[1])
        return img.movedim(1, -1).contiguous()

    def _plan(self, plan, shape, tiling: Tiling | None):
        """Plan once (`plan`: the model's plan_decode or plan_encode), ask the host for that much room,
        re-plan only if the host could not make it. Untiled requests run "auto": untiled when the
        plan fits, else tiled."""
        t = tiling or Tiling(mode="auto")
        t = dataclasses.replace(t, progress=t.progress or self.host.progress(), interrupt=t.interrupt or self.host.interrupt())
        p = plan(shape, t if t.memory_budget else dataclasses.replace(t, memory_budget=UNLIMITED))
        budget = self.host.load(self, p.predicted)
        if not t.memory_budget and budget is not None and p.predicted > budget:
            p = plan(shape, dataclasses.replace(t, memory_budget=budget))
        return p

    # -- the methods ComfyUI's core nodes call on a VAE -----------------------------------------
    def encode(self, pixel_samples):
        return self.encode_latent(pixel_samples)

    def decode(self, samples_in, vae_options={}):
        return self.decode_image(samples_in)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Core's VAEEncodeTiled: tile size in image px. Tiles are exact here (klvae's default mode:
        whole-image statistics, one row of context per layer, no blending), so core's overlap has
        nothing to do and is not passed on."""
        tile = min((t for t in (tile_x, tile_y) if t), default=512)  # square tiles: the smaller side
        f = self.downscale_ratio
        return self.encode_latent(pixel_samples, tiling=Tiling(mode=DEFAULT_MODE, tile_size=max(f, tile // f * f)))

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """Core's VAEDecodeTiled: tile size in the graph latent's px (exact tiles: the overlap is not
        needed). A clip is exact in time too: core's temporal_size / temporal_overlap do not apply
        (said once in the log)."""
        if tile_t is not None and torch.is_tensor(samples) and samples.dim() == 5 and samples.shape[2] > 1:
            _say_once("klvae: VAE Decode (Tiled)'s temporal_size and temporal_overlap are not used: klvae's tiles are "
                      "exact in time (each causal conv's cache runs through the whole clip, so no tile restarts it)")
        f = self.upscale_ratio
        tile = min((t for t in (tile_x, tile_y) if t), default=64)
        return self.decode_image(samples, tiling=Tiling(mode=DEFAULT_MODE, tile_size=tile * f))

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return self.model.temporal_compression_ratio if self.video_shaped else None

    def get_sd(self):
        """LDM-layout state dict (what checkpoint savers store under first_stage_model.)."""
        return {k: v.contiguous() for k, v in self.model.state_dict().items()}

    def throw_exception_if_invalid(self):
        pass

    def model_size(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    get_ram_usage = model_size

    def memory_used_decode(self, shape, dtype=None):
        return self.model.plan_decode(shape, Tiling(mode="auto", memory_budget=UNLIMITED)).predicted

    def memory_used_encode(self, shape, dtype=None):
        return self.model.plan_encode(shape, Tiling(mode="auto", memory_budget=UNLIMITED)).predicted

    def vae_encode_crop_pixels(self, pixels):
        """Centre-crop [B, H, W, C] to multiples of 8, as core's VAE does (it never pads)."""
        f = self.downscale_ratio
        H, W = pixels.shape[1], pixels.shape[2]
        h, w = H // f * f, W // f * f
        if h == 0 or w == 0:
            raise KLVAEError(f"image {W}x{H} is smaller than one latent pixel ({f}x{f}): use a larger image")
        if (h, w) != (H, W):
            log.info("klvae: image %dx%d centre-cropped to %dx%d (sides must be multiples of %d)", W, H, w, h, f)
            y0, x0 = (H - h) // 2, (W - w) // 2
            pixels = pixels[:, y0:y0 + h, x0:x0 + w]
        return pixels


_said = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


def _as_image(image) -> torch.Tensor:
    if not torch.is_tensor(image) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        got = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise KLVAEError(f"expected an IMAGE [B, H, W, 3] in [0, 1], got {got}")
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)  # greyscale: replicate, as a user would expect
    return image


# -- loading and accepting the host's own VAE objects ------------------------------------------------
@in_node_words
def load(path, dtype: str = "auto", device: str = "auto", host: Host = PLAIN, name: str = "") -> KLVAE:
    dev = host.device(device)
    model = load_vae(path, device=host.offload_device(dev), dtype=host.dtype(dtype, dev))
    return KLVAE(model, host, name or str(path), dev)


# Names of the host's VAE classes that are not KL autoencoders, for the error message.
NOT_KL = {
    "TAESD": "a TAESD (tiny approximate autoencoder, no posterior)",
    "TAEHV": "a tiny video autoencoder (TAEHV)",
    "AudioOobleckVAE": "an audio VAE",
    "StageA": "Stable Cascade's stage A (a VQGAN)",
    "StageC_coder": "Stable Cascade's effnet encoder",
    "VideoDecoder": "Stable Video Diffusion's temporal VAE",
}
_converted = weakref.WeakKeyDictionary()  # host VAE -> {(dtype, device): KLVAE}


def describe(vae) -> str:
    inner = getattr(vae, "first_stage_model", None)
    if vae is None:
        return "nothing (no VAE connected)"
    if inner is None:
        return f"a {type(vae).__name__} without a model (the checkpoint had no VAE weights)" \
            if hasattr(vae, "first_stage_model") else f"a {type(vae).__module__}.{type(vae).__name__}"
    names = [type(inner).__name__, type(getattr(inner, "decoder", None)).__name__]
    for n in names:
        if n in NOT_KL:
            return f"{NOT_KL[n]} ({type(inner).__module__}.{type(inner).__name__})"
    return f"a {type(inner).__module__}.{type(inner).__name__} with {getattr(vae, 'latent_channels', '?')} latent channels"


def is_kl(vae) -> bool:
    """ComfyUI's own KL autoencoders: SD1.x/2.x/SDXL load as AutoencoderKL, SD3/Flux.1 (and
    HunyuanImage-2.1) as an AutoencodingEngine with a Gaussian posterior and a 2-D decoder,
    Qwen-Image's as Wan 2.1's WanVAE (comfy.ldm.wan.vae), Wan 2.2's (and newer cores' Qwen-Image
    2.1's) as vae2_2's WanVAE."""
    inner = getattr(vae, "first_stage_model", None)
    kind = type(inner).__name__
    if kind == "AutoencoderKL":
        return True
    if kind == "WanVAE" and type(inner).__module__.endswith(("wan.vae", "wan.vae2_2")):  # Wan 2.1's (Qwen-Image's), 2.2's
        return True
    return (kind == "AutoencodingEngine"
            and type(getattr(inner, "regularization", None)).__name__ == "DiagonalGaussianRegularizer"
            and type(getattr(inner, "decoder", None)).__name__ == "Decoder")


def as_klvae(vae, what: str = "klvae", host: Host = PLAIN, dtype: str = "auto", device: str = "auto") -> KLVAE:
    """A KLVAE for any VAE a graph carries: ours as is, the host's KL autoencoders converted
    (weights copied once and cached per host VAE), anything else a clear error."""
    if isinstance(vae, KLVAE):
        return vae
    if not is_kl(vae):
        raise KLVAEError(f"{what} only supported for AutoencoderKL (KL VAEs: {', '.join(FAMILIES)}); got "
                         f"{describe(vae)}: connect a KL VAE, or use the core VAE nodes for this one")
    # "auto" follows the host VAE's own placement and precision.
    dev = host.device(device) if device != "auto" else torch.device(getattr(vae, "device", "cpu"))
    dt = host.dtype(dtype, dev) if dtype != "auto" else getattr(vae, "vae_dtype", None) or host.dtype("auto", dev)
    cache = _converted.setdefault(vae, {})
    key = (str(dt), str(dev))
    if key not in cache:
        with warnings.catch_warnings():
            # A 4-channel VAE is SD1.x or SDXL by its shapes alone; in a graph latents are raw,
            # so the family only names things and the ambiguity warning would be noise.
            warnings.simplefilter("ignore")
            model = load_vae(vae.get_sd(), device=host.offload_device(dev), dtype=dt)
        cache[key] = KLVAE(model, host, f"host VAE ({type(vae.first_stage_model).__name__})", dev)
    return cache[key]


# -- the nodes' work ----------------------------------------------------------------------------
def encode(vae, image, posterior="argmax", seed=0, tiling=None, host: Host = PLAIN, what="klvae Encode") -> dict:
    kl = as_klvae(vae, what, host)
    return {"samples": kl.encode_latent(image, posterior, seed, tiling)}


def decode(vae, latent: dict, tiling=None, host: Host = PLAIN, what="klvae Decode") -> torch.Tensor:
    if not isinstance(latent, dict) or "samples" not in latent:
        raise KLVAEError(f"expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
    kl = as_klvae(vae, what, host)
    return kl.decode_image(latent["samples"], tiling)
