"""VAEConfig: the shape of a KL autoencoder, and the families that share one architecture.

The numbers come from the released VAEs (LDM `first_stage_config`, diffusers `config.json`):
SD1.x/2.x and SDXL are 4-channel with quant convs, SD3 and Flux.1 are 16-channel without them,
Flux.2 is 32-channel with quant convs and a latent BatchNorm (`bn.*`), optionally with a narrower
decoder. SD1.x and SDXL have identical tensor shapes; only metadata or a file name can tell them apart.

A VAEConfig checks itself when it is made (`__post_init__`): every value is of the right type
and inside bounds that no real VAE comes near, so a config built from a hostile file fails here,
naming the value, before a single module is built from it.
"""
import math
from dataclasses import dataclass, field, replace

from .diffusers_compat import DiffusersNames
from .errors import KLVAEError


ARCHS = ("sd", "qwenimage", "hunyuanimage")  # the networks: model.py, model_qwenimage.py, model_hunyuanimage.py

# Qwen-Image's per-channel latent statistics (its VAE's config.json, ComfyUI's latent_formats.Wan21):
# its pipelines hand the denoiser (raw - mean) / std.
QWEN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
QWEN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class Family:
    name: str
    latent_channels: int
    scaling_factor: float
    shift_factor: float
    quant_conv: bool
    note: str = ""
    force_upcast: bool = False  # diffusers pipelines run it in fp32 when given fp16
    batch_norm: bool = False    # latents normalised by a BatchNorm over 2x2 patches (Flux.2)
    arch: str = "sd"            # which network (ARCHS)
    latents_mean: tuple | None = None  # per-channel latent statistics its pipelines normalise with
    latents_std: tuple | None = None
    shape: tuple = ()           # the released network's shape: VAEConfig fields


FAMILIES = {
    "sd1": Family("sd1", 4, 0.18215, 0.0, True, "Stable Diffusion 1.x/2.x"),
    "sdxl": Family("sdxl", 4, 0.13025, 0.0, True, "SDXL (overflows fp16 in the decoder)", True),
    "sd3": Family("sd3", 16, 1.5305, 0.0609, False, "Stable Diffusion 3 / 3.5"),
    "flux": Family("flux", 16, 0.3611, 0.1159, False, "Flux.1"),
    # Flux.2: no scale or shift; its pipelines normalise 2x2-patchified latents with the VAE's
    # BatchNorm running statistics instead (to_scaled / from_scaled).
    "flux2": Family("flux2", 32, 1.0, 0.0, True, "Flux.2 (BatchNorm-normalised 2x2 patches)", batch_norm=True),
    # Qwen-Image (and its Edit models): Wan 2.1's causal video VAE, run on single frames (T = 1).
    "qwenimage": Family("qwenimage", 16, 1.0, 0.0, True, "Qwen-Image (Wan 2.1's VAE, images as T = 1)",
                        arch="qwenimage", latents_mean=QWEN_LATENTS_MEAN, latents_std=QWEN_LATENTS_STD,
                        shape=(("ch", 96), ("temporal_downsample", (False, True, True)))),
    # HunyuanImage-2.1: GroupNorm resnets, 32x down by space-to-channel, 64 latent channels.
    "hunyuanimage": Family("hunyuanimage", 64, 0.75289, 0.0, False, "HunyuanImage-2.1 (32x, 64 channels)",
                           arch="hunyuanimage", shape=(("ch", 128), ("ch_mult", (1, 2, 4, 4, 8, 8)))),
}
CUSTOM = "custom"  # a VAE of this architecture that no released family matches
# Which family a latent channel count suggests, for error messages.
FAMILIES_BY_CHANNELS = {4: "sd1/sdxl", 16: "sd3/flux or qwenimage (check which model made it)",
                        64: "hunyuanimage (HunyuanImage-2.1)", 8: "a video/other VAE",
                        32: "flux2 (Flux.2's raw latent)",
                        128: "flux2 in its patchified, normalised form (ComfyUI's Flux.2 LATENT, or to_scaled's)"}

# Bounds a config must keep. Released VAEs: ch 128, 4 levels, 2 res blocks, <= 32 latent channels.
MAX_CH, MAX_WIDTH, MAX_LEVELS, MAX_RES_BLOCKS, MAX_LATENT, MAX_IO = 1024, 4096, 8, 8, 256, 16


@dataclass(frozen=True)
class VAEConfig(DiffusersNames):
    family: str = "sd1"
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128                          # width of the first level
    ch_mult: tuple = (1, 2, 4, 4)          # widths per level, in units of ch
    num_res_blocks: int = 2                # encoder; the decoder has one more per level
    latent_channels: int = 4               # z_channels
    norm_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # Per-channel latent statistics some diffusers VAEs state (e.g. Playground v2.5's SDXL-shaped
    # VAE); when set, scaled = (raw - latents_mean) * scaling_factor / latents_std.
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = False             # diffusers' flag (SDXL: True; the fp16-fix VAE: False)
    decoder_ch: int | None = None          # the decoder's first width when it differs (Flux.2's small decoder)
    # Flux.2: a BatchNorm (running mean/variance, no affine) over latents patchified 2x2 (`bn.*` keys)
    batch_norm: bool = False
    batch_norm_eps: float = 1e-4
    notes: tuple = field(default=(), compare=False)  # how the config was inferred (for `info`)
    arch: str = "sd"                       # the network (ARCHS): SD-style, Qwen-Image's, HunyuanImage's
    temporal_downsample: tuple | None = None  # qwenimage: per level, whether video frames are downsampled
    match_channels: bool = True            # hunyuanimage: resamples change to the next level's width

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise KLVAEError(f"unknown architecture {self.arch!r}: klvae builds {', '.join(ARCHS)}")
        if self.family not in FAMILIES and self.family != CUSTOM:
            raise KLVAEError(f"unknown family {self.family!r}: use one of {', '.join(FAMILIES)} (or '{CUSTOM}')")
        for name, lo, hi in (("in_channels", 1, MAX_IO), ("out_channels", 1, MAX_IO), ("ch", 1, MAX_CH),
                             ("num_res_blocks", 1, MAX_RES_BLOCKS), ("latent_channels", 1, MAX_LATENT),
                             ("norm_groups", 1, MAX_CH)):
            _int_in(name, getattr(self, name), lo, hi)
        if self.decoder_ch is not None:
            _int_in("decoder_ch", self.decoder_ch, 1, MAX_CH)
        if not isinstance(self.ch_mult, tuple) or not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise KLVAEError(f"ch_mult {self.ch_mult!r}: expected a tuple of 1 to {MAX_LEVELS} level widths")
        for m in self.ch_mult:
            _int_in("ch_mult entry", m, 1, MAX_WIDTH // self.ch)
        bad = [w for w in self.block_out_channels + self.decoder_block_out_channels if w % self.norm_groups]
        if bad and self.arch != "qwenimage":  # Qwen-Image's RMS norms have no groups
            raise KLVAEError(f"norm_groups {self.norm_groups} does not divide the width {bad[0]}: GroupNorm needs "
                             f"groups that divide every width (released VAEs use 32)")
        for name in ("use_quant_conv", "use_post_quant_conv", "force_upcast", "batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise KLVAEError(f"{name} is {getattr(self, name)!r}: expected True or False")
        for name in ("scaling_factor", "shift_factor", "batch_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise KLVAEError(f"{name} is {v!r}: expected a finite number")
        if not 0 < self.batch_norm_eps <= 1:
            raise KLVAEError(f"batch_norm_eps is {self.batch_norm_eps!r}: expected a small positive number (Flux.2: 1e-4)")
        if not 1e-6 <= self.scaling_factor <= 1e6:
            raise KLVAEError(f"scaling_factor is {self.scaling_factor!r}: expected a positive factor "
                             f"(released VAEs: 0.13 to 1.53)")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, tuple) or len(v) != self.latent_channels or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise KLVAEError(f"{name} must be {self.latent_channels} finite numbers, one per latent channel; "
                                 f"got {str(v)[:60]}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise KLVAEError("latents_mean and latents_std come together: state both or neither")
        if self.latents_std is not None and min(self.latents_std) <= 0:
            raise KLVAEError(f"latents_std must be positive, got {min(self.latents_std)}")
        if self.arch == "qwenimage" and (not isinstance(self.temporal_downsample, tuple) or len(
                self.temporal_downsample) != len(self.ch_mult) - 1 or not all(isinstance(b, bool) for b in self.temporal_downsample)):
            raise KLVAEError(f"temporal_downsample {str(self.temporal_downsample)[:60]}: Qwen-Image's VAE needs one flag "
                             f"(True/False) per level transition, {len(self.ch_mult) - 1} here")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_out_channels(self) -> tuple:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def decoder_block_out_channels(self) -> tuple:
        return tuple((self.decoder_ch or self.ch) * m for m in self.ch_mult)

    @property
    def scaled_channels(self) -> int:
        """Channels of a to_scaled latent (Flux.2: 4x the raw ones, at half the size)."""
        return self.latent_channels * (4 if self.batch_norm else 1)

    def with_family(self, family: str) -> "VAEConfig":
        f = FAMILIES[family]
        return replace(self, family=family, scaling_factor=f.scaling_factor, shift_factor=f.shift_factor,
                       force_upcast=f.force_upcast, latents_mean=f.latents_mean, latents_std=f.latents_std)


def _int_in(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise KLVAEError(f"{name} is {v!r}: expected a whole number from {lo} to {hi}")


def preset(family: str, **overrides) -> VAEConfig:
    """The released configuration of a family (full width), optionally narrowed by overrides."""
    if family not in FAMILIES:
        raise KLVAEError(f"unknown family {family!r}: use one of {', '.join(FAMILIES)}")
    f = FAMILIES[family]
    cfg = VAEConfig(family=family, latent_channels=f.latent_channels, use_quant_conv=f.quant_conv,
                    use_post_quant_conv=f.quant_conv, scaling_factor=f.scaling_factor,
                    shift_factor=f.shift_factor, force_upcast=f.force_upcast, batch_norm=f.batch_norm,
                    arch=f.arch, latents_mean=f.latents_mean, latents_std=f.latents_std, **dict(f.shape))
    if f.arch == "qwenimage" and "ch_mult" in overrides and "temporal_downsample" not in overrides:
        # the released flags belong to 4 levels; a narrowed test network keeps the last ones it has room for
        levels = len(overrides["ch_mult"])
        overrides["temporal_downsample"] = cfg.temporal_downsample[len(cfg.temporal_downsample) - levels + 1:] if levels > 1 else ()
    return replace(cfg, **overrides)
