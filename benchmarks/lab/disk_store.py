"""Lab script for docs/measurements.md ("Disk store: a freed spill file serves the next store"):
one exact decode of a family's calibrated weights (benchmarks/out, made by `bench.py <family>`)
with one store, its time and the bytes the kernel dirtied and wrote back (/proc/vmstat).
Run each case in a fresh process, alternating stores, with nothing else on the CPU:

    python benchmarks/lab/disk_store.py qwenimage 1024 device|disk [--spill DIR]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (benchmarks/common.py)
from klvae.vae import Tiling, load_vae  # noqa: E402


def vmstat() -> tuple:
    d = dict(line.split() for line in open("/proc/vmstat"))
    return int(d["nr_dirtied"]) * 4096, int(d["nr_written"]) * 4096


ap = argparse.ArgumentParser()
ap.add_argument("family")
ap.add_argument("size", type=int)
ap.add_argument("store", choices=["device", "disk"])
ap.add_argument("--spill", default=os.path.join(common.OUT, "spill"))
a = ap.parse_args()
os.makedirs(a.spill, exist_ok=True)
vae = load_vae(common.shared_vae(a.family).state_dict(), family="sd1" if a.family == "sd1" else None)
z = common.latent_for(a.size, a.family)
common.timed(lambda: vae.decode(z[..., :16, :16]))  # warm-up
d0, w0 = vmstat()
_, seconds, _ = common.timed(lambda: vae.decode(z, tiling=Tiling(mode="exact", tile_size=256, store=a.store,
                                                                  spill_dir=a.spill)))
d1, w1 = vmstat()
print(f"{a.family} {a.size} {a.store}: {seconds:.2f} s, dirtied {(d1 - d0) / 2**30:.2f} GiB, "
      f"written back {(w1 - w0) / 2**30:.2f} GiB; {vae.last_tiling}")
