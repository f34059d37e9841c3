"""VAEConfig: the shape of a KL autoencoder, and the four families that share one architecture.

The numbers come from the released VAEs (LDM `first_stage_config`, diffusers `config.json`):
SD1.x/2.x and SDXL are 4-channel with quant convs, SD3 and Flux.1 are 16-channel without them.
SD1.x and SDXL have identical tensor shapes; only metadata or a file name can tell them apart.
"""
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Family:
    name: str
    latent_channels: int
    scaling_factor: float
    shift_factor: float
    quant_conv: bool
    note: str = ""
    force_upcast: bool = False  # diffusers pipelines run it in fp32 when given fp16


FAMILIES = {
    "sd1": Family("sd1", 4, 0.18215, 0.0, True, "Stable Diffusion 1.x/2.x"),
    "sdxl": Family("sdxl", 4, 0.13025, 0.0, True, "SDXL (overflows fp16 in the decoder)", True),
    "sd3": Family("sd3", 16, 1.5305, 0.0609, False, "Stable Diffusion 3 / 3.5"),
    "flux": Family("flux", 16, 0.3611, 0.1159, False, "Flux.1"),
}
# Which family a latent channel count suggests, for error messages.
FAMILIES_BY_CHANNELS = {4: "sd1/sdxl", 16: "sd3/flux", 8: "a video/other VAE", 32: "a DC-AE or video VAE"}


@dataclass(frozen=True)
class VAEConfig:
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
    notes: tuple = field(default=(), compare=False)  # how the config was inferred (for `info`)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def block_out_channels(self) -> tuple:
        return tuple(self.ch * m for m in self.ch_mult)

    # -- diffusers' names, so `vae.config` reads like diffusers.AutoencoderKL's in pipelines ------
    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        from .checkpoint import diffusers_config
        d = diffusers_config(self)
        if name in d:
            return d[name]
        raise AttributeError(f"VAEConfig has no attribute {name!r}")

    def __getitem__(self, name):
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name, default=None):
        return getattr(self, name, default)

    def with_family(self, family: str) -> "VAEConfig":
        f = FAMILIES[family]
        return replace(self, family=family, scaling_factor=f.scaling_factor, shift_factor=f.shift_factor,
                       force_upcast=f.force_upcast)


def preset(family: str, **overrides) -> VAEConfig:
    """The released configuration of a family (full width), optionally narrowed by overrides."""
    f = FAMILIES[family]
    cfg = VAEConfig(family=family, latent_channels=f.latent_channels, use_quant_conv=f.quant_conv,
                    use_post_quant_conv=f.quant_conv, scaling_factor=f.scaling_factor,
                    shift_factor=f.shift_factor, force_upcast=f.force_upcast)
    return replace(cfg, **overrides)
