"""Lab script for docs/measurements.md ("The untiled pass's GroupNorm on channels-last CPU
tensors"): per call, max error against float64 and best-of-3 time of PyTorch's GroupNorm kernel
and of klvae's GroupNorm (vae/groupnorm.py) at several Stats chunk sizes, on channels-last fp32
activations whose channel means dwarf their spread. Run with nothing else on the CPU:

    python benchmarks/lab/groupnorm_kernels.py
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import best_ms  # noqa: E402
from klvae.vae import groupnorm  # noqa: E402
from klvae.vae.model import Normalize  # noqa: E402

torch.manual_seed(0)
default = groupnorm.STATS_CHUNK
for C, n in [(128, 256), (128, 512), (128, 1024), (256, 1024), (512, 256), (128, 2048)]:
    x = (torch.randn(1, C, n, n) * 0.5 + torch.randn(1, C, 1, 1) * 20).contiguous(memory_format=torch.channels_last)
    norm = Normalize(C, 32)
    with torch.no_grad():
        ref = F.group_norm(x.double().contiguous(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
        row = [f"C={C} n={n}:"]
        kernel = lambda: torch.nn.GroupNorm.forward(norm, x)  # noqa: E731
        row.append(f"kernel {(kernel().double() - ref).abs().max():.1e} {best_ms(kernel):.0f} ms")
        for mib in (32, 8, 2):
            groupnorm.STATS_CHUNK = mib * 2**20
            err = (norm(x).double() - ref).abs().max()
            row.append(f"stats/{mib} MiB {err:.1e} {best_ms(lambda: norm(x)):.0f} ms")
        groupnorm.STATS_CHUNK = default
    print(" | ".join(row), flush=True)
