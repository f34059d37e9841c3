"""Clips chunk by chunk vs the whole clip at once vs diffusers: time and peak RSS of one decode
(docs/measurements.md, "Clips chunk by chunk"). Qwen-Image's VAE (Wan 2.1's network) at its released
size, seeded weights, latents [1, 16, T, 32, 32] (256x256 px), fp32, 2 threads.

    python benchmarks/lab/clip_chunks.py chunked|whole|diffusers T
"""
import json
import sys
import time

import torch

from klvae.testing import diffusers_vae, klvae_from
from klvae.vae.memory import proc_status


def main():
    what, T = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(2)
    d = diffusers_vae("qwenimage", seed=3).eval()
    z = torch.randn(1, 16, T, 32, 32, generator=torch.Generator().manual_seed(1))
    k = klvae_from(d) if what != "diffusers" else None
    base = proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS
    t0 = time.perf_counter()
    with torch.no_grad():
        if what == "diffusers":
            out = d.decode(z).sample
        elif what == "whole":
            out = k.decoder(k.post_quant_conv(z))
        else:
            out = k.decode(z)
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(what=what, T=T, frames=out.shape[2], seconds=round(seconds, 1),
                          peak_gib=round((proc_status("VmHWM") - base) / 2**30, 2))))


if __name__ == "__main__":
    main()
