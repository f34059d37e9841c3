"""The Qwen-Image VAE (Wan 2.1's architecture) at one frame: parity with diffusers'
AutoencoderKLQwenImage and ComfyUI's WanVAE, the key maps, exact and bounded tiling equal to the
untiled pass, and the fp16 guard's stream-scaled copy. Small seeded networks (base width 16, the
released structure otherwise), CPU, fp32."""
import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from klvae.testing import test_image
from klvae.vae import KLVAEError, Tiling
from klvae.vae import model_qwenimage as q
from klvae.vae.engine import band_count
from klvae.vae.precision import stream_scaled
from klvae.vae.tiling import execute, make_plan

SHAPE = q.QwenImageShape(ch=16)    # the released structure (mults 1, 2, 4, 4; 2 res blocks; z 16) at 1/6 width
CPU = torch.device("cpu")


def diffusers_qwen(shape, seed=0, noise=0.1):
    """diffusers' AutoencoderKLQwenImage of this shape: its own init, plus seeded noise on every RMS
    gamma and bias, so that no norm or bias is an identity that a wrong key could hide behind."""
    from diffusers import AutoencoderKLQwenImage
    cfg = q.diffusers_config(shape)
    torch.manual_seed(seed)
    d = AutoencoderKLQwenImage(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith(("bias", "gamma")):
                p.add_(noise * torch.randn(p.shape, generator=g))
    return d


@pytest.fixture(scope="module")
def pair():
    """The diffusers model, its decoder's output on the test images' latents centred and scaled to
    std 0.5 (so that the decode clamp cuts only tails: both sides of it are tested), and ours with
    its weights through the key map."""
    d = diffusers_qwen(SHAPE)
    with torch.no_grad():
        z = d.encode(images()[:, :, None]).latent_dist.mode()
        out = d.decoder(d.post_quant_conv(z))
        a = 0.5 / out.std()
        d.decoder.conv_out.weight.mul_(a)
        d.decoder.conv_out.bias.mul_(a).sub_(a * out.mean())
    m = q.QwenImageVAE(SHAPE)
    m.load_state_dict(q.diffusers_to_original(d.state_dict()), strict=True)
    return d, m.requires_grad_(False).eval()


def images(h=48, w=64):
    x = test_image(h, w)
    return torch.cat([x, x.flip(3).roll(7, dims=2)])  # two different items


def latent(h, w, seed=2):
    return torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(seed))


# -- the key maps --------------------------------------------------------------------------------------
def test_key_maps_round_trip_and_agree_with_diffusers_converter(pair):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    d, m = pair
    sd, ours = d.state_dict(), m.state_dict()
    orig = q.diffusers_to_original(sd)
    assert set(orig) == set(ours)  # every diffusers key maps onto one of our modules' (and load_state_dict was strict)
    there = q.original_to_diffusers(orig)
    assert list(there) == list(sd) and all(there[k] is sd[k] for k in sd)
    back = q.diffusers_to_original(q.original_to_diffusers(ours))
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)
    # diffusers' own converter of the original release (its indices are the released structure's) agrees
    theirs = convert_wan_vae_to_diffusers(dict(ours))
    assert theirs.keys() == q.original_to_diffusers(ours).keys()
    # 3-D weights as the checkpoint has them; the temporal convs kept where the levels change frames
    assert ours["encoder.conv1.weight"].shape == (16, 3, 3, 3, 3)
    assert ours["encoder.downsamples.3.shortcut.weight"].shape == (32, 16, 1, 1, 1)
    assert ours["encoder.downsamples.0.residual.0.gamma"].shape == (16, 1, 1, 1)
    assert ours["decoder.middle.1.norm.gamma"].shape == (64, 1, 1)
    assert ours["decoder.middle.1.to_qkv.weight"].shape == (192, 64, 1, 1)
    assert ours["conv1.weight"].shape == (32, 32, 1, 1, 1) and ours["conv2.weight"].shape == (16, 16, 1, 1, 1)
    assert ours["decoder.upsamples.3.resample.1.weight"].shape == (32, 64, 3, 3)   # halves the width
    assert ours["decoder.upsamples.3.time_conv.weight"].shape == (128, 64, 3, 1, 1)
    tc = sorted(k for k in ours if "time_conv.weight" in k)
    assert tc == ["decoder.upsamples.3.time_conv.weight", "decoder.upsamples.7.time_conv.weight",
                  "encoder.downsamples.5.time_conv.weight", "encoder.downsamples.8.time_conv.weight"]
    assert q.config_from_shapes(lambda k: ours[k].shape, ours.keys()) == dataclasses.asdict(SHAPE)
    cfg = q.diffusers_config(SHAPE)
    assert cfg["latents_mean"] == list(q.LATENTS_MEAN) and "input_channels" not in cfg
    with pytest.raises(KLVAEError, match="not a Qwen-Image"):
        q.diffusers_to_original({**sd, "decoder.up_blocks.0.resnets.0.norm3.gamma": torch.zeros(1)})
    with pytest.raises(KLVAEError, match="not a Qwen-Image"):
        q.original_to_diffusers({**ours, "encoder.downsamples.0.norm.gamma": torch.zeros(1)})
    with pytest.raises(KLVAEError, match="Wan 2.2"):
        q.config_from_shapes(lambda k: (1,), ["decoder.upsamples.0.upsamples.0.residual.2.weight"])


@pytest.mark.parametrize("shape", [
    q.QwenImageShape(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, temporal_downsample=(True, False)),
    q.QwenImageShape(ch=8, ch_mult=(2,), num_res_blocks=3, latent_channels=4, in_channels=4, out_channels=4,
                     temporal_downsample=())])
def test_key_maps_follow_any_structure(shape):
    """Other level counts and block counts than the released ones (the decoder's flat index is
    i * (num_res_blocks + 2) + j): every key and shape of diffusers' model of that config."""
    from diffusers import AutoencoderKLQwenImage
    cfg = q.diffusers_config(shape)
    theirs = AutoencoderKLQwenImage(**{k: v for k, v in cfg.items() if not k.startswith("_")}).state_dict()
    with torch.device("meta"):
        ours = q.QwenImageVAE(shape).state_dict()
    mapped = q.original_to_diffusers(ours)
    assert mapped.keys() == theirs.keys() and all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert list(q.diffusers_to_original(mapped)) == list(ours)
    assert list(q.original_to_diffusers(q.diffusers_to_original(theirs))) == list(theirs)
    assert q.config_from_shapes(lambda k: ours[k].shape, ours.keys()) == dataclasses.asdict(shape)
    assert "latents_mean" not in cfg and cfg.get("input_channels", 3) == shape.in_channels


# -- parity --------------------------------------------------------------------------------------------
def test_parity_with_diffusers_at_one_frame(pair):
    """Moments, the argmax latent and the decode of diffusers' AutoencoderKLQwenImage on [B, 3, 1, H, W]."""
    d, m = pair
    x = images()
    with torch.no_grad():
        x5 = x[:, :, None]
        ref_moments = d._encode(x5)[:, :, 0]
        mode = d.encode(x5).latent_dist.mode()
        moments = m.moments(x)
        torch.testing.assert_close(moments, ref_moments, atol=1e-4, rtol=0)
        torch.testing.assert_close(moments[:, :16], mode[:, :, 0], atol=1e-4, rtol=0)
        out = m.decode(moments[:, :16])
        torch.testing.assert_close(out, d.decode(mode).sample[:, :, 0], atol=1e-4, rtol=0)
        # diffusers' decoder does not clamp, its decode does, and so does our decoder
        d.clear_cache()
        raw = d.decoder(d.post_quant_conv(mode), feat_cache=d._feat_map, feat_idx=[0])[:, :, 0]
    assert (raw.abs() > 1).any() and (raw.abs() < 1).float().mean() > 0.9
    torch.testing.assert_close(out, raw.clamp(-1, 1), atol=1e-4, rtol=0)
    assert out.abs().max() <= 1


def test_rms_norm_in_half_precision_is_diffusers():
    """fp16: the norm in fp32, as diffusers (activations ~1e4 have a norm beyond fp16's range)."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm
    g = torch.Generator().manual_seed(3)
    ref = QwenImageRMS_norm(64, images=False)
    ours = q.RMSNorm(64)
    with torch.no_grad():
        ref.gamma.copy_(1 + 0.1 * torch.randn(64, 1, 1, 1, generator=g))
        ours.gamma.copy_(ref.gamma)
        x = 1e4 * torch.randn(2, 64, 5, 7, generator=g)
        assert torch.isinf(x.half().norm(dim=1)).all()  # what a norm in fp16 would give
        want = ref.half()(x.half()[:, :, None])[:, :, 0].float()
        got = ours.half()(x.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2e-3)


COMFY_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # no CUDA probing: ComfyUI's device setup reads this at import
from comfy.ldm.wan.vae import WanVAE
from safetensors.torch import load_file, save_file
sd, io = load_file(sys.argv[2]), load_file(sys.argv[3])
m = WanVAE(dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]).eval()
m.load_state_dict(sd, strict=True)
with torch.no_grad():
    mu = m.encode(io["x"][:, :, None])[:, :, 0]
    out = m.decode(io["z"][:, :, None])[:, :, 0]
    mu_clip, out_clip = m.encode(io["xc"]), m.decode(io["zc"])
save_file({"mu": mu.contiguous(), "out": out.contiguous(), "mu_clip": mu_clip.contiguous(),
           "out_clip": out_clip.contiguous()}, sys.argv[4])
"""


def test_parity_with_comfyui_wanvae(pair, tmp_path):
    """Our state dict is ComfyUI's WanVAE's (strict load, in a child process: ComfyUI's modules stay
    out of this one); its encode (the mean) and its decode (unclamped: ComfyUI clamps when it maps
    pixels to [0, 1]) at one frame, and on clips (9 frames -> 3 latent frames, 3 latent frames -> 9
    frames: its causal caches, chunk by chunk)."""
    from comfy_host import comfy_tree
    _, m = pair
    x, z = images(), latent(6, 8)
    g = torch.Generator().manual_seed(8)
    xc, zc = torch.rand(1, 3, 9, 32, 24, generator=g) * 2 - 1, torch.randn(1, 16, 3, 4, 3, generator=g)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    save_file({"x": x, "z": z, "xc": xc, "zc": zc}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(COMFY_RUN), str(comfy_tree()), str(tmp_path / "vae.safetensors"),
                        str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(m.moments(x)[:, :16], theirs["mu"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(z), theirs["out"].clamp(-1, 1), atol=1e-4, rtol=0)
        torch.testing.assert_close(m.moments(xc)[:, :16], theirs["mu_clip"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(zc), theirs["out_clip"].clamp(-1, 1), atol=1e-4, rtol=0)


# -- tiling --------------------------------------------------------------------------------------------
def run(net, direction, x, latent_shape, tiling):
    calls = []
    t = dataclasses.replace(tiling, progress=lambda done, total: calls.append((done, total)))
    in_ch = x.shape[1]
    plan = make_plan(net, direction, in_ch, latent_shape, torch.float32, CPU, t, 8)
    with torch.inference_mode():
        out, report = execute(net, x, plan)
    assert calls and calls[-1][0] == calls[-1][1]  # the steps' pass counts are what the engines run
    if plan.mode == "exact":  # the report does not claim GroupNorm sums: the RMS norm shares nothing
        assert report.statistics == "none needed: no layer normalises over the image", report.statistics
    return out, plan


# latent (h, w) and tile size: odd sizes; 8 px tiles make one-latent-row bands at 16 latent px wide
CASES = [(5, 16, 8), (7, 9, 16), (3, 5, 8)]


@pytest.mark.parametrize("store", ["device", "disk"])
def test_exact_tiling_equals_untiled(pair, store, tmp_path):
    _, m = pair
    one_row = False
    for h, w, tile in CASES:
        tiling = Tiling(mode="exact", tile_size=tile, store=store, spill_dir=str(tmp_path))
        with torch.inference_mode():
            zz = m.conv2(latent(h, w))
            x = test_image(8 * h, 8 * w, seed=h)
            full_dec, full_enc = m.decoder(zz), m.encoder(x)
        dec, plan = run(m.decoder, "decode", zz, (1, 16, h, w), tiling)
        assert plan.mode == "exact" and plan.store == store and plan.grid[0] > 1
        one_row |= band_count(h, w, 64, plan.band_elems) == h   # bands of one row at the latent resolution
        assert (dec - full_dec).abs().max() <= 1e-4
        enc, plan = run(m.encoder, "encode", x, (1, 16, h, w), tiling)
        assert plan.mode == "exact" and plan.grid[0] > 1
        assert (enc - full_enc).abs().max() <= 1e-4
    assert one_row


def test_bounded_mode_equals_untiled(pair):
    """No statistics are shared between pixels, so bounded mode's strips and bands are exact."""
    _, m = pair
    grids = {"decode": [], "encode": []}
    for h, w, tile in CASES + [(24, 32, 8)]:
        tiling = Tiling(mode="bounded", tile_size=tile, mosaic_size=4)  # a mosaic: small images streamed too
        with torch.inference_mode():
            zz = m.conv2(latent(h, w))
            x = test_image(8 * h, 8 * w, seed=h)
            full_dec, full_enc = m.decoder(zz), m.encoder(x)
        dec, plan = run(m.decoder, "decode", zz, (1, 16, h, w), tiling)
        assert plan.mode == "bounded"
        grids["decode"].append(plan.grid)
        assert (dec - full_dec).abs().max() <= 1e-4
        enc, plan = run(m.encoder, "encode", x, (1, 16, h, w), tiling)
        grids["encode"].append(plan.grid)
        assert (enc - full_enc).abs().max() <= 1e-4
    for g in grids.values():  # both directions streamed in several bands and several strips
        assert any(b > 1 for b, _ in g) and any(s > 1 for _, s in g), grids


# -- the fp16 guard's copy ----------------------------------------------------------------------------
def test_stream_scaled_copy_is_exact_and_scales_the_stream(pair):
    """stream_scaled(net, s): every activation between layers (the residual stream, and the maps of
    it to itself) is s times the original's, the output the same."""
    _, m = pair
    s = 2.0**-12
    for net, x in ((m.decoder, m.conv2(latent(6, 8))), (m.encoder, images())):
        scaled = stream_scaled(net, s)
        a, b = x, x
        with torch.no_grad():
            for la, lb in zip(net.layers()[:-1], scaled.layers()[:-1]):
                a, b = la(a), lb(b)
                torch.testing.assert_close(b, s * a, atol=1e-4 * s * a.abs().max().item(), rtol=0)
            a, b = net.layers()[-1](a), scaled.layers()[-1](b)
        assert (a - b).abs().max() <= 1e-4
    # where the eps matters (a pixel's norm below it): F.normalize's eps floors the norm, so it scales by s
    norm, scaled = m.decoder.middle[0].norm1, stream_scaled(m.decoder, s).middle[0].norm1
    tiny = 1e-13 * torch.randn(1, 64, 3, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(scaled(s * tiny), norm(tiny), atol=1e-6, rtol=1e-5)
