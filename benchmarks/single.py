"""The suites whose cases each run in a fresh process on this machine: core, tiling, precision, big.
`run_case` is one case (klvae, diffusers or ComfyUI; decode or encode; a mode), `run_suite` the whole
suite, side by side in one run, then the tables and the heat maps."""
import json
import os
import subprocess
import sys
from unittest import mock

import torch

from common import (BENCH, DTYPES, FAMILY_SUITES, OUT, cases, comfy_path, fidelity, latent_for, outputs, shared_vae,
                    tile_boundaries, timed)
from klvae import testing
from klvae.vae import KLVAEError, Tiling, images, load_vae
from klvae.vae import tiling as tiling_module
from klvae.vae.metrics import psnr_vs_full


def latent_shape(vae, size) -> tuple:
    f = vae.config.downscale
    return 1, vae.config.latent_channels, size // f, size // f


def run_case(system, op, size, mode, tile, family="sd1"):
    torch.set_num_threads(2)
    dvae = shared_vae(family)
    x = latent_for(size, family) if op == "decode" else testing.test_image(size)
    video = family in ("qwenimage", "qwenimage21")  # diffusers' Qwen-Image classes take and give [B, C, T, H, W]
    if op == "encode" and dvae.config.get("in_channels", 3) == 4:  # Qwen-Image 2.1's RGBA: every system opaque alpha
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    report = None
    # mode: [dtype-]tiling[-store]: "untiled", "exact", "exact-disk", "bounded", "tiled" (anchors),
    # "bf16", "bf16-exact" (precision suite); fp32 and the store the plan picks unless named.
    parts = mode.split("-")
    dname = parts.pop(0) if parts[0] in DTYPES else "fp32"
    tmode, store = (parts + ["untiled"])[0], (parts[1:] + ["auto"])[0]
    dtype = DTYPES[dname]
    if system == "klvae":
        vae = load_vae(dvae.state_dict(), family="sd1" if family == "sd1" else None, dtype=dtype)
        del dvae
        tiling = None if tmode == "untiled" else Tiling(mode=tmode, tile_size=tile or None, store=store,
                                                       spill_dir=os.path.join(OUT, "spill"))
        os.makedirs(os.path.join(OUT, "spill"), exist_ok=True)
        fn = (lambda: vae.decode(x, tiling=tiling)) if op == "decode" else (lambda: vae.encode(x, tiling=tiling).mode())
    elif system == "diffusers":
        vae = dvae.to(dtype)
        x = x.to(dtype)
        if tmode == "tiled":
            vae.enable_tiling()
        if video:
            fn = (lambda: vae.decode(x[:, :, None]).sample[:, :, 0]) if op == "decode" else \
                (lambda: vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0])
        else:
            fn = (lambda: vae.decode(x).sample) if op == "decode" else (lambda: vae.encode(x).latent_dist.mode())
    elif system == "comfy":
        sys.path.insert(0, comfy_path())
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options
        comfy.options.enable_args_parsing()  # so that --cpu is read, as `python main.py --cpu` does
        import comfy.sd
        # klvae's state dict has ComfyUI's keys (LDM's; Qwen-Image's original release's), as ComfyUI loads them
        sd = load_vae(dvae.state_dict(), family="sd1" if family == "sd1" else None).state_dict()
        del dvae
        vae = comfy.sd.VAE(sd=sd, dtype=dtype)
        # ComfyUI's tiled nodes' defaults: 64 px overlap, tile and overlap in latent units for decode
        f = vae.spacial_compression_decode()
        if op == "decode":
            x = x[:, :, None] if video else x  # ComfyUI's Wan VAE LATENT: [B, 16, T, h, w]
            fn = (lambda: vae.decode(x) if tmode == "untiled" else
                  vae.decode_tiled(x, tile_x=tile // f, tile_y=tile // f, overlap=64 // f))
        else:
            px = ((x + 1) / 2).permute(0, 2, 3, 1)  # ComfyUI IMAGE: [B, H, W, C] in 0..1
            fn = (lambda: vae.encode(px) if tmode == "untiled" else vae.encode_tiled(px, tile_x=tile, tile_y=tile, overlap=64))
    y, seconds, peak = timed(fn)
    if system == "comfy":
        y = y[:, :, 0] if op == "encode" and video else y  # one frame
        if op == "decode":
            y = (y[:, 0] if video else y).movedim(-1, 1) * 2 - 1  # [B, (T,) H, W, C] in 0..1 -> [B, C, H, W]
    if system == "klvae" and tmode != "untiled":
        r = vae.last_tiling
        report = dict(grid=r.grid, halo=r.halo, predicted=r.predicted_peak, statistics=r.statistics, tile=r.tile_size,
                      store=r.store, store_bytes=r.store_bytes, measured=r.measured_peak,
                      boundaries=tile_boundaries(vae, x.shape if op == "decode" else latent_shape(vae, size), r))
    os.makedirs(outputs(family), exist_ok=True)
    torch.save(y.float().contiguous(), os.path.join(outputs(family), f"{system}_{op}_{size}_{mode}_{tile}.pt"))
    return dict(system=system, op=op, size=size, mode=mode, tile=tile, seconds=seconds, peak=peak, report=report)


def heatmaps(results, size):
    """|tiled - untiled| per system and mode, side by side, labelled (system, mode, psnr_vs_full),
    one colour scale: docs/heatmap_decode_<size>.png."""
    ref = torch.load(os.path.join(OUT, "outputs", f"klvae_decode_{size}_untiled_0.pt"))
    panels, keys, seen = [], [], set()
    for c in results:  # one panel per mode: exact (the first store and tile size run), bounded, each anchor's tiled
        key = (c["system"], c["mode"].split("-")[0])
        if c["op"] == "decode" and c["size"] == size and key[1] in ("exact", "bounded", "tiled") and key not in seen:
            seen.add(key)
            y = torch.load(os.path.join(OUT, "outputs", f"{c['system']}_decode_{size}_{c['mode']}_{c['tile']}.pt"))
            d = ((y.clamp(-1, 1) - ref.clamp(-1, 1)).abs().mean(1)[0] / 2).numpy()
            name = {"klvae": "klvae", "diffusers": "diffusers 0.42.1", "comfy": "ComfyUI 0.3.75"}[c["system"]]
            panels.append((f"{name} {key[1]}\n{c['tile']} px tiles, psnr_vs_full {psnr_vs_full(y, ref):.1f} dB", d))
            keys.append(f"{c['system']} {c['mode']} {c['tile']}")
    path = os.path.join(OUT, f"heatmap_decode_{size}.png")
    # Each panel's figure also in the PNG's text chunks (klvae.psnr_vs_full.<system> <mode>), so a test
    # holds the shipped picture to the table printed by the same run (tests/test_docs.py).
    text = {f"klvae.psnr_vs_full.{key}": title.rsplit("psnr_vs_full ", 1)[1].split(" dB")[0]
            for key, (title, _) in zip(keys, panels)}
    text["klvae.command"] = f"python benchmarks/bench.py tiling --sizes {size}"
    images.save_png(images.heat_map(panels, scale=0.05, note=f"{size}x{size} decode"), path, text)
    return path, [name for name, _ in panels]


def table(results, suite):
    gib = lambda b: f"{b / 2**30:.2f}"
    if suite == "precision":
        rows = ["| size | system | dtype / mode | time s | x faster than diffusers fp32 | x faster than klvae fp32 | peak GiB | psnr vs klvae fp32 dB |",
                "|---|---|---|---|---|---|---|---|"]
        for r in results:
            rows.append(f"| {r['size']} | {r['system']} | {r['mode']} | {r['seconds']:.0f} | {r['speedup_vs_diffusers_fp32']:.1f} | "
                        f"{r['speedup_vs_klvae_fp32']:.1f} | {gib(r['peak'])} | {r['psnr_vs_fp32']:.1f} |")
        return "\n".join(rows)
    if suite == "core":
        rows = ["| op | size | klvae s | diffusers s | time ratio (diffusers/klvae) | klvae peak GiB | diffusers peak GiB | peak saved |",
                "|---|---|---|---|---|---|---|---|"]
        for op in ("decode", "encode"):
            for size in sorted({r["size"] for r in results}):
                k = next((r for r in results if r["system"] == "klvae" and r["op"] == op and r["size"] == size), None)
                d = next((r for r in results if r["system"] == "diffusers" and r["op"] == op and r["size"] == size), None)
                if k and d:
                    rows.append(f"| {op} | {size} | {k['seconds']:.0f} | {d['seconds']:.0f} | {d['seconds'] / k['seconds']:.2f} | "
                                f"{gib(k['peak'])} | {gib(d['peak'])} | {100 * (1 - k['peak'] / d['peak']):.0f}% |")
        return "\n".join(rows)
    rows = ["| op | size | system | mode | tile px | bands/tiles | time s | x klvae untiled | peak RSS GiB | device peak GiB "
            "| predicted GiB | store GiB | psnr_vs_full dB | max_abs_vs_full | seam_ratio | latent rel-L2 |",
            "|---" * 16 + "|"]
    for r in results:
        rep = r.get("report") or {}
        grid = "x".join(map(str, rep["grid"])) if rep else ""
        dev = rep.get("measured") if rep.get("store") == "disk" else r["peak"]
        rows.append(f"| {r['op']} | {r['size']} | {r['system']} | {r['mode']} | {r['tile'] or ''} | {grid} | "
                    f"{r['seconds']:.0f} | {r.get('ratio_time', float('nan')):.2f} | {gib(r['peak'])} | "
                    f"{gib(dev) if dev is not None else ''} | {gib(rep['predicted']) if rep else ''} | "
                    f"{gib(rep['store_bytes']) if rep.get('store_bytes') else ''} | "
                    f"{r.get('psnr_vs_full', float('nan')):.1f} | {r.get('max_abs_vs_full', float('nan')):.1e} | "
                    f"{r.get('seam_ratio', float('nan')):.2f} | {r.get('rel_l2_vs_full', float('nan')):.1e} |")
    return "\n".join(rows)


def big_plans(measured) -> str:
    """The plans of larger decodes on this machine (nothing run), with times predicted from the
    measured run's rate (seconds per FLOP of its convolutions and attention). A plan this machine
    refuses (a store beyond its disk) is shown with the refusal and as it would run with room."""
    dtype = measured["mode"].split("-")[0]
    vae = load_vae(shared_vae().state_dict(), family="sd1", dtype=dtype)
    size = measured["size"]
    rate = measured["seconds"] / vae.plan_decode((1, 4, size // 8, size // 8), Tiling(mode="exact")).flops
    rows = ["| decode | store | tile px | bands | predicted peak GiB | store GiB | TFLOP | predicted time |",
            "|---|---|---|---|---|---|---|---|"]
    for side in (size, 2 * size):
        shape, tiling = (1, 4, side // 8, side // 8), Tiling(mode="exact", spill_dir=os.path.join(OUT, "spill"))
        label = f"{side}^2 {dtype}" + (f" (measured: {measured['seconds']:.0f} s)" if side == size else "")
        try:
            p = vae.plan_decode(shape, tiling)
        except KLVAEError as e:  # refused here: say so, then the plan on a disk with room
            rows.append(f"| {label}: refused here | {e} |")
            with mock.patch.object(tiling_module, "_store_room", lambda *a: 2**62), \
                    mock.patch.object(tiling_module, "check_spill_folder", lambda *a: None):
                p = vae.plan_decode(shape, tiling)
            label += ", with room for the store"
        if side == size:  # what ran (the plan depends on the memory free at the time)
            r = measured["report"]
            store, tile, bands, peak, store_bytes = r["store"], r["tile"], r["grid"][0], r["predicted"], r["store_bytes"]
        else:
            store, tile, bands, peak, store_bytes = p.store, p.tile_size, p.grid[0], p.predicted, p.store_bytes
        rows.append(f"| {label} | {store} | {tile} | {bands} | {peak / 2**30:.2f} | {store_bytes / 2**30:.1f} | "
                    f"{p.flops / 1e12:.0f} | {p.flops * rate / 60:.0f} min |")
    return "\n".join(rows)


def run_suite(suite, sizes, systems, modes, ops=("decode", "encode")):
    """Every case of a suite, each in a fresh process; then ratios, fidelity, the table."""
    os.makedirs(OUT, exist_ok=True)
    family = suite if suite in FAMILY_SUITES else "sd1"
    shared_vae(family)  # make the shared weights once, outside the timed cases
    results, failed = [], []  # a case that fails is a finding too: kept in the JSON and the table with its reason
    for system, op, size, mode, tile in cases(suite, sizes, systems):
        if modes and mode not in modes or op not in ops:
            continue
        latent_for(size, family)
        cmd = [sys.executable, BENCH, suite, "--case", f"{system}:{op}:{size}:{mode}:{tile}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{system} {op} {size} {mode}: FAILED\n{p.stderr[-1500:]}", file=sys.stderr)
            why = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
            if p.returncode < 0:  # SIGKILL here is the kernel's OOM killer: the case needed more than this machine has
                why = f"killed by signal {-p.returncode}" + (" (out of memory)" if p.returncode == -9 else "")
            failed.append(dict(system=system, op=op, size=size, mode=mode, tile=tile, error=why))
        else:
            r = json.loads(line[0][7:])
            results.append(r)
            print(f"{system:9} {op:6} {size:5} {mode:8} {r['seconds']:7.1f} s  peak {r['peak'] / 2**30:5.2f} GiB", flush=True)
        with open(os.path.join(OUT, f"{suite}.json"), "w") as f:  # as it goes: a stopped run keeps its cases
            json.dump(results + failed, f, indent=1)
    # fidelity and ratios against klvae untiled of the same op and size
    base = {(r["op"], r["size"]): r for r in results if r["system"] == "klvae" and r["mode"] == "untiled"}
    for r in results:
        b = base.get((r["op"], r["size"]))
        if b:
            r["ratio_time"] = r["seconds"] / b["seconds"]
            if r is not b:  # every other case against klvae untiled: the anchors' untiled passes show parity
                ref = torch.load(os.path.join(outputs(family), f"klvae_{r['op']}_{r['size']}_untiled_0.pt"))
                r.update(fidelity(r, ref, outputs(family)))
    if suite == "precision":
        ref_case = next(r for r in results if r["system"] == "klvae" and r["mode"] == "fp32")
        ref = torch.load(os.path.join(OUT, "outputs", f"klvae_decode_{ref_case['size']}_fp32_0.pt"))
        d32 = next((r for r in results if r["system"] == "diffusers" and r["mode"] == "fp32"), None)
        for r in results:
            y = torch.load(os.path.join(OUT, "outputs", f"{r['system']}_decode_{r['size']}_{r['mode']}_{r['tile']}.pt"))
            if r["system"] == "comfy":
                y = y.clamp(-1, 1)
            r["psnr_vs_fp32"] = testing.psnr_vs_full(y, ref) if r is not ref_case else float("inf")
            r["speedup_vs_diffusers_fp32"] = d32["seconds"] / r["seconds"] if d32 else float("nan")
            r["speedup_vs_klvae_fp32"] = ref_case["seconds"] / r["seconds"]
    if suite == "core":
        for r in results:
            k = next((q for q in results if q["system"] == "klvae" and q["op"] == r["op"] and q["size"] == r["size"]), None)
            r["ratio_time_vs_klvae"] = r["seconds"] / k["seconds"]
            r["ratio_peak_vs_klvae"] = r["peak"] / max(k["peak"], 1)
    with open(os.path.join(OUT, f"{suite}.json"), "w") as f:
        json.dump(results + failed, f, indent=1)
    if sizes:  # a run of chosen sizes also keeps its own copy (the next run of the suite rewrites <suite>.json)
        with open(os.path.join(OUT, f"{suite}_{'_'.join(map(str, sizes))}.json"), "w") as f:
            json.dump(results + failed, f, indent=1)
    print(table(results, "tiling" if family != "sd1" else suite))
    for r in failed:
        print(f"failed: {r['system']} {r['op']} {r['size']} {r['mode']} {r['tile'] or ''}: {r['error']}")
    if suite == "tiling":
        for size in sorted({r["size"] for r in results if r["op"] == "decode"}):
            print("heat map:", *heatmaps(results, size))
    if suite == "big" and results:
        print(big_plans(results[0]))
