"""Clips through Wan 2.1's VAE (Qwen-Image's network) in exact mode: time chunks x bands, every
causal conv's earlier frames held in a store of the plan's kind (engine.run_clip). Equal to the
untiled clip (Wan's chunks, diffusers' decode: test_families) however time is chunked; plans
that price the caches; progress per chunk; an interrupt and a full spill disk mid-clip end in one
error with nothing left behind. Small seeded networks, CPU, fp32."""
import errno
import gc
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from klvae.testing import diffusers_vae, klvae_from, worst_frame_psnr
from klvae.vae import Interrupted, KLVAEError, Tiling, engine
from klvae.vae.layers import steps_of
from klvae.vae.tiling import Plan

SMALL = dict(ch=16, ch_mult=(1, 2, 2, 2))  # the released structure (3 levels of 2x, 2 of them in time) at 1/6 width


@pytest.fixture(scope="module")
def vae():
    return klvae_from(diffusers_vae("qwenimage", seed=21, **SMALL))


def latents(B=2, T=3, h=6, w=5, seed=0):
    return torch.randn(B, 16, T, h, w, generator=torch.Generator().manual_seed(seed))


def frames(T=9, H=48, W=40, seed=1):
    return torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def spill_maps() -> list:
    with open("/proc/self/maps") as f:
        return [line for line in f if "klvae-store-" in line]


@pytest.mark.parametrize("store", ["device", "disk"])
def test_exact_clips_equal_the_untiled_clip(vae, store, tmp_path):
    """Bands of a few rows at every resolution, the caches in the store: the decode's worst frame
    >= 100 dB from the untiled clip (it is equal to float noise), and the encode's moments too."""
    z, x = latents(), frames()
    t = Tiling(mode="exact", store=store, spill_dir=str(tmp_path), tile_size=16)
    ref, ref_m = vae.decode(z), vae.encode(x).moments
    out = vae.decode(z, tiling=t)
    r = vae.last_tiling
    assert r.mode == "exact" and r.store == store and r.grid[0] >= 4 and r.chunks == 3, str(r)
    assert "3 time chunks x" in str(r) and "cached frames" in str(r)
    assert out.shape == ref.shape == (2, 3, 9, 48, 40)
    assert (out - ref).abs().max() <= 1e-5 and worst_frame_psnr(out, ref) >= 100
    m = vae.encode(x, tiling=t).moments
    assert vae.last_tiling.chunks == 3 and m.shape == ref_m.shape == (1, 32, 3, 6, 5)
    assert (m - ref_m).abs().max() <= 1e-5
    assert list(tmp_path.iterdir()) == [] and spill_maps() == []


def test_the_clip_does_not_depend_on_how_time_is_chunked(vae):
    """engine.run_clip with other chunkings than the plan's (decode: 1, 2 or 4 latent frames at a
    time; encode: Wan's 1, 4, 4, two frames at a time, the whole clip at once): the same clip."""
    z, x = latents(B=1, T=4), frames()
    cpu, f32 = torch.device("cpu"), torch.float32

    def run(net, cin, r, x, bounds, h, w):
        plan = Plan("decode", "exact", 16, h, w, 8, Tiling(), store="device", band_elems=2000, chunks=len(bounds) - 1)
        parts = {}
        chunks = ((a, x[:, :, a:b]) for a, b in zip(bounds, bounds[1:]))
        engine.run_clip(steps_of(net.layers(), cin, r), chunks, plan, lambda t0, y: parts.setdefault(t0, y.clone()),
                        cpu, f32)
        return torch.cat([parts[k] for k in sorted(parts)], dim=2)
    with torch.no_grad():
        zq = vae.post_quant_conv(z)
        decoded = [run(vae.decoder, 16, 1, zq, b, 6, 5) for b in ([0, 1, 2, 3, 4], [0, 2, 4], [0, 1, 3, 4], [0, 4])]
        encoded = [run(vae.encoder, 3, 8, x, b, 6, 5) for b in ([0, 1, 5, 9], [0, 1, 3, 5, 7, 9], [0, 9], [0, 2, 9])]
    ref = vae.decoder(zq)
    for d in decoded:
        assert d.shape == (1, 3, 13, 48, 40) and (d - ref).abs().max() <= 1e-5
    for e in encoded:
        assert e.shape == (1, 32, 3, 6, 5) and (e - encoded[0]).abs().max() <= 1e-5
    assert (vae.quant_conv(encoded[0]) - vae.encode(x).moments).abs().max() <= 1e-5


def test_the_time_upsample_doubles_frames_and_keeps_the_clip_channels_last():
    """UpResample.doubled, chunk by chunk as Wan's decoder runs it: frame 0 as it is, every later
    frame t -> two frames (the causal time conv's channels [0, C) and [C, 2C)), and every chunk's
    result channels last, so the 2-D convs after it take their frames without copying them (the
    reshape it once ended with left the chunks after the first channels first)."""
    import torch.nn.functional as F
    from klvae.vae.model_qwenimage import UpResample
    torch.manual_seed(0)
    up = UpResample(8, temporal=True)
    x = torch.randn(1, 8, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        up.cache = ()  # a chunked run: the first chunk holds frame 0
        chunks = [up.doubled(x[:, :, a:b]) for a, b in ((0, 1), (1, 2), (2, 4))]
        tc = F.conv3d(F.pad(x[:, :, 1:], (0, 0, 0, 0, 2, 0)), up.time_conv.weight, up.time_conv.bias)  # [1, 16, 3, 5, 6]
    assert [c.shape[2] for c in chunks] == [1, 2, 4]
    assert all(c.is_contiguous(memory_format=torch.channels_last_3d) for c in chunks)
    y = torch.cat(chunks, dim=2)
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    for t in range(3):
        assert (y[:, :, 1 + 2 * t] - tc[:, :8, t]).abs().max() <= 1e-5
        assert (y[:, :, 2 + 2 * t] - tc[:, 8:, t]).abs().max() <= 1e-5


@pytest.mark.parametrize("store", ["device", "disk"])
def test_progress_counts_chunks_and_an_interrupt_mid_clip_gives_everything_back(vae, store, tmp_path):
    z = latents(B=1, T=3, seed=3)
    seen = []
    t = dict(mode="exact", store=store, spill_dir=str(tmp_path), tile_size=16)
    out = vae.decode(z, tiling=Tiling(**t, progress=lambda done, total: seen.append((done, total))))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    gc.disable()  # the memory (and the spill files' mappings) must come back without the cyclic collector
    try:
        with pytest.raises(Interrupted):
            vae.decode(z, tiling=Tiling(**t, progress=lambda done, total: seen.append(done),
                                        interrupt=lambda: len(seen) > 3))  # during the second chunk
        alive = [o for o in gc.get_objects() if type(o) is engine.Store]
        maps = spill_maps()
    finally:
        gc.enable()
    assert seen[3:] == [1] and alive == [] and maps == [] and list(tmp_path.iterdir()) == []
    assert torch.equal(vae.decode(z, tiling=Tiling(**t)), out)


def test_a_spill_disk_that_fills_up_mid_clip_is_one_error(vae, tmp_path, monkeypatch):
    """The first store made after the first chunk (a cache or an activation) finds the disk full."""
    z = latents(B=1, T=3, seed=4)
    t = dict(mode="exact", store="disk", spill_dir=str(tmp_path), tile_size=16)
    done, real = [], os.posix_fallocate

    def fallocate(*a):
        if done:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a)
    monkeypatch.setattr(engine.os, "posix_fallocate", fallocate)
    with pytest.raises(KLVAEError, match=f"spill folder {tmp_path} is full") as e:
        vae.decode(z, tiling=Tiling(**t, progress=lambda n, total: done.append(n)))
    assert "\n" not in str(e.value) and done == [1] and isinstance(e.value.__cause__, OSError)
    assert spill_maps() == [] and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert (vae.decode(z, tiling=Tiling(**t)) - vae.decode(z)).abs().max() <= 1e-5


def test_clip_plans_and_refusals(vae, tmp_path):
    p = vae.plan_decode((1, 16, 5, 6, 5), Tiling(mode="exact", tile_size=16, store="disk", spill_dir=str(tmp_path)))
    assert p.frames == 5 and p.chunks == 5 and p.store == "disk" and p.store_bytes > 0
    assert str(p).startswith("exact decode of 40x48 px x 5 latent frames: 5 time chunks x ")
    assert vae.plan_encode((1, 3, 9, 48, 40), "exact").chunks == 3  # Wan's: 1, 4, 4 frames
    # more frames: the caches are the same, the output grows (in the device's memory, on the CPU)
    longer = vae.plan_decode((1, 16, 9, 6, 5), Tiling(mode="exact", tile_size=16, store="disk", spill_dir=str(tmp_path)))
    frame = 3 * 48 * 40 * 4
    assert longer.store_bytes == p.store_bytes and longer.predicted - p.predicted == 16 * frame
    for call, words in [
            (lambda: vae.decode(latents(B=1), tiling="bounded"), "exact mode only"),
            (lambda: vae.plan_decode((1, 16, 3, 6, 5)), "untiled clip decode is not planned"),
            (lambda: vae.plan_encode((1, 3, 7, 48, 40), "exact"), r"encodes 1 \+ 4k frames"),
            (lambda: vae.plan_decode((1, 15, 3, 6, 5), "exact"), "have 15 channels, this VAE's have 16"),
            (lambda: vae.plan_decode((1, 16, 0, 6, 5), "exact"), r"pass \(B, C, T, H, W\), five positive"),
            (lambda: vae.decode(latents(B=1), tiling=Tiling(mode="exact", memory_budget=2**10)), "of device memory even in"),
    ]:
        with pytest.raises(KLVAEError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    vae.enable_tiling("exact", tile_size=16)  # the default applies to clips too
    try:
        z = latents(B=1)
        assert (vae.decode(z) - vae.decode(z, tiling="none")).abs().max() <= 1e-5
        vae.decode(z)
        assert vae.last_tiling.mode == "exact" and vae.last_tiling.chunks == 3
    finally:
        vae.disable_tiling()


def test_decode_clip_hands_over_each_chunks_frames_as_it_finishes(vae, tmp_path):
    """decode_clip: write(t0, frames) per time chunk (fp32, on the CPU), in order, nothing held: the
    frames are the clip's; its plan leaves the output out (exactly the output's bytes less, where the
    output would be in device memory: the CPU)."""
    z = latents(B=1, T=3, seed=5)
    got = []
    r = vae.decode_clip(z, lambda t0, frames: got.append((t0, frames)),
                        tiling=Tiling(mode="exact", tile_size=16, store="disk", spill_dir=str(tmp_path)))
    assert r is vae.last_tiling and r.chunks == 3 and r.store == "disk" and list(tmp_path.iterdir()) == []
    assert [t0 for t0, _ in got] == [0, 1, 5] and [f.shape[2] for _, f in got] == [1, 4, 4]
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for _, f in got)
    assert (torch.cat([f for _, f in got], dim=2) - vae.decode(z)).abs().max() <= 1e-5
    t = Tiling(mode="exact", tile_size=16)
    full, streamed = vae.plan_decode(z.shape, t), vae.plan_decode(z.shape, t, output=False)
    assert full.predicted - streamed.predicted == 9 * 3 * 48 * 40 * 4
    for call, words in [(lambda: vae.decode_clip(z[:, :, 0], print), r"decode_clip takes a clip's latents"),
                        (lambda: vae.decode_clip(z, None), "write must be a callable"),
                        (lambda: vae.decode_clip(z, print, tiling="bounded"), "exact mode only")]:
        with pytest.raises(KLVAEError, match=words):
            call()


def test_the_residual_stream_scales_exactly_on_clips(vae):
    """precision.stream_scaled (the fp16 guard's copies) on clips: Wan 2.1's decoder and encoder,
    scaled by 2^-12 and 2^16, give the same clip (the time convs of the resamples map the stream to
    itself: their biases scale too; images never run them, so only clips could show it)."""
    from klvae.vae import AutoencoderKL, load_vae, preset
    from klvae.vae.precision import stream_scaled
    wan22 = (torch.manual_seed(0), AutoencoderKL(preset("wan22", ch=16, decoder_ch=24)).eval())[1]
    for m, z, x in ((vae, latents(B=1), frames()), (wan22, torch.randn(1, 48, 3, 4, 5), frames(H=64, W=80))):
        with torch.no_grad():
            ref, ref_m = m.decode(z), m.encode(x).moments
        for s in (2.0**-12, 2.0**16):
            sd = m.state_dict()
            for part in ("decoder", "encoder"):
                sd.update({f"{part}.{k}": t for k, t in stream_scaled(getattr(m, part), s).state_dict().items()})
            w = load_vae(sd)
            assert (w.decode(z) - ref).abs().max() <= 1e-5 and (w.encode(x).moments - ref_m).abs().max() <= 1e-5, s


def test_the_fp16_guard_rescues_an_overflowing_clip(vae):
    """A Wan 2.1 VAE whose residual stream is 2^16 larger (stream_scaled: the same clip in fp32)
    overflows fp16; the guard re-runs the clip with the stream scaled down (untiled and exact, decode,
    encode and decode_clip, whose writer gets the frames again from frame 0), warns once, remembers
    the scale (the next call runs once) and the result is the fp32 clip's within fp16 noise; with
    the guard off it is one error."""
    import warnings
    from klvae.vae import load_vae
    from klvae.vae.precision import stream_scaled
    sd = vae.state_dict()
    for part in ("decoder", "encoder"):
        sd.update({f"{part}.{k}": t for k, t in stream_scaled(getattr(vae, part), 2.0**16).state_dict().items()})
    z, x = latents(B=1), frames()
    ref, ref_m = vae.decode(z), vae.encode(x).moments
    for tiling in (None, Tiling(mode="exact", tile_size=16)):
        v16 = load_vae(sd, dtype="fp16")
        v16.guard.enabled = False
        with pytest.raises(KLVAEError, match="decode of a clip gave non-finite values in float16"):
            v16.decode(z, tiling=tiling)
        v16.guard.enabled = True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = v16.decode(z, tiling=tiling)
            again = v16.decode(z, tiling=tiling)
            m = v16.encode(x, tiling=tiling).moments
        assert out.dtype == torch.float16 and worst_frame_psnr(out.float(), ref) >= 50
        assert torch.equal(out, again) and (m.float() - ref_m).abs().max() <= 0.05
        assert len(caught) == 1 and "re-ran the clip with the residual stream scaled by 2^-" in str(caught[0].message)
        assert len(v16.guard.log) == 2, v16.guard.log  # the decoder's rescue, then the encoder's; the second decode ran once
        assert "re-ran the clip" in str(v16.last_tiling)
    v16, got = load_vae(sd, dtype="fp16"), []
    with pytest.warns(UserWarning, match="re-ran the clip") as caught:
        v16.decode_clip(z, lambda t0, y: got.append(t0), tiling=Tiling(mode="exact", tile_size=16))
    assert caught[0].filename == __file__  # the warning points at the user's call
    assert got[:1] == [0] and got[-3:] == [0, 1, 5] and len(v16.guard.log) == 1, got


MEASURE = """
import json, sys, torch
torch.set_num_threads(2)
from klvae.testing import diffusers_vae, klvae_from
from klvae.vae import Tiling
vae = klvae_from(diffusers_vae("qwenimage", seed=0, ch=48), family="qwenimage")
z = torch.randn(1, 16, 3, 24, 24)
plan = vae.plan_decode(z.shape, Tiling(mode="exact", tile_size=96, store=sys.argv[1]))
vae.decode(z, tiling=plan)
r = vae.last_tiling
print(json.dumps([plan.predicted, r.measured_peak, plan.store_bytes, r.store_bytes]))
"""


@pytest.mark.parametrize("store", ["device", "disk"])
def test_clip_memory_model_matches_measured_peak(store):
    """A 192 px clip of 9 frames at a width whose decode needs a few hundred MiB (the caches most of
    it): predicted vs measured as for images (test_tiling), the stores' bytes exactly."""
    res = subprocess.run([sys.executable, "-c", MEASURE, store], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    predicted, measured, store_predicted, store_measured = json.loads(res.stdout.strip().splitlines()[-1])
    print(store, predicted / 2**20, measured / 2**20, store_predicted / 2**20)
    assert store_predicted == store_measured and store_predicted > 100 * 2**20
    assert 0.75 * predicted - 48 * 2**20 <= measured <= 1.3 * predicted + 48 * 2**20, (predicted, measured)
    assert math.isfinite(predicted)
