"""klvae's main job on this machine: decode a large image tiled, exactly, and show it equals untiled.

    python examples/demo.py [--size 1024] [--out out/demo]

Until the shipped demo VAE lands, the weights are random but calibrated (an SD1.x-shaped VAE,
seeded; benchmarks/common.py), and the image is the benchmarks' synthetic test picture. Writes the
untiled, exact-tiled and bounded-tiled decodes, a |tiled - untiled| heat map per mode, and prints
time, peak memory and psnr_vs_full / max_abs_vs_full for each.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import common  # noqa: E402

from klvae.vae import Tiling, load_vae  # noqa: E402


def to_png(x: torch.Tensor, path: str):
    a = ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(a).save(path)


def heat(d: torch.Tensor, path: str, scale=0.05):
    a = (d[0].abs().mean(0) / 2 / scale).clamp(0, 1).numpy()
    Image.fromarray((np.stack([a, a ** 2, 0 * a], -1) * 255).astype("uint8")).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="image side in px (multiple of 8)")
    ap.add_argument("--tile", type=int, default=512, help="tile core in px")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"))
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(a.out, exist_ok=True)
    print("building calibrated random SD1.x-shaped weights (cached after the first run) ...")
    vae = load_vae(common.calibrated_sd_vae("sd1").state_dict(), family="sd1")
    img = common.test_image(a.size)
    to_png(img, os.path.join(a.out, "input.png"))
    print(f"encoding {a.size}x{a.size} (exact tiling) ...")
    z = vae.encode(img, tiling=Tiling(mode="exact", tile_size=a.tile)).mode()
    results = {}
    for mode in ("untiled", "exact", "bounded"):
        bar = tqdm(total=1, desc=f"decode {mode}", unit="step", leave=False)

        def progress(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        tiling = None if mode == "untiled" else Tiling(mode=mode, tile_size=a.tile, progress=progress)
        rss0 = common.peak_rss_reset()
        t0 = time.perf_counter()
        y = vae.decode(z, tiling=tiling)
        seconds, peak = time.perf_counter() - t0, common.peak_rss() - rss0
        bar.close()
        results[mode] = y
        to_png(y, os.path.join(a.out, f"decode_{mode}.png"))
        line = f"{mode:8} {seconds:6.1f} s   peak RSS +{peak / 2**30:.2f} GiB"
        if mode != "untiled":
            r = vae.last_tiling
            full = results["untiled"]
            heat(y - full, os.path.join(a.out, f"heat_{mode}.png"))
            line += (f"   tiles {r.grid[0]}x{r.grid[1]}, predicted {r.predicted_peak / 2**30:.2f} GiB, "
                     f"psnr_vs_full {common.psnr_vs_full(y, full):.1f} dB, "
                     f"max_abs_vs_full {common.max_abs_vs_full(y, full):.1e}; statistics {r.statistics}")
        print(line, flush=True)
    print(f"images and heat maps (white = 0.05 error) in {a.out}")
    print("(peaks are RSS rises within this one process, where memory freed by an earlier run is reused; "
          "benchmarks/bench.py measures each case in a fresh process)")


if __name__ == "__main__":
    main()
