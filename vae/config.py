"""VAEConfig: the shape of a KL autoencoder; the registry of the networks klvae builds and their families.

Each network's model file (model.py: SD1.x/2.x, SDXL, SD3, Flux.1, Flux.2; model_qwenimage.py;
model_hunyuanimage.py) makes one `Network` (its builders, presets, file markers, key maps, diffusers
names, its own checks) and registers it here (`register_network`); vae/__init__.py imports them in
the order lists print them. `FAMILIES` and `NETWORKS` are what the loader, the presets, the CLI,
the nodes and the error messages read: nothing outside a family's own file names it.

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
from typing import Callable

import torch

from .diffusers_compat import DiffusersNames, register_arch
from .errors import KLVAEError


FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes a VAE computes in


@dataclass(frozen=True)
class Family:
    """A released VAE's conventions: what its pipelines scale latents by, its latent statistics."""
    name: str
    latent_channels: int
    scaling_factor: float
    shift_factor: float
    quant_conv: bool
    note: str = ""
    force_upcast: bool = False  # diffusers pipelines run it in fp32 when given fp16
    batch_norm: bool = False    # latents normalised by a BatchNorm over 2x2 patches (Flux.2)
    arch: str = "sd"            # which network (NETWORKS)
    latents_mean: tuple | None = None  # per-channel latent statistics its pipelines normalise with
    latents_std: tuple | None = None
    shape: tuple = ()           # the released network's shape: VAEConfig fields
    sample_size: int = 512      # diffusers config.json's sample_size (its own tiling threshold)
    metadata_words: tuple = ()  # words in a file's modelspec/ss_ metadata that name this family
    file_names: str = ""        # a regular expression on file names that suggests this family


@dataclass(frozen=True)
class Network:
    """One network klvae builds, everything about it in one object. Its model file (model.py,
    model_<family>.py) makes it and calls `register_network`; nothing outside that file compares a family
    or network name. Adding a family is one new model file and one line in vae/__init__.py."""
    name: str
    module: object                   # the model file: Encoder(cfg), Decoder(cfg), quant_convs(cfg)
    families: tuple                  # its presets (Family), in the order lists print them
    markers: tuple = ()              # (layout, key): keys (after any prefix) only its files have
    read: Callable | None = None     # (name, shape, keys, layout) -> ({klvae key: file key}, VAEConfig fields)
    to_file: Callable | None = None  # klvae's keys -> its own file layout (None: the same keys)
    diffusers: object = None         # its diffusers_compat.ArchNames (class names, config, key maps)
    video_shaped: bool = False       # its pipelines pass [B, C, T, H, W] (an image is T = 1)
    group_norms: bool = True         # its norms are GroupNorms: norm_groups must divide every width
    check: Callable | None = None    # its own VAEConfig checks: check(cfg) raises a KLVAEError
    narrow: Callable | None = None   # (preset config, overrides) -> overrides, for narrowed networks
    refuse_clip: Callable | None = None  # (cfg, frames) -> the KLVAEError for a clip this config does not run, or None


NETWORKS = {}   # name -> Network, in registration order (vae/__init__.py imports the model files)
FAMILIES = {}   # name -> Family, every network's presets in that order


def register_network(network: Network) -> None:
    """Make a network and its families known to the loader, the presets, diffusers' names and the lists."""
    NETWORKS[network.name] = network
    for f in network.families:
        FAMILIES[f.name] = f
    if network.diffusers is not None:
        register_arch(network.name, network.diffusers)


CUSTOM = "custom"  # a VAE of this architecture that no released family matches
# What a latent channel count suggests beyond the families' own (the error messages): forms no family's raw latent has.
OTHER_LATENTS = {8: "a video/other VAE",
                 128: "flux2 in its patchified, normalised form (ComfyUI's Flux.2 LATENT, or to_scaled's)"}


def families_with(channels: int) -> str:
    """The families whose raw latents have this many channels, in words, for error messages."""
    names = [f.name for f in FAMILIES.values() if f.latent_channels == channels]
    if names:
        return "/".join(names) + (" (check which model made it)" if len(names) > 1 else "")
    return OTHER_LATENTS.get(channels, "another model family")


def family_titles() -> str:
    """The families klvae loads, as their notes name them: "Stable Diffusion 1.x/2.x, SDXL, ..."."""
    return ", ".join(f.note.split(" (")[0] for f in FAMILIES.values())

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
    arch: str = "sd"                       # the network (NETWORKS): SD-style, Qwen-Image's, HunyuanImage's
    temporal_downsample: tuple | None = None  # qwenimage: per level, whether video frames are downsampled
    match_channels: bool = True            # hunyuanimage: resamples change to the next level's width
    patch_size: int = 1                    # wan22: pixels go in and out as p x p patches in channels (Wan 2.2: 2)
    time_kernel: int = 3                   # wan22: the convolutions' frames (Qwen-Image 2.1's 2-D network: 1)

    def __post_init__(self):
        if self.arch not in NETWORKS:
            raise KLVAEError(f"unknown architecture {self.arch!r}: klvae builds {', '.join(NETWORKS)}")
        if self.family not in FAMILIES and self.family != CUSTOM:
            raise KLVAEError(f"unknown family {self.family!r}: use one of {', '.join(FAMILIES)} (or '{CUSTOM}')")
        for name, lo, hi in (("in_channels", 1, MAX_IO), ("out_channels", 1, MAX_IO), ("ch", 1, MAX_CH),
                             ("num_res_blocks", 1, MAX_RES_BLOCKS), ("latent_channels", 1, MAX_LATENT),
                             ("norm_groups", 1, MAX_CH)):
            _int_in(name, getattr(self, name), lo, hi)
        if self.decoder_ch is not None:
            _int_in("decoder_ch", self.decoder_ch, 1, MAX_CH)
        _int_in("patch_size", self.patch_size, 1, 4)
        _int_in("time_kernel", self.time_kernel, 1, 3)
        if not isinstance(self.ch_mult, tuple) or not 1 <= len(self.ch_mult) <= MAX_LEVELS:
            raise KLVAEError(f"ch_mult {self.ch_mult!r}: expected a tuple of 1 to {MAX_LEVELS} level widths")
        for m in self.ch_mult:
            _int_in("ch_mult entry", m, 1, MAX_WIDTH // self.ch)
        bad = [w for w in self.block_out_channels + self.decoder_block_out_channels if w % self.norm_groups]
        if bad and self.network.group_norms:  # RMS norms (Qwen-Image's) have no groups
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
        if self.network.check is not None:
            self.network.check(self)

    @property
    def network(self) -> Network:
        return NETWORKS[self.arch]

    @property
    def clips(self) -> bool:
        """It takes clips [B, C, T, H, W] (Wan's VAEs): a video network whose config has a time axis
        (Qwen-Image 2.1's 2-D network, on Wan 2.2's, has none: Network.refuse_clip)."""
        refuse = self.network.refuse_clip
        return self.network.video_shaped and (refuse is None or refuse(self, 2) is None)

    @property
    def sample_size(self) -> int:
        """diffusers config.json's sample_size: the family's (512 for a custom VAE)."""
        return FAMILIES[self.family].sample_size if self.family in FAMILIES else 512

    @property
    def downscale(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)

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
    if NETWORKS[f.arch].narrow is not None:
        overrides = NETWORKS[f.arch].narrow(cfg, dict(overrides))
    return replace(cfg, **overrides)
