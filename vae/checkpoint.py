"""Reading and writing the VAE files users have, and checking everything they say.

What arrives in practice:
- a lone VAE in the LDM/ComfyUI layout (`encoder.down.0.block.0.norm1.weight`, 1x1-conv attention),
- a lone VAE in the diffusers layout (`encoder.down_blocks.0.resnets.0...`, Linear attention
  `to_q` or, in older files, `query/key/value/proj_attn`; decoder `up_blocks` in reverse order),
- a whole checkpoint whose VAE sits under `first_stage_model.` (LDM) or `vae.` (some trainers),
- a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline's `vae/`),
- .safetensors (memory-mapped, only the VAE tensors are read) or .ckpt/.pt/.bin (weights_only).

Files come from anywhere and are read inside long-running servers, so everything a file says is
checked before it is used: parser failures (safetensors, pickle/zip, JSON, the OS) become one
`KLVAEError` line with the original exception chained; key indices, shapes, dtypes and metadata
are bounded (a 40-byte edit must not make the loader build 10^8 blocks); weights must be finite
floats that fit the requested dtype. The config is read from tensor shapes; the family (scale,
shift) from file metadata, a diffusers config.json or the file name, and when none says, the
ambiguity is reported, never hidden.
"""
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CUSTOM, FAMILIES, FLOATS, NETWORKS, VAEConfig, family_titles
from .diffusers_compat import (DIFFUSERS_NAMES, config_fields, diffusers_config, diffusers_key_to_ldm, flag, integer,
                               is_attention_projection, is_diffusers_layout, levels_of, number,
                               read_config_json, vector)
from .errors import KLVAEError

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
PREFIXES = ("first_stage_model.", "vae.")
IGNORED = ("loss.", "model_ema.")  # training leftovers in original LDM VAE checkpoints (discriminator, LPIPS)
MAX_INDEX = 64  # no index in a KL VAE key goes near this (levels <= 8, blocks per level <= 9)
FP16_MAX = 65504.0
# The common image formats' first bytes, which as a safetensors header length would be a gigabyte or
# more (BMP's "BM" is left out: as a length it is a plausible 19778 bytes). WebP: RIFF....WEBP, below.
IMAGE_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"))


def _first_line(e: BaseException, n=100) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:n]


# --------------------------------------------------------------------------------------------
# Sources: one interface over safetensors handles, pickled state dicts and in-memory dicts.
# --------------------------------------------------------------------------------------------
class Source:
    """Keys, shapes and lazy tensor access for one weights file (or dict), plus what it says of itself."""

    def __init__(self, name, keys, shape, get, metadata=None, config_json=None):
        self.name, self.keys, self.shape, self.get = name, list(keys), shape, get
        self.metadata = metadata or {}
        self.config_json = config_json


def source_from_dict(sd: dict, name="state dict", metadata=None) -> Source:
    if isinstance(sd.get("state_dict"), dict):  # Lightning-style .ckpt
        sd = sd["state_dict"]
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise KLVAEError(f"{name} has a key {str(bad[0])[:40]!r} of type {type(bad[0]).__name__}: a state dict's keys "
                         f"are strings; this is not a saved state dict")
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    return Source(name, sd.keys(), lambda k: tuple(sd[k].shape), sd.__getitem__, metadata)


def unreadable(path: Path, e: BaseException) -> KLVAEError:
    return KLVAEError(f"{path.name} is not a readable .safetensors file ({_first_line(e)}): it is probably "
                      f"truncated or corrupt; download it again")


def _safetensors(path: Path) -> Source:
    try:
        f = safe_open(str(path), framework="pt", device="cpu")  # mmap: nothing is read until get_tensor
        keys = list(f.keys())
        metadata = f.metadata() or {}
    except Exception as e:  # the safetensors parser's errors (SafetensorError, OSError, ...)
        raise unreadable(path, e) from e

    def shape(k):
        try:
            return tuple(f.get_slice(k).get_shape())
        except Exception as e:
            raise KLVAEError(f"{path.name}: tensor {k} cannot be read ({_first_line(e)}): the file is corrupt") from e

    def get(k):
        try:
            return f.get_tensor(k)
        except Exception as e:
            raise KLVAEError(f"{path.name}: tensor {k} cannot be read ({_first_line(e)}): the file is truncated "
                             f"or corrupt; download it again") from e
    return Source(path.name, keys, shape, get, metadata)


def _pickle(path: Path) -> Source:
    try:
        mmap = zipfile.is_zipfile(path)
        # weights_only: tensors, dicts and numbers only; never arbitrary objects. mmap avoids a copy.
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise KLVAEError(f"{path.name} holds pickled Python objects, not just tensors ({_first_line(e, 120)}); "
                         f"klvae never unpickles arbitrary code: convert it to .safetensors with a tool you "
                         f"trust") from e
    except Exception as e:  # anything torch.load's zip/pickle readers raise on a damaged file
        raise KLVAEError(f"{path.name} could not be read as a PyTorch checkpoint ({type(e).__name__}: "
                         f"{_first_line(e)}): it is probably truncated or corrupt; download it again") from e
    if not isinstance(sd, dict):
        raise KLVAEError(f"{path.name} holds a {type(sd).__name__}, not a state dict of tensors: "
                         f"save the VAE's state_dict() instead")
    return source_from_dict(sd, path.name)


def _diffusers_folder(path: Path) -> Source:
    if (path / "vae" / "config.json").is_file():  # a whole pipeline folder: take its VAE
        path = path / "vae"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise KLVAEError(f"folder {path} has no config.json file: pass a diffusers VAE folder or a weights file")
    cfg = read_config_json(cfg_file)
    cls = cfg.get("_class_name", "AutoencoderKL")
    known = tuple(c for a in DIFFUSERS_NAMES.values() for c in a.classes)
    if cls not in known:
        raise KLVAEError(f"{path} holds a diffusers {str(cls)[:40]}, which klvae does not load: it loads "
                         f"{', '.join(known)}")
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            src = open_path(path / name)
            src.config_json = cfg
            src.name = f"{path.name}/{name}"
            return src
    raise KLVAEError(f"{path} has a config.json but no weights ({WEIGHT_NAMES[0]}): copy the weights next to it")


def open_path(path) -> Source:
    if not isinstance(path, (str, Path)):
        raise KLVAEError(f"expected a file path, a diffusers folder or a state dict, got {type(path).__name__}")
    try:
        path = Path(path)
        if not path.exists():
            raise KLVAEError(f"no such file: {str(path)[:200]}")
        if path.is_dir():
            return _diffusers_folder(path)
        if path.stat().st_size == 0:
            raise KLVAEError(f"{path.name} is empty (0 bytes): the download failed; download it again")
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as e:  # a name over the OS limit, a dangling link, no permission...
        raise KLVAEError(f"cannot open {str(path)[:120]}: {e.strerror or _first_line(e)}") from e
    kind = next((k for magic, k in IMAGE_MAGIC if head.startswith(magic)), None) or \
        ("WebP" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else None)
    if kind:
        raise KLVAEError(f"{path.name} is a {kind} image, not a VAE: pass a VAE file (.safetensors, .ckpt) or a "
                         f"diffusers folder (an image is what encode takes)")
    # A safetensors file starts with its header's length (eight bytes, the high ones zero), a
    # checkpoint with PK or 0x80: first bytes that are all printable are a text file passed instead.
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        what = "a JSON" if head.lstrip()[:1] in (b"{", b"[") else "a text (Markdown, YAML, ...)"
        raise KLVAEError(f"{path.name} is {what} file, not a VAE: pass the weights (.safetensors, .ckpt) or the "
                         f"diffusers folder that holds them")
    # safetensors begin with a little-endian header length; zip (torch.save) with PK; old pickles with 0x80.
    if path.suffix == ".safetensors" or (head[:2] != b"PK" and head[:1] != b"\x80"):
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
        return "a video VAE of a design klvae does not load (of the video VAEs it loads Wan 2.1's and Wan 2.2's)"
    return f"an unrecognised model (first keys: {', '.join(k[:60] for k in ks[:3])})"


def find_prefix(src: Source) -> str:
    """'' for a lone VAE, 'first_stage_model.' or 'vae.' inside a whole checkpoint."""
    keys = set(src.keys)
    for p in ("",) + PREFIXES:
        first = [p + k for k in ("encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv1.weight",
                                 "decoder.conv1.weight") if p + k in keys]
        if first:
            video = NETWORKS[arch_of(k[len(p):] for k in keys if k.startswith(p))[0]].video_shaped
            if len(src.shape(first[0])) == 5 and not video:
                raise KLVAEError(f"{src.name} is a video VAE (3-D convolutions) klvae does not load: it loads the VAEs "
                                 f"of {family_titles()}")
            return p
    raise KLVAEError(f"{src.name} is not a VAE: it looks like {what_is_it(src.keys)}")


def arch_of(keys) -> tuple:
    """(network, key layout) of a VAE's keys (after the prefix): ('sd', None) unless a network's
    marker keys (config.Network.markers) say."""
    keys = set(keys)
    return next(((net.name, layout) for net in NETWORKS.values() for layout, marker in net.markers if marker in keys),
                ("sd", None))


def check_indices(name: str, keys) -> None:
    """No key may index a level or block beyond MAX_INDEX: the config is read from these indices."""
    for k in keys:
        for n in re.findall(r"\.(\d+)(?=\.)", k):
            if len(n) > 3 or int(n) >= MAX_INDEX:
                raise KLVAEError(f"{name}: key {k[:80]} has the index {n[:12]}, beyond any KL VAE's (< {MAX_INDEX}): "
                                 f"the file is damaged or crafted; do not use it")


# --------------------------------------------------------------------------------------------
# Config from shapes, family from what the file says about itself.
# --------------------------------------------------------------------------------------------
def _count(keys, pattern) -> int:
    found = [int(m[1]) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _layout_words(quant_conv: bool, batch_norm: bool) -> str:
    return (f" {'with' if quant_conv else 'without'} quant convs" +
            (" and a latent BatchNorm" if batch_norm else ""))


def infer_config(name, shape, keys, hints=(), stated=None, stated_from=None) -> VAEConfig:
    """VAEConfig from LDM-named tensor shapes. `hints`: (family, where-from) pairs, strongest first;
    `stated`: config fields the file states itself (scale, shift, groups, latent statistics), which
    win over a family's preset: a family argument only names the family and fills what the file
    cannot say, and one whose latent layout the file contradicts is an error. `stated_from`: where
    the file states its scale (for the notes)."""
    stated = dict(stated or {})
    need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight", "encoder.conv_out.weight",
            "encoder.down.0.block.0.conv2.weight"]
    missing = [k for k in need if k not in keys]
    if missing:
        raise KLVAEError(f"{name}: VAE weights incomplete: missing {', '.join(missing[:3])}: "
                         f"the file holds only part of a VAE (an encoder- or decoder-only file?)")
    for k in need:
        s = shape(k)
        if len(s) != 4 or min(s) < 1:
            raise KLVAEError(f"{name}: {k} has shape {s}, not a 4-D convolution kernel: the file is damaged")
    ch, in_ch = shape("encoder.conv_in.weight")[:2]
    levels = levels_of(keys, "ldm")
    widths = []
    for i in range(levels):
        k = f"encoder.down.{i}.block.0.conv2.weight"
        if k not in keys or len(shape(k)) != 4:
            raise KLVAEError(f"{name}: {k} is missing or not a convolution: the encoder's levels are incomplete")
        widths.append(shape(k)[0])
    if any(w % ch for w in widths):
        raise KLVAEError(f"{name}: level widths {widths} are not multiples of the first width {ch}: not a KL VAE")
    num_res = _count(keys, r"^encoder\.down\.0\.block\.(\d+)\.")
    dec_res = _count(keys, r"^decoder\.up\.0\.block\.(\d+)\.")
    if dec_res != num_res + 1:
        raise KLVAEError(f"{name}: decoder has {dec_res} resnet blocks per level, encoder {num_res}: not an "
                         f"LDM-style KL autoencoder (expected decoder = encoder + 1)")
    z = shape("decoder.conv_in.weight")[1]
    ch_mult = tuple(w // ch for w in widths)
    dec_top = shape("decoder.conv_in.weight")[0]  # the decoder's widest level: Flux.2's small decoder is narrower
    if dec_top % ch_mult[-1]:
        raise KLVAEError(f"{name}: decoder width {dec_top} does not follow the encoder's level pattern {ch_mult}")
    batch_norm = "bn.running_mean" in keys
    if batch_norm and tuple(shape("bn.running_mean")) != (4 * z,):
        raise KLVAEError(f"{name}: bn.running_mean has shape {shape('bn.running_mean')}, expected ({4 * z},): "
                         f"a Flux.2 VAE's BatchNorm covers its 2x2-patchified latent")
    cfg = dict(family=CUSTOM, in_channels=in_ch, out_channels=shape("decoder.conv_out.weight")[0],
               ch=ch, ch_mult=ch_mult, num_res_blocks=num_res, latent_channels=z,
               use_quant_conv="quant_conv.weight" in keys, use_post_quant_conv="post_quant_conv.weight" in keys,
               scaling_factor=1.0, shift_factor=0.0, batch_norm=batch_norm,
               decoder_ch=None if dec_top // ch_mult[-1] == ch else dec_top // ch_mult[-1])
    # GroupNorm's group count leaves no trace in the shapes: 32 in every released VAE, otherwise
    # stated by the file (klvae metadata, diffusers norm_num_groups).
    cfg["norm_groups"] = stated.pop("norm_groups", 32)
    candidates = [f for f, spec in FAMILIES.items() if spec.arch == "sd" and spec.latent_channels == z and
                  spec.quant_conv == cfg["use_quant_conv"] and spec.batch_norm == batch_norm]
    notes, family = [], None
    for fam, where in hints:
        if where == EXPLICIT and fam not in candidates:
            spec = FAMILIES[fam]
            if spec.arch != "sd":
                raise KLVAEError(f"{name}: not a {fam} VAE: the file holds an SD-style network, {fam} is "
                                 f"{spec.note}: drop the family argument")
            raise KLVAEError(f"{name}: not a {fam} VAE: {fam} has {spec.latent_channels} latent channels"
                             f"{_layout_words(spec.quant_conv, spec.batch_norm)}, this file "
                             f"{z}{_layout_words(cfg['use_quant_conv'], batch_norm)}: drop the family argument"
                             f"{' or use ' + ' / '.join(candidates) if candidates else ''}")
        if fam in candidates or (fam in FAMILIES and "scaling_factor" in stated):
            family = fam
            notes.append(f"family {fam} from {where}")
            break
    else:
        if candidates:
            family = candidates[0]
            if len(candidates) > 1:
                msg = (f"shapes fit {' and '.join(candidates)} equally; assumed {candidates[0]} "
                       f"(pass family='{candidates[1]}' if that is what it is)")
                notes.append("ambiguous: " + msg)
                if "scaling_factor" not in stated:  # the file states its scale: the family only names it then
                    warnings.warn(f"klvae: family ambiguous: {msg}", stacklevel=4)
            else:
                notes.append(f"family {candidates[0]} from tensor shapes")
        else:
            notes.append(f"no released family has {z} latent channels with quant_conv={cfg['use_quant_conv']}"
                         f"{' and a latent BatchNorm' if batch_norm else ''}; scale 1.0, shift 0.0 unless the file "
                         f"says otherwise")
    if "scaling_factor" in stated:
        notes.append(f"scale {stated['scaling_factor']:g} and shift {stated.get('shift_factor', 0.0):g} from "
                     f"{stated_from or 'the file'}")
    elif family is not None:
        f = FAMILIES[family]
        notes.append(f"scale {f.scaling_factor:g} and shift {f.shift_factor:g}: the {family} preset (the file states "
                     f"none)")
    try:
        config = VAEConfig(**cfg, notes=tuple(notes))
        if family is not None:
            config = config.with_family(family)
        return replace(config, **stated)  # what the file states wins over the family's numbers
    except KLVAEError as e:
        raise KLVAEError(f"{name}: {e}") from e


EXPLICIT = "the family argument"


def family_hints(src: Source, explicit=None):
    """(family, where-from) pairs, strongest first, the config fields the file states (its own scale
    and shift win over any family's, a named one's too), and where it states its scale (or None)."""
    hints, stated, stated_from = [], {}, None
    if explicit is not None:
        if not isinstance(explicit, str) or explicit not in FAMILIES:
            raise KLVAEError(f"unknown family {str(explicit)[:40]!r}: use one of {', '.join(FAMILIES)}")
        hints.append((explicit, EXPLICIT))
    md = {k: v for k, v in src.metadata.items() if isinstance(k, str) and isinstance(v, str)}
    if "klvae.family" in md:
        fam = md["klvae.family"]
        if fam not in FAMILIES and fam != CUSTOM:
            raise KLVAEError(f"{src.name}: metadata klvae.family is {fam[:40]!r}, not a family klvae knows "
                             f"({', '.join(FAMILIES)}): the file is damaged or from a newer klvae")
        if explicit is not None and fam not in (explicit, CUSTOM):
            raise KLVAEError(f"{src.name} says it is a {fam} VAE (klvae metadata), not {explicit}: drop the family "
                             f"argument (the file's own family, scale and shift are kept)")
        hints.append((fam, "klvae metadata"))
        if "klvae.scaling_factor" in md:
            stated["scaling_factor"] = number(md["klvae.scaling_factor"], f"{src.name}: metadata klvae.scaling_factor")
            stated["shift_factor"] = number(md.get("klvae.shift_factor", "0"), f"{src.name}: metadata klvae.shift_factor")
            stated_from = "klvae metadata"
    if "klvae.norm_groups" in md:
        stated["norm_groups"] = integer(md["klvae.norm_groups"], f"{src.name}: metadata klvae.norm_groups")
    for k in ("latents_mean", "latents_std"):
        if f"klvae.{k}" in md and md[f"klvae.{k}"] != "null":
            stated[k] = vector(md[f"klvae.{k}"], f"{src.name}: metadata klvae.{k}", None)
    if "klvae.force_upcast" in md:
        stated["force_upcast"] = flag(md["klvae.force_upcast"], f"{src.name}: metadata klvae.force_upcast")
    if "klvae.batch_norm_eps" in md:
        stated["batch_norm_eps"] = number(md["klvae.batch_norm_eps"], f"{src.name}: metadata klvae.batch_norm_eps")
    # The families' own words and file-name patterns, the last registered first: a later family's
    # name holds an earlier one's (flux2's flux, sdxl's v2-era names), so it must be tried before it.
    arch = (md.get("modelspec.architecture", "") + " " + md.get("ss_base_model_version", "")).lower()
    said = next((f.name for f in reversed(FAMILIES.values()) if any(w in arch for w in f.metadata_words)), None)
    if said:
        hints.append((said, "file metadata"))
    dc = src.config_json
    if dc:
        fields = config_fields(dc)
        if "scaling_factor" in fields:
            s, sh = fields["scaling_factor"], fields.get("shift_factor", 0.0)
            for fam, spec in FAMILIES.items():
                if abs(spec.scaling_factor - s) < 1e-4 and abs(spec.shift_factor - sh) < 1e-4:
                    hints.append((fam, "config.json scaling_factor"))
            fields.setdefault("shift_factor", 0.0)
            stated_from = "config.json"
        stated.update(fields)
    name = src.name.lower()
    named = next((f.name for f in reversed(FAMILIES.values()) if f.file_names and re.search(f.file_names, name)), None)
    if named:
        hints.append((named, "the file name"))
    return hints, stated, stated_from


# --------------------------------------------------------------------------------------------
# Reading a checkpoint, and filling a model from it.
# --------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A VAE found in a source: its config and where each of the model's tensors comes from."""
    source: Source
    config: VAEConfig
    names: dict       # LDM key -> the source's key
    layout: str       # "ldm" | "diffusers"


def read(src, family=None, config_json=None, name=None) -> Checkpoint:
    """Open a path, a diffusers folder or a state dict, find the VAE, check its keys, infer its config."""
    if isinstance(src, Source):
        source = src
    elif isinstance(src, dict):
        source = source_from_dict(src, name or "state dict")
    else:
        source = open_path(src)
    if config_json is not None:
        source.config_json = config_json
    prefix = find_prefix(source)
    raw_keys = [k for k in source.keys if k.startswith(prefix) and not k[len(prefix):].startswith(IGNORED)]
    sub = [k[len(prefix):] for k in raw_keys]
    check_indices(source.name, sub)
    arch, layout = arch_of(sub)
    if NETWORKS[arch].read is not None:  # a network with its own reader (model_<family>.py); SD's is below
        return read_family(source, arch, layout, dict(zip(sub, raw_keys)), family)
    if is_diffusers_layout(sub):
        levels = levels_of(sub, "diffusers")
        names = {diffusers_key_to_ldm(k, levels): full for k, full in zip(sub, raw_keys)}
        layout = "diffusers"
    elif "encoder.quant_conv.weight" in sub or "decoder.post_quant_conv.weight" in sub:
        # Black Forest Labs' Flux.2 release keeps the quant convs inside the encoder and decoder.
        bfl = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
        names = {next((new + k[len(old):] for old, new in bfl.items() if k.startswith(old)), k): full
                 for k, full in zip(sub, raw_keys)}
        layout = "bfl"
    else:
        names = dict(zip(sub, raw_keys))
        layout = "ldm"
    hints, stated, stated_from = family_hints(source, family)
    cfg = infer_config(source.name, lambda k: source.shape(names[k]), names.keys(), hints, stated, stated_from)
    return Checkpoint(source, cfg, names, layout)


def read_family(source: Source, arch: str, layout: str, keys: dict, family=None) -> Checkpoint:
    """A VAE of a network with its own model file (Qwen-Image's, HunyuanImage-2.1's): klvae's names
    for the source's keys and its shape, through the network's `read`; its family's conventions."""
    net = NETWORKS[arch]
    names, fields = net.read(source.name, source.shape, keys, layout)
    f = FAMILIES[fields.pop("family")] if "family" in fields else net.families[0]  # a network of several families
    if family is not None and family != f.name:
        raise KLVAEError(f"{source.name} holds a {f.note} VAE, not a {str(family)[:40]} one: drop the "
                         f"family argument (the file's network says which it is)")
    stated = config_fields(source.config_json) if source.config_json else {}
    try:
        cfg = replace(VAEConfig(family=f.name, arch=arch, use_quant_conv=f.quant_conv, use_post_quant_conv=f.quant_conv,
                                notes=(f"{f.note}, {layout} key layout",), **fields).with_family(f.name), **stated)
    except KLVAEError as e:
        raise KLVAEError(f"{source.name}: {e}") from e
    return Checkpoint(source, cfg, names, "diffusers" if layout == "diffusers" else "ldm")


def fill(model, ckpt: Checkpoint, device, dtype) -> None:
    """Assign the checkpoint's tensors to a model built on the meta device, one tensor at a time in
    the target dtype and device (the weights exist once in memory). Every tensor is checked: key,
    shape, a float dtype, finite values, and values that fit the target dtype."""
    src, names = ckpt.source, ckpt.names
    ref = torch.nn.Module.state_dict(model)  # the module names (AutoencoderKL.state_dict gives a file layout)
    optional = {"bn.num_batches_tracked"}  # a counter only training uses; not every Flux.2 file has it
    missing, unexpected = sorted(ref.keys() - names.keys() - optional), sorted(names.keys() - ref.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(k[:60] for k in unexpected[:3])})")
        raise KLVAEError(f"{src.name}: VAE keys do not match a KL autoencoder: {'; '.join(parts)}: "
                         f"the file is damaged or from another architecture")
    sd = {k: torch.zeros((), dtype=ref[k].dtype) for k in optional & ref.keys() - names.keys()}
    for k, full in names.items():
        t = src.get(full)
        if k in optional:
            if not torch.is_tensor(t) or t.numel() != 1 or t.is_floating_point() or t.is_complex():
                raise KLVAEError(f"{src.name}: {full} should be one whole number (a batch counter), got "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
            sd[k] = t.reshape(()).to(torch.long)
            continue
        if not torch.is_tensor(t) or t.layout != torch.strided or t.is_meta or t.is_quantized or t.is_nested:
            kind = "meta" if torch.is_tensor(t) and t.is_meta else getattr(t, "layout", type(t).__name__)
            raise KLVAEError(f"{src.name}: {full} is a {kind} tensor, not plain stored weights: the file is damaged "
                             f"or was saved from a quantized/sparse model; save plain float weights")
        if t.dtype not in FLOATS + (torch.float64,):
            raise KLVAEError(f"{src.name}: {full} is stored as {t.dtype}, not as float weights: klvae does not "
                             f"dequantize; use an fp32, fp16 or bf16 file")
        if is_attention_projection(k) and t.dim() == 2:
            t = t[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        if t.dim() == 4 and ref[k].dim() == 5 and ref[k].shape[2] == 1:
            t = t[:, :, None]  # a 2-D conv's kernel where the module keeps a time axis of 1 (Qwen-Image 2.1's diffusers files)
        if tuple(t.shape) != tuple(ref[k].shape):
            raise KLVAEError(f"{src.name}: {full} has shape {tuple(t.shape)}, expected {tuple(ref[k].shape)}: "
                             f"the file mixes VAEs of different widths or is damaged")
        if not torch.isfinite(t).all():
            raise KLVAEError(f"{src.name}: {full} contains NaN or Inf values: the weights are broken (a failed "
                             f"training run or a damaged file); use another copy")
        if k == "bn.running_var" and (t < 0).any():
            raise KLVAEError(f"{src.name}: {full} has negative variances: the BatchNorm statistics are damaged")
        if dtype == torch.float16 and t.numel() and t.abs().max().item() > FP16_MAX:
            raise KLVAEError(f"{src.name}: {full} has values up to {t.abs().max().item():.3g}, beyond fp16's "
                             f"{FP16_MAX:g}: load it in bf16 or fp32 instead")
        sd[k] = t.to(device=device, dtype=dtype)
    model.load_state_dict(sd, strict=True, assign=True)


def stored_dtypes(path) -> list[str]:
    """The dtypes a VAE file (or a diffusers folder's weights) stores its tensors in, from the
    headers alone ('F16', 'BF16', 'F32', ...); ['pickle'] for .ckpt/.pt/.bin files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    seen = set()
    for f in files:
        if f.suffix != ".safetensors":
            return ["pickle"]
        try:
            with safe_open(str(f), "pt") as h:
                for k in list(h.keys())[:64]:
                    seen.add(str(h.get_slice(k).get_dtype()))
        except Exception as e:
            raise unreadable(f, e) from e
    return sorted(seen)


def file_mode() -> int:
    """The mode a new file gets from this process (0666 less the umask), read without changing the
    umask where Linux shows it (os.umask sets it, briefly, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(tensors: dict, path, metadata=None) -> None:
    """save_file, made safe for files users keep: written to a temporary file beside `path` and
    renamed over it only when complete (a full disk or an interrupt leaves the old file, or none,
    and no half file), with the mode the process gives its other files (safetensors creates 0600,
    which a ComfyUI service user or a shared models folder cannot read)."""
    path = Path(path)
    if path.is_symlink():  # write through a link, as cp does, rather than replace the link with a file
        path = path.resolve()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            # safetensors words an OS error as "Error while serializing: I/O error: <strerror> (os error N) ..."
            why = getattr(e, "strerror", None) or (re.search(r"I/O error: (.+?) \(os error", str(e)) or [0, None])[1]
            raise KLVAEError(f"cannot write {path}: {why or _first_line(e)}") from e
        raise


def save_vae(model, path, layout: str = "ldm") -> None:
    """LDM or diffusers keys in a .safetensors file; a diffusers folder when `path` has no suffix."""
    if layout not in ("ldm", "diffusers"):
        raise KLVAEError(f"unknown layout {layout!r}: use 'ldm' or 'diffusers'")
    cfg = model.config
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict(layout=layout).items()}
    meta = dict(getattr(model, "source_metadata", None) or {})
    meta |= {"klvae.family": cfg.family, "klvae.scaling_factor": repr(cfg.scaling_factor),
            "klvae.shift_factor": repr(cfg.shift_factor), "klvae.layout": layout,
            "klvae.norm_groups": str(cfg.norm_groups), "klvae.force_upcast": str(cfg.force_upcast).lower()}
    if cfg.batch_norm:
        meta["klvae.batch_norm_eps"] = repr(cfg.batch_norm_eps)
    for k in ("latents_mean", "latents_std"):
        if getattr(cfg, k) is not None:
            meta[f"klvae.{k}"] = json.dumps(list(getattr(cfg, k)))
    path = Path(path)
    try:
        if layout == "diffusers" and path.suffix == "":
            path.mkdir(parents=True, exist_ok=True)
            write_safetensors(sd, path / WEIGHT_NAMES[0], meta)
            (path / "config.json").write_text(json.dumps(diffusers_config(cfg), indent=2))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(sd, path, meta)
    except OSError as e:
        raise KLVAEError(f"cannot write {path}: {e.strerror or _first_line(e)}") from e
