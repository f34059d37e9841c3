"""Wan 2.2's VAE and Qwen-Image 2.1's (residual blocks across several layers, 16x) on images: parity
with diffusers' AutoencoderKLWan(is_residual=True) and AutoencoderKLQwenImage21 and with ComfyUI
0.3.75's vae2_2.WanVAE, both key layouts both ways, the family read off the file, exact and bounded
tiling equal to the untiled pass, RGB given to the RGBA VAE. Small seeded networks (base widths 16
and 24, the released structure otherwise: Wan 2.2's 4 levels and 2x2 patches, Qwen-Image 2.1's 5
levels and 4 channels), CPU, fp32."""
import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from klvae.testing import test_image
from klvae.vae import KLVAEError, Tiling, load_vae, preset, save_vae
from klvae.vae import model_wan22 as w
from klvae.vae.diffusers_compat import diffusers_config

NARROW = dict(ch=16, decoder_ch=24)  # the released structure at 1/10 and 1/6 of the widths


def diffusers_model(family, seed=0, noise=0.1):
    """diffusers' class for the family (narrowed), its own init plus seeded noise on every RMS gamma
    and bias (no norm or bias an identity a wrong key could hide behind), its decoder's output
    scaled to std ~0.5 on these test images (the decode clamp cuts only tails)."""
    import diffusers
    cfg = diffusers_config(preset(family, **NARROW))
    torch.manual_seed(seed)
    d = getattr(diffusers, cfg["_class_name"])(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.endswith(("bias", "gamma")):
                p.add_(noise * torch.randn(p.shape, generator=g))
        z = d.encode(images(family)[:, :, None]).latent_dist.mode()
        d.clear_cache()
        out = d.decoder(d.post_quant_conv(z), feat_cache=d._feat_map, feat_idx=[0], first_chunk=True)
        a = 0.5 / out.std()
        d.decoder.conv_out.weight.mul_(a)
        d.decoder.conv_out.bias.mul_(a).sub_(a * out.mean())
    return d


def klvae(sd, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_vae(sd, **kw)


@pytest.fixture(scope="module", params=["wan22", "qwenimage21"])
def pair(request):
    d = diffusers_model(request.param)
    return request.param, d, klvae(d.state_dict())


def images(family, h=64, w=96):
    """Two different items; Qwen-Image 2.1's with an alpha channel that is not flat."""
    x = test_image(h, w)
    x = torch.cat([x, x.flip(3).roll(7, dims=2)])
    if family == "qwenimage21":
        alpha = torch.linspace(-1, 1, w).expand(2, 1, h, w)
        x = torch.cat([x, alpha], dim=1)
    return x


# -- the network and its keys ------------------------------------------------------------------------
def test_config_family_and_keys_are_read_off_the_file(pair):
    family, d, m = pair
    c = m.config
    assert c.family == family and c.arch == "wan22" and c.downscale == 16
    if family == "wan22":
        assert (c.patch_size, c.time_kernel, c.in_channels, c.ch_mult, c.latent_channels) == (2, 3, 3, (1, 2, 4, 4), 48)
        assert c.temporal_downsample == (False, True, True) and m.temporal_compression_ratio == 4
    else:
        assert (c.patch_size, c.time_kernel, c.in_channels, c.ch_mult, c.latent_channels) == (1, 1, 4, (1, 2, 4, 8, 8), 64)
        assert d.encoder.conv_in.weight.dim() == 4  # diffusers' 2-D convs; ours keep the original files' time axis of 1
    assert (c.ch, c.decoder_ch) == (16, 24)
    assert c.latents_mean == tuple(d.config.latents_mean) and len(c.latents_std) == c.latent_channels
    ours = m.state_dict(layout="ldm")  # the original / ComfyUI layout
    assert "decoder.upsamples.0.upsamples.0.residual.0.gamma" in ours and "conv1.weight" in ours
    assert ours["decoder.head.2.weight"].shape[2] == c.time_kernel
    back = w.diffusers_to_original(w.original_to_diffusers(ours))
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)
    theirs = d.state_dict()
    mapped = w.to_diffusers(m.state_dict())
    assert mapped.keys() == theirs.keys() and all(mapped[k].shape == theirs[k].shape for k in theirs)
    assert w.config_from_shapes(lambda k: ours[k].shape, ours.keys())["family"] == family


def test_key_maps_refuse_what_is_not_theirs():
    with pytest.raises(KLVAEError, match="not a Wan 2.2 / Qwen-Image 2.1 VAE key"):
        w.original_to_diffusers({"encoder.downsamples.0.downsamples.0.norm.gamma": torch.zeros(1)})
    with pytest.raises(KLVAEError, match="not a Wan 2.2 / Qwen-Image 2.1 VAE key"):
        w.diffusers_to_original({"decoder.up_blocks.0.resnets.0.norm3.gamma": torch.zeros(1)})


# -- parity --------------------------------------------------------------------------------------------
def test_parity_with_diffusers_at_one_frame(pair):
    """The argmax latent and the decode of diffusers' class on [B, C, 1, H, W], and the same as
    images [B, C, H, W]; the decode clamps as diffusers' does."""
    family, d, m = pair
    x = images(family)
    with torch.no_grad():
        post = d.encode(x[:, :, None]).latent_dist
        ref = d.decode(post.mode()).sample
        ours = m.encode(x[:, :, None]).latent_dist
        torch.testing.assert_close(ours.mode(), post.mode(), atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.logvar, post.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(post.mode()).sample, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(post.mode()[:, :, 0]).sample, ref[:, :, 0], atol=1e-4, rtol=0)
    assert (ref.abs() == 1).any() and (ref.abs() < 1).float().mean() > 0.9  # the clamp cut some tails


COMFY_RUN = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # no CUDA probing: ComfyUI's device setup reads this at import
from comfy.ldm.wan.vae2_2 import WanVAE
from safetensors.torch import load_file, save_file
sd, io = load_file(sys.argv[2]), load_file(sys.argv[3])
m = WanVAE(dim=16, dec_dim=24, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
           temperal_downsample=[False, True, True]).eval()
m.load_state_dict(sd, strict=True)
with torch.no_grad():
    mu = m.encode(io["x"][:, :, None])[:, :, 0]
    out = m.decode(io["z"][:, :, None])[:, :, 0]
    mu_clip, out_clip = m.encode(io["xc"]), m.decode(io["zc"])
save_file({"mu": mu.contiguous(), "out": out.contiguous(), "mu_clip": mu_clip.contiguous(),
           "out_clip": out_clip.contiguous()}, sys.argv[4])
"""


def test_parity_with_comfyui_wan22_vae(tmp_path):
    """Our original-layout file is ComfyUI 0.3.75's vae2_2.WanVAE's (strict load, in a child process:
    ComfyUI's modules stay out of this one); its encode (the mean) and its decode (unclamped: ComfyUI
    clamps when it maps pixels to [0, 1]) at one frame and on clips (9 frames -> 3 latent frames, 3
    latent frames -> 9 frames: its caches, chunk by chunk)."""
    from comfy_host import comfy_tree
    m = klvae(diffusers_model("wan22").state_dict())
    x = images("wan22")
    z = torch.randn(2, 48, 4, 6, generator=torch.Generator().manual_seed(3))
    save_vae(m, tmp_path / "wan2.2_vae.safetensors")
    zc = torch.randn(1, 48, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    save_file({"x": x, "z": z, "xc": clip(), "zc": zc}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(COMFY_RUN), str(comfy_tree()),
                        str(tmp_path / "wan2.2_vae.safetensors"), str(tmp_path / "in.safetensors"),
                        str(tmp_path / "out.safetensors")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(m.encode(x).latent_dist.mean, theirs["mu"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(z).sample, theirs["out"].clamp(-1, 1), atol=1e-4, rtol=0)
        torch.testing.assert_close(m.encode(clip()).latent_dist.mean, theirs["mu_clip"], atol=1e-4, rtol=0)
        torch.testing.assert_close(m.decode(zc).sample, theirs["out_clip"].clamp(-1, 1), atol=1e-4, rtol=0)


def test_rgb_is_given_opaque_alpha():
    """Qwen-Image 2.1's VAE encodes RGBA; RGB is given alpha 1.0 (opaque), as ComfyUI and diffusers'
    pipeline do: the same latent as the explicit RGBA image."""
    m = klvae(diffusers_model("qwenimage21").state_dict())
    rgba = images("qwenimage21")
    rgba[:, 3] = 1.0
    with torch.no_grad():
        want = m.encode(rgba).latent_dist.mean
        torch.testing.assert_close(m.encode(rgba[:, :3]).latent_dist.mean, want, atol=0, rtol=0)
        torch.testing.assert_close(m.encode(rgba[:, :3, None]).latent_dist.mean[:, :, 0], want, atol=0, rtol=0)
        assert m.decode(want).sample.shape[1] == 4
    assert m.plan_encode((1, 3, 64, 64)).predicted == m.plan_encode((1, 4, 64, 64)).predicted
    with pytest.raises(KLVAEError, match="2 channels"):
        m.encode(rgba[:, :2])


# -- files ---------------------------------------------------------------------------------------------
def test_both_layouts_load_and_save_both_ways(pair, tmp_path):
    """A diffusers folder (config.json + weights) and an original-layout file load to the same
    network; klvae writes both layouts back, and diffusers' own class loads the folder klvae writes."""
    import diffusers
    family, d, m = pair
    d.save_pretrained(tmp_path / "theirs")
    a = klvae(str(tmp_path / "theirs"))
    save_vae(m, tmp_path / "original.safetensors")
    b = klvae(str(tmp_path / "original.safetensors"))
    save_vae(b, tmp_path / "ours", layout="diffusers")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    back = getattr(diffusers, cfg["_class_name"]).from_pretrained(tmp_path / "ours").eval()
    assert type(back) is type(d) and cfg["is_residual"] is True
    x = images(family)
    with torch.no_grad():
        want = d.encode(x[:, :, None]).latent_dist.mode()
        for v in (a, b):
            torch.testing.assert_close(v.encode(x[:, :, None]).latent_dist.mode(), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(back.encode(x[:, :, None]).latent_dist.mode(), want, atol=1e-4, rtol=0)
    assert a.config.family == b.config.family == family
    other = "wan22" if family == "qwenimage21" else "qwenimage21"
    with pytest.raises(KLVAEError, match=f"not a {other} one"):
        klvae(str(tmp_path / "original.safetensors"), family=other)


def test_qwen_image_21_refuses_clips_in_one_line():
    """Qwen-Image 2.1's VAE has 2-D convs: more than one frame is refused before anything runs; one
    frame in a clip's shape is an image, planned as one."""
    m = klvae(diffusers_model("qwenimage21").state_dict())
    z = torch.zeros(1, 64, 3, 2, 2)
    for call in (lambda: m.decode(z), lambda: m.plan_decode(tuple(z.shape)),
                 lambda: m.encode(torch.zeros(1, 4, 3, 32, 32))):
        with pytest.raises(KLVAEError, match="image VAE .* not 3"):
            call()
    one = m.plan_decode((1, 64, 1, 2, 2), tiling="exact")
    assert one.predicted == m.plan_decode((1, 64, 2, 2), tiling="exact").predicted


def clip(T=9, H=64, W=96, seed=3):
    return torch.rand(1, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def wan22():
    d = diffusers_model("wan22")
    return d, klvae(d.state_dict())


def test_wan22_clips_are_diffusers_untiled_and_exact_tiled(wan22, tmp_path):
    """A 9-frame clip: the argmax latent (3 frames: Wan's chunks of 1, 4, 4 frames through the
    levels' time shortcuts) and its decode (one latent frame at a time, the first level's shortcut
    dropping its first frame) are diffusers' AutoencoderKLWan(is_residual=True)'s untiled, and the
    exact engine's (device and disk stores, bands of a few rows) equal the untiled ones."""
    d, m = wan22
    x = clip()
    with torch.no_grad():
        want = d.encode(x).latent_dist.mode()
        ref = d.decode(want).sample
        z = m.encode(x).latent_dist.mode()
        out = m.decode(want).sample
    assert want.shape == (1, 48, 3, 4, 6) and ref.shape == out.shape == (1, 3, 9, 64, 96)
    torch.testing.assert_close(z, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for store in ("device", "disk"):
        t = Tiling(mode="exact", tile_size=16, store=store, spill_dir=str(tmp_path))
        with torch.no_grad():
            zt = m.encode(x, tiling=t).latent_dist.mode()
            enc = m.last_tiling
            ot = m.decode(want, tiling=t).sample
            dec = m.last_tiling
        assert enc.mode == dec.mode == "exact" and dec.grid[0] >= 4, dec
        assert (zt - z).abs().max() <= 1e-5 and (ot - out).abs().max() <= 1e-5
        for r in (enc, dec):
            assert r.store_bytes <= r.plan.store_bytes <= 1.3 * r.store_bytes, r
    assert list(tmp_path.iterdir()) == []


def test_wan22_decode_clip_hands_over_each_chunk(wan22):
    """decode_clip: each latent frame's output frames to the callback as they finish (1, then 4 at a
    time), together the whole decode."""
    d, m = wan22
    z = torch.randn(1, 48, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    got = {}
    with torch.no_grad():
        m.decode_clip(z, lambda t0, frames: got.__setitem__(t0, frames.clone()), tiling=Tiling(mode="exact", tile_size=32))
        ref = d.decode(z).sample
    assert sorted(got) == [0, 1, 5] and [got[t].shape[2] for t in (0, 1, 5)] == [1, 4, 4]
    torch.testing.assert_close(torch.cat([got[t] for t in (0, 1, 5)], 2), ref, atol=1e-4, rtol=0)


# -- tiling --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["device", "disk"])
def test_exact_tiling_equals_untiled(pair, store, tmp_path):
    """Bands of a few rows at every resolution (latent 5 x 7: odd band edges), through the blocks
    whose shortcut spans the level: within float noise of the untiled pass, both directions."""
    family, _, m = pair
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, m.config.latent_channels, 5, 7, generator=g)
    x = images(family, 80, 112)[:1]
    t = Tiling(mode="exact", tile_size=16, store=store, spill_dir=str(tmp_path))
    with torch.no_grad():
        full_dec, full_enc = m.decode(z).sample, m.encode(x).latent_dist.mean
        dec = m.decode(z, tiling=t).sample
        report = m.last_tiling
        enc = m.encode(x, tiling=t).latent_dist.mean
    assert report.mode == "exact" and report.store == store and report.grid[0] >= 5
    assert (dec - full_dec).abs().max() <= 1e-5 and (enc - full_enc).abs().max() <= 1e-5
    assert report.store_bytes <= report.plan.store_bytes <= 1.3 * report.store_bytes, report
    assert list(tmp_path.iterdir()) == []


def test_bounded_mode_is_exact(pair):
    """RMS norms share no statistics: bounded mode's strips and bands are exact here too. (The decoder's
    receptive field is 13 latent px: a short, wide image is what streams in several strips and bands.)"""
    family, _, m = pair
    g = torch.Generator().manual_seed(6)
    z = torch.randn(1, m.config.latent_channels, 12, 92, generator=g)
    x = images(family, 192, 1472)[:1]
    t = Tiling(mode="bounded", tile_size=16, mosaic_size=4)  # a mosaic: small images streamed too
    with torch.no_grad():
        full_dec, full_enc = m.decode(z).sample, m.encode(x).latent_dist.mean
        dec = m.decode(z, tiling=t).sample
        report = m.last_tiling
        enc = m.encode(x, tiling=t).latent_dist.mean
    assert report.mode == "bounded" and report.grid[0] > 1 and report.grid[1] > 1, report
    assert m.last_tiling.grid[0] > 1 and m.last_tiling.grid[1] > 1, m.last_tiling
    assert (dec - full_dec).abs().max() <= 1e-5 and (enc - full_enc).abs().max() <= 1e-5


# -- ComfyUI's graph forms (nodes/adapter.py) -----------------------------------------------------------
def test_graph_forms_are_cores(pair):
    """Wan 2.2's LATENT is core's [B, 48, T, h, w] (T = 1 for an image) and its IMAGE RGB; Qwen-Image
    2.1's LATENT is core's image form [B, 64, h, w] and its IMAGE RGBA both ways (an RGB IMAGE
    encodes as opaque, as core pads it); a batch of IMAGEs is a batch of images there, not a clip."""
    from klvae.nodes import adapter
    family, _, m = pair
    kl = adapter.KLVAE(m)
    rgba = (images("qwenimage21")[:1].movedim(1, -1) + 1) / 2
    if family == "wan22":  # a batch of 5 IMAGEs is the frames of one clip, as core's WanVAE takes them
        z = kl.encode(rgba[..., :3])
        assert z.shape == (1, 48, 1, 4, 6) and kl.latent_dim == 3 and kl.temporal_compression_decode() == 4
        assert kl.decode(z).shape == (1, 64, 96, 3)
        frames = (clip(T=5)[0].movedim(0, -1) + 1) / 2
        zc = kl.encode(frames)
        with torch.no_grad():
            want = m.encode(frames.movedim(-1, 0)[None] * 2 - 1).latent_dist.mode()
        assert zc.shape == (1, 48, 2, 4, 6)
        torch.testing.assert_close(zc, want, atol=1e-5, rtol=0)
        assert kl.decode(zc).shape == (5, 64, 96, 3)
        return
    z = kl.encode(rgba.expand(3, -1, -1, -1))
    assert z.shape == (3, 64, 4, 6) and kl.latent_dim == 2 and kl.temporal_compression_decode() is None
    with torch.no_grad():
        want = m.encode(rgba.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    torch.testing.assert_close(z[:1], want, atol=1e-5, rtol=0)
    opaque = kl.encode(rgba[..., :3])
    torch.testing.assert_close(opaque, kl.encode(torch.cat([rgba[..., :3], torch.ones_like(rgba[..., :1])], -1)))
    out = kl.decode(z)
    assert out.shape == (3, 64, 96, 4) and 0 <= out.min() and out.max() <= 1


def test_cli_keeps_alpha_through_the_rgba_vae(tmp_path):
    """`klvae info` names the family and its patches; `roundtrip` through Qwen-Image 2.1's VAE keeps
    an RGBA PNG's alpha (what the VAE decodes it to), and drops it only for JPEG; `convert` writes
    the diffusers folder that loads back as the same family."""
    from PIL import Image
    m = klvae(diffusers_model("qwenimage21").state_dict())
    save_vae(m, tmp_path / "qwen_image_2.1_vae.safetensors")
    rgba = ((images("qwenimage21")[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(rgba).save(tmp_path / "in.png")
    vae = str(tmp_path / "qwen_image_2.1_vae.safetensors")

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "klvae", "--threads", "2", *map(str, args)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout
    info = cli("info", vae)
    assert "qwenimage21" in info and "4 channels in, 4 out" in info
    cli("roundtrip", tmp_path / "in.png", "-o", tmp_path / "out.png", "--vae", vae)
    cli("roundtrip", tmp_path / "in.png", "-o", tmp_path / "out.jpg", "--vae", vae)
    out = Image.open(tmp_path / "out.png")
    assert out.mode == "RGBA" and Image.open(tmp_path / "out.jpg").mode == "RGB"
    with torch.no_grad():
        want = m.decode(m.encode(torch.from_numpy(rgba).permute(2, 0, 1)[None].float() / 127.5 - 1).latent_dist.mode()).sample
    want = ((want[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert abs(torch.tensor(want) - torch.tensor(np.asarray(out), dtype=torch.float32)).max() <= 1  # alpha included
    cli("convert", vae, "-o", tmp_path / "diffusers", "--layout", "diffusers")
    assert klvae(str(tmp_path / "diffusers")).config.family == "qwenimage21"


def test_stream_scaled_copy_is_exact_and_scales_the_stream(pair):
    """The fp16 guard's copy (precision.stream_scaled): every activation between the first conv and
    the head is s times the original's (through the spanning blocks: their shortcuts are linear,
    the patches a permutation), the output the same."""
    from klvae.vae.model_qwenimage import Head
    from klvae.vae.precision import stream_scaled
    family, _, m = pair
    s = 2.0 ** -12
    z = torch.randn(1, m.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(9))
    for net, x in ((m.decoder, m.post_quant_conv(z)), (m.encoder, images(family)[:1])):
        scaled = stream_scaled(net, s)
        a, b, stream = x, x, False
        with torch.no_grad():
            for la, lb in zip(net.layers(), scaled.layers()):
                a, b = la(a), lb(b)
                stream = stream and not isinstance(la, Head) or isinstance(la, w.CausalConv3d)
                if stream:
                    torch.testing.assert_close(b, s * a, atol=1e-4 * s * a.abs().max().item(), rtol=0)
        assert (a - b).abs().max() <= 1e-4


# -- diffusers pipelines -------------------------------------------------------------------------------
class NoText:
    """QwenImage21Pipeline's constructor asks its processor for two token counts; the prompts come as
    embeddings here (no text encoder, no network access), so nothing else of it is used."""
    tokenizer = type("Tokenizer", (), {"encode": staticmethod(lambda s: [0])})()

    def apply_chat_template(self, *args, **kwargs):
        return [[0, 0, 0]]


def test_tiny_pipelines_with_klvae_vae():
    """QwenImage21Pipeline and Wan 2.2's WanPipeline offline (prompt embeddings given; one-layer seeded
    transformers), built with klvae's VAE: the same RGBA image / frame as with diffusers' VAE (the
    pipelines read z_dim, latents_mean/std and the compression ratios off the VAE's config, and
    denormalise with them before decoding)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline, QwenImage21Transformer2DModel,
                           WanPipeline, WanTransformer3DModel)
    pe = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    d = diffusers_model("qwenimage21")
    torch.manual_seed(0)
    tr = QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=1, attention_head_dim=16,
                                       num_attention_heads=2, context_in_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    out = []
    for vae in (d, klvae(d.state_dict())):
        pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   processor=NoText(), transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(prompt_embeds=pe, prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long), height=64, width=64,
                        num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images)
    theirs, ours = out
    assert ours.shape == (1, 4, 64, 64) and theirs.std() > 0.01 and (ours - theirs).abs().max() <= 1e-4

    d = diffusers_model("wan22")
    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=48,
                               out_channels=48, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True,
                               qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    out = []
    for vae in (d, klvae(d.state_dict())):
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe(prompt_embeds=pe, negative_prompt_embeds=pe, height=64, width=96, num_frames=1,
                        num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                        generator=torch.Generator().manual_seed(0)).frames)
    theirs, ours = out
    assert ours.shape == (1, 1, 3, 64, 96) and theirs.std() > 0.01 and (ours - theirs).abs().max() <= 1e-4


def test_scaled_latents_are_the_pipelines_and_comfyuis(pair):
    """to_scaled is (raw - latents_mean) / latents_std with Wan 2.2's statistics as ComfyUI 0.3.75's
    latent format Wan22 has them (its process_in), and Qwen-Image 2.1's as diffusers' class states
    them by default (what QwenImage21Pipeline divides by)."""
    import inspect
    from diffusers import AutoencoderKLQwenImage21
    from test_families import comfy_latent_formats
    family, _, m = pair
    raw = torch.randn(2, m.config.latent_channels, 1, 3, 4, generator=torch.Generator().manual_seed(4))
    if family == "wan22":
        want = comfy_latent_formats().Wan22().process_in(raw)
    else:
        defaults = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
        mean, std = (torch.tensor(defaults[k].default).view(1, -1, 1, 1, 1) for k in ("latents_mean", "latents_std"))
        want = (raw - mean) / std
    torch.testing.assert_close(m.to_scaled(raw), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(m.from_scaled(m.to_scaled(raw)), raw, atol=1e-5, rtol=0)


def test_cores_wan22_vae_converts(wan22):
    """KLVAEFromVAE on core's Wan 2.2 VAE (comfy.ldm.wan.vae2_2.WanVAE, as core's VAE Loader makes it):
    converted from its state dict (the original keys), the same decode."""
    from klvae.nodes import adapter
    _, m = wan22
    WanVAE = type("WanVAE", (torch.nn.Module,), {"__module__": "comfy.ldm.wan.vae2_2"})

    class HostVAE:
        device, vae_dtype, latent_channels = torch.device("cpu"), torch.float32, 48

        def __init__(self):
            self.first_stage_model = WanVAE()

        def get_sd(self):
            return m.state_dict()

    converted = adapter.as_klvae(HostVAE())
    assert converted.model.config.family == "wan22"
    z = torch.randn(1, 48, 1, 4, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(converted.decode(z), adapter.KLVAE(m).decode(z), atol=0, rtol=0)
