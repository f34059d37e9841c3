"""Train the small demo KL VAE that klvae ships (models/klvae-demo-f8c4.safetensors).

What it is: klvae's own AutoencoderKL, the SD1.x architecture (f8, 4 latent channels, quant convs,
attention mid block) at a quarter of SD's width (ch=32 instead of 128), trained from scratch on a
few dozen permissively licensed images that ship *inside PyPI wheels* (scikit-image's bundled
photographs, and the ComfyUI workflow-template thumbnails). Nothing is downloaded: the files are
found through the installed packages at run time.

It is a demo/test model: small enough to commit (~10 MB fp16) and to run on a CPU in tests and
examples, trained for about an hour on a 2-core CPU. It is not a substitute for SD's VAE.

    python train/train_demo_vae.py                      # train (--minutes of wall clock), save, evaluate
    python train/train_demo_vae.py --pilot              # fp32 vs bf16 step speed, then exit
    python train/train_demo_vae.py --eval-only          # evaluate an existing --out file

Plain torch, one file, no framework. Seeded; see --steps for bit-for-bit reruns (the default
schedule follows the wall clock, so the step count depends on the machine's speed).

Precision (`--pilot` on the 2-core Sapphire Rapids VM, batch 8 x 128px, channels_last, alone on the
machine): fp32 0.565 steps/s, bf16 autocast 1.170 steps/s (2.07x: oneDNN runs the bf16 convolutions
on AMX). bf16 is the default; the loss, the weights and AdamW's state stay fp32. torch.compile was
tried and not kept (minutes to compile on 2 cores, no faster step in our try).
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The repository root is the package `klvae` (setuptools package-dir); make a checkout importable
# without `pip install -e .` as well.
REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("klvae") is None:
    sys.path.insert(0, str(REPO.parent))

from klvae.vae import load_vae, save_vae  # noqa: E402
from klvae.vae.autoencoder import AutoencoderKL  # noqa: E402
from klvae.vae.config import preset  # noqa: E402

MODEL_NAME = "klvae-demo"

# ------------------------------------------------------------------------------------------
# Data. Every file below is inside the scikit-image wheel (skimage/data); the licence is what
# scikit-image's docstring for that image says. Images whose docstring states no licence
# (moon, page, the Middlebury motorcycle pair) and synthetic ones (color wheel, logo, text,
# chessboards, horse) are left out.
# ------------------------------------------------------------------------------------------
SKIMAGE_TRAIN = {
    # file: (what, licence as stated by scikit-image)
    "astronaut.png": ("Eileen Collins, NASA portrait, RGB 512x512", "public domain (NASA)"),
    "hubble_deep_field.jpg": ("Hubble eXtreme Deep Field, RGB 1000x872", "public domain (NASA)"),
    "retina.jpg": ("fundus photograph, RGB 1411x1411", "CC0 1.0 (Mikael Haggstrom, Wikimedia)"),
    "ihc.png": ("immunohistochemistry micrograph, RGB 512x512", "no known copyright restrictions"),
    "camera.png": ("cameraman on a campus, gray 512x512", "CC0 (Lav Varshney)"),
    "coins.png": ("Greek coins, Brooklyn Museum, gray 384x303", "no known copyright restrictions"),
    "clock_motion.png": ("motion-blurred wall clock, gray 400x300", "public domain (Stefan van der Walt)"),
    "brick.png": ("brick wall texture, gray 512x512", "CC0 (CC0Textures)"),
    "grass.png": ("grass texture, gray 512x512", "CC0 (DeviantArt linolafett)"),
    "gravel.png": ("gravel texture, gray 512x512", "CC0 (CC0Textures)"),
}
# Held out: never cropped for training, never used for the scaling factor; only evaluated.
SKIMAGE_HELDOUT = {
    "chelsea.png": ("Chelsea the cat, RGB 451x300", "CC0 (Stefan van der Walt)"),
    "coffee.png": ("coffee cup, RGB 600x400", "CC0 (Rachel Michetti)"),
    "rocket.jpg": ("Falcon 9 / DSCOVR launch, SpaceX, RGB 640x427", "public domain (SpaceX)"),
}
TEMPLATE_PACKAGES = ("comfyui_workflow_templates_media_image", "comfyui_workflow_templates_media_api",
                     "comfyui_workflow_templates_media_other", "comfyui_workflow_templates_media_video")
# Downscaled copies make crops with denser detail (what a 256x256 evaluation of a large photo
# looks like); the full-size ones keep smooth, large-scale content.
SCALES = (1.0, 0.75, 0.5)


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def skimage_data_dir() -> Path:
    d = package_dir("skimage")
    if d is None:
        raise SystemExit("scikit-image is not installed: pip install scikit-image (its wheel bundles the photos)")
    return d / "data"


def load_rgb(path: Path) -> Image.Image:
    im = Image.open(path)
    im.seek(0)  # first frame of an animated file
    return im.convert("RGB")  # gray -> 3 equal channels, RGBA -> RGB


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def template_files(min_side: int) -> list[Path]:
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


def to_uint8_chw(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class CropPool:
    """All training images in memory as uint8 [3, H, W] at a few scales; batches are random crops.

    Two groups are sampled half and half: the real photographs (few, but the point) and the
    template thumbnails (many, AI-generated, for diversity of colour and content).
    """

    def __init__(self, groups: dict[str, list[Path]], crop: int, seed: int):
        self.crop = crop
        self.rng = random.Random(seed)
        self.groups = {}
        for name, files in groups.items():
            items = []
            for f in files:
                im = load_rgb(f)
                versions = []
                for s in SCALES:
                    w, h = round(im.width * s), round(im.height * s)
                    if min(w, h) >= crop:  # box filter: an area average, no ringing
                        versions.append(to_uint8_chw(im if s == 1.0 else im.resize((w, h), Image.BOX)))
                if versions:
                    items.append(versions)
            self.groups[name] = items
        self.names = [n for n, items in self.groups.items() if items]

    def sample(self, batch: int, size: int | None = None) -> torch.Tensor:
        size = size or self.crop
        out = torch.empty(batch, 3, size, size, dtype=torch.uint8)
        for i in range(batch):
            items = self.groups[self.rng.choice(self.names)]
            versions = [v for v in self.rng.choice(items) if min(v.shape[1:]) >= size]
            img = self.rng.choice(versions)
            y = self.rng.randint(0, img.shape[1] - size)
            x = self.rng.randint(0, img.shape[2] - size)
            c = img[:, y:y + size, x:x + size]
            out[i] = c.flip(-1) if self.rng.random() < 0.5 else c  # horizontal flip only: photos have an up
        # uint8 -> [-1, 1], the pixel range of every SD-family VAE; NHWC for oneDNN.
        return (out.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------
# Model and loss.
# ------------------------------------------------------------------------------------------
def build_model(args) -> AutoencoderKL:
    # SD1.x's VAE (ch=128, ch_mult 1,2,4,4, 2 res blocks, 4 latent channels, quant convs, attention
    # mid block) at ch=32. GroupNorm with 8 groups keeps SD's 4 channels per group at the first
    # level (32 groups of 32 channels would be instance norm); widths 32/64/128 all divide by 8.
    cfg = preset("sd1", ch=args.ch, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=args.norm_groups)
    return AutoencoderKL(cfg)


def posterior(model: AutoencoderKL, x: torch.Tensor):
    """Encoder -> quant_conv -> (mean, logvar). AutoencoderKL.encode runs under inference_mode,
    which a training step cannot use, so the same path is spelled out here."""
    moments = model.quant_conv(model.encoder(x)).float()
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)  # the LDM/diffusers clamp


def train_step_loss(model, x, kl_weight):
    mean, logvar = posterior(model, x)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterised sample
    xr = model.decoder(model.post_quant_conv(z)).float()
    err = xr - x
    mse = err.pow(2).mean()
    # L1 drives the early, coarse fit fast; MSE is what PSNR measures and dominates the end.
    rec = 0.5 * err.abs().mean() + mse
    # KL to N(0, I), summed over latent elements. LDM's kl-f8 weighs it 1e-6 against a
    # reconstruction loss summed over pixels; dividing by 3*H*W keeps that ratio for a per-pixel
    # mean. It only keeps the posterior from drifting (mean scale, logvar), not a real prior.
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
    loss = rec + kl_weight * kl / (3 * x.shape[2] * x.shape[3])
    return loss, mse.detach(), kl.detach()


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


def autocast(precision: str):
    # bf16 autocast on the CPU: oneDNN runs the convolutions on AMX tiles; the weights, the
    # optimizer state and the loss stay fp32 (autocast only lowers the op inputs).
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=(precision == "bf16"))


# ------------------------------------------------------------------------------------------
# Stages.
# ------------------------------------------------------------------------------------------
def gather_data(args):
    data_dir = skimage_data_dir()
    train_real = [data_dir / f for f in SKIMAGE_TRAIN if (data_dir / f).exists()]
    missing = sorted(set(SKIMAGE_TRAIN) - {p.name for p in train_real})
    if missing:
        print(f"warning: not in this scikit-image wheel, skipped: {missing}", flush=True)
    templates = template_files(args.crop)
    heldout = [data_dir / f for f in SKIMAGE_HELDOUT]
    # The held-out photos must not reach training, not even as a byte-identical copy elsewhere.
    held_hashes = {sha16(p) for p in heldout}
    assert not held_hashes & {sha16(p) for p in train_real + templates}, "a held-out photo is in the training set"
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
            x = pool.sample(args.batch)
            t0 = time.perf_counter()
            with autocast(precision):
                loss, mse, _ = train_step_loss(model, x, args.kl_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            i += 1
        steady = times[2:]  # the first steps pay for oneDNN's kernel selection
        sps = len(steady) / sum(steady)
        results[precision] = sps
        print(f"pilot {precision}: {sps:.3f} steps/s ({sps * args.batch:.2f} crops/s of {args.crop}px, "
              f"batch {args.batch}, {len(steady)} timed steps)", flush=True)
    print(f"pilot: bf16/fp32 speedup {results['bf16'] / results['fp32']:.2f}x", flush=True)
    return results


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


def train(args, pool, model):
    # AdamW, betas (0.9, 0.99): the shorter second-moment memory adapts faster in a short run.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    budget = args.minutes * 60.0
    t_start = time.time()
    step, run_psnr, win_t, win_steps = 0, None, time.time(), 0
    last_ckpt = t_start
    governor = ThreadGovernor(args.threads)
    while True:
        elapsed = time.time() - t_start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = pool.sample(args.batch)
        with autocast(args.precision):
            loss, mse, kl = train_step_loss(model, x, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipping guards against the odd bad batch (a flat black crop of the Hubble field, say).
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not torch.isfinite(loss):
            raise SystemExit(f"step {step}: loss is {loss.item()}; lower --lr or use --precision fp32")
        opt.step()
        step += 1
        win_steps += 1
        governor.update(step)
        p = psnr_from_mse(mse.item())
        run_psnr = p if run_psnr is None else 0.98 * run_psnr + 0.02 * p
        if step % args.log_every == 0:
            now = time.time()
            print(f"step {step:6d}  {(now - t_start) / 60:6.1f} min  thr {governor.threads}  loss {loss.item():.4f}  kl {kl.item():8.1f}  "
                  f"lr {lr:.2e}  gnorm {gn.item():.2f}  {win_steps / (now - win_t):.2f} steps/s  "
                  f"psnr(run) {run_psnr:.2f} dB", flush=True)
            win_t, win_steps = now, 0
        if time.time() - last_ckpt > 600:  # a crash late in the run should not cost the hour
            torch.save({"model": model.state_dict(), "step": step}, args.work_dir / "ckpt.pt")
            last_ckpt = time.time()
    minutes = (time.time() - t_start) / 60
    torch.save({"model": model.state_dict(), "step": step, "minutes": minutes}, args.work_dir / "ckpt.pt")
    print(f"trained {step} steps in {minutes:.1f} min ({step / (minutes * 60):.2f} steps/s)", flush=True)
    return step, minutes


@torch.no_grad()
def scaling_factor(args, pool, model) -> tuple[float, float]:
    """1 / std of the posterior mode over training crops, as SD's 0.18215 was found: it makes the
    scaled latents unit-variance for a diffusion model. Shift stays 0 (SD1 convention)."""
    rng_state = pool.rng.getstate()
    pool.rng.seed(args.seed + 1)
    zs = []
    for _ in range(args.scale_batches):
        mean, _ = posterior(model, pool.sample(8, size=256))
        zs.append(mean.flatten())
    pool.rng.setstate(rng_state)
    z = torch.cat(zs)
    return 1.0 / z.std().item(), z.mean().item()


def save(args, model, scale: float, steps: int, minutes: float) -> None:
    fp16 = AutoencoderKL(replace(model.config, scaling_factor=float(scale), shift_factor=0.0))
    fp16.load_state_dict(model.state_dict())
    fp16 = fp16.half()
    out = Path(args.out)
    save_vae(fp16, out)  # LDM keys + klvae.family/scaling_factor/shift_factor/layout/norm_groups
    # save_vae has no slot for extra metadata: add the model name (and provenance) to the same file.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(out), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(out))
    meta.update({"klvae.model": MODEL_NAME, "klvae.train_steps": str(steps),
                 "klvae.train_minutes": f"{minutes:.1f}", "klvae.train_seed": str(args.seed)})
    save_file(tensors, str(out), metadata=meta)
    n = sum(t.numel() for t in tensors.values())
    print(f"saved {out}: {n} parameters, {out.stat().st_size} bytes, scaling_factor {scale:.5f}", flush=True)


def heldout_tensor(path: Path, size: int) -> torch.Tensor:
    """Centre square crop, then Lanczos to size x size (down for 256, up for 1024), in [-1, 1]."""
    im = load_rgb(path)
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)
    return to_uint8_chw(im)[None].float() / 127.5 - 1.0


@torch.no_grad()
def evaluate(args, heldout) -> dict:
    """PSNR of the saved file through the public API, fp32: load_vae -> encode().mode() -> decode()."""
    vae = load_vae(args.out, dtype="fp32")
    print(f"loaded {args.out}: family {vae.config.family}, scaling_factor {vae.config.scaling_factor:.5f}, "
          f"norm_groups {vae.config.norm_groups}", flush=True)
    table = {}
    for path in heldout:
        row = {}
        for size in args.eval_sizes:
            x = heldout_tensor(path, size)
            y = vae.decode(vae.encode(x).mode())
            mse01 = ((y.clamp(-1, 1) + 1) / 2 - (x + 1) / 2).pow(2).mean().item()
            row[size] = 10 * math.log10(1.0 / mse01)
        table[path.name] = row
        print(f"{path.name:14s} " + "  ".join(f"{s}px {row[s]:.2f} dB" for s in args.eval_sizes), flush=True)
    means = {s: sum(r[s] for r in table.values()) / len(table) for s in args.eval_sizes}
    print("mean           " + "  ".join(f"{s}px {means[s]:.2f} dB" for s in args.eval_sizes), flush=True)
    return {"psnr": table, "mean": means, "scaling_factor": vae.config.scaling_factor}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=70.0, help="wall-clock training budget (the lr schedule follows it)")
    ap.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (schedule by step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "models" / "klvae-demo-f8c4.safetensors"))
    ap.add_argument("--work-dir", default=str(REPO / "train" / "runs"), help="fp32 checkpoint and eval json")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--ch", type=int, default=32)
    ap.add_argument("--norm-groups", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--scale-batches", type=int, default=16, help="8 crops of 256px each, for the scaling factor")
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--pilot", action="store_true", help="time fp32 vs bf16 training steps and exit")
    ap.add_argument("--pilot-seconds", type=float, default=60.0)
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out and exit")
    args = ap.parse_args()
    args.work_dir = Path(args.work_dir)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(args.threads)
    # Flush denormals to zero: a precaution (x86 handles denormal floats in microcode, and tiny Adam
    # moments or gradients could underflow into them). A clean measurement here showed no difference
    # over the first steps; an earlier 5x figure was another process sharing the CPU (see ThreadGovernor).
    torch.set_flush_denormal(True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} threads, args: {vars(args)}", flush=True)

    train_real, templates, heldout = gather_data(args)
    print(f"data: {len(train_real)} scikit-image photos, {len(templates)} template thumbnails, "
          f"held out: {[p.name for p in heldout]}", flush=True)
    if args.eval_only:
        evaluate(args, heldout)
        return

    pool = CropPool({"photos": train_real, "templates": templates}, args.crop, args.seed)
    model = build_model(args).to(memory_format=torch.channels_last).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.config.ch=} {model.config.ch_mult=} {model.config.norm_groups=}, {n_params} parameters", flush=True)
    if args.pilot:
        pilot(args, pool, model)
        return

    steps, minutes = train(args, pool, model)
    model.eval()
    scale, zmean = scaling_factor(args, pool, model)
    print(f"latent mode over training crops: mean {zmean:.4f}, std {1 / scale:.4f} -> scaling_factor {scale:.5f}", flush=True)
    save(args, model, scale, steps, minutes)
    result = evaluate(args, heldout)
    result.update({"steps": steps, "minutes": minutes, "parameters": n_params,
                   "file_bytes": Path(args.out).stat().st_size, "latent_mean": zmean, "args": {
                       k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}})
    (args.work_dir / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
