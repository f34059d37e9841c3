"""HunyuanImage-2.1's VAE (vae/model_hunyuanimage.py): its key maps and config, parity with diffusers'
AutoencoderKLHunyuanImage and with ComfyUI's own modules, its layer types streamed row by row, exact
tiling, bounded tiling, and the fp16 guard's stream scaling. Small seeded networks, offline."""
import re
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
import torch
from diffusers import AutoencoderKLHunyuanImage

from klvae.testing import calibrate, max_abs_vs_full, psnr, test_image
from klvae.vae import KLVAEError, Tiling
from klvae.vae import model_hunyuanimage as hy
from klvae.vae.bounded import Streamer
from klvae.vae.layers import steps_of
from klvae.vae.ops import Progress, Scratch, Tile
from klvae.vae.precision import stream_scaled
from klvae.vae.tiling import execute, make_plan

# The released structure at a quarter width or less: widths that grow in the resample (32 -> 64,
# 64 -> 128) and that keep it (64 -> 64), so the shortcuts average groups of 2 and of 4 channels.
SMALL = hy.HunyuanImageShape(block_out_channels=(32, 64, 64, 128), num_res_blocks=2, latent_channels=8, downscale=8)
# Four resamples (16x), one resnet per encoder level, 16 latent channels (groups of 4, repeats of 8).
DEEP = hy.HunyuanImageShape(block_out_channels=(32, 32, 64, 64, 128), num_res_blocks=1, latent_channels=16,
                            downscale=16)
# What ComfyUI builds and diffusers cannot: levels that do not resample, resamples that keep the
# width, so resnets change width through nin_shortcut.
COMFY_ONLY = hy.HunyuanImageShape(block_out_channels=(32, 64, 64, 128), num_res_blocks=1, latent_channels=8,
                                  downscale=4, match_channels=False)
RELEASED = hy.HunyuanImageShape()


def diffusers_hunyuan(cfg, seed=0):
    """diffusers' AutoencoderKLHunyuanImage of cfg: its own seeded init plus 0.1 N(0, 1) on every norm
    and bias, so that no GroupNorm affine or bias is an identity."""
    torch.manual_seed(seed)
    d = AutoencoderKLHunyuanImage(**{k: v for k, v in hy.diffusers_config(cfg).items() if not k.startswith("_")})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return d.eval()


def networks(cfg, sd):
    """Our encoder and decoder of cfg with a ComfyUI-keyed state dict, loaded strictly."""
    enc, dec = hy.Encoder(cfg).eval(), hy.Decoder(cfg).eval()
    for net, prefix in ((enc, "encoder."), (dec, "decoder.")):
        net.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    return enc, dec


def comfy_state_dict(cfg, seed=0):
    """Seeded weights in ComfyUI's layout for any cfg (also those diffusers cannot build)."""
    torch.manual_seed(seed)
    enc, dec = hy.Encoder(cfg), hy.Decoder(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    with torch.no_grad():
        for prefix, net in (("encoder.", enc), ("decoder.", dec)):
            for k, v in net.state_dict().items():
                sd[prefix + k] = v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith("bias") or "norm" in k else v
    return sd


@pytest.fixture(scope="module", params=[SMALL, DEEP], ids=["small", "deep"])
def pair(request):
    """(cfg, diffusers model, our encoder, our decoder) sharing weights through the key map."""
    cfg = request.param
    d = diffusers_hunyuan(cfg, seed=1)
    names = hy.diffusers_to_comfy(d.state_dict().keys())
    return (cfg, d, *networks(cfg, {names[k]: v for k, v in d.state_dict().items()}))


# ----------------------------------------------------------------------------------------------
# Keys and config
# ----------------------------------------------------------------------------------------------
def _ours_keys(cfg):
    with torch.device("meta"):
        return {f"{p}.{k}" for p, net in (("encoder", hy.Encoder(cfg)), ("decoder", hy.Decoder(cfg)))
                for k in net.state_dict()}


@pytest.mark.parametrize("cfg", [SMALL, DEEP, RELEASED], ids=["small", "deep", "released"])
def test_key_maps_cover_every_key_both_ways(cfg):
    with torch.device("meta"):
        d = AutoencoderKLHunyuanImage(**{k: v for k, v in hy.diffusers_config(cfg).items() if not k.startswith("_")})
    dkeys = list(d.state_dict())
    to_comfy = hy.diffusers_to_comfy(dkeys)
    assert set(to_comfy) == set(dkeys) and set(to_comfy.values()) == _ours_keys(cfg)  # onto our module names
    back = hy.comfy_to_diffusers(to_comfy.values())
    assert {k: back[v] for k, v in to_comfy.items()} == {k: k for k in dkeys}          # round trip: identity
    assert hy.diffusers_to_comfy(back.values()) == {v: k for k, v in back.items()}
    if cfg == SMALL:  # a few by hand: the flat lists interleave resnets and resamples, lowest resolution first
        assert to_comfy["encoder.down_blocks.2.conv.weight"] == "encoder.down.0.downsample.conv.weight"
        assert to_comfy["encoder.down_blocks.3.norm1.bias"] == "encoder.down.1.block.0.norm1.bias"
        assert to_comfy["decoder.up_blocks.3.conv.bias"] == "decoder.up.0.upsample.conv.bias"
        assert to_comfy["decoder.up_blocks.14.conv2.weight"] == "decoder.up.3.block.2.conv2.weight"
        assert to_comfy["decoder.mid_block.attentions.0.proj.weight"] == "decoder.mid.attn_1.proj_out.weight"
        assert to_comfy["encoder.mid_block.resnets.1.norm2.weight"] == "encoder.mid.block_2.norm2.weight"
    sd = d.state_dict()  # meta tensors: shapes without weights, even at the released width
    assert hy.config_from_shapes(lambda k: sd[back[k]].shape, to_comfy.values()) == asdict(cfg)


def test_key_maps_of_comfyui_only_shapes_round_trip():
    """Levels that do not resample and width changes in resnets (nin_shortcut <-> conv_shortcut)."""
    keys = _ours_keys(COMFY_ONLY)
    assert any("nin_shortcut" in k for k in keys)
    to_d = hy.comfy_to_diffusers(keys)
    assert len(set(to_d.values())) == len(keys) and any("conv_shortcut" in k for k in to_d.values())
    assert hy.diffusers_to_comfy(to_d.values()) == {v: k for k, v in to_d.items()}
    sd = comfy_state_dict(COMFY_ONLY)
    assert hy.config_from_shapes(lambda k: sd[k].shape, sd) == asdict(COMFY_ONLY)


def test_unknown_and_damaged_keys_are_refused():
    keys = _ours_keys(SMALL)
    with pytest.raises(KLVAEError, match="not a key of a HunyuanImage VAE"):
        hy.comfy_to_diffusers(keys | {"encoder.down.0.attn.0.q.weight"})
    with pytest.raises(KLVAEError, match="not a key of a HunyuanImage VAE"):
        hy.diffusers_to_comfy(["decoder.up_blocks.0.resnets.0.norm1.weight"])  # SD's layout, not this one
    dkeys = set(hy.comfy_to_diffusers(keys).values())
    with pytest.raises(KLVAEError, match="skips an index"):
        hy.diffusers_to_comfy({k for k in dkeys if not k.startswith("encoder.down_blocks.1.")})
    sd = comfy_state_dict(SMALL)
    with pytest.raises(KLVAEError, match="missing"):
        hy.config_from_shapes(lambda k: sd[k].shape, [k for k in sd if k != "decoder.conv_in.weight"])


def test_released_config_and_scaling_factor():
    import comfy_host

    cfg = hy.diffusers_config(RELEASED)
    assert cfg == {"_class_name": "AutoencoderKLHunyuanImage", "in_channels": 3, "out_channels": 3,
                   "latent_channels": 64, "block_out_channels": [128, 256, 512, 512, 1024, 1024],
                   "layers_per_block": 2, "spatial_compression_ratio": 32, "sample_size": 384,
                   "scaling_factor": 0.75289, "downsample_match_channel": True, "upsample_match_channel": True}
    # ComfyUI's latent format scales by the same number (its HunyuanImage21 class, read as text)
    text = (comfy_host.comfy_tree() / "comfy" / "latent_formats.py").read_text()
    block = text[text.index("class HunyuanImage21(LatentFormat)"):]
    assert float(re.search(r"scale_factor = ([0-9.]+)", block)[1]) == hy.SCALING_FACTOR
    assert re.search(r"latent_dimensions = (\d)", block)[1] == "2"
    with pytest.raises(KLVAEError, match="ComfyUI's layout only"):
        hy.diffusers_config(COMFY_ONLY)
    with pytest.raises(KLVAEError, match="downscale"):
        hy.Encoder(replace(SMALL, downscale=16))       # more resamples than levels after the first


def test_shuffles_are_the_references_channel_order():
    """Our space_to_channel / channel_to_space against diffusers' own resample modules (zero conv:
    the output is the shortcut alone, which carries the shuffle's channel order)."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanimage import (HunyuanImageDownsample,
                                                                           HunyuanImageUpsample)
    x = torch.randn(2, 8, 6, 10, generator=torch.Generator().manual_seed(0))
    for ref, ours, ins in ((HunyuanImageDownsample(8, 16), hy.ShuffleDownsample(8, 16), x),
                           (HunyuanImageDownsample(8, 8), hy.ShuffleDownsample(8, 8), x),
                           (HunyuanImageUpsample(8, 4), hy.ShuffleUpsample(8, 4), x),
                           (HunyuanImageUpsample(8, 8), hy.ShuffleUpsample(8, 8), x)):
        with torch.no_grad():
            ref.conv.weight.zero_()
            ref.conv.bias.zero_()
            ours.load_state_dict(ref.state_dict(), strict=True)
            assert torch.equal(ours(ins), ref(ins))
    assert torch.equal(hy.channel_to_space(hy.space_to_channel(x)), x)


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------
def test_parity_with_diffusers(pair):
    cfg, d, enc, dec = pair
    x = test_image(64, 96)
    with torch.no_grad():
        ref_moments = d._encode(x)
        ref = d.encode(x).latent_dist
        moments = enc(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = ref.mode()
        ref_img, img = d.decode(z).sample, dec(z)
    diffs = dict(moments=max_abs_vs_full(moments, ref_moments), mode=max_abs_vs_full(mean, z),
                 logvar=max_abs_vs_full(logvar.clamp(-30, 20), ref.logvar), decode=max_abs_vs_full(img, ref_img))
    print(f"\nparity with diffusers, {cfg.block_out_channels} x{cfg.downscale}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    assert moments.shape == (1, 2 * cfg.latent_channels, 64 // cfg.downscale, 96 // cfg.downscale)
    assert max(diffs.values()) <= 1e-4
    assert ref_img.abs().max() > 0.1 and ref_moments.std() > 0.1   # nothing collapsed to a constant


COMFY_SCRIPT = r"""
import sys, torch
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, {tree!r})
import comfy.options
comfy.options.enable_args_parsing()
from comfy.ldm.hunyuan_video.vae import Decoder, Encoder
results = []
for case in torch.load({src!r}):
    c = case["cfg"]
    enc = Encoder(in_channels=c["in_channels"], z_channels=c["latent_channels"],
                  block_out_channels=c["block_out_channels"], num_res_blocks=c["num_res_blocks"],
                  ffactor_spatial=c["downscale"], downsample_match_channel=c["match_channels"])
    dec = Decoder(z_channels=c["latent_channels"], out_channels=c["out_channels"],
                  block_out_channels=c["block_out_channels"], num_res_blocks=c["num_res_blocks"],
                  ffactor_spatial=c["downscale"], upsample_match_channel=c["match_channels"])
    for net, p in ((enc, "encoder."), (dec, "decoder.")):
        net.load_state_dict({{k[len(p):]: v for k, v in case["sd"].items() if k.startswith(p)}}, strict=True)
    with torch.no_grad():
        results.append(dict(moments=enc(case["x"]), image=dec(case["z"])))
torch.save(results, {dst!r})
print("OK")
"""


def test_parity_with_comfyui_modules(tmp_path):
    """ComfyUI 0.3.75's own Encoder/Decoder (comfy.ldm.hunyuan_video.vae, in a process of their own)
    load our state dicts strictly, so our module names are its keys, and compute what we compute;
    also for the shapes only ComfyUI builds."""
    import comfy_host

    cases, ours = [], []
    for n, cfg in enumerate((SMALL, COMFY_ONLY)):
        sd = comfy_state_dict(cfg, seed=n)
        enc, dec = networks(cfg, sd)
        x = test_image(32, 48, seed=n)
        z = torch.randn(1, cfg.latent_channels, 5, 3, generator=torch.Generator().manual_seed(n))
        c = asdict(cfg)
        c["block_out_channels"] = list(c["block_out_channels"])
        cases.append(dict(cfg=c, sd=sd, x=x, z=z))
        with torch.no_grad():
            ours.append(dict(moments=enc(x), image=dec(z)))
    torch.save(cases, tmp_path / "cases.pt")
    tree = comfy_host.comfy_tree()
    script = COMFY_SCRIPT.format(tree=str(tree), src=str(tmp_path / "cases.pt"), dst=str(tmp_path / "out.pt"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tree)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout[-1000:], r.stderr[-3000:])
    for mine, theirs in zip(ours, torch.load(tmp_path / "out.pt")):
        diffs = {k: max_abs_vs_full(mine[k], theirs[k]) for k in mine}
        print(f"\nparity with ComfyUI: {diffs}")
        assert max(diffs.values()) <= 1e-4


# ----------------------------------------------------------------------------------------------
# The layer types streamed row by row (bounded mode's machinery) equal the module on the whole input
# ----------------------------------------------------------------------------------------------
def _stream(step, x, chunks, x0, x1, s):
    """step's streaming op fed rows of columns [x0, x1) of x in chunks of the given sizes (cycled),
    with its statistics recorded on the whole input first; -> {row: valid output Tile parts}."""
    H, W = x.shape[2:]
    whole = Tile(x, 0, H, 0, W, H, W, s)
    stats = []
    rec = Streamer(stats, True, Progress(0), Scratch()).build(step.describe()).push(whole)
    op = Streamer(stats, False, Progress(0), Scratch()).build(step.describe())
    parts, y, n = [], 0, 0
    while y < H:
        y1 = min(H, y + chunks[n % len(chunks)])
        out = op.push(Tile(x[:, :, y:y1, x0:x1], y, y1, x0, x1, H, W, s))
        if out is not None:
            parts.append(out)
        y, n = y1, n + 1
    return rec, parts


def test_new_layer_types_stream_row_by_row():
    sd = comfy_state_dict(SMALL, seed=3)
    enc, dec = networks(SMALL, sd)
    g = torch.Generator().manual_seed(0)
    cases = [(enc.down[0].downsample, torch.randn(1, 32, 26, 30, generator=g), 8),     # 32 -> 64
             (enc.down[1].downsample, torch.randn(1, 64, 14, 18, generator=g), 4),     # 64 -> 64
             (dec.up[0].upsample, torch.randn(1, 128, 9, 11, generator=g), 1),         # 128 -> 64
             (dec.up[2].upsample, torch.randn(1, 64, 13, 9, generator=g), 4),          # 64 -> 32
             (hy.EncoderOut(enc), 3 * torch.randn(1, 128, 11, 13, generator=g) + 1, 1),
             (hy.DecoderIn(dec), torch.randn(1, 8, 11, 13, generator=g), 1)]
    with torch.no_grad():
        for layer, x, s in cases:
            step = steps_of([layer], x.shape[1], s)[0]
            ref = layer(x)
            rec, _ = _stream(step, x, [x.shape[2]], 0, x.shape[3], s)
            assert rec.data.shape == ref.shape and max_abs_vs_full(rec.data, ref) <= 1e-5, type(layer).__name__
            # strips starting on odd and even columns: the conv's valid columns then start on a 2x2
            # cell's first or second column (a downsample must drop the half cell)
            for chunks, (x0, x1) in (([1], (0, x.shape[3])), ([2, 1, 3], (3, x.shape[3] - 2)), ([5], (2, 9)),
                                     ([4, 7], (1, 8))):
                _, parts = _stream(step, x, chunks, x0, x1, s)
                rows = [r for p in parts for r in range(p.y0, p.y1)]
                assert rows == list(range(ref.shape[2])), (type(layer).__name__, chunks, rows)  # each once, in order
                for p in parts:
                    assert max_abs_vs_full(p.data, ref[:, :, p.y0:p.y1, p.x0:p.x1]) <= 1e-5, type(layer).__name__
                assert parts[0].x1 > parts[0].x0 and all((p.x0, p.x1) == (parts[0].x0, parts[0].x1) for p in parts)


# ----------------------------------------------------------------------------------------------
# Exact tiling
# ----------------------------------------------------------------------------------------------
def _seeded(cfg, seed):
    return networks(cfg, comfy_state_dict(cfg, seed))


@pytest.mark.parametrize("cfg,hw,batch,tile,store", [
    (SMALL, (7, 11), 1, 8, "device"),       # bands of one row at every resolution
    (SMALL, (7, 11), 2, 16, "disk"),
    (SMALL, (9, 5), 1, 24, "device"),
    (DEEP, (5, 7), 1, 16, "device"),
    (DEEP, (5, 7), 1, 32, "disk"),
    (COMFY_ONLY, (9, 7), 1, 4, "disk"),
], ids=["small-1row", "small-disk-batch2", "small-tall", "deep-1row", "deep-disk", "comfy-only-1row"])
def test_exact_tiling_equals_untiled(cfg, hw, batch, tile, store, tmp_path):
    enc, dec = _seeded(cfg, seed=5)
    h, w = hw
    f = cfg.downscale
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch, cfg.latent_channels, h, w, generator=g)
    x = torch.cat([test_image(h * f, w * f, seed=i) for i in range(batch)])
    for net, inp, direction in ((dec, z, "decode"), (enc, x, "encode")):
        calls = []
        t = Tiling(mode="exact", tile_size=tile, store=store, spill_dir=str(tmp_path),
                   progress=lambda d, n: calls.append((d, n)))
        plan = make_plan(net, direction, inp.shape[1], (batch, 2 * cfg.latent_channels, h, w), torch.float32,
                         torch.device("cpu"), t, f)
        with torch.no_grad():
            full = net(inp)
            out, report = execute(net, inp, plan)
        diff = max_abs_vs_full(out, full)
        print(f"\nexact {direction} {cfg.block_out_channels} {h}x{w} latent, {plan.describe()}, {store}: "
              f"max {diff:.2e}")
        assert plan.mode == "exact" and plan.grid[0] > 1 and report.store == store
        assert out.shape == full.shape and diff <= 1e-4
        assert calls[-1][0] == calls[-1][1] == report.steps   # every band counted, no more
    if tile == f:  # the finest plan: bands at the top resolution no taller than one latent row (SMALL: one px row)
        rows = make_plan(dec, "decode", cfg.latent_channels, z.shape, torch.float32, torch.device("cpu"),
                         Tiling(mode="exact", tile_size=tile, store=store, spill_dir=str(tmp_path)), f).band_rows
        assert rows <= f and (rows == 1 or cfg != SMALL)


# ----------------------------------------------------------------------------------------------
# Bounded mode
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bounded_nets():
    """SMALL, calibrated on a 128x384 test image (klvae.testing.calibrate: every conv rescaled to
    unit-std outputs, residual branches 0.3, the decoded image std 0.5), so that its GroupNorm
    statistics vary over the image as a trained VAE's do and PSNR on [-1, 1] measures something;
    that image and its latent (16x48 latent px: wide enough for several strips with the smallest tiles)."""
    x = test_image(128, 384)
    d = calibrate(diffusers_hunyuan(SMALL, seed=7), x)
    names = hy.diffusers_to_comfy(d.state_dict())
    enc, dec = networks(SMALL, {names[k]: v for k, v in d.state_dict().items()})
    with torch.no_grad():
        z = enc(x).chunk(2, dim=1)[0]
    return enc, dec, x, z


def _run(net, inp, direction, tiling, f=SMALL.downscale, zc=SMALL.latent_channels):
    h, w = inp.shape[2] // (1 if direction == "decode" else f), inp.shape[3] // (1 if direction == "decode" else f)
    plan = make_plan(net, direction, inp.shape[1], (inp.shape[0], zc, h, w), torch.float32, torch.device("cpu"),
                     tiling, f)
    with torch.no_grad():
        return execute(net, inp, plan)


def test_bounded_exact_statistics_equal_untiled(bounded_nets):
    """A small image is its own mosaic: bounded mode's streaming with exact statistics."""
    enc, dec, x, z = bounded_nets
    with torch.no_grad():
        full_img, full_mom = dec(z), enc(x)
    img, rep = _run(dec, z, "decode", Tiling(mode="bounded", tile_size=64))
    mom, rep_e = _run(enc, x, "encode", Tiling(mode="bounded", tile_size=64))
    assert rep.mosaic_lattice is None and rep_e.mosaic_lattice is None
    assert max_abs_vs_full(img, full_img) <= 1e-4 and max_abs_vs_full(mom, full_mom) <= 1e-4


def test_bounded_strips_and_bands_equal_one_pass(bounded_nets):
    """With the same statistics mosaic, many bands and strips give what one band over the image gives:
    the streaming is exact, only the statistics are estimated."""
    enc, dec, x, z = bounded_nets
    one, rep1 = _run(dec, z, "decode", Tiling(mode="bounded", tile_size=1024, mosaic_size=8))
    tiled, rep = _run(dec, z, "decode", Tiling(mode="bounded", tile_size=8, mosaic_size=8))
    print(f"\nbounded decode: {rep1.describe()} vs {rep.describe()}, halo {rep.halo} px")
    assert rep1.grid == (1, 1) and rep.grid[0] > 1 and rep.grid[1] > 1
    assert max_abs_vs_full(tiled, one) <= 1e-4
    one, rep1 = _run(enc, x, "encode", Tiling(mode="bounded", tile_size=1024, mosaic_size=8))
    tiled, rep = _run(enc, x, "encode", Tiling(mode="bounded", tile_size=8, mosaic_size=8))
    print(f"bounded encode: {rep1.describe()} vs {rep.describe()}, halo {rep.halo} px")
    assert rep.grid[0] > 1 and rep.grid[1] > 1
    assert max_abs_vs_full(tiled, one) <= 1e-4


def test_bounded_is_close_to_untiled(bounded_nets):
    """Statistics from a mosaic of 4x4 crops of 4x4 latent px (a third of the 16x48 latent). Measured:
    44 dB, 6.5% (the SD-style VAE at a quarter width, calibrated alike, on the same image and mosaic:
    27 dB, 11%)."""
    enc, dec, x, z = bounded_nets
    with torch.no_grad():
        full_img, full_mom = dec(z), enc(x)
    img, rep = _run(dec, z, "decode", Tiling(mode="bounded", tile_size=32, mosaic_size=16))
    mom, rep_e = _run(enc, x, "encode", Tiling(mode="bounded", tile_size=32, mosaic_size=16))
    assert rep.mosaic_lattice is not None and "estimated" in rep.statistics
    db = psnr(img, full_img)
    mean, ref = mom.chunk(2, dim=1)[0], full_mom.chunk(2, dim=1)[0]
    rel = ((mean - ref).norm() / ref.norm()).item()
    print(f"\nbounded decode PSNR {db:.1f} dB vs untiled ({rep.describe()}); encode mean relative error {rel:.3f}")
    assert db > 38 and rel < 0.09


# ----------------------------------------------------------------------------------------------
# The fp16 guard's stream scaling
# ----------------------------------------------------------------------------------------------
def test_stream_scaled_gives_the_same_outputs():
    enc, dec = _seeded(SMALL, seed=9)
    s = 2.0 ** -12
    x = test_image(48, 80)
    z = torch.randn(1, SMALL.latent_channels, 6, 10, generator=torch.Generator().manual_seed(2))
    for net, inp, direction in ((enc, x, "encode"), (dec, z, "decode")):
        scaled = stream_scaled(net, s)
        assert net.skip_gain == 1.0 and scaled.skip_gain == (1 / s if direction == "encode" else s)
        seen = {}

        def hook(name):
            def fn(mod, inp, out):
                seen.setdefault(name, out.abs().mean())  # returns None: the output is left as it is
            return fn
        for name, m in (("plain", net), ("scaled", scaled)):
            m.mid.block_1.register_forward_hook(hook(name))
        with torch.no_grad():
            ref, out = net(inp), scaled(inp)
        ratio = (seen["scaled"] / seen["plain"]).item()
        assert abs(ratio / s - 1) < 1e-3, ratio   # the stream really is s times smaller
        tiled, _ = _run(scaled, inp, direction, Tiling(mode="exact", tile_size=8, store="device"))
        diffs = max_abs_vs_full(out, ref), max_abs_vs_full(tiled, ref)
        print(f"\nstream-scaled {direction}: untiled {diffs[0]:.2e}, exact tiled {diffs[1]:.2e}")
        assert max(diffs) <= 1e-4
