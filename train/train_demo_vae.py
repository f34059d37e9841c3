"""Train the small demo KL VAEs that klvae ships (models/klvae-demo-f8c16.safetensors and -f8c4).

What they are: klvae's own AutoencoderKL at a quarter of SD's width (ch=32 instead of 128, 8
GroupNorm groups, attention mid block, f8): `--latent-channels 16` is Flux.1's conventions (no
quant convs, a scale and a shift; 5.29 M parameters), 4 is SD1.x's (quant convs; 5.25 M). They
are trained on images that need no download:

  * photographs that ship *inside PyPI wheels* (scikit-image's skimage/data; matplotlib's
    sample_data only for a held-out photo), found through the installed packages at run time;
  * the ComfyUI workflow-template thumbnails (MIT, mostly AI-generated) of the installed
    comfyui-workflow-templates-media-* packages;
  * procedural images made on the fly by seeded code (train/procedural.py): saturated and pastel
    colour fields, RGB/HSV/Lab gradients, hard-edged shapes, stripes, checkerboards, flag-like bands,
    rendered text, noise and texture at several scales.

The loss sees colour: pixel L1 + MSE, an L1 in CIELAB (sRGB -> linear -> XYZ -> Lab in torch), an
L1 on 4x4-low-passed Lab chroma (a*, b*), and the tiny KL term. An EMA of the weights (0.999) is
what gets saved and evaluated. A warm start from an existing file is `--init PATH`.

They are demo/test models: small enough to commit (~10 MB fp16) and to run on a CPU in tests and
examples, trained on 2-core CPUs (f8c4: 70 minutes from scratch; f8c16: widened from it, then 3000
steps on 160 px crops in the background, 345 wall-clock minutes with pauses, 0.63 steps/s when alone
on an AVX-512 BF16 CPU, then 1200 steps on 256 px crops). Not a substitute for SD's VAE. The
commands that made f8c16 (see its model card):

    python train/train_demo_vae.py --latent-channels 16 --init models/klvae-demo-f8c4.safetensors \
        --out f8c16-3000.safetensors --steps 3000 --lr 2e-4 --save-every 20 --work-dir DIR
    python train/train_demo_vae.py ... --resume        # continue that run from DIR/ckpt.pt
    python train/train_demo_vae.py --latent-channels 16 --init f8c16-3000.safetensors \
        --out models/klvae-demo-f8c16.safetensors --crop 256 --batch 3 --steps 1200 --lr 1e-4 --warmup 50
    python train/train_demo_vae.py --pilot              # fp32 vs bf16 step speed, then exit
    python train/train_demo_vae.py --eval-only --out FILE [--sizes 256]   # the held-out table for FILE
    python train/train_demo_vae.py --device cuda ...    # the same run on a GPU (bf16 autocast there too)

The evaluation table (PSNR and mean CIEDE2000 per held-out photo at 256 and 1024 px) is printed
and written next to the weights as FILE.eval.md and FILE.eval.json.

Plain torch, no framework. Seeded; see --steps for repeatable reruns (the default schedule follows
the wall clock, so the step count depends on the machine's speed).

Precision (`--pilot` on the 2-core Sapphire Rapids VM, batch 8 x 128px, channels_last, alone on the
machine): fp32 0.565 steps/s, bf16 autocast 1.170 steps/s (2.07x: oneDNN runs the bf16 convolutions
on AMX). bf16 is the default on the CPU and on CUDA; the loss (colour conversions included), the
weights, the EMA and AdamW's state stay fp32. torch.compile was tried and not kept (minutes to
compile on 2 cores, no faster step in our try).
"""
import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import queue
import random
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The repository root is the package `klvae` (setuptools package-dir); make a checkout importable
# without `pip install -e .` as well.
REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("klvae") is None:
    sys.path.insert(0, str(REPO.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # train/procedural.py
# Training reallocates the same tensors every step: glibc's own free-list reuse is what it wants.
# klvae's low mmap threshold (vae/memory.py, for inference servers) made every large tensor a fresh
# mapping here: 33-50% of the CPU time in page faults, steps 2.2x slower (0.08 vs 0.175 steps/s, 2026-11-30).
os.environ.setdefault("KLVAE_KEEP_MALLOC", "1")

from klvae.vae import load_vae, save_vae  # noqa: E402
from klvae.vae.autoencoder import AutoencoderKL  # noqa: E402
from klvae.vae.config import preset  # noqa: E402
from klvae.vae.precision import cpu_has_native_bf16  # noqa: E402

MODEL_NAME = "klvae-demo"

# ------------------------------------------------------------------------------------------
# Data. Every photo below is a file inside an installed wheel; its licence is what that package
# states for it (scikit-image: the image's `skimage.data` docstring). Left out of the
# scikit-image wheel: moon, page, the Middlebury motorcycle pair and lfw_subset (no licence
# stated); the synthetic images (color wheel, logo, chessboards, horse, phantom) and cell.png
# (a computed phase map, not a photograph; mostly flat); microaneurysms (tiny).
# ------------------------------------------------------------------------------------------
# (package, folder inside the package, file): (what, licence as the package states it)
PHOTOS_TRAIN = {
    ("skimage", "data", "hubble_deep_field.jpg"): ("Hubble eXtreme Deep Field, RGB 1000x872", "public domain (NASA)"),
    ("skimage", "data", "retina.jpg"): ("fundus photograph, RGB 1411x1411", "CC0 1.0 (Mikael Haggstrom, Wikimedia)"),
    ("skimage", "data", "ihc.png"): ("immunohistochemistry micrograph, RGB 512x512", "no known copyright restrictions"),
    ("skimage", "data", "coins.png"): ("Greek coins, Brooklyn Museum, gray 384x303", "no known copyright restrictions"),
    ("skimage", "data", "clock_motion.png"): ("motion-blurred wall clock, gray 400x300", "public domain (Stefan van der Walt)"),
    ("skimage", "data", "text.png"): ("photo of handwritten text, gray 448x172", "no known copyright restrictions, public domain (Wikipedia)"),
    ("skimage", "data", "brick.png"): ("brick wall texture, gray 512x512", "CC0 (CC0Textures)"),
    ("skimage", "data", "grass.png"): ("grass texture, gray 512x512", "CC0 (DeviantArt linolafett)"),
    ("skimage", "data", "gravel.png"): ("gravel texture, gray 512x512", "CC0 (CC0Textures)"),
}
# Held out: whole photos, never cropped for training, never used for the scaling factor; only
# evaluated. The first three are the original low-detail set; the rest have fine detail.
PHOTOS_HELDOUT = {
    ("skimage", "data", "chelsea.png"): ("Chelsea the cat (fur, whiskers, green eyes), RGB 451x300", "CC0 (Stefan van der Walt)"),
    ("skimage", "data", "coffee.png"): ("coffee cup, RGB 600x400", "CC0 (Rachel Michetti)"),
    ("skimage", "data", "rocket.jpg"): ("Falcon 9 / DSCOVR launch, SpaceX, RGB 640x427", "public domain (SpaceX)"),
    ("skimage", "data", "astronaut.png"): ("Eileen Collins, NASA portrait: face, hair, US flag, mission patch and text, RGB 512x512",
                                           "public domain (NASA)"),
    ("skimage", "data", "camera.png"): ("cameraman: grass field, coat, tripod, buildings, gray 512x512 (any colour cast shows)",
                                        "CC0 (Lav Varshney)"),
    ("matplotlib", "mpl-data/sample_data", "grace_hopper.jpg"): (
        "Grace Hopper, US Navy portrait: face, hair, US flag, insignia, name tag, RGB 512x600",
        "matplotlib's licence (PSF-style, package-level; the wheel states nothing per image)"),
}
# astronaut and camera were training photos of the first shipped model (klvae-demo-f8c4, 3065
# steps from scratch): for a model warm-started from it (--init) they are held out from this run
# only. chelsea, coffee, rocket and grace_hopper were never trained on.
SEEN_BY_V1 = {"astronaut.png", "camera.png"}
HELDOUT_INFO = {k[2]: {"package": k[0], "what": v[0], "licence": v[1],
                       "note": "a training photo of the first klvae-demo-f8c4 (so not clean under --init from it)"
                       if k[2] in SEEN_BY_V1 else "never trained on"} for k, v in PHOTOS_HELDOUT.items()}
TEMPLATE_PACKAGES = ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_api",
                     "comfyui_workflow_templates_media_other", "comfyui_workflow_templates_media_video")
TEMPLATE_MIN_SIDE = 128  # the same 149 thumbnails whatever the crop size
GROUPS = ("photos", "procedural", "templates")


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def photo_path(key) -> Path:
    pkg, sub, name = key
    d = package_dir(pkg)
    if d is None:
        raise SystemExit(f"{pkg} is not installed: pip install scikit-image==0.26.0 matplotlib "
                         f"(their wheels bundle the photos; {name} is in {pkg}/{sub})")
    return d / sub / name


def load_rgb(path: Path) -> Image.Image:
    im = Image.open(path)
    im.seek(0)  # first frame of an animated file
    return im.convert("RGB")  # gray -> 3 equal channels, RGBA -> RGB


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def template_files(min_side: int = TEMPLATE_MIN_SIDE) -> list[Path]:
    """Still .webp thumbnails (>= min_side px) of the installed ComfyUI template media packages."""
    files = []
    for pkg in TEMPLATE_PACKAGES:
        d = package_dir(pkg)
        if d is None:
            continue
        for f in sorted(d.rglob("*.webp")):
            try:
                im = Image.open(f)
                if getattr(im, "n_frames", 1) == 1 and min(im.size) >= min_side:
                    files.append(f)
            except OSError:
                continue
    return files


def to_uint8_chw(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class CropPool:
    """Training crops from three groups, chosen per crop with the probabilities `mix`:

    photos      the training photographs, at a random scale (log-uniform 0.3x-3x: downscaled crops
                have the density of a 256 px evaluation, upscaled ones the smoothness of a 1024 px one),
                colour photos chosen twice as often as gray ones; a gray crop is tinted (duotone)
                with probability `gray_tint`, so gray stays in the mix (neutrality) but does not dominate;
    procedural  a fresh seeded synthetic image (train/procedural.py);
    templates   the ComfyUI thumbnails, at a random scale like the photos.

    Colour photos and thumbnails get a random channel permutation with probability `perm`. Every
    crop is flipped horizontally with probability 0.5 (no vertical flips: photos have an up).
    """

    def __init__(self, photos: list[Path], templates: list[Path], crop: int, seed: int,
                 mix=(0.35, 0.35, 0.30), scale_range=(0.3, 3.0), perm=0.15, gray_tint=0.5):
        from procedural import Procedural
        self.crop = crop
        self.rng = random.Random(seed)
        self.proc = Procedural(seed)
        self.mix = dict(zip(GROUPS, mix))
        self.scale_range = scale_range
        self.perm, self.gray_tint = perm, gray_tint
        self.images = {"photos": [], "templates": []}
        for name, files in (("photos", photos), ("templates", templates)):
            for f in files:
                im = load_rgb(f)
                a = np.asarray(im)
                gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
                self.images[name].append((im, gray))
        self.weights = {k: [1.0 if g else 2.0 for _, g in v] for k, v in self.images.items()}
        if not self.images["templates"]:
            self.mix["templates"] = 0.0
        if not self.images["photos"]:
            self.mix["photos"] = 0.0
        self.counts = dict.fromkeys(GROUPS, 0)

    def _crop_image(self, im: Image.Image, size: int, scale: float | None) -> np.ndarray:
        r = self.rng
        if scale is None:
            lo, hi = self.scale_range
            scale = math.exp(r.uniform(math.log(lo), math.log(hi)))
        side = min(size / scale, im.width, im.height)  # source square; smaller than `size` = upscale
        x0 = r.uniform(0, im.width - side)
        y0 = r.uniform(0, im.height - side)
        if abs(side - size) < 0.5 and scale == 1.0:
            xi, yi = int(x0), int(y0)
            return np.asarray(im.crop((xi, yi, xi + size, yi + size)))
        if side > size:
            resample = r.choice((Image.BOX, Image.LANCZOS, Image.BICUBIC))
        else:
            resample = r.choice((Image.LANCZOS, Image.BICUBIC))
        return np.asarray(im.resize((size, size), resample, box=(x0, y0, x0 + side, y0 + side)))

    def _augment_colour(self, a: np.ndarray, gray: bool) -> np.ndarray:
        r = self.rng
        if gray:
            if r.random() < self.gray_tint:  # duotone: dark colour -> light colour along the gray value
                c0 = self.proc.color(r.choice(("dark", "saturated", "neutral")))
                c1 = self.proc.color(r.choice(("pastel", "saturated", "any")))
                if c0.sum() > c1.sum():
                    c0, c1 = c1, c0
                t = a[..., :1].astype(np.float32) / 255.0
                return (np.clip(c0 + (c1 - c0) * t, 0, 1) * 255 + 0.5).astype(np.uint8)
            return a
        if r.random() < self.perm:
            order = [0, 1, 2]
            while order == [0, 1, 2]:
                r.shuffle(order)
            return a[..., order]
        return a

    def one(self, size: int, groups=GROUPS, plain: bool = False) -> np.ndarray:
        r = self.rng
        w = [self.mix[g] if g in groups else 0.0 for g in GROUPS]
        g = r.choices(GROUPS, weights=w)[0]
        self.counts[g] += 1
        if g == "procedural":
            a = self.proc.image(size)
        else:
            im, gray = r.choices(self.images[g], weights=self.weights[g])[0]
            a = self._crop_image(im, size, 1.0 if plain else None)
            if not plain:
                a = self._augment_colour(a, gray)
        if r.random() < 0.5:
            a = a[:, ::-1]
        return a

    def sample(self, batch: int, size: int | None = None, groups=GROUPS, plain: bool = False) -> torch.Tensor:
        size = size or self.crop
        out = np.stack([self.one(size, groups, plain) for _ in range(batch)])
        # uint8 -> [-1, 1], the pixel range of every SD-family VAE; NHWC memory for oneDNN/cuDNN.
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return x.contiguous(memory_format=torch.channels_last)


class Prefetcher:
    """Makes batches in one background thread (for a GPU, whose step is faster than our Python data
    code). One producer keeps the stream deterministic. Not used on the CPU, where both cores train."""

    def __init__(self, pool: CropPool, batch: int, depth: int = 6, pin: bool = False):
        self.pool, self.batch, self.pin = pool, batch, pin
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_flag = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop_flag:
            x = self.pool.sample(self.batch)
            if self.pin:
                x = x.pin_memory()
            while not self.stop_flag:
                try:
                    self.q.put(x, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def get(self) -> torch.Tensor:
        return self.q.get()

    def stop(self):
        self.stop_flag = True
        self.thread.join()


# ------------------------------------------------------------------------------------------
# Model and loss.
# ------------------------------------------------------------------------------------------
def build_model(args) -> AutoencoderKL:
    # SD1.x's VAE (ch=128, ch_mult 1,2,4,4, 2 res blocks, 4 latent channels, quant convs, attention
    # mid block) at ch=32; with --latent-channels 16, Flux.1's conventions instead (16 channels, no
    # quant convs, a shift). GroupNorm with 8 groups keeps SD's 4 channels per group at the first
    # level (32 groups of 32 channels would be instance norm); widths 32/64/128 all divide by 8.
    family = {4: "sd1", 16: "flux"}[args.latent_channels]
    cfg = preset(family, ch=args.ch, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=args.norm_groups)
    return AutoencoderKL(cfg)


@torch.no_grad()
def widened(src: AutoencoderKL, model: AutoencoderKL) -> dict:
    """src's weights for `model`, a copy of it with more latent channels (and maybe no quant convs),
    such that `model` computes what src does at the start (exactly, but for the post_quant_conv
    bias at the latent's border, where the conv's zero padding now sees the bias folded in): the quant convs (1x1) are folded
    into the encoder's conv_out and the decoder's conv_in, the new latent channels get fresh
    encoder rows (a small init, their log-variance that of the old channels) and zero decoder
    weights. So the warm start keeps the 4-channel file's quality and training only has to put the
    new channels to use."""
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    ref = model.state_dict()
    z0, z1 = src.config.latent_channels, model.config.latent_channels
    w, b = sd.pop("encoder.conv_out.weight"), sd.pop("encoder.conv_out.bias")      # [2 z0, C, 3, 3]
    if "quant_conv.weight" in sd:
        q, qb = sd.pop("quant_conv.weight")[:, :, 0, 0], sd.pop("quant_conv.bias")
        w, b = torch.einsum("oi,ichw->ochw", q, w), q @ b + qb
    W, B = ref["encoder.conv_out.weight"].clone(), ref["encoder.conv_out.bias"].clone()
    W.normal_(0, 0.01)
    B.zero_()
    W[:z0], B[:z0] = w[:z0], b[:z0]                      # means
    W[z1:z1 + z0], B[z1:z1 + z0] = w[z0:], b[z0:]        # log-variances
    B[z1 + z0:] = b[z0:].mean()
    sd["encoder.conv_out.weight"], sd["encoder.conv_out.bias"] = W, B
    w, b = sd.pop("decoder.conv_in.weight"), sd.pop("decoder.conv_in.bias")        # [C, z0, 3, 3]
    if "post_quant_conv.weight" in sd:
        p, pb = sd.pop("post_quant_conv.weight")[:, :, 0, 0], sd.pop("post_quant_conv.bias")
        b = b + torch.einsum("ochw,c->o", w, pb)
        w = torch.einsum("ochw,ci->oihw", w, p)
    W = torch.zeros_like(ref["decoder.conv_in.weight"])
    W[:, :z0] = w
    sd["decoder.conv_in.weight"], sd["decoder.conv_in.bias"] = W, b
    return sd


def warm_start(model: AutoencoderKL, path: str) -> dict:
    """Copy the weights of an existing klvae file into `model`: the same architecture, or the same
    but for the latent width (`widened`)."""
    src = load_vae(path, dtype="fp32")
    a, b = src.config, model.config
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v
    for k in ("ch", "ch_mult", "num_res_blocks", "norm_groups"):
        if norm(getattr(a, k, None)) != norm(getattr(b, k, None)):
            raise SystemExit(f"--init {path}: {k} is {getattr(a, k, None)}, this model has {getattr(b, k, None)}")
    same = (a.latent_channels, a.use_quant_conv) == (b.latent_channels, b.use_quant_conv)
    if not same and a.latent_channels > b.latent_channels:
        raise SystemExit(f"--init {path}: {a.latent_channels} latent channels cannot start a {b.latent_channels}-channel model")
    model.load_state_dict(src.state_dict() if same else widened(src, model))
    meta = {}
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # a folder or another format: no metadata to carry over
        pass
    return {"file": Path(path).name, "sha16": sha16(Path(path)) if Path(path).is_file() else "",
            "steps": meta.get("klvae.train_steps", ""), "minutes": meta.get("klvae.train_minutes", "")}


def posterior(model: AutoencoderKL, x: torch.Tensor):
    """Encoder -> quant_conv -> (mean, logvar). AutoencoderKL.encode runs under inference_mode,
    which a training step cannot use, so the same path is spelled out here."""
    moments = model.encoder(x)
    if model.quant_conv is not None:
        moments = model.quant_conv(moments)
    moments = moments.float()
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # the LDM/diffusers clamp


# sRGB (D65) -> XYZ and the D65 2-degree white: the constants skimage.color.rgb2lab uses, so the
# training loss and the CIEDE2000 evaluation see the same CIELAB.
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883])


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] (sRGB) -> CIELAB [B, 3, H, W] (L* 0..100, a*, b* about -128..127).
    Differentiable; fp32 with autocast off (the 3x3 matrix product would otherwise run in bf16).
    Values outside [0, 1] are clamped (no colour there; the pixel loss still pulls them in)."""
    with torch.autocast(x.device.type, enabled=False):
        c = ((x.float() + 1.0) * 0.5).clamp(0.0, 1.0)
        lin = torch.where(c > 0.04045, ((c + 0.055) / 1.055).pow(2.4), c / 12.92)
        m = (_XYZ_FROM_RGB / _WHITE_D65[:, None]).to(lin.device)
        xyz = torch.einsum("ij,bjhw->bihw", m, lin)
        eps = 0.008856
        f = torch.where(xyz > eps, xyz.clamp_min(eps).pow(1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
        fx, fy, fz = f.unbind(1)
        return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), 1)


def train_step_loss(model, x, args):
    mean, logvar = posterior(model, x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterised sample
    xr = model.decoder(z if model.post_quant_conv is None else model.post_quant_conv(z)).float()
    x = x.float()
    err = xr - x
    mse = err.pow(2).mean()
    l1 = err.abs().mean()
    # L1 drives the early, coarse fit fast; MSE is what PSNR measures and dominates the end.
    loss = args.w_l1 * l1 + args.w_mse * mse
    # Colour: L1 in CIELAB (units: 1 = about one just-noticeable difference), per pixel, and on the
    # chroma (a*, b*) after a 4x4 average pool, where texture the model cannot keep averages out and
    # what is left is colour casts and desaturation of whole regions.
    lab_x, lab_r = rgb_to_lab(x), rgb_to_lab(xr)
    dlab = (lab_r - lab_x).abs().mean()
    dab_lp = (F.avg_pool2d(lab_r[:, 1:], 4) - F.avg_pool2d(lab_x[:, 1:], 4)).abs().mean()
    loss = loss + args.w_lab * dlab + args.w_chroma * dab_lp
    # The worst blocks: a mean hides a local fault (the cat's pupils went dark red with a good
    # mean), so the Lab error of the worst 16x16 blocks of each crop gets a vote of its own.
    worst = lab_x.new_zeros(())
    if args.w_worst > 0:
        blocks = F.avg_pool2d((lab_r - lab_x).abs().mean(1, keepdim=True), 16).flatten(1)  # [B, blocks]
        k = max(1, round(args.worst_frac * blocks.shape[1]))
        worst = blocks.topk(k, dim=1).values.mean()
        loss = loss + args.w_worst * worst
    # KL to N(0, I), summed over latent elements. LDM's kl-f8 weighs it 1e-6 against a
    # reconstruction loss summed over pixels; dividing by 3*H*W keeps that ratio for a per-pixel
    # mean. It only keeps the posterior from drifting (mean scale, logvar), not a real prior.
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
    loss = loss + args.kl_weight * kl / (3 * x.shape[2] * x.shape[3])
    parts = {"mse": mse.detach(), "l1": l1.detach(), "dlab": dlab.detach(), "dab_lp": dab_lp.detach(), "kl": kl.detach(),
             "worst": worst.detach()}
    return loss, parts


def psnr_from_mse(mse_pm1: float) -> float:
    # Pixels are in [-1, 1]; PSNR is on [0, 1], where the squared error is a quarter.
    return 10.0 * math.log10(1.0 / max(mse_pm1 / 4.0, 1e-12))


def lr_at(progress: float, step: int, args) -> float:
    """Linear warmup over the first steps, then cosine from peak to 2% of peak as progress 0 -> 1.
    progress is the fraction of the wall-clock budget spent (or of --steps when given), so the
    schedule ends exactly when the time does, however fast this machine is."""
    warm = min(1.0, (step + 1) / args.warmup)
    p = min(max(progress, 0.0), 1.0)
    return args.lr * warm * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * p)))


def autocast(precision: str, device: torch.device):
    # bf16 autocast: on the CPU oneDNN runs the convolutions on AMX tiles; on CUDA, tensor cores.
    # The weights, the optimizer state and the loss stay fp32 (autocast only lowers the op inputs).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=(precision == "bf16"))


class EMA:
    """Exponential moving average of the weights, updated after every optimizer step.

    decay_t = min(decay, (1 + t) / (10 + t)), the usual warmup (TensorFlow's num_updates form): the
    average forgets its starting point (random init, or the --init weights with their colour cast)
    instead of carrying 0.999^t of it. The ramp is slow: decay_t is 0.9964 at t = 2500 and 0.9975 at
    t = 3500, so over a 70-minute CPU run the average spans the last ~300-400 steps (the low-lr
    tail of the cosine); on a GPU run of 10k+ steps it reaches the nominal 0.999. --no-ema-warmup
    uses the plain decay from the first step (then a warm start's weights stay in the average:
    0.999^3000 = 5 %)."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.src = [p for p in model.parameters()]
        self.dst = [p for p in self.model.parameters()]
        self.updates = 0
        self.current = 0.0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        self.current = d
        torch._foreach_lerp_(self.dst, self.src, 1.0 - d)
        for b_dst, b_src in zip(self.model.buffers(), model.buffers()):
            b_dst.copy_(b_src)


# ------------------------------------------------------------------------------------------
# Stages.
# ------------------------------------------------------------------------------------------
def gather_data(args):
    train_real = []
    for key in PHOTOS_TRAIN:
        p = photo_path(key)
        if p.exists():
            train_real.append(p)
        else:
            print(f"warning: {key[2]} is not in this {key[0]} wheel, skipped", flush=True)
    heldout = [photo_path(k) for k in PHOTOS_HELDOUT]
    missing = [str(p) for p in heldout if not p.exists()]
    if missing:
        raise SystemExit(f"held-out photos missing (pip install scikit-image==0.26.0 matplotlib): {missing}")
    templates = template_files()
    # The held-out photos must not reach training, not even as a byte-identical copy elsewhere.
    held_hashes = {sha16(p) for p in heldout}
    assert not held_hashes & {sha16(p) for p in train_real + templates}, "a held-out photo is in the training set"
    assert not {p.name for p in heldout} & {p.name for p in train_real}, "a held-out photo is in the training set"
    return train_real, templates, heldout


def pilot(args, pool, model):
    """Steps/s of one training step, fp32 vs bf16 autocast, both channels_last."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = {}
    for precision in ("fp32", "bf16"):
        times = []
        t_end = time.perf_counter() + args.pilot_seconds
        i = 0
        while time.perf_counter() < t_end or i < 4:
            x = pool.sample(args.batch).to(args.device)
            sync(args.device)
            t0 = time.perf_counter()
            with autocast(precision, args.device):
                loss, _ = train_step_loss(model, x, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(args.device)
            times.append(time.perf_counter() - t0)
            i += 1
        steady = times[2:]  # the first steps pay for oneDNN's / cuDNN's kernel selection
        sps = len(steady) / sum(steady)
        results[precision] = sps
        print(f"pilot {precision}: {sps:.3f} steps/s ({sps * args.batch:.2f} crops/s of {args.crop}px, "
              f"batch {args.batch}, {len(steady)} timed steps)", flush=True)
    print(f"pilot: bf16/fp32 speedup {results['bf16'] / results['fp32']:.2f}x", flush=True)
    return results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PauseClock:
    """Seconds the process spent stopped (SIGSTOP, as during benchmarks: the brief pauses training
    then), so that the schedule's clock counts training only and a paused run keeps its learning
    rate schedule. SIGCONT's handler adds the time since the loop's last tick; the loop ticks every
    step, so a pause is counted to within a step or two (the step it stopped in, and the one the
    handler waits for)."""

    def __init__(self):
        self.last, self.stopped = time.time(), 0.0
        if hasattr(signal, "SIGCONT") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCONT, self._resumed)

    def _resumed(self, *_):
        self.stopped += time.time() - self.last

    def take(self) -> float:
        """Seconds stopped since the last call."""
        out, self.stopped, self.last = self.stopped, 0.0, time.time()
        return out


class ThreadGovernor:
    """Runs on all cores while the machine is ours, on one while another process is busy.

    Measured on this 2-core VM, bf16 step of 8x128px: 0.82 s on 2 threads when alone, but 11-19 s on
    2 threads while a test suite ran beside it, and 1.6 s on 1 thread in the same conditions: the
    parallel regions wait for their slowest thread, which shares its core. Other processes' CPU use
    is the system-wide busy time (/proc/stat) minus ours (process_time), over the last window.
    """

    def __init__(self, max_threads: int, window_s: float = 5.0, busy_cores: float = 0.3):
        self.max, self.window, self.busy = max_threads, window_s, busy_cores
        self.tick = os.sysconf("SC_CLK_TCK")
        self.threads = max_threads
        self.switches = 0
        self.mark = self._sample()

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:7]) - v[3] - v[4]) / self.tick  # user..softirq, less idle and iowait (not steal)
        except OSError:
            busy = None
        return time.time(), busy, time.process_time()

    def update(self, step: int) -> None:
        if self.max < 2 or time.time() - self.mark[0] < self.window:
            return
        now = self._sample()
        (t0, b0, p0), (t1, b1, p1) = self.mark, now
        self.mark = now
        if b0 is None or b1 is None or t1 - t0 <= 0:
            return
        others = max(0.0, (b1 - b0) - (p1 - p0)) / (t1 - t0)  # cores used by other processes
        want = 1 if others > self.busy else self.max
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.switches += 1
            print(f"step {step}: other processes use {others:.2f} cores -> {want} thread(s)", flush=True)


def save_checkpoint(args, model, ema, opt, step, minutes=None):
    state = {"model": model.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt.state_dict(),
             "step": step, "args": {k: str(v) for k, v in vars(args).items()}}
    if minutes is not None:
        state["minutes"] = minutes
    tmp = args.work_dir / "ckpt.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, args.work_dir / "ckpt.pt")


def checkpoint_eval(args, pool, ema, step, minutes, init, heldout) -> None:
    """The EMA weights as they are now: saved to --out (fp16, scaling factor from a few batches),
    evaluated at the smallest eval size, and a point added to FILE.curve.json, so that a run that
    is stopped at any time has left its best-so-far file and its curve."""
    scale, zmean = scaling_factor(args, pool, ema.model, batches=4)
    save(args, ema.model, scale, step, minutes, init, shift=zmean)
    result = evaluate(args, heldout, sizes=[min(args.eval_sizes)])
    curve_path = Path(str(args.out) + ".curve.json")
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    size = str(min(args.eval_sizes))
    curve.append({"run": args.run_name, "step": step, "minutes": round(minutes, 2),
                  "minutes_before": float(init["minutes"] or 0) if init else 0.0, "size": int(size),
                  "photos": {k: {m: round(v[size][m], 3) for m in ("psnr", "ciede2000", "ciede2000_worst_block")}
                             for k, v in result["results"].items()},
                  "mean": {m: round(result["mean"][size][m], 3) for m in ("psnr", "ciede2000", "ciede2000_worst_block")}})
    curve_path.write_text(json.dumps(curve, indent=1))


def train(args, pool, model, ema, init=None, heldout=None):
    # AdamW, betas (0.9, 0.99): the shorter second-moment memory adapts faster in a short run.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    budget = args.minutes * 60.0
    dev = args.device
    step, done_s = 0, 0.0
    if args.resume and (args.work_dir / "ckpt.pt").exists():  # the same run, after a stop: state and schedule
        state = torch.load(args.work_dir / "ckpt.pt", map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, done_s = state["step"], 60.0 * float(state.get("minutes", 0.0))
        ema.updates = step
        print(f"resumed {args.work_dir / 'ckpt.pt'} at step {step}, {done_s / 60:.1f} min", flush=True)
    prefetch = Prefetcher(pool, args.batch, pin=(dev.type == "cuda")) if args.prefetch else None
    t_start = time.time() - done_s
    pauses = PauseClock()
    run_psnr, run_de, win_t, win_steps, win_data = None, None, time.time(), 0, 0.0
    last_ckpt = last_eval = time.time()
    governor = ThreadGovernor(args.threads) if dev.type == "cpu" else None
    try:
        while True:
            t_start += pauses.take()  # stopped (SIGSTOP) time is not training time
            elapsed = time.time() - t_start
            progress = step / args.steps if args.steps else elapsed / budget
            if progress >= 1.0:
                break
            lr = lr_at(progress, step, args)
            for g in opt.param_groups:
                g["lr"] = lr
            t_data = time.perf_counter()
            x = prefetch.get() if prefetch else pool.sample(args.batch)
            x = x.to(dev, non_blocking=True)
            win_data += time.perf_counter() - t_data
            with autocast(args.precision, dev):
                loss, parts = train_step_loss(model, x, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Clipping guards against the odd bad batch (a flat black crop of the Hubble field, say).
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if not torch.isfinite(loss):
                raise SystemExit(f"step {step}: loss is {loss.item()}; lower --lr or use --precision fp32")
            opt.step()
            ema.update(model)
            step += 1
            win_steps += 1
            if governor:
                governor.update(step)
            p = psnr_from_mse(parts["mse"].item())
            de = parts["dlab"].item()
            run_psnr = p if run_psnr is None else 0.98 * run_psnr + 0.02 * p
            run_de = de if run_de is None else 0.98 * run_de + 0.02 * de
            if step % args.log_every == 0 or step == 1:
                now = time.time()
                thr = f"thr {governor.threads}" if governor else dev.type
                print(f"step {step:6d}  {(now - t_start) / 60:6.1f} min  {thr}  loss {loss.item():.4f}  "
                      f"kl {parts['kl'].item():8.1f}  lr {lr:.2e}  gnorm {gn.item():.2f}  "
                      f"{win_steps / (now - win_t):.3f} steps/s  data {1000 * win_data / win_steps:.0f} ms/step  "
                      f"psnr(run) {run_psnr:.2f} dB  |dLab|(run) {run_de:.2f}  ema {ema.current:.4f}", flush=True)
                win_t, win_steps, win_data = now, 0, 0.0
            if time.time() - last_ckpt > 600:  # a crash late in the run should not cost the hour
                save_checkpoint(args, model, ema, opt, step, (time.time() - t_start) / 60)
                last_ckpt = time.time()
            if args.save_every and time.time() - last_eval > 60 * args.save_every and heldout:
                t_eval = time.time()
                checkpoint_eval(args, pool, ema, step, (t_eval - t_start) / 60, init, heldout)
                t_start += time.time() - t_eval  # the schedule's clock counts training only
                last_eval = time.time()
    finally:
        if prefetch:
            prefetch.stop()
    minutes = (time.time() - t_start) / 60
    save_checkpoint(args, model, ema, opt, step, minutes)
    total = sum(pool.counts.values()) or 1
    print(f"trained {step} steps in {minutes:.1f} min ({step / max(minutes * 60, 1e-9):.3f} steps/s); crops by group: "
          + ", ".join(f"{g} {100 * n / total:.0f}%" for g, n in pool.counts.items()), flush=True)
    return step, minutes


@torch.no_grad()
def scaling_factor(args, pool, model, batches=None) -> tuple[float, float]:
    """1 / std of the posterior mode over training crops (photos and thumbnails at their own scale,
    no procedural images, no colour augmentation), as SD's 0.18215 was found: it makes the scaled
    latents unit-variance for a diffusion model. Shift stays 0 (SD1 convention)."""
    saved = pool.rng.getstate()
    pool.rng.seed(args.seed + 1)
    zs = []
    for _ in range(batches or args.scale_batches):
        x = pool.sample(8, size=256, groups=("photos", "templates"), plain=True).to(args.device)
        with autocast("fp32", args.device):
            mean, _ = posterior(model, x)
        zs.append(mean.flatten().float().cpu())
    pool.rng.setstate(saved)
    z = torch.cat(zs)
    return 1.0 / z.std().item(), z.mean().item()


def save(args, model, scale: float, steps: int, minutes: float, init: dict | None, out: str | None = None,
         weights: str | None = None, shift: float = 0.0) -> None:
    """The fp16 file. shift: the latent mean for a Flux-convention (16-channel) model, 0 for SD1's."""
    shift = float(shift) if model.config.shift_factor else 0.0
    fp16 = AutoencoderKL(replace(model.config, scaling_factor=float(scale), shift_factor=shift))
    fp16.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    fp16 = fp16.half()
    out = Path(out or args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_vae(fp16, out)  # LDM keys + klvae.family/scaling_factor/shift_factor/layout/norm_groups
    # save_vae has no slot for extra metadata: add the model name (and provenance) to the same file.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(out))
    meta.update({"klvae.model": MODEL_NAME, "klvae.train_steps": str(steps),
                 "klvae.train_minutes": f"{minutes:.1f}", "klvae.train_seed": str(args.seed),
                 "klvae.train_weights": weights or f"ema {args.ema}" + (" (warmup (1+t)/(10+t))" if args.ema_warmup else "")})
    if init:
        meta.update({"klvae.train_init": init["file"], "klvae.train_init_sha16": init["sha16"],
                     "klvae.train_init_steps": str(init["steps"]), "klvae.train_init_minutes": str(init["minutes"])})
    save_file(tensors, str(out), metadata=meta)
    n = sum(t.numel() for t in tensors.values())
    print(f"saved {out}: {n} parameters, {out.stat().st_size} bytes, scaling_factor {scale:.5f}", flush=True)


def heldout_image(path: Path, size: int) -> tuple[np.ndarray, float]:
    """Centre square crop, then Lanczos to size x size (down for 256, up for 1024): uint8 HxWx3,
    and the resize factor (> 1: upscaled, so the image is smoother than the photo)."""
    im = load_rgb(path)
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return np.asarray(im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)), size / s


def heldout_tensor(path: Path, size: int) -> torch.Tensor:
    return to_uint8_chw(heldout_image(path, size)[0])[None].float() / 127.5 - 1.0


def bicubic_thumbnail(a: np.ndarray) -> np.ndarray:
    """The reference codec: box-downscale 8x (3 values per 8x8 block), bicubic back up. [0, 1] float."""
    h, w = a.shape[:2]
    im = Image.fromarray(a).resize((w // 8, h // 8), Image.BOX).resize((w, h), Image.BICUBIC)
    return np.asarray(im, dtype=np.float64) / 255.0


def image_metrics(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """PSNR (dB, on [0, 1]), mean CIEDE2000 and the worst 1/64-side block's mean CIEDE2000 of two
    HxWx3 float images in [0, 1] (scikit-image). The worst block sees what a mean hides: a local
    colour failure (f8c16's first file turned the cat's black pupils red, 24 -> 72 in R, at every
    size from 512 px, with a good mean)."""
    from skimage.color import deltaE_ciede2000, rgb2lab
    mse = float(((a - b) ** 2).mean())
    psnr = 10.0 * math.log10(1.0 / max(mse, 1e-12))
    de = deltaE_ciede2000(rgb2lab(a), rgb2lab(b))
    k = max(1, min(de.shape) // 64)
    blocks = de[:de.shape[0] // k * k, :de.shape[1] // k * k].reshape(de.shape[0] // k, k, -1, k).mean((1, 3))
    return psnr, float(de.mean()), float(blocks.max())


# The cat's eyes in the demo photo's centre square (fractions of its side): where the pupils are.
EYES = ((0.20, 0.28, 0.45, 0.55), (0.72, 0.35, 0.92, 0.60))  # (left, top, right, bottom)


@torch.no_grad()
def pupil_probe(path, size: int = 2048, device="cpu") -> dict:
    """The demo's own picture, measured where f8c16 failed: `klvae demo`'s canvas (the demo photo's
    centre square, Lanczos to size), an untiled fp32 round trip, and the mean RGB (0..255) of the
    pupils, i.e. the input's dark pixels (every channel < 0.15) inside the two eye boxes, before and
    after. The shipped 1200-step file: pupils R 24 -> 47 (dark red)."""
    from klvae.vae import DEMO_PHOTO, read_image
    vae = load_vae(str(path), device=str(device), dtype="fp32")
    x = read_image(DEMO_PHOTO, size=size).to(device)
    y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    a, b = ((t[0].cpu() + 1) * 127.5 for t in (x, y))  # [3, S, S] in 0..255
    mask = torch.zeros(size, size, dtype=torch.bool)
    for l, t, r, bt in EYES:
        mask[int(t * size):int(bt * size), int(l * size):int(r * size)] = True
    mask &= (a < 0.15 * 255).all(0)
    rgb_in, rgb_out = a[:, mask].mean(1), b[:, mask].mean(1)
    return {"size": size, "pixels": int(mask.sum()), "rgb_in": [round(v, 1) for v in rgb_in.tolist()],
            "rgb_out": [round(v, 1) for v in rgb_out.tolist()],
            "max_channel_error": round(float((rgb_out - rgb_in).abs().max()), 1)}


@torch.no_grad()
def evaluate(args, heldout, path: str | None = None, sizes: list[int] | None = None) -> dict:
    """PSNR and CIEDE2000 of the saved file through the public API, fp32:
    load_vae -> encode().mode() -> decode(), on every held-out photo at every size."""
    out = Path(path or args.out)
    vae = load_vae(str(out), device=str(args.device), dtype="fp32")
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata() or {})
    print(f"loaded {out}: family {vae.config.family}, scaling_factor {vae.config.scaling_factor:.5f}, "
          f"norm_groups {vae.config.norm_groups}", flush=True)
    sizes = sizes or args.eval_sizes
    rows = {}
    for path in heldout:
        row = {}
        for size in sizes:
            t0 = time.time()
            a8, factor = heldout_image(path, size)
            x = (to_uint8_chw(a8)[None].float() / 127.5 - 1.0).to(args.device)
            y = vae.decode(vae.encode(x).mode())
            a = a8.astype(np.float64) / 255.0
            b = ((y.clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 0).double().cpu().numpy()
            psnr, de, worst = image_metrics(a, b)
            ref_psnr, ref_de, _ = image_metrics(a, bicubic_thumbnail(a8))
            row[str(size)] = {"psnr": psnr, "ciede2000": de, "ciede2000_worst_block": worst, "resize": factor,
                              "ref_bicubic8x_psnr": ref_psnr, "ref_bicubic8x_ciede2000": ref_de,
                              "mean_rgb_in": a.mean((0, 1)).round(4).tolist(),
                              "mean_rgb_out": b.mean((0, 1)).round(4).tolist(), "seconds": time.time() - t0}
        rows[path.name] = row
        seen = "  (a training photo of klvae-demo-f8c4: not held out for it or its warm starts)" \
            if path.name in SEEN_BY_V1 else ""
        print(f"{path.name:18s} " + "  ".join(
            f"{s}px {row[str(s)]['psnr']:.2f} dB dE00 {row[str(s)]['ciede2000']:.2f} "
            f"(worst block {row[str(s)]['ciede2000_worst_block']:.1f})" for s in sizes) + seen, flush=True)
    means = {str(s): {m: sum(r[str(s)][m] for r in rows.values()) / len(rows)
                      for m in ("psnr", "ciede2000", "ciede2000_worst_block", "ref_bicubic8x_psnr",
                                "ref_bicubic8x_ciede2000")} for s in sizes}
    print(f"{'mean':18s} " + "  ".join(f"{s}px {means[str(s)]['psnr']:.2f} dB dE00 {means[str(s)]['ciede2000']:.2f}"
                                      for s in sizes), flush=True)
    result = {
        "file": out.name, "sha16": sha16(out), "bytes": out.stat().st_size, "metadata": meta,
        "scaling_factor": vae.config.scaling_factor, "sizes": sizes,
        "method": "centre square crop, Lanczos to SxS (upscaled when the photo is smaller), [-1,1] fp32, "
                  "load_vae -> encode().mode() -> decode(), clamp; PSNR on [0,1]; mean CIEDE2000 with "
                  "skimage.color.rgb2lab + deltaE_ciede2000; worst block: the largest mean CIEDE2000 over blocks "
                  "of 1/64 of the side (4x4 px at 256, 16x16 at 1024); reference: box 8x down, bicubic up",
        "heldout": {p.name: HELDOUT_INFO[p.name] for p in heldout},
        "results": rows, "mean": means,
    }
    write_eval(Path(getattr(args, "eval_dir", None) or out.parent) / out.name, result)
    return result


def write_eval(out: Path, result: dict) -> None:
    """FILE.eval.json and FILE.eval.md: next to the weights a run trains, in --work-dir for --eval-only
    (an evaluation of a shipped file does not write into models/)."""
    sizes = result["sizes"]
    lines = [f"# Held-out evaluation of `{result['file']}`", "",
             f"sha256[:16] `{result['sha16']}`, {result['bytes']} bytes, scaling_factor {result['scaling_factor']:.5f}. "
             f"Method: {result['method']}.", ""]
    head = "| held-out photo | " + " | ".join(f"{s} PSNR | {s} ΔE00 (worst block)" for s in sizes) + " | " + \
        " | ".join(f"{s} bicubic-8x ref, PSNR / ΔE00" for s in sizes) + " |"
    lines += [head, "|" + " --- |" * (1 + 3 * len(sizes))]

    def cell(r, s):
        x = r[str(s)]
        up = f" (up {x['resize']:.2f}x)" if x["resize"] > 1 else ""
        return f"{x['psnr']:.2f} dB{up} | {x['ciede2000']:.2f} ({x['ciede2000_worst_block']:.1f})"

    for name, r in result["results"].items():
        lines.append(f"| {name} | " + " | ".join(cell(r, s) for s in sizes) + " | " + " | ".join(
            f"{r[str(s)]['ref_bicubic8x_psnr']:.2f} / {r[str(s)]['ref_bicubic8x_ciede2000']:.2f}" for s in sizes) + " |")
    m = result["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{m[str(s)]['psnr']:.2f} dB** | **{m[str(s)]['ciede2000']:.2f}** "
                                            f"({m[str(s)]['ciede2000_worst_block']:.1f})" for s in sizes)
                 + " | " + " | ".join(f"{m[str(s)]['ref_bicubic8x_psnr']:.2f} / {m[str(s)]['ref_bicubic8x_ciede2000']:.2f}"
                                      for s in sizes) + " |")
    lines += ["", "Held-out photos:", ""]
    for name, h in result["heldout"].items():
        lines.append(f"- {name} ({h['package']}): {h['what']}; licence: {h['licence']}; {h['note']}")
    Path(str(out) + ".eval.md").write_text("\n".join(lines) + "\n")
    Path(str(out) + ".eval.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out}.eval.md and {out}.eval.json", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=70.0, help="training budget in minutes of wall-clock time, less any time the process was stopped (SIGSTOP during benchmarks); the lr schedule follows it")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (schedule by step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "models" / "klvae-demo-f8c4.safetensors"),
                    help="the weights to write (or, with --eval-only, to evaluate); the eval table goes to OUT.eval.md/.json")
    ap.add_argument("--init", default=None, help="warm start: copy the weights of this klvae file first")
    ap.add_argument("--work-dir", default=str(REPO / "train" / "runs"), help="fp32 checkpoint and result.json")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 on CUDA and on CPUs with AMX or AVX-512 BF16 (measured: 2.07x and 1.68x "
                         "fp32's steps/s), fp32 where bf16 is emulated (AVX2 only: ~13x slower)")
    ap.add_argument("--batch", type=int, default=6)
    ap.add_argument("--crop", type=int, default=160)
    ap.add_argument("--lr", type=float, default=None, help="peak lr; default 5e-4 from scratch, 2e-4 with --init")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    ap.add_argument("--w-l1", type=float, default=0.5, help="pixel L1 weight (pixels in [-1, 1])")
    ap.add_argument("--w-mse", type=float, default=1.0, help="pixel MSE weight")
    # The colour weights were set from the gradients at the shipped weights (batch of natural crops):
    # w.r.t. the reconstructed pixels, |grad| of (0.5 L1 + MSE) was 2.1e-3, of the Lab L1 0.275 and
    # of the pooled-chroma L1 0.38 (per unit weight). 0.004 and 0.003 give each colour term about
    # half the pixel terms' pull (1.1e-3 each), so colour gets an equal vote in all, and its
    # gradient is 98-99.9 % chroma (the pixel terms' is 55 %).
    ap.add_argument("--w-lab", type=float, default=0.004, help="weight of the CIELAB L1 (mean of |dL*|,|da*|,|db*|, Lab units)")
    ap.add_argument("--w-chroma", type=float, default=0.003, help="weight of the L1 on 4x4-pooled a*, b* (Lab units)")
    ap.add_argument("--w-worst", type=float, default=0.0,
                    help="weight of the mean Lab L1 of the worst --worst-frac of 16x16 blocks per crop (0: off)")
    ap.add_argument("--worst-frac", type=float, default=0.02, help="the share of blocks --w-worst averages")
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay (the EMA weights are saved and evaluated)")
    ap.add_argument("--no-ema-warmup", dest="ema_warmup", action="store_false",
                    help="EMA decay constant from step 1 instead of min(decay, (1+t)/(10+t))")
    ap.add_argument("--scale-range", type=float, nargs=2, default=[0.3, 3.0], metavar=("LO", "HI"),
                    help="photo and thumbnail crops are resized by a log-uniform factor in [LO, HI] (> 1: upscaled, "
                         "smoother than the photo; the demo's 2048 canvas upscales its photo 6.8x)")
    ap.add_argument("--mix", type=float, nargs=3, default=[0.35, 0.35, 0.30], metavar=("PHOTOS", "PROCEDURAL", "TEMPLATES"),
                    help="probability of each data group per crop")
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--latent-channels", type=int, choices=(4, 16), default=4,
                    help="4: SD1's conventions (quant convs); 16: Flux.1's (no quant convs, a shift). --init from a "
                         "4-channel file widens it (the same outputs at the start)")
    ap.add_argument("--save-every", type=float, default=0.0,
                    help="minutes: save the EMA weights to --out, evaluate at the smallest size, add to FILE.curve.json")
    ap.add_argument("--resume", action="store_true", help="continue the run in --work-dir (ckpt.pt: weights, EMA, "
                                                           "optimizer, step, schedule)")
    ap.add_argument("--run-name", default="", help="a label for this run's points in the curve")
    ap.add_argument("--norm-groups", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prefetch", type=int, default=None, help="1: make batches in a background thread (default: on for cuda)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--scale-batches", type=int, default=16, help="8 crops of 256px each, for the scaling factor")
    ap.add_argument("--eval-sizes", "--sizes", dest="eval_sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--pilot", action="store_true", help="time fp32 vs bf16 training steps and exit")
    ap.add_argument("--pilot-seconds", type=float, default=60.0)
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out and exit")
    ap.add_argument("--pupils", type=int, default=0, metavar="SIZE",
                    help="measure --out's pupils on the demo's SIZE px canvas (2048: the demo's) and exit")
    ap.add_argument("--no-eval-raw", dest="eval_raw", action="store_false",
                    help="skip the diagnostic evaluation (smallest size) of the last raw, non-EMA weights")
    args = ap.parse_args()
    args.work_dir = Path(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.device = torch.device("cuda" if args.device == "gpu" else args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this machine has no usable CUDA device")
    if args.precision == "auto":
        args.precision = "bf16" if args.device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if args.lr is None:
        args.lr = 2e-4 if args.init else 5e-4
    if args.prefetch is None:
        args.prefetch = 1 if args.device.type == "cuda" else 0
    if args.steps <= 0 and args.minutes <= 0 and not (args.eval_only or args.pilot):
        raise SystemExit("give --steps N or --minutes M (> 0)")

    torch.set_num_threads(args.threads)
    # Flush denormals to zero: a precaution (x86 handles denormal floats in microcode, and tiny Adam
    # moments or gradients could underflow into them). A clean measurement here showed no difference
    # over the first steps; an earlier 5x figure was another process sharing the CPU (see ThreadGovernor).
    torch.set_flush_denormal(True)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # every device
    if importlib.util.find_spec("skimage") is None:
        raise SystemExit("scikit-image is not installed: pip install scikit-image==0.26.0 matplotlib "
                         "(the photos ship in their wheels; the evaluation uses skimage's CIEDE2000)")
    print(f"torch {torch.__version__}, {args.threads} threads, args: {vars(args)}", flush=True)

    train_real, templates, heldout = gather_data(args)
    print(f"data: {len(train_real)} photos {[p.name for p in train_real]}, {len(templates)} template thumbnails, "
          f"procedural on the fly; held out: {[p.name for p in heldout]}", flush=True)
    if args.pupils:
        print(json.dumps({"file": str(args.out), **pupil_probe(args.out, args.pupils, args.device)}), flush=True)
        return
    if args.eval_only:
        args.eval_dir = args.work_dir
        evaluate(args, heldout)
        return

    t0 = time.time()
    pool = CropPool(train_real, templates, args.crop, args.seed, mix=args.mix, scale_range=tuple(args.scale_range))
    print(f"pool: {len(pool.images['photos'])} photos ({sum(g for _, g in pool.images['photos'])} gray), "
          f"{len(pool.images['templates'])} thumbnails, mix {pool.mix}, loaded in {time.time() - t0:.1f} s", flush=True)
    model = build_model(args)
    init = None
    if args.init:
        init = warm_start(model, args.init)
        print(f"warm start from {args.init} ({init})", flush=True)
    model = model.to(args.device, memory_format=torch.channels_last).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config.ch=} {model.config.ch_mult=} {model.config.norm_groups=}, {n_params} parameters", flush=True)
    if args.pilot:
        pilot(args, pool, model)
        return

    ema = EMA(model, args.ema, warmup=args.ema_warmup)
    steps, minutes = train(args, pool, model, ema, init, heldout)
    final = ema.model.eval()
    scale, zmean = scaling_factor(args, pool, final)
    print(f"latent mode (EMA weights) over training crops: mean {zmean:.4f}, std {1 / scale:.4f} -> scaling_factor {scale:.5f}", flush=True)
    save(args, final, scale, steps, minutes, init, shift=zmean)
    result = evaluate(args, heldout)
    if args.eval_raw:
        # Diagnostic only (the EMA file above is the result): the last raw weights, at the smallest
        # eval size, so a run can tell whether the average helped. Not used to pick anything.
        raw_path = str(args.work_dir / "raw-weights.safetensors")
        save(args, model.eval(), scale, steps, minutes, init, out=raw_path, weights="raw (last step)", shift=zmean)
        print("diagnostic: the raw (non-EMA) weights of the last step:", flush=True)
        raw = evaluate(args, heldout, path=raw_path, sizes=[min(args.eval_sizes)])
        result["raw_weights_mean"] = raw["mean"]
    result.update({"steps": steps, "minutes": minutes, "parameters": n_params, "init": init,
                   "crops_by_group": pool.counts, "latent_mean": zmean, "args": {
                       k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}})
    (args.work_dir / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
