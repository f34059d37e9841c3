"""A causal 3x3x3 conv over a band of a clip's chunk: F.conv3d against the sum of its three time
slices' 2-D convs (ops.conv_over_time), time and the rise of peak RSS of one call, each in a fresh
process (docs/measurements.md, "Causal convs as 2-D convs over time slices").

    python benchmarks/lab/conv3d_slices.py C T ROWS WIDTH     # e.g. 96 4 32 256
"""
import sys
import time

import torch
import torch.nn.functional as F


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def main():
    torch.set_num_threads(2)
    C, T, r, W = map(int, sys.argv[1:5])
    x = torch.randn(1, C, T + 2, r, W).contiguous(memory_format=torch.channels_last_3d)  # two cached frames in front
    w, b = torch.randn(C, C, 3, 3, 3), torch.randn(C)
    base, t = hwm_mib(), time.perf_counter()
    y = F.conv3d(x, w, b, padding=(0, 1, 1))
    t3, m3 = time.perf_counter() - t, hwm_mib() - base
    del y
    slices = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]
    fold = lambda k: x[:, :, k:k + T].transpose(1, 2).flatten(0, 1)
    base, t = hwm_mib(), time.perf_counter()
    y = F.conv2d(fold(0), slices[0], b, padding=1)
    for k in (1, 2):
        y += F.conv2d(fold(k), slices[k], None, padding=1)
    t2, m2 = time.perf_counter() - t, hwm_mib() - base
    print(f"C={C} T={T} {r}x{W}: input {x.numel() * 4 / 2**20:.0f} MiB; conv3d {t3:.3f} s +{m3:.0f} MiB; "
          f"3 conv2d {t2:.3f} s +{m2:.0f} MiB")


if __name__ == "__main__":
    main()
