"""GroupNorm: its statistics, which the untiled pass and both tiled engines share.

- `Stats`: per (batch item, channel) count, mean and squared deviations, in float64, exactly
  additive over any partition of the pixels (Chan et al.'s pairwise update); `affine` turns them
  into the norm's per-channel scale and shift. The exact engine adds each band to one, the
  distributed run gathers them, bounded mode records them from a mosaic.
- `GroupNorm`: nn.GroupNorm (same parameters, same keys) whose CPU fp32 channels-last forward
  takes its statistics from `Stats`. Why: klvae keeps activations channels-last, and PyTorch's
  channels-last CPU kernel sums x and x^2 in fp32 over the whole image, so its variance
  (E[x^2] - E[x]^2) loses precision as the image grows: 1e-4 at 512^2 and 2e-3 at 1024^2 on a
  128-channel activation whose channel means dwarf their spread, against 3e-7 here
  (docs/measurements.md). That error was the untiled pass's, not the tiles'.
"""
import torch
import torch.nn as nn

STATS_CHUNK = 32 * 2**20  # bytes of fp32 deviations that Stats.add works on at a time


class Stats:
    """Exactly additive over any partition of the pixels (Chan et al.'s pairwise update), in float64.
    Each chunk of a band contributes its own mean and squared deviations about it (two passes over
    rows that are in cache), so no precision is lost when a channel's mean dwarfs its spread."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, y: torch.Tensor, scratch=None) -> None:     # y: [B, C, rows, W] or [B, C, T, rows, W]
        """y's per-channel statistics added, STATS_CHUNK bytes of fp32 deviations at a time: the
        four passes over a chunk (mean, deviations, square, sum) then hit the cache, not memory
        (measured: docs/measurements.md). The deviations go into scratch's warm "stats" buffer
        (ops.Scratch), or into one buffer made for this call. A clip's frames count as more rows
        (its norms take statistics over time and space alike)."""
        if y.dim() == 5:
            y = y.flatten(2, 3)  # a view in either layout: T's stride is H rows of H's
        B, C, H, W = y.shape
        rows = min(H, max(1, STATS_CHUNK // max(1, B * C * W * 4)))
        if rows == 0:
            return
        if scratch is not None:
            buf = scratch.like("stats", y, torch.float32, rows=rows)
        else:
            buf = torch.empty(B, C, rows, W, dtype=torch.float32, device=y.device,
                              memory_format=torch.channels_last)
        for a in range(0, H, rows):
            part = y[:, :, a:a + rows]
            mean = part.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)
            d = torch.sub(part, mean, out=buf[:, :, :part.shape[2]]).square_()
            self.merge(part.shape[2] * W, mean.flatten(1).double(), d.sum(dim=(2, 3)).double())

    def merge(self, n, mean, m2) -> None:
        """Add another part's count, per-channel means and squared deviations (Chan's update)."""
        if n == 0:
            return
        if self.mean is None or self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def affine(self, norm: nn.GroupNorm, dtype) -> tuple:
        """GroupNorm as x * scale + shift with these statistics: ([B, C, 1, 1], [B, C, 1, 1])."""
        B, C = self.mean.shape
        G = norm.num_groups
        cm, cm2 = self.mean.view(B, G, C // G), self.m2.view(B, G, C // G)
        gmean = cm.mean(-1, keepdim=True)
        gvar = (cm2.sum(-1, keepdim=True) + self.n * (cm - gmean).square().sum(-1, keepdim=True)) / (self.n * C // G)
        rstd = torch.rsqrt(gvar + norm.eps)                                    # [B, G, 1]
        w = norm.weight.to(rstd.device, torch.float64).view(1, G, C // G)
        b = norm.bias.to(rstd.device, torch.float64).view(1, G, C // G)
        scale = (rstd * w).reshape(B, C, 1, 1)
        shift = (b - gmean * rstd * w).reshape(B, C, 1, 1)
        return scale.to(dtype), shift.to(dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose statistics come from `Stats` where PyTorch's own kernel loses precision:
    fp32, channels-last, on the CPU, with no autograd (training keeps the kernel and its backward).
    Elsewhere it is nn.GroupNorm. CUDA is left to its kernel: not measured there yet.
    Time: 1.2-2.2x the kernel's per call at 128-512 channels, 128^2-1024^2; +3% on a whole
    1024^2 decode (docs/measurements.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not self.affine
                or not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)
        st = Stats()
        st.add(x)
        scale, shift = st.affine(self, x.dtype)
        return torch.addcmul(shift, x, scale)
