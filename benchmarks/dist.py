"""The distributed suite: one decode over 1, 2 and 4 gloo ranks (1 thread each), klvae against
DistVAE, with what each rank sends counted by wrapping the collectives. A size HxWxF is a clip of F
frames through Wan 2.1's VAE (the calibrated full-size one, video.py's pan clip): klvae's untiled
clip in one process against its exact clip sharded over 2 ranks (DistVAE shards images only).

    python benchmarks/bench.py dist --sizes 1024
    python benchmarks/bench.py dist --sizes 256x448x9"""
import json
import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from common import BENCH, OUT, cases, latent_for, shared_vae, timed
from klvae import testing
from klvae.vae import Tiling, load_vae


# ---- distributed: one decode over several processes (gloo on this CPU) ------------------------------
COMM = {"bytes": 0}


def count_communication():
    """Count the bytes this rank hands to torch.distributed (klvae and DistVAE alike): what each
    collective or send is given, not the ring algorithm's traffic."""
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


def clip_latent(size: str):
    """The latent of the pan clip "HxWxframes" (video.py's, made once and cached)."""
    import video
    H, W, F = map(int, size.split("x"))
    return video.clip_latent(H, W, 1 + (F - 1) // 4)


def run_rank(system, size, rank, world, port):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    count_communication()
    if system == "klvae-wan":  # a clip: H x W x frames
        vae, z = load_vae(shared_vae("qwenimage").state_dict()), clip_latent(size)
        tiling = Tiling(mode="exact", process_group=dist.group.WORLD) if world > 1 else None
        fn = lambda: vae.decode(z, tiling=tiling)
    elif system == "klvae":
        vae, z = load_vae(shared_vae().state_dict(), family="sd1"), latent_for(size)
        tiling = Tiling(mode="exact", process_group=dist.group.WORLD) if world > 1 else None
        fn = lambda: vae.decode(z, tiling=tiling)
    else:  # DistVAE (xDiT's patch-parallel VAE) on diffusers' AutoencoderKL
        from distvae.vae.parallel import parallelize_decoder
        vae, z = shared_vae(), latent_for(size)
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
    procs = [subprocess.Popen([sys.executable, BENCH, "dist", "--rank-case", f"{system}:{size}:{r}:{world}:{port}"],
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


def dist_suite(sizes):
    os.makedirs(os.path.join(OUT, "outputs"), exist_ok=True)
    results = []
    for system, op, size, mode, _ in cases("dist", sizes, []):
        if system == "klvae-wan":  # the clip's latent, made once before the ranks start
            clip_latent(size)
        else:
            shared_vae()
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
