"""Faults around the stores: a spill disk that fills up or disappears mid-run, a store allocation that
fails half-way, an interrupt in the first band. Each ends in one KLVAEError (or Interrupted), leaves
no spill file and no mapping behind, gives its memory back without waiting for the garbage
collector, and the next call works and equals the untiled result. (A dead rank and a rank whose
spill disk fills: tests/test_distributed.py.)"""
import errno
import gc
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from klvae.testing import NARROW
from klvae.vae import AutoencoderKL, Interrupted, KLVAEError, Tiling, engine, preset


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(7)
    return AutoencoderKL(preset("sd1", **NARROW)).eval()


def spill_maps() -> list:
    """This process's memory mappings of klvae spill files (unlinked, so '(deleted)')."""
    with open("/proc/self/maps") as f:
        return [line for line in f if "klvae-store-" in line]


def latent(h, w, seed=0):
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))


# ---- a real full filesystem: a tmpfs mounted by the test ------------------------------------------
FILL = r"""
import json, os, sys, torch
from klvae.testing import NARROW
from klvae.vae import AutoencoderKL, KLVAEError, Tiling, preset
folder = sys.argv[1]
torch.manual_seed(7)
vae = AutoencoderKL(preset("sd1", **NARROW)).eval()
z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
def fill(done, total):  # another process fills the folder one band in
    if done == 1:
        with open(os.path.join(folder, "filler"), "wb") as f:
            f.write(b"\0" * (os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize - 2**20))
out = {}
try:
    vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=folder, tile_size=128, progress=fill))
except KLVAEError as e:
    out["error"] = str(e)
out["left"] = sorted(os.listdir(folder))
out["maps"] = [l for l in open("/proc/self/maps") if "klvae-store-" in l]
os.remove(os.path.join(folder, "filler"))
again = vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=folder, tile_size=128))
out["store"] = vae.last_tiling.store
out["again"] = (again - vae.decode(z)).abs().max().item()
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.fixture
def small_fs(tmp_path, vae):
    """A tmpfs a little larger than the decode's disk store needs (root only: skipped elsewhere)."""
    need = vae.plan_decode((1, 4, 32, 32), Tiling(mode="exact", store="disk", spill_dir=str(tmp_path),
                                                  tile_size=128)).store_bytes
    mnt = tmp_path / "spill"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need + 4 * 2**20}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()[:80]}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_spill_disk_that_fills_up_mid_decode_is_one_error(small_fs):
    """Before the fix this process died of SIGBUS (exit 135); it runs in a child so that a
    regression fails this test instead of killing the test session."""
    r = subprocess.run([sys.executable, "-c", FILL, str(small_fs)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    out = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert f"spill folder {small_fs} is full" in out["error"] and "mode='bounded'" in out["error"]
    assert "\n" not in out["error"]
    assert out["left"] == ["filler"] and out["maps"] == []  # no spill file, no mapping left
    assert out["again"] <= 1e-4 and out["store"] == "disk"  # the next call works, exactly


# ---- the same faults injected in this process ---------------------------------------------------------
def test_the_spill_folder_removed_mid_run(vae, tmp_path):
    folder = tmp_path / "spill"
    folder.mkdir()
    z = latent(16, 16)
    gone = lambda done, total: done == 1 and shutil.rmtree(folder)
    with pytest.raises(KLVAEError, match=f"cannot create the disk store in the spill folder {folder}") as e:
        vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=str(folder), tile_size=64, progress=gone))
    assert "\n" not in str(e.value) and isinstance(e.value.__cause__, FileNotFoundError)
    assert not folder.exists() and spill_maps() == []
    out = vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=str(tmp_path), tile_size=64))
    assert (out - vae.decode(z)).abs().max().item() <= 1e-4 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where,err,words", [
    ("posix_fallocate", errno.ENOSPC, "is full"),                   # the disk filled up
    ("posix_fallocate", errno.EIO, r"failed \(Input/output error\)"),  # the disk itself failed
    ("mkstemp", errno.EROFS, "read-only"),                          # the folder became read-only
])
def test_a_store_allocation_that_fails_half_way(vae, tmp_path, monkeypatch, where, err, words):
    """The fourth disk store of the decode cannot be made: one error, nothing left, memory back."""
    real = {"posix_fallocate": os.posix_fallocate, "mkstemp": engine.tempfile.mkstemp}[where]
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(err, os.strerror(err))
        return real(*a, **k)
    monkeypatch.setattr(engine.os if where == "posix_fallocate" else engine.tempfile, where, failing)
    z = latent(16, 16, seed=1)
    gc.disable()  # the memory must come back without the cyclic collector
    try:
        with pytest.raises(KLVAEError, match=words) as e:
            vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=str(tmp_path), tile_size=64))
        alive = [o for o in gc.get_objects() if type(o) is engine.Store]
        maps = spill_maps()
    finally:
        gc.enable()
    assert "\n" not in str(e.value) and len(calls) == 4
    assert alive == [] and maps == [] and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = vae.decode(z, tiling=Tiling(mode="exact", store="disk", spill_dir=str(tmp_path), tile_size=64))
    assert (out - vae.decode(z)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("store", ["device", "disk"])
def test_an_interrupt_in_the_first_band_gives_everything_back(vae, tmp_path, store):
    z = latent(24, 24, seed=2)
    gc.disable()
    try:
        with pytest.raises(Interrupted):
            vae.decode(z, tiling=Tiling(mode="exact", store=store, spill_dir=str(tmp_path), tile_size=64,
                                        interrupt=lambda: True))
        alive = [o for o in gc.get_objects() if type(o) is engine.Store]
        maps = spill_maps()
    finally:
        gc.enable()
    assert alive == [] and maps == [] and list(tmp_path.iterdir()) == []
    out = vae.decode(z, tiling=Tiling(mode="exact", store=store, spill_dir=str(tmp_path), tile_size=64))
    assert (out - vae.decode(z)).abs().max().item() <= 1e-4
