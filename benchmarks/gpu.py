"""The GPU suite, prepared for a lent device: CUDA tests, then klvae, diffusers (eager, compiled, tiled)
and ComfyUI side by side at 1K-8K, clips through Wan 2.1's and Wan 2.2's VAEs, Qwen-Image 2.1's at 2K-4K,
every case a fresh process within a time budget; per case: time, peak memory against the plan, host
syncs, the guard, finite output, trailing zero rows (the 2**31 kernels); results in DIR/gpu.json and DIR/gpu.log.
`--device cpu --sizes 64` runs the same script end to end on the CPU (tests/test_gpu_suite.py)."""
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import torch

from common import BENCH, DTYPES, comfy_path, peak_rss_reset
from klvae.vae.memory import proc_status
from klvae import testing
from klvae.vae import Tiling, load_vae, preset


# ---- the GPU suite: one command on a lent GPU, the same script on the CPU at toy sizes --------------
# Sizes per case; --sizes N (the CPU smoke run) sets every case to N. The latent of every decode is
# the calibrated VAE's encoding of the test image (exact tiling where the image would not fit).
GPU_CASES = [
    # system, op, dtype, tiling (None = untiled), size
    ("klvae", "decode", "bf16", None, 1024), ("klvae", "decode", "fp16", None, 1024),
    ("klvae", "decode", "bf16", None, 2048), ("klvae", "decode", "fp16", None, 2048),
    ("klvae", "decode", "bf16", None, 4096),                 # the reference for 4096's tiled psnr_vs_full
    ("klvae", "decode", "bf16", "exact", 4096), ("klvae", "decode", "fp16", "exact", 4096),
    ("klvae", "decode", "bf16", "bounded", 4096),
    ("klvae", "decode", "bf16", "exact", 8192), ("klvae", "decode", "fp16", "exact", 8192),
    ("klvae", "decode", "bf16", "bounded", 8192),
    ("klvae", "encode", "bf16", None, 2048), ("klvae", "encode", "bf16", "exact", 4096),
    ("klvae-flux", "decode", "bf16", "exact", 4096),
    ("diffusers", "decode", "bf16", None, 1024),
    ("diffusers-compile", "decode", "bf16", None, 1024),  # torch.compile'd decoder: the "fastest compiled" figure
    ("diffusers", "decode", "bf16", "tiled", 1024),
    ("diffusers", "decode", "bf16", None, 2048), ("diffusers", "decode", "bf16", "tiled", 4096),
    ("comfy", "decode", "bf16", None, 1024), ("comfy", "decode", "bf16", "tiled", 1024),
    ("comfy", "decode", "bf16", None, 2048), ("comfy", "decode", "bf16", "tiled", 4096),
    # clips through Wan 2.1's VAE, "HxWxframes" (SGLang's H200 figures for these two: 1.56 s and 2.32 s)
    ("klvae-wan", "decode", "bf16", None, "480x832x81"), ("klvae-wan", "decode", "bf16", "exact", "480x832x81"),
    ("klvae-wan", "decode", "bf16", None, "704x1280x61"), ("klvae-wan", "decode", "bf16", "exact", "704x1280x61"),
    ("diffusers-wan", "decode", "bf16", None, "480x832x81"), ("diffusers-wan", "decode", "bf16", "tiled", "480x832x81"),
    ("diffusers-wan", "decode", "bf16", None, "704x1280x61"), ("diffusers-wan", "decode", "bf16", "tiled", "704x1280x61"),
    # Qwen-Image 2.1's VAE (RGBA, 16x) at its recommended 2048 and at 4096; Wan 2.2's on FastWan's clip
    # (704x1280x121: diffusers bf16 4.02 s, TensorRT-LLM 3.00 s on a B200, published)
    ("klvae-qi21", "decode", "bf16", None, 2048), ("klvae-qi21", "decode", "bf16", "exact", 2048),
    ("klvae-qi21", "decode", "bf16", "exact", 4096), ("diffusers-qi21", "decode", "bf16", None, 2048),
    ("klvae-wan22", "decode", "bf16", None, "704x1280x121"), ("klvae-wan22", "decode", "bf16", "exact", "704x1280x121"),
    ("diffusers-wan22", "decode", "bf16", None, "704x1280x121"),
]
FAMILY_OF = {"klvae-flux": "flux", "klvae-wan": "qwenimage", "diffusers-wan": "qwenimage", "klvae-qi21": "qwenimage21",
             "diffusers-qi21": "qwenimage21", "klvae-wan22": "wan22", "diffusers-wan22": "wan22"}
NARROW_SMOKE = {"qwenimage21": dict(ch=16, decoder_ch=24), "wan22": dict(ch=16, decoder_ch=24)}  # the CPU smoke run


def gpu_folder(family, out_dir, smoke):
    """The calibrated VAE as a diffusers folder, made once per run; the cases load it from there
    (klvae's cases without importing diffusers: a fresh process per case stays cheap)."""
    cache = os.path.join(out_dir, f"vae_{family}_{'smoke' if smoke else 'full'}")
    if not os.path.exists(os.path.join(cache, "config.json")):  # full width: ComfyUI's VAE fixes it (the 16x
        # families are narrowed for the CPU smoke run: 0.3-0.7 G parameters would make it minutes)
        testing.calibrated_vae(family, seed=0, image_size=64 if smoke else 256, cache=cache,
                               **(NARROW_SMOKE.get(family, {}) if smoke else {}))
    return cache


def gpu_latent(folder, family, size, dev, out_dir, smoke):
    """The calibrated VAE's latent of the test image at `size` (made once, in fp32)."""
    zpath = os.path.join(out_dir, f"latent_{family}_{size}_{'s' if smoke else 'f'}.pt")
    if not os.path.exists(zpath):
        if size > 2048:  # 2x2 copies of the half-size latent: no 8K encode needed
            z = gpu_latent(folder, family, size // 2, dev, out_dir, smoke)
            z = torch.cat([torch.cat([z, z], 3)] * 2, 2)
        else:
            k32 = load_vae(folder, family=family, device=dev, dtype="fp32")
            z = k32.encode(testing.test_image(size).to(dev)).mode()
        torch.save(z.cpu(), zpath)
    return torch.load(zpath, weights_only=True).to(dev)


def gpu_case(system, op, dtype, tiling, size, device, out_dir, smoke):
    """One GPU-suite case in this process: time after a warm-up (synchronised), peak memory, the
    plan's prediction, host syncs inside the call, the guard's firings; the output saved."""
    family = FAMILY_OF.get(system, "sd1")
    dev = torch.device(device)
    dt = DTYPES[dtype]
    if smoke:  # the CPU's bf16/fp16 convolutions are slow (diffusers' bf16 decode: 80 s at 64 px); the smoke run checks code paths
        dt = torch.float32
    folder = gpu_folder(family, out_dir, smoke)
    if isinstance(size, str):  # a clip, HxWxframes: seeded latents (the timing does not depend on them)
        H, W, F = map(int, size.split("x"))
        c = preset(family)
        f = 2 ** (len(c.ch_mult) - 1) * c.patch_size
        z = torch.randn(1, c.latent_channels, 1 + (F - 1) // 4, H // f, W // f,
                        generator=torch.Generator().manual_seed(0)).to(dev)
    else:
        z = gpu_latent(folder, family, size, dev, out_dir, smoke)
    x = testing.test_image(size).to(dev) if op == "encode" else None
    report, plan_pred, guard = {}, None, None
    if system.startswith("klvae"):
        vae = load_vae(folder, family=family if family in ("sd1", "flux") else None, device=dev, dtype=dt)
        t = Tiling(mode=tiling) if tiling else None
        if z.dim() == 5 and t is None:  # the untiled clip (Wan's chunks) has no plan
            plan = None
        else:
            plan = vae.plan_decode(z.shape, t) if op == "decode" else vae.plan_encode(x.shape, t)
            plan_pred = plan.predicted
        fn = (lambda: vae.decode(z.to(dt), tiling=plan)) if op == "decode" else (lambda: vae.encode(x.to(dt), tiling=plan).mode())
    elif system in ("diffusers-wan", "diffusers-qi21", "diffusers-wan22"):  # the Wan classes take [B, C, T, h, w]
        import diffusers
        with open(os.path.join(folder, "config.json")) as f:
            vae = getattr(diffusers, json.load(f)["_class_name"]).from_pretrained(folder).eval().to(dev, dt)
        if tiling:
            vae.enable_tiling()  # diffusers' own tiles in space (overlapping, blended: not exact)
        z5 = z if z.dim() == 5 else z[:, :, None]
        fn = (lambda: vae.decode(z5.to(dt)).sample)
    elif system in ("diffusers", "diffusers-compile"):
        from diffusers import AutoencoderKL as DAutoencoderKL
        vae = DAutoencoderKL.from_pretrained(folder).eval().to(dev, dt)
        if tiling:
            vae.enable_tiling()
        if system == "diffusers-compile":  # as diffusers' docs speed up a VAE: channels-last, the decoder compiled;
            # the warm-up below compiles. The CPU smoke run traces with dynamo only (inductor's C++ build: minutes)
            vae = vae.to(memory_format=torch.channels_last)
            vae.decoder = torch.compile(vae.decoder, backend="eager" if smoke else "inductor")
        fn = (lambda: vae.decode(z.to(dt)).sample)
    else:
        sys.path.insert(0, comfy_path())
        sys.argv = [sys.argv[0]] + (["--cpu"] if dev.type == "cpu" else [])
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.sd
        sd = load_vae(folder, family=family).state_dict()
        vae = comfy.sd.VAE(sd=sd, dtype=dt)
        fn = (lambda: vae.decode(z) if not tiling else vae.decode_tiled(z, tile_x=64, tile_y=64, overlap=8))
    sync = lambda: torch.cuda.synchronize(dev) if dev.type == "cuda" else None
    with torch.inference_mode():
        fn()  # warm-up: kernels chosen, caches filled
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        else:
            base = peak_rss_reset()
        syncs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            t0 = time.perf_counter()
            y = fn()
            sync()
            seconds = time.perf_counter() - t0
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) - base
        else:
            # the kernel batches RSS counters per CPU, so a case that allocates nothing new (its
            # warm-up left the memory in place) can read a few pages under its base: that is zero
            peak = max(0, proc_status("VmHWM") - base)
    if system.startswith("klvae"):
        guard = list(vae.guard_log)
        r = vae.last_tiling
        if r is not None:
            report = dict(mode=r.mode, store=r.store, store_bytes=r.store_bytes, grid=r.grid, steps=r.steps)
    if system == "comfy":
        y = y.movedim(-1, 1) * 2 - 1
    y = y.float().cpu()
    finite = bool(torch.isfinite(y).all())
    # pytorch/pytorch#141831: kernels that index past 2**31 elements (a 4096^2 decoder's 128-channel
    # activations are exactly 2**31) returned zeros there. Zeros show as trailing rows of exact 0.0
    # (an image in [-1, 1] has none); counted for every case
    rows = (y == 0).flatten(0, -3).all(0).all(-1) if y.dim() >= 3 else torch.zeros(0, dtype=torch.bool)
    zero_tail = int(rows.flip(0).int().cumprod(0).sum())
    name = f"{system}_{op}_{dtype}_{tiling or 'untiled'}_{size}"
    torch.save(y, os.path.join(out_dir, name + ".pt"))
    return dict(name=name, system=system, op=op, dtype=dtype, tiling=tiling or "untiled", size=size,
                seconds=seconds, ran_dtype=str(dt).removeprefix("torch."), peak=peak, predicted=plan_pred, host_syncs=len(syncs), guard=guard,
                finite=finite, zero_tail_rows=zero_tail, report=report)


def gpu_suite(out_dir, device, sizes, timeout_total=480):
    """Every GPU case in a fresh process, under an overall time limit; then fidelity and a table."""
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "gpu.log"), "a")
    say = lambda m: (print(m, flush=True), log.write(m + "\n"), log.flush())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for mod in ("diffusers", "safetensors", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # a missing package is recorded, its cases skipped
            versions[mod] = f"missing ({type(e).__name__})"
    say(f"versions: {json.dumps(versions)}")
    t_start = time.time()
    results = {"versions": versions, "cases": [], "tests": None}
    if device != "cpu":  # (1) the CUDA tests
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "gpu or cuda", "tests/test_precision.py"],
                           capture_output=True, text=True, timeout=300)
        results["tests"] = r.stdout[-2000:]
        say(f"CUDA tests: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]}")
    smoke = device == "cpu"
    cases, seen = [], set()
    for system, op, dtype, tiling, size in GPU_CASES:
        if sizes:  # the smoke run: every system and mode once, at the given size (clips: 5 frames of it)
            key = (system, op, tiling)
            if key in seen:
                continue
            seen.add(key)
            size = f"{sizes[0]}x{sizes[0]}x5" if isinstance(size, str) else sizes[0]
        cases.append((system, op, dtype, tiling, size))
    # one fresh process per case on a GPU (peaks and timings of their own); the CPU smoke run, which
    # checks code paths only, runs each system's cases in one process
    groups = [[c] for c in cases] if not smoke else [[c for c in cases if c[0] == s] for s in dict.fromkeys(c[0] for c in cases)]
    for group in groups:
        left = timeout_total - (time.time() - t_start)
        if left < 10:
            say(f"skipped (time): {group}")
            continue
        cmd = [sys.executable, BENCH, "gpu", "--gpu-case", json.dumps(group),
               "--device", device, "--out", out_dir] + (["--smoke"] if smoke else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, 240))
            so, why = p.stdout, (p.stderr.strip().splitlines() or ["?"])[-1][:300]
        except subprocess.TimeoutExpired as e:
            so, why = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timed out"
        done = [json.loads(l[7:]) for l in so.splitlines() if l.startswith("RESULT ")]
        for system, op, dtype, tiling, size in group:
            r = next((r for r in done if (r["system"], r["op"], r["dtype"], r["tiling"], r["size"])
                      == (system, op, dtype, tiling or "untiled", size)), None)
            if r is None:
                say(f"failed: {system} {op} {dtype} {tiling} {size}: {why}")
                results["cases"].append(dict(system=system, op=op, dtype=dtype, tiling=tiling or "untiled", size=size, error=why))
                continue
            results["cases"].append(r)
            say(f"{r['name']:40} {r['seconds']:8.3f} s  peak {r['peak'] / 2**30:7.2f} GiB  predicted "
                f"{(r['predicted'] or 0) / 2**30:7.2f} GiB  syncs {r['host_syncs']}  guard {len(r['guard'] or [])}  "
                f"finite {r['finite']}  zero tail rows {r['zero_tail_rows']}")
    for r in results["cases"]:  # psnr_vs_full against the same system's untiled output where it ran
        if "error" in r or r["tiling"] == "untiled":
            continue
        ref = os.path.join(out_dir, f"{r['system']}_{r['op']}_bf16_untiled_{r['size']}.pt")
        if os.path.exists(ref):
            y, full = torch.load(os.path.join(out_dir, r["name"] + ".pt")), torch.load(ref)
            r["psnr_vs_full"] = testing.psnr_vs_full(y, full) if r["op"] == "decode" else None
            r["max_abs_vs_full"] = testing.max_abs_vs_full(y, full)
    with open(os.path.join(out_dir, "gpu.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name in os.listdir(out_dir):  # outputs are big; the JSON and the log come back
        if name.endswith(".pt"):
            os.remove(os.path.join(out_dir, name))
    say(f"done in {time.time() - t_start:.0f} s: {len(results['cases'])} cases")
    return results
