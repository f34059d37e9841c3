"""Tiled decode/encode: exact mode (the segment engine) equals the untiled result for every shape,
band size, store and family; bounded mode is close; plans come before any work, in milliseconds;
progress, interrupts, spill files and the memory model behave as documented."""
import json
import math
import subprocess
import sys

import pytest
import torch

from klvae.testing import NARROW, calibrate, diffusers_vae, klvae_from, max_abs_vs_full, psnr, seam_ratio, test_image
from klvae.vae import KLVAEError, Tiling
from klvae.vae import bounded, groupnorm
from klvae.vae.engine import band_rows
from klvae.vae.errors import Interrupted
from klvae.vae.layers import steps_of


@pytest.fixture(scope="module")
def vae4():
    return klvae_from(diffusers_vae("sd1", seed=1, **NARROW), family="sd1")


@pytest.fixture(scope="module")
def vae16():
    return klvae_from(diffusers_vae("flux", seed=2, **NARROW), family="flux")


def latent(vae, B, h, w, seed=0):
    return torch.randn(B, vae.config.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


# ---- exact mode equals untiled ------------------------------------------------------------------
@pytest.mark.parametrize("shape,tile,store", [
    ((1, 40, 56), 128, "device"),   # not a multiple of the band, non-square
    ((2, 24, 24), 64, "device"),    # batch of 2, many bands
    ((1, 6, 10), 256, "disk"),      # bands larger than the image, spilled to disk
    ((1, 33, 17), 8, "host"),       # odd latent sizes, one-latent-px tiles (single-row bands)
    ((1, 20, 12), 16, "disk"),      # two-latent-px tiles, disk store
])
@pytest.mark.parametrize("which", ["vae4", "vae16"])
def test_exact_decode_equals_untiled(request, which, shape, tile, store):
    vae = request.getfixturevalue(which)
    B, h, w = shape
    z = latent(vae, B, h, w, seed=h * w)
    full = torch.cat([vae.decode(z[i:i + 1]) for i in range(B)])  # per item: batch-size float noise aside
    calls = []
    tiled = vae.decode(z, tiling=Tiling(mode="exact", tile_size=tile, store=store, progress=lambda d, t: calls.append(t)))
    assert tiled.shape == full.shape
    assert max_abs_vs_full(tiled, full) <= 1e-4
    rep = vae.last_tiling
    assert rep.mode == "exact" and rep.statistics.startswith("exact") and rep.store == store
    # the bands the plan made, for every store: each holds a tile's values at the widest activation
    # (full resolution, w * 8 px wide), so tile^2 / (w * 8) rows, at least one and at most the image
    rows = h * 8
    per_band = min(rows, max(1, tile * tile // (w * 8)))
    assert rep.grid[0] == math.ceil(rows / per_band), (rep.grid, per_band)
    assert rep.steps == len(calls) == calls[-1] and rep.band_rows * rep.grid[0] >= rows


@pytest.mark.parametrize("tile,store", [(64, "device"), (128, "disk"), (16, "device")])
@pytest.mark.parametrize("which", ["vae4", "vae16"])
def test_exact_encode_equals_untiled(request, which, tile, store):
    vae = request.getfixturevalue(which)
    x = torch.rand(1, 3, 200, 312, generator=torch.Generator().manual_seed(tile)) * 2 - 1
    full = vae.encode(x)
    post = vae.encode(x, tiling=Tiling(mode="exact", tile_size=tile, store=store))
    assert max_abs_vs_full(post.mean, full.mean) <= 1e-4 and max_abs_vs_full(post.logvar, full.logvar) <= 1e-4
    assert vae.last_tiling.mode == "exact" and vae.last_tiling.grid[0] > 1


def test_exact_full_width_sd_and_batches():
    vae = klvae_from(diffusers_vae("sd1", seed=4), family="sd1")
    z = torch.randn(2, 4, 20, 16, generator=torch.Generator().manual_seed(0))
    full = torch.cat([vae.decode(z[i:i + 1]) for i in range(2)])
    assert max_abs_vs_full(vae.decode(z, tiling=Tiling(mode="exact", tile_size=32)), full) <= 1e-4
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert max_abs_vs_full(vae.encode(x, tiling=Tiling(mode="exact", tile_size=16)).mean, vae.encode(x).mean) <= 1e-4


@torch.inference_mode()
def test_the_equality_check_catches_per_band_statistics(vae4, monkeypatch):
    """The same check fails when every band normalises with statistics of its own part of the
    image (what the anchors' tiles do): the tests can tell exact statistics from local ones."""
    z = latent(vae4, 1, 40, 40, seed=3)
    full = vae4.decode(z)
    ours = vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64))
    assert max_abs_vs_full(ours, full) <= 1e-4
    add = groupnorm.Stats.add

    def first_band_only(self, y, scratch=None):  # statistics from one band instead of all of them
        if self.mean is None:
            add(self, y, scratch)

    monkeypatch.setattr(groupnorm.Stats, "add", first_band_only)
    theirs = vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64))
    assert max_abs_vs_full(theirs, full) > 1e-2


def test_exact_has_no_seams(vae4):
    z = latent(vae4, 1, 48, 48)
    full = vae4.decode(z)
    tiled = vae4.decode(z, tiling=Tiling(mode="exact", tile_size=128))
    p = vae4.plan_decode(z.shape, Tiling(tile_size=128))
    ys = [y0 for y0, _ in band_rows(48 * 8, 48 * 8, 32, p.band_elems)]  # the bands at full resolution
    assert len(ys) > 2 and max_abs_vs_full(tiled, full) <= 1e-4
    assert seam_ratio(tiled, full, ys[1:], []) <= 1.5  # band boundaries: float noise, like anywhere else


# ---- bounded mode -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated():
    """A 64-channel SD-shaped VAE with calibrated weights and the latent of a structured 768x768 image:
    realistic, content-dependent GroupNorm statistics (iid-noise latents would flatter the estimate)."""
    vae = klvae_from(calibrate(diffusers_vae("sd1", seed=0, ch=64), test_image(256)), family="sd1")
    z = vae.encode(test_image(768)).mode()
    return vae, z, vae.decode(z)


@pytest.fixture(scope="module")
def bounded64(calibrated):
    """The calibrated latent decoded in bounded mode, 256 px tiles, a 64 latent px mosaic; its report."""
    vae, z, _ = calibrated
    return vae.decode(z, tiling=Tiling(mode="bounded", tile_size=256, mosaic_size=64)), vae.last_tiling


def test_bounded_decode_reaches_40_db(calibrated, bounded64):
    vae, z, full = calibrated
    tiled, rep = bounded64
    assert rep.mode == "bounded" and "mosaic of 16x16 crops" in rep.statistics and rep.halo == 56
    assert psnr(tiled, full) >= 40
    # Every tile uses the same estimated statistics: the tiles are one image, equal to a single
    # tile covering it all with those statistics (no tile-shaped steps; the error is global tone).
    one = vae.decode(z, tiling=Tiling(mode="bounded", tile_size=768, mosaic_size=64))
    assert vae.last_tiling.n_tiles == 1 and max_abs_vs_full(tiled, one) <= 1e-4


def test_bounded_estimate_improves_with_the_mosaic(calibrated, bounded64):
    vae, z, full = calibrated
    scores = [psnr(vae.decode(z, tiling=Tiling(mode="bounded", tile_size=256, mosaic_size=16)), full),
              psnr(bounded64[0], full)]
    print("bounded psnr_vs_full with mosaics of 16 and 64 latent px:", scores)
    assert scores[0] + 3 < scores[1]


def test_bounded_encode_is_close(calibrated):
    vae, z, _ = calibrated
    e = vae.encode(test_image(768), tiling=Tiling(mode="bounded", tile_size=256, mosaic_size=64)).mode()
    assert ((e - z).norm() / z.norm()).item() < 0.03


def test_bounded_small_image_is_its_own_mosaic(calibrated):
    """When the default mosaic would cover the image, the image is its mosaic: exact statistics
    (256x384 with 128 px tiles: the case where the estimate used to drop to ~34 dB)."""
    vae, _, _ = calibrated
    z = vae.encode(test_image(256, 384)).mode()
    full = vae.decode(z)
    tiled = vae.decode(z, tiling=Tiling(mode="bounded", tile_size=128))
    assert "the whole image" in vae.last_tiling.statistics
    assert max_abs_vs_full(tiled, full) <= 1e-4


@pytest.mark.parametrize("which,shape,tile,strips", [
    ("vae4", (2, 24, 60), 16, 4),    # batch of 2, four strips of three bands
    ("vae4", (1, 37, 21), 8, 1),     # odd sizes, one strip of four bands
    ("vae16", (1, 19, 70), 64, 2),   # 16 channels, two strips
])
def test_bounded_strips_and_bands_equal_one_pass(request, which, shape, tile, strips):
    """Streaming is exact given the statistics: bands that keep the rows their next band needs, and
    strips that carry the halo sideways, return what one pass with the same (mosaic) statistics does."""
    vae = request.getfixturevalue(which)
    B, h, w = shape
    z = latent(vae, B, h, w, seed=h * w)
    one = vae.decode(z, tiling=Tiling(mode="bounded", tile_size=64 * max(h, w), mosaic_size=16))
    assert vae.last_tiling.n_tiles == 1
    tiled = vae.decode(z, tiling=Tiling(mode="bounded", tile_size=tile, mosaic_size=16))
    assert vae.last_tiling.grid[0] > 2 and vae.last_tiling.grid[1] == strips
    assert max_abs_vs_full(tiled, one) <= 1e-5
    x = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(h)) * 2 - 1
    one = vae.encode(x, tiling=Tiling(mode="bounded", tile_size=64 * max(h, w), mosaic_size=16)).mean
    tiled = vae.encode(x, tiling=Tiling(mode="bounded", tile_size=tile, mosaic_size=16)).mean
    assert vae.last_tiling.n_tiles > 2 and max_abs_vs_full(tiled, one) <= 1e-5


def test_bounded_memory_does_not_grow_with_the_image(vae4):
    peaks = []
    for side in (64, 128, 256):
        p = vae4.plan_decode((1, 4, side, side), Tiling(mode="bounded", tile_size=128, mosaic_size=32))
        out = 3 * (8 * side) ** 2 * 4
        lat = vae4.config.block_out_channels[-1] * side * side * 4
        peaks.append(p.predicted - out - lat)  # the tiles' part, beyond the output and the latent-res state
    assert max(peaks) < 1.25 * min(peaks)  # the image's area grows 16x; the strips' shape varies a little
    exact = [vae4.plan_decode((1, 4, s, s), Tiling(mode="exact", tile_size=128, store="device")).predicted
             for s in (64, 128)]
    assert exact[1] > 3 * exact[0]  # the device store grows with the image, as documented


@pytest.mark.parametrize("overlap", [None, 16, 200])
def test_bounded_halo_is_the_receptive_field_at_least(vae4, overlap):
    p = vae4.plan_decode((1, 4, 32, 32), Tiling(mode="bounded", tile_size=64, overlap=overlap))
    assert p.halo == max(56, -(-(overlap or 0) // 8) * 8)
    # The latent-resolution part runs whole; tiles carry the receptive field of the rest.
    dec, enc = steps_of(vae4.decoder.layers(), 4, 1), steps_of(vae4.encoder.layers(), 3, 8)
    assert bounded.halo_of(bounded.split(dec, "decode")[1]) == 7
    assert bounded.halo_of(bounded.split(enc, "encode")[1]) == 36


# ---- planning, progress, interruption, stores -----------------------------------------------------
def test_progress_and_interrupt(vae4):
    z = latent(vae4, 1, 32, 32)
    calls = []
    vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64, progress=lambda d, t: calls.append((d, t))))
    assert calls and calls[-1][0] == calls[-1][1] == vae4.last_tiling.steps
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))
    calls.clear()
    vae4.decode(z, tiling=Tiling(mode="bounded", tile_size=64, mosaic_size=16, progress=lambda d, t: calls.append((d, t))))
    rep = vae4.last_tiling
    assert rep.grid[0] > 1 and calls[-1][0] == calls[-1][1] == (1 + rep.n_tiles) * 19  # the mosaic, each band; 19 norms
    n = []
    with pytest.raises(Interrupted):
        vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64, interrupt=lambda: n.append(1) or len(n) > 40))
    assert len(n) == 41


def test_interrupt_leaves_no_spill_files(vae4, tmp_path):
    z = latent(vae4, 1, 32, 32)
    n = []
    with pytest.raises(Interrupted):
        vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64, store="disk", spill_dir=str(tmp_path),
                                     interrupt=lambda: n.append(1) or len(n) > 30))
    assert len(n) == 31 and list(tmp_path.iterdir()) == []
    vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64, store="disk", spill_dir=str(tmp_path)))
    assert vae4.last_tiling.store == "disk" and vae4.last_tiling.store_bytes > 0 and list(tmp_path.iterdir()) == []


def test_disk_store_reuses_a_freed_spill_file_like_the_device_store(vae4, tmp_path, monkeypatch):
    """A freed store serves the next one of its shape on every store kind: a new spill file's
    pages fault into the page cache on first write (1.14x -> 1.02x the device store's time on a
    1024^2 Qwen-Image decode), so the disk store makes as many files as the device store makes
    allocations, and the result is the same."""
    from klvae.vae import engine
    made = {"device": 0, "disk": 0}
    store_init, spill = engine.Store.__init__, engine.spill_file

    def counting_init(self, kind, *a, **k):
        made[kind] += 1
        store_init(self, kind, *a, **k)

    monkeypatch.setattr(engine.Store, "__init__", counting_init)
    files = []
    monkeypatch.setattr(engine, "spill_file", lambda folder, n: files.append(n) or spill(folder, n))
    z = latent(vae4, 1, 24, 24)
    out, runs = {}, {}
    for st in ("device", "disk"):  # (the attention's q, k, v are device stores in either run)
        made.update(device=0, disk=0)
        out[st] = vae4.decode(z, tiling=Tiling(mode="exact", tile_size=64, store=st, spill_dir=str(tmp_path)))
        runs[st] = dict(made)
    assert runs["disk"]["disk"] == len(files) == runs["device"]["device"] - runs["disk"]["device"] > 0
    assert len(files) < vae4.last_tiling.steps // 4   # far fewer files than band passes, yet several
    assert torch.equal(out["disk"], out["device"])


def test_disk_store_refuses_unwritable_or_full_folders_before_running(vae4, tmp_path):
    z = latent(vae4, 1, 16, 16)
    called = []
    spy = Tiling(mode="exact", tile_size=64, store="disk", progress=lambda d, t: called.append(d))
    with pytest.raises(KLVAEError, match="spill folder /proc is not writable") as e:
        vae4.decode(z, tiling=Tiling(**{**spy.__dict__, "spill_dir": "/proc"}))
    assert "\n" not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(KLVAEError, match="file is a file, not a folder: set Tiling"):
        vae4.decode(z, tiling=Tiling(**{**spy.__dict__, "spill_dir": str(tmp_path / "file")}))
    huge = (1, 4, 8192, 8192)  # a 65536^2 image: terabytes of store, more than this disk has
    with pytest.raises(KLVAEError, match="the disk store needs"):
        vae4.plan_decode(huge, Tiling(mode="exact", store="disk", tile_size=512, spill_dir=str(tmp_path)))
    with pytest.raises(KLVAEError, match=r"in exact mode needs .* in its disk store, but the spill folder"):
        vae4.plan_decode(huge, Tiling(mode="exact", store="disk", spill_dir=str(tmp_path), memory_budget=2**50))  # tile size: the planner
    assert not called


def test_auto_plans_before_running_and_fast(vae4):
    z = latent(vae4, 1, 64, 64)
    vae4.decode(z, tiling=Tiling(mode="auto", memory_budget=2**40))
    assert vae4.last_tiling.mode == "untiled"  # everything fits: the plain pass
    whole = vae4.last_tiling.predicted_peak
    vae4.decode(z, tiling=Tiling(mode="auto", memory_budget=whole // 2))
    r = vae4.last_tiling
    assert r.mode == "exact" and r.n_tiles > 1 and r.predicted_peak <= whole // 2
    called = []
    with pytest.raises(KLVAEError, match="over the budget"):
        vae4.decode(z, tiling=Tiling(mode="auto", memory_budget=1000, progress=lambda d, t: called.append(d)))
    assert not called  # refused before the first tile, not after running out of memory
    for side in (1024, 4096, 8192):  # up to a 65536 x 65536 image: planned without a tensor of that size
        assert vae4.plan_decode((1, 4, side, side), Tiling(mode="auto", memory_budget=2**55)).mode == "untiled"
        p = vae4.plan_decode((1, 4, side, side), Tiling(mode="exact", store="device", memory_budget=2**55, tile_size=512))
        assert p.mode == "exact" and p.grid[0] == side * 8 // p.band_rows
    with pytest.raises(KLVAEError, match=r"needs .* GiB of device memory even in bounded mode .* over the budget of 1.00 GiB"):
        vae4.plan_decode((1, 4, 8192, 8192), Tiling(mode="bounded", memory_budget=2**30))


def test_untiled_calls_that_cannot_fit_are_refused_up_front(vae4):
    z = torch.zeros(1, 4, 4096, 4096)  # 64 MiB latent; an untiled decode would need terabytes
    with pytest.raises(KLVAEError, match="pass tiling='auto'"):
        vae4.decode(z)
    with pytest.raises(KLVAEError, match="beyond what klvae plans"):
        vae4.decode(torch.zeros(1, 4, 100000, 1))


@pytest.mark.parametrize("kw,words", [
    (dict(tile_size="512"), "tile_size='512'"), (dict(overlap=1.5), "overlap=1.5"), (dict(memory_budget=-1), "memory_budget"),
    (dict(mosaic_size=2), "at least 4"), (dict(progress=3), "progress must be a callable"), (dict(mode="fast"), "unknown tiling mode"),
    (dict(store="ssd"), "unknown store"), (dict(interrupt="no"), "interrupt must be a callable"), (dict(spill_dir=3), "spill_dir"),
])
def test_tiling_options_are_checked_once_when_made(kw, words):
    with pytest.raises(KLVAEError, match=words.replace("(", r"\(")):
        Tiling(**kw)


def test_tiling_argument_errors(vae4):
    z = latent(vae4, 1, 8, 8)
    with pytest.raises(KLVAEError, match="unknown tiling"):
        vae4.decode(z, tiling="fast")
    with pytest.raises(KLVAEError, match="not a positive multiple of 8"):
        vae4.decode(z, tiling=Tiling(mode="exact", tile_size=100))
    assert Tiling(tile_size=0, overlap=0).tile_size is None  # 0 means "choose"
    vae4.decode(z, tiling=Tiling(mode="exact", tile_size=32, overlap=16))
    assert "overlap 16 px ignored" in vae4.last_tiling.notes[0]


# ---- the memory model against measured peaks (fresh process each) ---------------------------------
MEASURE = """
import json, torch
torch.set_num_threads(2)
from klvae.testing import diffusers_vae, klvae_from
from klvae.vae import Tiling
vae = klvae_from(diffusers_vae({family!r}, seed=0, **{width!r}), family={family!r})
z = torch.randn(1, vae.config.latent_channels, {side}, {side})
t = None if {mode!r} == "untiled" else Tiling(mode={mode!r}, tile_size=128, store={store!r})
plan = vae.plan_decode(z.shape, t)
vae.decode(z, tiling=plan)
r = vae.last_tiling  # measured inside the call: peak RSS, or anonymous memory for the disk store
print(json.dumps([plan.predicted, r.measured_peak if r.measured_peak is not None else -1]))
"""
# Every family's network at a width whose 512x512 decode needs a few hundred MiB (so the process's
# own slack, tens of MiB, does not decide the test): SD's, Qwen-Image's (RMS norms, causal convs,
# width-halving upsamples) and HunyuanImage-2.1's (pixel shuffles, 32x).
MEASURED = {"sd1": (dict(ch=64), 64), "qwenimage": (dict(ch=48), 64),
            "hunyuanimage": (dict(ch=32, ch_mult=(1, 2, 4, 4, 8, 8)), 16)}


@pytest.mark.parametrize("family", list(MEASURED))
@pytest.mark.parametrize("mode,store", [("exact", "device"), ("exact", "disk"), ("bounded", "auto"), ("untiled", "auto")])
def test_memory_model_matches_measured_peak(family, mode, store):
    """Predicted vs measured (VmHWM above the RSS at the start of the call), for every family.
    Tolerance: measured within [0.75, 1.3] x predicted + 48 MiB: the model counts tensors and the
    conv workspace; the process also holds allocator slack and thread scratch (tens of MiB)."""
    width, side = MEASURED[family]
    code = MEASURE.format(family=family, width=width, side=side, mode=mode, store=store)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    predicted, measured = json.loads(res.stdout.strip().splitlines()[-1])
    print(family, mode, store, predicted / 2**20, measured / 2**20)
    assert 0.75 * predicted - 48 * 2**20 <= measured <= 1.3 * predicted + 48 * 2**20, (predicted, measured)


def test_spill_folder_that_does_not_exist_is_said_so(vae4, tmp_path):
    """It read "0.00 GiB free: use a larger disk" when the folder was simply missing."""
    z = latent(vae4, 1, 16, 16)
    for t in (Tiling(mode="exact", tile_size=64, store="disk", spill_dir=str(tmp_path / "nope")),
              Tiling(mode="exact", store="disk", spill_dir=str(tmp_path / "nope"))):
        with pytest.raises(KLVAEError, match=f"spill folder {tmp_path / 'nope'} does not exist: create it") as e:
            vae4.decode(z, tiling=t)
        assert "GiB free" not in str(e.value)


def test_a_refused_plan_does_not_advise_what_it_already_tried(vae4, tmp_path):
    """The refusal used to end "or use mode='exact' with store='disk'" right after that had failed."""
    huge = (1, 4, 8000, 8000)
    with pytest.raises(KLVAEError, match="of device memory even in") as e:
        vae4.plan_decode(huge, Tiling(mode="auto", memory_budget=2**20, spill_dir=str(tmp_path)))
    assert "with the disk store" in str(e.value) and "store='disk'" not in str(e.value), str(e.value)
    with pytest.raises(KLVAEError, match="store='disk'"):  # bounded alone: the disk store is news
        vae4.plan_decode(huge, Tiling(mode="bounded", memory_budget=2**20))


def test_tiling_none_is_the_untiled_pass_in_the_library_too(vae4):
    """The CLI's --tiling none, as the library's tiling="none" (it was an unknown tiling there)."""
    z = latent(vae4, 1, 16, 16)
    untiled = vae4.decode(z)
    vae4.enable_tiling("exact", tile_size=32)
    try:
        assert torch.equal(vae4.decode(z, tiling="none"), untiled)
        assert vae4.last_tiling.plan.mode == "untiled"
        assert vae4.plan_decode(z.shape, "none").mode == "untiled"
    finally:
        vae4.disable_tiling()
    assert vae4.enable_tiling("none").tiling is None


def test_pad_to_multiple():
    from klvae.vae import pad_to_multiple
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(1, 2, 5, 7)
    y = pad_to_multiple(x, 8)
    assert y.shape == (1, 2, 8, 8) and torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5, :7], x[..., 3, :7])  # reflected, not zeros
    assert pad_to_multiple(torch.zeros(1, 3, 1, 9), 8).shape == (1, 3, 8, 16)  # too small to reflect: replicated
    with pytest.raises(KLVAEError, match="f=0"):
        pad_to_multiple(x, 0)
