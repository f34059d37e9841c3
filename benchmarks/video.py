"""Clips through Wan 2.1's VAE (the calibrated full-size Qwen-Image VAE: the same network; `wan22`:
Wan 2.2's, 16x, calibrated full-size too): klvae
untiled (Wan's time chunks) and exact (time chunks x bands, device and disk stores) against
diffusers' AutoencoderKLQwenImage untiled and enable_tiling(), and ComfyUI's VAE Decode and VAE
Decode (Tiled) node with its defaults (512 px / 64 overlap, temporal 64 / 8 frames) and with
temporal tiles shorter than the clip (256 px, 8 / 4 frames: "tiled-t8"), each case in a fresh
process.

    python benchmarks/bench.py wan                          # 256x448 px, 17 frames: every case
    python benchmarks/bench.py wan --sizes 480x832 --frames 17 --systems klvae,diffusers --modes untiled,exact-device,exact-disk
    python benchmarks/bench.py wan22                        # Wan 2.2's VAE, 256x448 px, 17 frames

The clip: the synthetic test image panning 3 px a frame (klvae's exact encode of it gives the
latent every decode case decodes). Columns: time, x klvae untiled, the rise of peak RSS, klvae's
predicted peak and its measured device-side peak (anonymous memory: what the disk store leaves
out), the worst frame's PSNR against klvae's untiled clip (both clamped to [-1, 1]), and flicker:
the smallest and largest frame-to-frame change of the clip over the untiled clip's at the same
frame (1.00-1.00: every frame moves as in the untiled video; a window that restarts the causal
cache shows as frozen frames, < 1, and jumps, > 1).
"""
import json
import os
import subprocess
import sys

import torch

from common import BENCH, OUT, comfy_path, shared_vae, timed
from klvae import testing
from klvae.vae import Tiling, load_vae

SUITES = {"wan": "qwenimage", "wan22": "wan22"}  # suite -> the family whose calibrated VAE it runs


def folder(suite) -> str:
    return os.path.join(OUT, "outputs_wan" if suite == "wan" else f"outputs_{suite}")


def pan_clip(H, W, n) -> torch.Tensor:
    """[1, 3, n, H, W] in [-1, 1]: a window of the test image moving 3 px right per frame."""
    big = testing.test_image(H, W + 3 * n)
    return torch.stack([big[:, :, :, 3 * t:3 * t + W] for t in range(n)], dim=2)


def clip_latent(H, W, T, suite="wan") -> torch.Tensor:
    """The raw latent [1, z, T, H/f, W/f] of the pan clip of 1 + 4(T - 1) frames (made once, cached)."""
    path = os.path.join(OUT, f"latent_{suite}_{H}x{W}x{T}.pt")
    if not os.path.exists(path):
        vae = load_vae(shared_vae(SUITES[suite]).state_dict())
        torch.save(vae.encode(pan_clip(H, W, 1 + 4 * (T - 1)), tiling="exact").mode().contiguous(), path)
    return torch.load(path, weights_only=True)


def cases(sizes, frames, systems):
    for H, W in sizes:
        for T in frames:
            yield "klvae", "decode", H, W, T, "untiled", 0
            yield "klvae", "decode", H, W, T, "exact-device", 256
            yield "klvae", "decode", H, W, T, "exact-disk", 256
            for system in ("diffusers", "comfy"):
                if system in systems:
                    yield system, "decode", H, W, T, "untiled", 0
                    yield system, "decode", H, W, T, "tiled", 512
            if "comfy" in systems:  # core's temporal tiles on a clip longer than one: 8 frames, 4 overlapping
                yield "comfy", "decode", H, W, T, "tiled-t8", 256


def run_case(system, op, H, W, T, mode, tile, suite="wan"):
    torch.set_num_threads(2)
    dvae = shared_vae(SUITES[suite])
    z = clip_latent(H, W, T, suite)
    tmode, store = (mode.split("-") + ["auto"])[:2]
    report = None
    if system == "klvae":
        vae = load_vae(dvae.state_dict())
        del dvae
        os.makedirs(os.path.join(OUT, "spill"), exist_ok=True)
        tiling = None if tmode == "untiled" else Tiling(mode=tmode, tile_size=tile or None, store=store,
                                                       spill_dir=os.path.join(OUT, "spill"))
        fn = lambda: vae.decode(z, tiling=tiling)
    elif system == "diffusers":
        if tmode == "tiled":
            dvae.enable_tiling()
        fn = lambda: dvae.decode(z).sample
    else:
        sys.path.insert(0, comfy_path())
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.sd
        sd = load_vae(dvae.state_dict()).state_dict()  # the original/ComfyUI keys
        del dvae
        vae = comfy.sd.VAE(sd=sd)
        if tmode == "untiled":
            fn = lambda: vae.decode(z)
        else:
            import nodes  # ComfyUI's own VAE Decode (Tiled) node, its defaults: 64 px overlap, temporal 64 / 8
            temporal = (8, 4) if store == "t8" else (64, 8)
            fn = lambda: nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile, 64, *temporal)[0]
    y, seconds, peak = timed(fn)
    if system == "comfy":  # IMAGE frames [B * T, H, W, 3] (or [B, T, H, W, 3]) in [0, 1]
        y = y.reshape(-1, *y.shape[-3:]).movedim(-1, 0)[None] * 2 - 1
    if system == "klvae" and tmode != "untiled":
        r = vae.last_tiling
        report = dict(grid=r.grid, chunks=r.chunks, predicted=r.predicted_peak, store=r.store, store_bytes=r.store_bytes,
                      measured=r.measured_peak, sentence=str(r))
    os.makedirs(folder(suite), exist_ok=True)
    torch.save(y.float().contiguous(), os.path.join(folder(suite), name(system, H, W, T, mode, tile)))
    return dict(system=system, op=op, H=H, W=W, T=T, frames=y.shape[2], mode=mode, tile=tile, seconds=seconds,
                peak=peak, report=report)


def name(system, H, W, T, mode, tile) -> str:
    return f"{system}_decode_{H}x{W}x{T}_{mode}_{tile}.pt"


def flicker(y, ref) -> tuple:
    """The smallest and largest frame-to-frame change of y over the untiled clip's at the same frame
    (1.00-1.00: every frame moves as in the untiled video; a window that restarts the causal cache
    freezes frames, < 1, then jumps, > 1)."""
    d = lambda v: (v[:, :, 1:] - v[:, :, :-1]).abs().transpose(1, 2).flatten(2).mean(2)  # [B, T - 1]
    r = d(y.clamp(-1, 1)) / d(ref.clamp(-1, 1)).clamp_min(1e-6)
    return float(r.min()), float(r.max())


def run_suite(sizes, frames, systems, modes=(), suite="wan"):
    results = []
    shared_vae(SUITES[suite])
    for case in cases(sizes, frames, systems):
        system, op, H, W, T, mode, tile = case
        if modes and mode not in modes:
            continue
        clip_latent(H, W, T, suite)
        p = subprocess.run([sys.executable, BENCH, suite, "--case", ":".join(map(str, case))],
                           capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            why = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
            results.append(dict(system=system, op=op, H=H, W=W, T=T, mode=mode, tile=tile, error=why))
            print(f"{system} {H}x{W}x{T} {mode}: FAILED {why}", file=sys.stderr, flush=True)
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        print(f"{system:9} {H}x{W} T={T} {mode:12} {r['seconds']:7.1f} s  peak {r['peak'] / 2**30:5.2f} GiB", flush=True)
        with open(os.path.join(OUT, f"{suite}.json"), "w") as f:
            json.dump(results, f, indent=1)
    for r in results:
        if "error" in r:
            continue
        base = next((b for b in results if b["system"] == "klvae" and b["mode"] == "untiled" and "error" not in b
                     and (b["H"], b["W"], b["T"]) == (r["H"], r["W"], r["T"])), None)
        if base is None:
            continue
        ref = torch.load(os.path.join(folder(suite), name("klvae", r["H"], r["W"], r["T"], "untiled", 0)))
        y = torch.load(os.path.join(folder(suite), name(r["system"], r["H"], r["W"], r["T"], r["mode"], r["tile"])))
        r["ratio_time"] = r["seconds"] / base["seconds"]
        r["worst_frame_db"] = testing.worst_frame_psnr(y, ref) if r is not base else float("inf")
        r["flicker"] = flicker(y, ref)
    with open(os.path.join(OUT, f"{suite}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


def table(results) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    rows = ["| clip | system | mode | time s | x klvae untiled | peak RSS GiB | device peak GiB | predicted GiB "
            "| store GiB | worst frame dB | flicker |", "|---" * 11 + "|"]
    for r in results:
        clip = f"{r['W']}x{r['H']} x {1 + 4 * (r['T'] - 1)}"
        if "error" in r:
            rows.append(f"| {clip} | {r['system']} | {r['mode']} | failed: {r['error'][:80]} |" + " |" * 7)
            continue
        rep = r.get("report") or {}
        dev = rep.get("measured") if rep.get("store") == "disk" else r["peak"]
        db = r.get("worst_frame_db", float("nan"))
        rows.append(f"| {clip} | {r['system']} | {r['mode']} | {r['seconds']:.0f} | {r.get('ratio_time', float('nan')):.2f} | "
                    f"{gib(r['peak'])} | {gib(dev)} | {gib(rep['predicted']) if rep else ''} | "
                    f"{gib(rep['store_bytes']) if rep else ''} | {'inf' if db == float('inf') else f'{db:.0f}'} | "
                    f"{'-'.join(f'{v:.2f}' for v in r.get('flicker', (float('nan'),) * 2))} |")
    return "\n".join(rows)
