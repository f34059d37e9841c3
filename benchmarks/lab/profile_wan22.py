"""Where an untiled Wan 2.2 clip decode spends its time, klvae against diffusers: the calibrated
full-size VAE of the benchmarks (benchmarks/out/calibrated_wan22_0, made on first use), a clip of
1 + 4(T - 1) frames, each system timed once after a warm-up, then one profiled call each
(torch.profiler, the top operators by self time).

    python benchmarks/lab/profile_wan22.py            # 9 frames at 224x128 (latent 3 x 8 x 14)
    python benchmarks/lab/profile_wan22.py 5 16 28    # 17 frames at 448x256

Measured 2026-12-07 (2 AMD EPYC cores, AVX-512 BF16, fp32), the default clip: klvae 29.0 s,
diffusers 30.0 s; convolutions 27.44 s of klvae's (294 oneDNN calls: ops.conv_over_time's 2-D time
slices) against 26.27 s of diffusers' (112 conv3d calls).
"""
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import shared_vae  # noqa: E402
from klvae.vae import load_vae  # noqa: E402


def main():
    torch.set_num_threads(2)
    T, h, w = (int(v) for v in (sys.argv[1:4] if len(sys.argv) > 3 else (3, 8, 14)))
    theirs = shared_vae("wan22")
    ours = load_vae(theirs.state_dict())
    z = torch.randn(1, 48, T, h, w, generator=torch.Generator().manual_seed(0))
    calls = {"klvae": lambda: ours.decode(z), "diffusers": lambda: theirs.decode(z).sample}
    with torch.inference_mode():
        for name, fn in calls.items():
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            print(f"{name}: {time.perf_counter() - t0:.1f} s")
        for name, fn in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as p:
                fn()
            print(name)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
