"""A causal 3x3x3 conv over a band of a clip's chunk: F.conv3d against the sum of its three time
slices' 2-D convs (ops.conv_over_time), time and the rise of peak RSS of one call, each in a fresh
process (docs/measurements.md, "Causal convs as 2-D convs over time slices").

    python benchmarks/lab/conv3d_slices.py C T ROWS WIDTH     # e.g. 96 4 32 256

With a fifth argument, one way only, timed warm (the best of 3 calls after one), run once per way
in fresh processes: `slices` (ops.conv_over_time), `stacked` (the three slices concatenated on
channels, one 2-D conv with 3C input channels: one conv call and no sums, for a 3x input copy) or
`conv3d`. Measured 2026-12-07 (2 AMD EPYC cores with AVX-512 BF16, fp32) at Wan 2.2's decoder
shapes for a 448x256 clip (docs/benchmarks.md): slices fastest at three, 0-5% behind conv3d at the
widest (256 channels x 4 frames x 128x224).
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import best_ms  # noqa: E402
from klvae.vae.ops import conv_over_time, fold  # noqa: E402


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def warm(C, T, r, W, way):
    x = torch.randn(1, C, T + 2, r, W).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(C, C, 3, 3, 3) * 0.01, torch.randn(C)
    if way == "slices":  # klvae's own
        slices = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
        f = lambda: conv_over_time(x, slices, b, padding=(1, 1))
    elif way == "stacked":
        ws = torch.cat([w[:, :, k] for k in range(3)], 1).contiguous(memory_format=torch.channels_last)
        f = lambda: F.conv2d(torch.cat([fold(x[:, :, k:k + T]) for k in range(3)], 1), ws, b, padding=1)
    elif way == "conv3d":
        f = lambda: F.conv3d(x, w, b, padding=(0, 1, 1))
    else:
        sys.exit(f"unknown way {way!r}: slices, stacked or conv3d")
    with torch.inference_mode():
        print(f"C={C} T={T} {r}x{W}: {way} {best_ms(f):.1f} ms")


def main():
    torch.set_num_threads(2)
    C, T, r, W = map(int, sys.argv[1:5])
    if len(sys.argv) > 5:
        return warm(C, T, r, W, sys.argv[5])
    x = torch.randn(1, C, T + 2, r, W).contiguous(memory_format=torch.channels_last_3d)  # two cached frames in front
    w, b = torch.randn(C, C, 3, 3, 3), torch.randn(C)
    base, t = hwm_mib(), time.perf_counter()
    y = F.conv3d(x, w, b, padding=(0, 1, 1))
    t3, m3 = time.perf_counter() - t, hwm_mib() - base
    del y
    slices = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
    base, t = hwm_mib(), time.perf_counter()
    conv_over_time(x, slices, b, padding=(1, 1))
    t2, m2 = time.perf_counter() - t, hwm_mib() - base
    print(f"C={C} T={T} {r}x{W}: input {x.numel() * 4 / 2**20:.0f} MiB; conv3d {t3:.3f} s +{m3:.0f} MiB; "
          f"3 conv2d {t2:.3f} s +{m2:.0f} MiB")


if __name__ == "__main__":
    main()
