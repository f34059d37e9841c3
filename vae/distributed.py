"""Several processes, one exact decode or encode: a rank is a store that holds one band of rows.

`Tiling(mode="exact", process_group=pg)` runs the segment engine (engine.py) on every rank of an
initialised torch.distributed process group (gloo on CPUs, NCCL between GPUs). Rank r owns latent
rows [r*h/N, (r+1)*h/N) and the same image region at every resolution. Per segment, what crosses
between ranks is exactly what the untiled network would read across a band boundary:
* the rows above and below a rank's band that its ops read (one for a 3x3 conv: verbs.reach; point-to-point
  send/recv with the two neighbours: 1-4 MiB per segment at 8192^2 in bf16, against all_gathering
  whole bands);
* each GroupNorm's per-channel count, mean and squared deviations (all_gather of [3, B, C] float64
  per rank, combined in rank order on every rank: the same exact statistics everywhere, no
  per-rank variance averaging);
* the mid-block attention's keys and values at latent resolution (all_gather: global attention,
  each rank's queries against every key);
* the result's bands at the end (all_gather, or gather to rank 0, or nothing: `gather=`).
A clip (Wan's VAEs) runs its time chunks one after another on every rank, each as above (no norm
statistics: per-pixel norms), each chunk's result gathered as it finishes; the causal convs'
cached frames are stores of the rank's rows and halo rows, so time adds no exchange of its own.
Every collective that fails (a rank died, or did not answer within the group's timeout) ends the
call with one KLVAEError line on every surviving rank.
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import KLVAEError

class Shard:
    """This rank's share of a distributed call, and the collectives the engine needs."""

    def __init__(self, group, latent_h: int, gather: str = "all"):  # gather: checked by Tiling
        if not dist.is_available() or not dist.is_initialized():
            raise KLVAEError("Tiling(process_group=...) needs an initialised torch.distributed process group "
                             "(torchrun, or torch.distributed.init_process_group): none is")
        self.group, self.gather = group, gather
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.size > latent_h:
            raise KLVAEError(f"{self.size} ranks for a latent of {latent_h} rows: each rank needs at least one row; "
                             f"use at most {latent_h} ranks")
        self.h = latent_h
        self.bytes_sent = 0

    def rows(self, H: int) -> tuple:
        """This rank's rows of an activation with H rows (H = latent rows x its resolution)."""
        r = H // self.h
        return self.rank * self.h // self.size * r, (self.rank + 1) * self.h // self.size * r

    def held(self, H: int, reach: int = 1) -> tuple:
        """The rows a store keeps: this rank's, plus the `reach` rows around them that the network's
        ops read (verbs.reach: one for 3x3 convs)."""
        lo, hi = self.rows(H)
        return max(0, lo - reach), min(H, hi + reach)

    # -- collectives, each failure one line ----------------------------------------------------------
    def _call(self, what, fn):
        try:
            return fn()
        except (RuntimeError, ValueError, OSError) as e:  # gloo/NCCL report peers lost or timed out so
            raise KLVAEError(f"distributed {what} failed on rank {self.rank} of {self.size}: a rank died or did "
                             f"not answer in time ({str(e).strip().splitlines()[0][:120]})") from e

    def exchange(self, store, reach: int = 1) -> None:
        """Fill the `reach` halo rows on each side of a store from the neighbouring ranks (and send
        them theirs). A neighbour's band is at least one latent row, so at least `reach` rows at any
        resolution where reach <= the resolution's px per latent px; the planner checks the rest."""
        lo, hi = self.rows(store.H)
        ops, recv = [], []
        for peer, mine, theirs in ((self.rank - 1, lo, lo - reach), (self.rank + 1, hi - reach, hi)):
            if 0 <= peer < self.size:
                out = store.rows(mine, mine + reach).contiguous()
                buf = torch.empty_like(out)
                ops += [dist.P2POp(dist.isend, out, peer, self.group), dist.P2POp(dist.irecv, buf, peer, self.group)]
                recv.append((theirs, buf))
                self.bytes_sent += out.numel() * out.element_size()
        if ops:
            self._call("halo exchange", lambda: [r.wait() for r in dist.batch_isend_irecv(ops)])
        for row, buf in recv:
            store.write(row, buf)

    def all_gather(self, t: torch.Tensor) -> list:
        """Every rank's tensor of this shape, in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.bytes_sent += t.numel() * t.element_size()
        self._call("all_gather", lambda: dist.all_gather(parts, t.contiguous(), group=self.group))
        return parts

    def gather_rows(self, t: torch.Tensor, H: int, to_all: bool = True, dim: int = 2):
        """The whole activation from every rank's own rows (t: this rank's rows along `dim`); None
        off rank 0 when not to_all. Bands differ by a latent row at most: padded to the largest."""
        most = max(((r + 1) * self.h // self.size - r * self.h // self.size) for r in range(self.size)) * (H // self.h)
        shape = list(t.shape)
        shape[dim] = most
        pad = torch.zeros(shape, dtype=t.dtype, device=t.device)
        pad.narrow(dim, 0, t.shape[dim]).copy_(t)
        if to_all:
            parts = self.all_gather(pad)
        else:
            parts = [torch.empty_like(pad) for _ in range(self.size)] if self.rank == 0 else None
            self.bytes_sent += pad.numel() * pad.element_size()
            self._call("gather", lambda: dist.gather(pad, parts, dst=dist.get_global_rank(self.group, 0)
                                                    if self.group is not None else 0, group=self.group))
            if self.rank != 0:
                return None
        r = H // self.h
        return torch.cat([p.narrow(dim, 0, ((i + 1) * self.h // self.size - i * self.h // self.size) * r)
                          for i, p in enumerate(parts)], dim=dim)

    def check_same_input(self, x: torch.Tensor) -> None:
        """Every rank must decode the same input: a cheap checksum (shape, sum, weighted sum) compared."""
        flat = x.detach().flatten().double()
        w = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64).remainder_(97)
        sig = torch.tensor([*x.shape, flat.sum().item(), (flat * w).sum().item()], dtype=torch.float64,
                           device=x.device)
        parts = [p.cpu() for p in self.all_gather(sig)]
        if any(not torch.allclose(p, parts[0], rtol=1e-12, atol=0) for p in parts):
            raise KLVAEError(f"the ranks were given different inputs (rank {self.rank}: shape {tuple(x.shape)}, "
                             f"checksum {parts[self.rank][-1].item():.6g}): every rank must pass the same tensor")


def backend_for(device) -> str:
    """NCCL between CUDA devices, gloo on CPUs."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env(device, timeout_s: float = 300.0):
    """The process group of a `torchrun` launch (its environment variables), for the CLI."""
    try:
        dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, KeyError) as e:
        raise KLVAEError(f"--distributed needs a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set): "
                         f"{str(e).strip().splitlines()[0][:120]}") from e
    if torch.device(device).type == "cuda":  # this node's GPU: torchrun's LOCAL_RANK (several nodes)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())) % torch.cuda.device_count())
    return dist.group.WORLD

