"""Memory: how much is free, how much a call used, and glibc's habit of keeping freed blocks.

glibc serves large allocations with mmap until a block is freed, then raises its mmap threshold
(up to 32 MiB) and serves later ones from the heap, which it rarely returns to the OS. Tiles of
varying sizes then leave the process RSS ~50% above the live tensors (measured: a bounded decode
with 435 MiB of live tensors peaked at 903 MiB of RSS; 469 MiB with a fixed threshold). klvae
fixes the threshold at 128 KiB on glibc, once, when it first runs on the CPU, so that freed
activations go back to the OS. Set KLVAE_KEEP_MALLOC=1 to leave glibc as it is.
"""
import ctypes
import ctypes.util
import os

import torch

_malloc_done = False


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) at 128 KiB; once per process."""
    global _malloc_done
    if _malloc_done or os.environ.get("KLVAE_KEEP_MALLOC"):
        return False
    _malloc_done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 128 * 1024))
    except (OSError, AttributeError):
        return False  # not glibc (macOS, Windows, musl): nothing to do


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class PeakMeter:
    """Measured peak above the starting point: CUDA allocator stats, or VmHWM of this process (Linux)."""

    def __init__(self, device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = self._rss("VmRSS") if self._reset_hwm() else None

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) of this process
            return True
        except OSError:
            return False

    @staticmethod
    def _rss(field_name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        return self._rss("VmHWM") - self.base
