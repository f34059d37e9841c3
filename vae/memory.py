"""Memory: how much is free, how much a call used, and glibc's habit of keeping freed blocks.

glibc serves large allocations with mmap until a block is freed, then raises its mmap threshold
(up to 32 MiB) and serves later ones from the heap, which it rarely returns to the OS. Tiles of
varying sizes then leave the process RSS ~50% above the live tensors (measured: a bounded decode
with 435 MiB of live tensors peaked at 903 MiB of RSS; 469 MiB with a fixed threshold).
`return_freed_memory_to_os()` fixes the threshold at 128 KiB; `load_vae` calls it once for a model
that computes on the CPU (a process-wide setting, stated here and in load_vae's docstring). Set
KLVAE_KEEP_MALLOC=1 to leave glibc as it is.
"""
import ctypes
import ctypes.util
import os
import threading

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


def proc_status(field_name: str, pid="self") -> int | None:
    """A byte count from /proc/<pid>/status (VmRSS, VmHWM, RssAnon...), or None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def free_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def free_memory(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        # blocks torch's caching allocator holds but no tensor uses are free to us too
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free_host_memory()


class PeakMeter:
    """Measured peak above the starting point: CUDA's allocator statistics; on the CPU this
    process's peak RSS (VmHWM), or with `anon=True` its anonymous memory (RssAnon, sampled every
    5 ms by a thread), which leaves out the page cache of memory-mapped files such as a disk store."""

    def __init__(self, device, anon: bool = False):
        self.device, self.anon, self.high = device, anon, 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        elif anon:
            self.base = self.high = proc_status("RssAnon")
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True) if self.base is not None else None
            if self._thread:
                self._thread.start()
        else:
            self.base = proc_status("VmRSS") if self._reset_hwm() else None

    def _sample(self):
        while not self._stop.wait(0.005):
            self.high = max(self.high, proc_status("RssAnon") or 0)

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak RSS (VmHWM) of this process
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """End the sampling thread (peak() does too); safe to call twice."""
        if self.anon and getattr(self, "_thread", None):
            self._stop.set()
            self._thread.join()

    def peak(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.base is None:
            return None
        if self.anon:
            self.stop()
            return max(self.high, proc_status("RssAnon") or 0) - self.base
        return proc_status("VmHWM") - self.base
