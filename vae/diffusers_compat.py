"""Everything diffusers-facing: key names, config.json, and the call shapes pipelines use.

klvae's own names are the LDM checkpoint keys (they are the module names in model.py). diffusers
names the same tensors differently; KEY_MAP below is the one table between the two, read in both
directions. diffusers' `config.json` fields map onto VAEConfig (`diffusers_config`, `config_fields`),
and two mixins give klvae's classes what pipelines touch: `vae.config.<any diffusers name>` and
`vae.from_diffusers/to_diffusers/save_pretrained`. This module imports nothing else of klvae but
the error type, so both config.py and autoencoder.py can lean on it.
"""
import json
import math
import re
from typing import NamedTuple

import torch

from .errors import KLVAEError

# -- keys ------------------------------------------------------------------------------------------
# (LDM module path, diffusers module path). {n}: encoder or decoder; {i}: level, counted from the
# highest resolution; {r}: the same decoder level counted from the lowest (diffusers' up_blocks
# order); {m}: mid resnet, 1-based in LDM; {m0}: the same, 0-based.
KEY_MAP = (
    ("{n}.norm_out", "{n}.conv_norm_out"),
    ("encoder.down.{i}.block", "encoder.down_blocks.{i}.resnets"),
    ("encoder.down.{i}.downsample", "encoder.down_blocks.{i}.downsamplers.0"),
    ("decoder.up.{i}.block", "decoder.up_blocks.{r}.resnets"),
    ("decoder.up.{i}.upsample", "decoder.up_blocks.{r}.upsamplers.0"),
    ("{n}.mid.block_{m}", "{n}.mid_block.resnets.{m0}"),
    ("{n}.mid.attn_1.norm", "{n}.mid_block.attentions.0.group_norm"),
    ("{n}.mid.attn_1.q", "{n}.mid_block.attentions.0.to_q"),
    ("{n}.mid.attn_1.k", "{n}.mid_block.attentions.0.to_k"),
    ("{n}.mid.attn_1.v", "{n}.mid_block.attentions.0.to_v"),
    ("{n}.mid.attn_1.proj_out", "{n}.mid_block.attentions.0.to_out.0"),
    ("nin_shortcut", "conv_shortcut"),  # inside any resnet
)
# Older diffusers files name the attention projections differently (same shapes).
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
MAX_LEVELS = 8  # resolution levels a KL VAE may have (released ones: 4)

_GROUP = {"n": r"(?P<n>encoder|decoder)", "i": r"(?P<i>\d+)", "r": r"(?P<r>\d+)", "m": r"(?P<m>\d+)",
          "m0": r"(?P<m0>\d+)"}


def _pattern(template: str) -> re.Pattern:
    body = re.sub(r"\\\{(\w+)\\\}", lambda g: _GROUP[g[1]], re.escape(template))
    return re.compile(r"(^|\.)" + body + r"(?=\.)")


_RULES = [(_pattern(ldm), ldm, _pattern(dif), dif) for ldm, dif in KEY_MAP]


def _rename(key: str, levels: int, to_diffusers: bool) -> str:
    for ldm_re, ldm, dif_re, dif in _RULES:
        src, dst = (ldm_re, dif) if to_diffusers else (dif_re, ldm)
        m = src.search(key)
        if m is None:
            continue
        g = {k: v for k, v in m.groupdict().items() if v is not None}
        if "i" in g:
            g["r"] = str(levels - 1 - int(g["i"]))
        elif "r" in g:
            g["i"] = str(levels - 1 - int(g["r"]))
        if "m" in g:
            g["m0"] = str(int(g["m"]) - 1)
        elif "m0" in g:
            g["m"] = str(int(g["m0"]) + 1)
        key = key[:m.start()] + m[1] + dst.format(**g) + key[m.end():]
    return key


def levels_of(keys, layout: str) -> int:
    """How many resolution levels the encoder of a key set has (LDM or diffusers names)."""
    pat = re.compile(r"^encoder\.down\.(\d+)\." if layout == "ldm" else r"^encoder\.down_blocks\.(\d+)\.")
    found = {int(m[1]) for k in keys if (m := pat.match(k))}
    if found and max(found) >= MAX_LEVELS:
        raise KLVAEError(f"key encoder level {max(found)} is out of range: a KL VAE has at most {MAX_LEVELS} "
                         f"resolution levels (released ones have 4); the file is damaged or not a KL VAE")
    return max(found) + 1 if found else 0


def is_diffusers_layout(keys) -> bool:
    return any(("down_blocks." in k or "up_blocks." in k or "mid_block." in k) for k in keys)


def diffusers_key_to_ldm(key: str, levels: int) -> str:
    for old, new in LEGACY_ATTENTION.items():
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return _rename(key, levels, to_diffusers=False)


def ldm_key_to_diffusers(key: str, levels: int) -> str:
    return _rename(key, levels, to_diffusers=True)


def is_attention_projection(ldm_key: str) -> bool:
    """1x1 convs in LDM files, Linear ([C, C]) in diffusers files."""
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


def ldm_to_diffusers(sd: dict, arch: str = "sd") -> dict:
    """A state dict with klvae's keys -> diffusers' (SD-style: attention projections as Linear [C, C];
    another network: its own map, registered by its model file)."""
    return DIFFUSERS_NAMES[arch].to_diffusers(sd)


def sd_to_diffusers(sd: dict) -> dict:
    levels = levels_of(sd, "ldm")
    return {ldm_key_to_diffusers(k, levels): v.reshape(v.shape[:2]) if is_attention_projection(k) else v
            for k, v in sd.items()}


class ArchNames(NamedTuple):
    """What diffusers calls a family's network: its class, its config.json, its keys both ways."""
    classes: tuple                # diffusers class names a folder's config.json may give
    config: object                # cfg -> config.json dict
    to_diffusers: object          # state dict with klvae's keys -> diffusers' keys
    from_diffusers: object        # the inverse
    read: object = None           # cfg -> config names pipelines read that config.json does not hold


# Each network's diffusers side, by network name: the SD-style one's is this module's own (below);
# another network's comes with its model file (config.register).
DIFFUSERS_NAMES = {}


def register_arch(arch: str, names: ArchNames) -> None:
    DIFFUSERS_NAMES[arch] = names


# -- config.json -----------------------------------------------------------------------------------
def diffusers_config(cfg) -> dict:
    """The config.json diffusers.AutoencoderKL.from_pretrained needs, scale and shift included
    (AutoencoderKLFlux2's for a VAE with a latent BatchNorm: no scale or shift, the BatchNorm's eps;
    another network's own class and config)."""
    return DIFFUSERS_NAMES[getattr(cfg, "arch", "sd")].config(cfg)


def sd_config(cfg) -> dict:
    n = len(cfg.ch_mult)
    if cfg.batch_norm:
        return {"_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "in_channels": cfg.in_channels,
                "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
                "block_out_channels": list(cfg.block_out_channels),
                "decoder_block_out_channels": list(cfg.decoder_block_out_channels) if cfg.decoder_ch else None,
                "layers_per_block": cfg.num_res_blocks, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, "norm_num_groups": cfg.norm_groups, "sample_size": 1024,
                "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
                "mid_block_add_attention": True, "batch_norm_eps": cfg.batch_norm_eps, "batch_norm_momentum": 0.1,
                "patch_size": [2, 2]}
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "norm_num_groups": cfg.norm_groups, "sample_size": cfg.sample_size,
            "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor if cfg.shift_factor else None,
            "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
            "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
            "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
            "force_upcast": cfg.force_upcast,
            "mid_block_add_attention": True}


# The SD-style network's diffusers side (model.py registers it with its Network).
SD_NAMES = ArchNames(("AutoencoderKL", "AutoencoderKLFlux2"), sd_config, sd_to_diffusers, None)


def read_config_json(path) -> dict:
    """A diffusers config.json as a dict, or one clear error (not JSON, not UTF-8, not an object)."""
    try:
        text = path.read_bytes().decode("utf-8")
        cfg = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KLVAEError(f"{path} is not a readable JSON config ({type(e).__name__}: {str(e)[:80]}): "
                         f"restore the folder's config.json from its source") from e
    if not isinstance(cfg, dict):
        raise KLVAEError(f"{path} holds a JSON {type(cfg).__name__}, not an object of settings: "
                         f"restore the folder's config.json from its source")
    return cfg


def config_fields(dc: dict, latent_channels: int | None = None) -> dict:
    """VAEConfig fields a diffusers config states (scale, shift, groups, latent statistics, upcast),
    each checked for its type; ranges are checked by VAEConfig itself."""
    out = {}
    if "scaling_factor" in dc:
        out["scaling_factor"] = number(dc["scaling_factor"], "config.json scaling_factor")
    if dc.get("shift_factor") is not None:
        out["shift_factor"] = number(dc["shift_factor"], "config.json shift_factor")
    if dc.get("norm_num_groups") is not None:
        out["norm_groups"] = integer(dc["norm_num_groups"], "config.json norm_num_groups")
    for k in ("latents_mean", "latents_std"):
        if dc.get(k) is not None:
            out[k] = vector(dc[k], f"config.json {k}", latent_channels)
    if dc.get("force_upcast") is not None:
        out["force_upcast"] = flag(dc["force_upcast"], "config.json force_upcast")
    if dc.get("batch_norm_eps") is not None:
        out["batch_norm_eps"] = number(dc["batch_norm_eps"], "config.json batch_norm_eps")
    ps = dc.get("patch_size")
    if ps is not None and ps != 2 and not (isinstance(ps, (list, tuple)) and list(ps) == [2, 2]):
        raise KLVAEError(f"config.json patch_size is {str(dc['patch_size'])[:20]}: klvae reads Flux.2's 2x2 patches only")
    return out


# Strict readers for values that arrive from files: JSON values, or strings in safetensors metadata.
def number(v, where: str) -> float:
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise KLVAEError(f"{where} is {v[:40]!r}, not a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise KLVAEError(f"{where} is {str(v)[:40]!r}: expected a finite number")
    return float(v)


def integer(v, where: str) -> int:
    if isinstance(v, str) and re.fullmatch(r"-?\d{1,9}", v.strip()):
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise KLVAEError(f"{where} is {str(v)[:40]!r}: expected a whole number")
    return v


def flag(v, where: str) -> bool:
    if isinstance(v, str) and v.lower() in ("true", "false"):
        v = v.lower() == "true"
    if not isinstance(v, bool):
        raise KLVAEError(f"{where} is {str(v)[:40]!r}: expected true or false")
    return v


def vector(v, where: str, length: int | None) -> tuple:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            raise KLVAEError(f"{where} is {v[:40]!r}, not a JSON list of numbers") from None
    if not isinstance(v, (list, tuple)):
        raise KLVAEError(f"{where} is {str(v)[:40]!r}: expected a list of numbers, one per latent channel")
    if length is not None and len(v) != length:
        raise KLVAEError(f"{where} has {len(v)} values: expected {length}, one per latent channel")
    return tuple(number(x, f"{where}[{i}]") for i, x in enumerate(v))


# -- what pipelines touch --------------------------------------------------------------------------
class DiffusersNames:
    """`vae.config.<name>` and `vae.config["<name>"]` for every diffusers config name (pipelines
    read scaling_factor, shift_factor, latents_mean, force_upcast, block_out_channels...)."""

    def __getattr__(self, name):
        # Only names the class lacks arrive here; its own fields never recurse into this.
        if name.startswith("_") or name in getattr(type(self), "__dataclass_fields__", ()):
            raise AttributeError(name)
        d = diffusers_config(self)
        if name in d:
            return d[name]
        read = DIFFUSERS_NAMES[getattr(self, "arch", "sd")].read
        if read is not None and name in (extra := read(self)):
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __getitem__(self, name):
        try:
            return getattr(self, name)
        except AttributeError:
            raise KeyError(name) from None

    def get(self, name, default=None):
        return getattr(self, name, default)


class Decoded(torch.Tensor):
    """What decode(z) returns: the pixels, a plain tensor in every use (klvae's API), that also
    answers `.sample` as diffusers' DecoderOutput does (`vae.decode(z / scale).sample` in scripts
    written for diffusers). Operations on it give plain tensors."""
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def sample(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    def __reduce_ex__(self, protocol):
        # torch.save(vae.decode(z)) writes a plain tensor: torch.load(weights_only=True) reads it
        # back without this class
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)


class DecoderOutput(NamedTuple):
    """decode(..., return_dict=True): `.sample` and `[0]` both give the pixels, as diffusers' DecoderOutput."""
    sample: torch.Tensor


class DiffusersVAE:
    """Conversions between klvae's AutoencoderKL and diffusers.AutoencoderKL, the folder format, and
    the hooks diffusers' model offloading attaches. Relies on the host class's `load(src, device,
    dtype, config_json=...)`, `state_dict(layout=)` and `save(path, layout=)`."""

    def _offload_hook(self) -> None:
        """What diffusers' @apply_forward_hook does before encode/decode: a pipeline's
        enable_model_cpu_offload() attaches an accelerate hook (`_hf_hook`) that moves the model to
        the execution device when it is about to be used."""
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)

    @classmethod
    def from_diffusers(cls, dvae, device=None, dtype=None):
        """A klvae copy of a diffusers.AutoencoderKL: every weight, its config (scale, shift,
        latents_mean/std, force_upcast), its device and dtype unless given."""
        return cls.load(dvae.state_dict(), device=device or dvae.device, dtype=dtype or dvae.dtype,
                        config_json=dict(dvae.config), name=f"diffusers {type(dvae).__name__}")

    def to_diffusers(self):
        """A diffusers.AutoencoderKL (AutoencoderKLFlux2 for Flux.2) with the same weights (bit-exact)
        and config, offline."""
        import diffusers  # optional dependency

        cfg = diffusers_config(self.config)
        cls = getattr(diffusers, cfg["_class_name"])
        with torch.device("meta"):
            d = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        sd = {k: v.contiguous() for k, v in self.state_dict(layout="diffusers").items()}
        d.load_state_dict(sd, strict=True, assign=True)
        return d.eval().requires_grad_(False)

    def save_pretrained(self, folder, **_ignored) -> None:
        """A diffusers folder (config.json + diffusion_pytorch_model.safetensors); what a
        pipeline's save_pretrained calls on its components."""
        self.save(folder, layout="diffusers")


# -- whole pipelines ------------------------------------------------------------------------------
# diffusers type-checks the components `from_pretrained` is given (only its own ModelMixin
# subclasses pass: pipeline_loading_utils.maybe_raise_or_warn) and saves only those (anything else
# is skipped with a warning and recorded as `vae: [null, null]`, losing the VAE). klvae's VAE is
# not a diffusers class, so these two functions do what a user of diffusers expects instead.
def load_pipeline(folder, vae, pipeline_class=None, **kwargs):
    """DiffusionPipeline.from_pretrained(folder, vae=vae) for a klvae VAE: the pipeline is loaded
    without its own VAE (never read from disk), then given `vae`."""
    if pipeline_class is None:
        from diffusers import DiffusionPipeline as pipeline_class  # optional dependency
    pipe = pipeline_class.from_pretrained(folder, vae=None, **kwargs)
    pipe.vae = vae
    return pipe


def save_pipeline(pipe, folder, **kwargs) -> None:
    """pipe.save_pretrained(folder) for a pipeline whose vae is klvae's: the VAE is saved as the
    diffusers class it converts to (weights shared, not copied), so the folder loads back in plain
    diffusers, `vae/` included. The pipeline keeps its klvae VAE."""
    vae = pipe.vae
    pipe.vae = vae.to_diffusers()
    try:
        pipe.save_pretrained(folder, **kwargs)
    finally:
        pipe.vae = vae
