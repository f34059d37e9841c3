"""Reading and writing the VAE files users have.

What arrives in practice:
- a lone VAE in the LDM/ComfyUI layout (`encoder.down.0.block.0.norm1.weight`, 1x1-conv attention),
- a lone VAE in the diffusers layout (`encoder.down_blocks.0.resnets.0...`, Linear attention
  `to_q` or, in older files, `query/key/value/proj_attn`; decoder `up_blocks` in reverse order),
- a whole checkpoint whose VAE sits under `first_stage_model.` (LDM) or `vae.` (some trainers),
- a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline's `vae/`),
- .safetensors (memory-mapped, only the VAE tensors are read) or .ckpt/.pt/.bin (weights_only).

The config is read from tensor shapes; the family (scale, shift) from file metadata, a diffusers
config.json or the file name, and when none says, the ambiguity is reported, never hidden.
Tensors are converted to the target dtype one at a time and assigned into a model built on the
meta device, so the weights exist once in memory.
"""
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import FAMILIES, VAEConfig
from .errors import KLVAEError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
PREFIXES = ("first_stage_model.", "vae.")
IGNORED = ("loss.", "model_ema.")  # training leftovers in original LDM VAE checkpoints (discriminator, LPIPS)


# --------------------------------------------------------------------------------------------
# Sources: one interface over safetensors handles, pickled state dicts and in-memory dicts.
# --------------------------------------------------------------------------------------------
class Source:
    """Keys, shapes and lazy tensor access for one weights file (or dict), plus what it says of itself."""

    def __init__(self, name, keys, shape, get, metadata=None, diffusers_config=None):
        self.name, self.keys, self.shape, self.get = name, list(keys), shape, get
        self.metadata = metadata or {}
        self.diffusers_config = diffusers_config


def source_from_dict(sd: dict, name="state dict", metadata=None) -> Source:
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # Lightning-style .ckpt
        sd = sd["state_dict"]
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    return Source(name, sd.keys(), lambda k: tuple(sd[k].shape), sd.__getitem__, metadata)


def _safetensors(path: Path) -> Source:
    try:
        f = safe_open(str(path), framework="pt", device="cpu")  # mmap: nothing is read until get_tensor
        keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise KLVAEError(f"{path.name} is not a readable .safetensors file ({str(e).splitlines()[0]}): "
                         f"it is probably truncated or corrupt; download it again") from None
    return Source(path.name, keys, lambda k: tuple(f.get_slice(k).get_shape()), f.get_tensor,
                  f.metadata() or {})


def _pickle(path: Path) -> Source:
    try:
        # weights_only: tensors, dicts and numbers only; never arbitrary objects. mmap avoids a copy.
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:120]
        raise KLVAEError(f"{path.name} holds pickled Python objects, not just tensors ({first}); klvae never "
                         f"unpickles arbitrary code: convert it to .safetensors with a tool you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise KLVAEError(f"{path.name} could not be read as a PyTorch checkpoint ({str(e).splitlines()[0][:100]}): "
                         f"it is probably truncated or corrupt; download it again") from None
    if not isinstance(sd, dict):
        raise KLVAEError(f"{path.name} holds a {type(sd).__name__}, not a state dict of tensors: "
                         f"save the VAE's state_dict() instead")
    return source_from_dict(sd, path.name)


def _diffusers_folder(path: Path) -> Source:
    if (path / "vae" / "config.json").exists():  # a whole pipeline folder: take its VAE
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise KLVAEError(f"folder {path} has no config.json: pass a diffusers VAE folder or a weights file")
    cfg = json.loads(cfg_file.read_text())
    cls = cfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise KLVAEError(f"{path} holds a diffusers {cls}, not an AutoencoderKL: klvae loads KL autoencoders "
                         f"(SD1.x/2.x, SDXL, SD3, Flux.1)")
    for name in WEIGHT_NAMES:
        if (path / name).exists():
            src = open_path(path / name)
            src.diffusers_config = cfg
            src.name = f"{path.name}/{name}"
            return src
    raise KLVAEError(f"{path} has a config.json but no weights ({WEIGHT_NAMES[0]}): copy the weights next to it")


def open_path(path) -> Source:
    path = Path(path)
    if not path.exists():
        raise KLVAEError(f"no such file: {path}")
    if path.is_dir():
        return _diffusers_folder(path)
    if path.stat().st_size == 0:
        raise KLVAEError(f"{path.name} is empty (0 bytes): the download failed; download it again")
    with open(path, "rb") as fh:
        head = fh.read(8)
    # safetensors begin with a little-endian header length; zip (torch.save) with PK; old pickles with 0x80.
    if path.suffix == ".safetensors" or (head[:2] not in (b"PK",) and head[:1] != b"\x80"):
        return _safetensors(path)
    return _pickle(path)


# --------------------------------------------------------------------------------------------
# Finding the VAE inside, and telling the user what a non-VAE file is instead.
# --------------------------------------------------------------------------------------------
def what_is_it(keys) -> str:
    """A best guess at what a file that is not a KL VAE holds, for the error message."""
    ks = list(keys)
    if not ks:
        return "no tensors at all"
    has = lambda *subs: any(any(s in k for s in subs) for k in ks)
    if has("taesd") or (has("decoder.layers.", "encoder.layers.")) or all(k.split(".")[0].isdigit() for k in ks):
        return "a TAESD (tiny autoencoder), which has no posterior; use it with a TAESD loader"
    if has("model.diffusion_model."):
        return "a diffusion model checkpoint without VAE weights"
    if has("double_blocks.", "single_blocks."):
        return "a Flux transformer (diffusion model), not a VAE"
    if has("joint_blocks."):
        return "an SD3 MMDiT (diffusion model), not a VAE"
    if has("input_blocks.", "time_embed.", "time_embedding.", "down_blocks.0.attentions."):
        return "a UNet (diffusion model), not a VAE"
    if has("lora_down", "lora_up", "lora_A", "lora_B"):
        return "a LoRA, not a VAE"
    if has("text_model.", "transformer.resblocks.", "shared.weight", "encoder.block.0.layer"):
        return "a text encoder (CLIP/T5), not a VAE"
    if has("temporal", "time_mix", "conv_in.conv.weight", "res_blocks."):
        return "a video VAE, which klvae does not load (it loads 2-D KL autoencoders)"
    return f"an unrecognised model (first keys: {', '.join(ks[:3])})"


def find_prefix(src: Source) -> str:
    """'' for a lone VAE, 'first_stage_model.' or 'vae.' inside a whole checkpoint."""
    keys = set(src.keys)
    for p in ("",) + PREFIXES:
        conv_in = [p + k for k in ("encoder.conv_in.weight", "decoder.conv_in.weight") if p + k in keys]
        if conv_in:
            if len(src.shape(conv_in[0])) == 5:
                raise KLVAEError(f"{src.name} is a video VAE (3-D convolutions), which klvae does not load: "
                                 f"use a 2-D KL autoencoder (SD1.x/2.x, SDXL, SD3, Flux.1)")
            return p
    raise KLVAEError(f"{src.name} is not a VAE: it looks like {what_is_it(src.keys)}")


# --------------------------------------------------------------------------------------------
# Key layouts. LDM names are canonical (they are our module names); diffusers names map onto them.
# --------------------------------------------------------------------------------------------
_ATTN_D2L = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k", "to_v": "v",
             "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_ATTN_L2D = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def is_diffusers_layout(keys) -> bool:
    return any(("down_blocks." in k or "up_blocks." in k or "mid_block." in k) for k in keys)


def diffusers_key_to_ldm(k: str, levels: int) -> str:
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    # diffusers counts decoder levels from the lowest resolution, LDM from the highest.
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)\.",
               lambda m: f"{m[1]}.mid.attn_1.{_ATTN_D2L[m[2]]}.", k)
    return k.replace(".conv_shortcut.", ".nin_shortcut.")


def ldm_key_to_diffusers(k: str, levels: int) -> str:
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
               lambda m: f"{m[1]}.mid_block.attentions.0.{_ATTN_L2D[m[2]]}.", k)
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def _is_attn_proj(ldm_key: str) -> bool:
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key) is not None


def _levels(keys, pattern) -> int:
    found = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def ldm_to_diffusers(sd: dict) -> dict:
    """LDM-keyed state dict -> diffusers-keyed (attention projections as Linear [C, C])."""
    levels = _levels(sd, r"^encoder\.down\.(\d+)\.")
    out = {}
    for k, v in sd.items():
        out[ldm_key_to_diffusers(k, levels)] = v.reshape(v.shape[:2]) if _is_attn_proj(k) else v
    return out


# --------------------------------------------------------------------------------------------
# Config from shapes, family from what the file says about itself.
# --------------------------------------------------------------------------------------------
def infer_config(shape, keys, hints=(), scale_shift=None, norm_groups=None) -> VAEConfig:
    """VAEConfig from LDM-named tensor shapes. `hints`: (family, where-from) pairs, strongest first."""
    need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "encoder.conv_out.weight"]
    missing = [k for k in need if k not in keys]
    if missing:
        raise KLVAEError(f"VAE weights incomplete: missing {', '.join(missing[:3])}: "
                         f"the file holds only part of a VAE (an encoder- or decoder-only file?)")
    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    levels = _levels(keys, r"^encoder\.down\.(\d+)\.")
    ch_mult = tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels))
    num_res = _levels(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
    dec_res = _levels(keys, r"^decoder\.up\.0\.block\.(\d+)\.")
    if dec_res != num_res + 1:
        raise KLVAEError(f"decoder has {dec_res} resnet blocks per level, encoder {num_res}: not an "
                         f"LDM-style KL autoencoder (expected decoder = encoder + 1)")
    z = shape("decoder.conv_in.weight")[1]
    # GroupNorm's group count leaves no trace in the shapes: 32 in every released VAE, otherwise
    # stated by the file (klvae metadata, diffusers norm_num_groups).
    groups = int(norm_groups or 32)
    if ch % groups:
        raise KLVAEError(f"{ch} channels cannot be split into {groups} GroupNorm groups: the file's "
                         f"norm_num_groups metadata is wrong or the weights are not a KL VAE")
    cfg = VAEConfig(family="custom", in_channels=in_ch, out_channels=shape("decoder.conv_out.weight")[0],
                    ch=ch, ch_mult=ch_mult, num_res_blocks=num_res, latent_channels=z, norm_groups=groups,
                    use_quant_conv="quant_conv.weight" in keys, use_post_quant_conv="post_quant_conv.weight" in keys,
                    scaling_factor=1.0, shift_factor=0.0)
    candidates = [f for f, spec in FAMILIES.items() if spec.latent_channels == z and spec.quant_conv == cfg.use_quant_conv]
    notes = []
    for fam, where in hints:
        if fam in candidates or (fam and fam not in FAMILIES and scale_shift):
            cfg = cfg.with_family(fam) if fam in FAMILIES else replace(cfg, family=fam)
            notes.append(f"family {fam} from {where}")
            break
    else:
        if candidates:
            cfg = cfg.with_family(candidates[0])
            if len(candidates) > 1:
                msg = (f"shapes fit {' and '.join(candidates)} equally; assumed {candidates[0]} "
                       f"(pass family='{candidates[1]}' if that is what it is)")
                notes.append("ambiguous: " + msg)
                if scale_shift is None:  # the file states its scale: the family only names it then
                    warnings.warn(f"klvae: family ambiguous: {msg}", stacklevel=3)
            else:
                notes.append(f"family {candidates[0]} from tensor shapes")
        else:
            notes.append(f"no released family has {z} latent channels with quant_conv={cfg.use_quant_conv}; "
                         f"scale 1.0, shift 0.0 unless the file says otherwise")
    if scale_shift is not None:  # a diffusers config.json or klvae metadata is authoritative for these
        cfg = replace(cfg, scaling_factor=float(scale_shift[0]), shift_factor=float(scale_shift[1] or 0.0))
    return replace(cfg, notes=tuple(notes))


def family_hints(src: Source, explicit=None):
    """(family, where-from) pairs, strongest first, plus (scale, shift) when the file states them."""
    hints, scale_shift = [], None
    if explicit:
        if explicit not in FAMILIES:
            raise KLVAEError(f"unknown family {explicit!r}: use one of {', '.join(FAMILIES)}")
        hints.append((explicit, "the family argument"))
    md = src.metadata
    if "klvae.family" in md:
        hints.append((md["klvae.family"], "klvae metadata"))
        if "klvae.scaling_factor" in md and not explicit:
            scale_shift = (float(md["klvae.scaling_factor"]), float(md.get("klvae.shift_factor", 0.0)))
    arch = (md.get("modelspec.architecture", "") + " " + md.get("ss_base_model_version", "")).lower()
    for word, fam in (("flux", "flux"), ("sd3", "sd3"), ("stable-diffusion-3", "sd3"), ("xl", "sdxl"),
                      ("stable-diffusion-v1", "sd1"), ("sd_v1", "sd1"), ("v2", "sd1")):
        if word in arch:
            hints.append((fam, "file metadata"))
            break
    dc = src.diffusers_config
    if dc and "scaling_factor" in dc:
        s, sh = float(dc["scaling_factor"]), float(dc.get("shift_factor") or 0.0)
        for fam, spec in FAMILIES.items():
            if abs(spec.scaling_factor - s) < 1e-4 and abs(spec.shift_factor - sh) < 1e-4:
                hints.append((fam, "config.json scaling_factor"))
        if not explicit:
            scale_shift = (s, sh)
    name = src.name.lower()
    for pattern, fam in ((r"flux|(^|/)ae\.safetensors", "flux"), (r"sd3|sd35|sd_3", "sd3"),
                         (r"sdxl|(^|[^a-z])xl([^a-z]|$)|pony|illustrious", "sdxl"),
                         (r"sd15|sd-?1|sd_?v?1|sd2|vae-ft-(mse|ema)|kl-f8|orangemix|anything", "sd1")):
        if re.search(pattern, name):
            hints.append((fam, "the file name"))
            break
    return hints, scale_shift


# --------------------------------------------------------------------------------------------
# Loading and saving.
# --------------------------------------------------------------------------------------------
def load_vae(src, device="cpu", dtype="auto", family: str | None = None):
    """A ready AutoencoderKL (eval, no grad) from a path, a diffusers folder or a state dict."""
    from .autoencoder import AutoencoderKL
    from .precision import resolve_device, resolve_dtype

    source = src if isinstance(src, Source) else source_from_dict(src) if isinstance(src, dict) else open_path(src)
    prefix = find_prefix(source)
    raw_keys = [k for k in source.keys if k.startswith(prefix) and not k[len(prefix):].startswith(IGNORED)]
    sub = [k[len(prefix):] for k in raw_keys]
    if is_diffusers_layout(sub):
        levels = _levels(sub, r"^encoder\.down_blocks\.(\d+)\.")
        names = {diffusers_key_to_ldm(k, levels): full for k, full in zip(sub, raw_keys)}
        layout = "diffusers"
    else:
        names = dict(zip(sub, raw_keys))
        layout = "ldm"
    hints, scale_shift = family_hints(source, family)
    groups = source.metadata.get("klvae.norm_groups") or (source.diffusers_config or {}).get("norm_num_groups")
    cfg = infer_config(lambda k: source.shape(names[k]), names.keys(), hints, scale_shift, groups)
    cfg = replace(cfg, **extra_config(source))

    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - names.keys()), sorted(names.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise KLVAEError(f"{source.name}: VAE keys do not match a KL autoencoder: {'; '.join(parts)}: "
                         f"the file is damaged or from another architecture")

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    ref = model.state_dict()
    sd = {}
    for k, full in names.items():
        t = source.get(full)
        if _is_attn_proj(k) and t.dim() == 2:
            t = t[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        if tuple(t.shape) != tuple(ref[k].shape):
            raise KLVAEError(f"{source.name}: {full} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}: "
                             f"the file mixes VAEs of different widths or is damaged")
        # One tensor at a time to the target dtype/device: the model's weights exist once.
        sd[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    # channels_last: oneDNN and cuDNN convolve NHWC without reordering copies (measured on this
    # CPU, SD decode at 512x512: 0.64 GiB peak instead of 1.08, and 8% faster).
    model.to(memory_format=torch.channels_last).requires_grad_(False).eval()
    model.source_layout, model.source_name = layout, source.name
    return model


EXTRA_CONFIG = ("latents_mean", "latents_std", "force_upcast")  # kept as the file states them


def extra_config(source: Source) -> dict:
    """latents_mean/std and force_upcast from a diffusers config or klvae metadata."""
    out = {}
    for k in EXTRA_CONFIG:
        v = (source.diffusers_config or {}).get(k)
        if v is None and f"klvae.{k}" in source.metadata:
            v = json.loads(source.metadata[f"klvae.{k}"])
        if v is not None:
            out[k] = tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else bool(v)
    return out


def diffusers_config(cfg: VAEConfig) -> dict:
    """The config.json diffusers.AutoencoderKL.from_pretrained needs, scale and shift included."""
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "norm_num_groups": cfg.norm_groups, "sample_size": 512 if cfg.family != "sdxl" else 1024,
            "scaling_factor": cfg.scaling_factor,
            "shift_factor": cfg.shift_factor if cfg.shift_factor else None,
            "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
            "latents_mean": list(cfg.latents_mean) if cfg.latents_mean is not None else None,
            "latents_std": list(cfg.latents_std) if cfg.latents_std is not None else None,
            "force_upcast": cfg.force_upcast,
            "mid_block_add_attention": True}


def save_vae(model, path, layout: str = "ldm") -> None:
    """LDM or diffusers keys in a .safetensors file; a diffusers folder when `path` has no suffix."""
    cfg = model.config
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict(layout=layout).items()}
    meta = {"klvae.family": cfg.family, "klvae.scaling_factor": repr(cfg.scaling_factor),
            "klvae.shift_factor": repr(cfg.shift_factor), "klvae.layout": layout,
            "klvae.norm_groups": str(cfg.norm_groups)}
    for k in EXTRA_CONFIG:
        if getattr(cfg, k) is not None:
            meta[f"klvae.{k}"] = json.dumps(list(v) if isinstance(v := getattr(cfg, k), tuple) else v)
    path = Path(path)
    if layout == "diffusers" and path.suffix == "":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
        save_file(sd, str(path / WEIGHT_NAMES[0]), metadata=meta)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata=meta)
