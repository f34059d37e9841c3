"""Flux.2's VAE: every layout it ships in, the pipelines' latent normalisation, exact tiling,
ComfyUI's latent form in the nodes, and a tiny offline Flux2Pipeline (diffusers parity, full width
and the small decoder: tests/test_core.py, with the other SD-style families)."""
import torch
from safetensors.torch import save_file

import pytest
from klvae.nodes import adapter
from klvae.testing import NARROW, diffusers_vae, max_abs_vs_full, psnr
from klvae.vae import AutoencoderKL, KLVAEError, Tiling, load_vae


@pytest.fixture(scope="module")
def pair():
    """A narrow diffusers AutoencoderKLFlux2 with non-trivial BatchNorm statistics, and klvae's copy."""
    d = diffusers_vae("flux2", seed=7, **NARROW)
    return d, AutoencoderKL.from_diffusers(d)


def test_every_layout_loads_as_flux2(pair, tmp_path):
    d, k = pair
    assert k.config.family == "flux2" and k.config.latent_channels == 32 and k.config.batch_norm
    assert k.config.batch_norm_eps == d.config.batch_norm_eps and torch.equal(k.bn.running_var, d.bn.running_var)
    sd = {n: v.contiguous() for n, v in d.state_dict().items()}
    save_file(sd, str(tmp_path / "diffusers_lone.safetensors"))   # diffusers keys, no config
    d.save_pretrained(tmp_path / "folder")                          # a diffusers folder
    k.save(tmp_path / "ldm.safetensors")                             # klvae/ComfyUI (LDM) keys
    # Black Forest Labs' release: LDM names, quant convs inside the encoder and decoder, no batch counter
    bfl = {("encoder." + n if n.startswith("quant_conv.") else "decoder." + n if n.startswith("post_quant_conv.") else n): v
           for n, v in k.state_dict().items() if n != "bn.num_batches_tracked"}
    save_file({n: v.contiguous() for n, v in bfl.items()}, str(tmp_path / "ae.safetensors"))
    z = torch.randn(1, 32, 6, 4, generator=torch.Generator().manual_seed(0))
    ref = k.decode(z)
    for name, layout in (("diffusers_lone.safetensors", "diffusers"), ("folder", "diffusers"),
                         ("ldm.safetensors", "ldm"), ("ae.safetensors", "bfl")):
        v = load_vae(tmp_path / name)
        assert (v.config.family, v.source_layout) == ("flux2", layout), name
        assert torch.equal(v.bn.running_mean, k.bn.running_mean) and torch.equal(v.decode(z), ref), name


def test_scaled_latents_are_the_pipelines_normalised_patches(pair):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    d, k = pair
    z = torch.randn(2, 32, 6, 8, generator=torch.Generator().manual_seed(2))
    # what Flux2Pipeline does to an encoded image, and back before vae.decode
    mean = d.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(d.bn.running_var.view(1, -1, 1, 1) + d.config.batch_norm_eps)
    ref = (Flux2Pipeline._patchify_latents(z) - mean) / std
    s = k.to_scaled(z)
    assert s.shape == (2, 128, 3, 4)
    torch.testing.assert_close(s, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(k.from_scaled(s), Flux2Pipeline._unpatchify_latents(ref * std + mean), atol=1e-6, rtol=0)
    torch.testing.assert_close(k.from_scaled(s), z, atol=1e-5, rtol=0)
    with pytest.raises(KLVAEError, match="from_scaled first"):
        k.decode(s)
    with pytest.raises(KLVAEError, match="sides must be even"):
        k.to_scaled(torch.zeros(1, 32, 3, 4))


def test_wrong_family_latents_name_flux2(pair):
    sd1 = load_vae(diffusers_vae("sd1", **NARROW).state_dict(), family="sd1")
    with pytest.raises(KLVAEError, match="32 channels suggests flux2") as e:
        sd1.decode(torch.zeros(1, 32, 4, 4))
    assert "\n" not in str(e.value)
    with pytest.raises(KLVAEError, match="128 channels suggests flux2 in its patchified"):
        sd1.decode(torch.zeros(1, 128, 4, 4))


def test_exact_tiling_for_flux2(pair):
    _, k = pair
    z = torch.randn(1, 32, 20, 12, generator=torch.Generator().manual_seed(3))
    assert max_abs_vs_full(k.decode(z, tiling=Tiling(tile_size=32)), k.decode(z)) <= 1e-4
    x = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert max_abs_vs_full(k.encode(x, tiling=Tiling(tile_size=32, store="disk")).mean, k.encode(x).mean) <= 1e-4


def test_nodes_use_comfyuis_flux2_latent(pair):
    """The graph's Flux.2 LATENT is core's: patchified, normalised, 128 channels at 1/16."""
    _, k = pair
    kl = adapter.KLVAE(k)
    img = torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(5))
    lat = kl.encode(img)
    assert lat.shape == (1, 128, 4, 3) and kl.downscale_ratio == 16 and kl.latent_channels == 128
    x = img.movedim(-1, 1) * 2 - 1
    torch.testing.assert_close(lat, k.to_scaled(k.encode(x).mode()), atol=1e-5, rtol=0)
    out = kl.decode(lat)
    torch.testing.assert_close(out, ((k.decode(k.from_scaled(lat)) + 1) / 2).clamp(0, 1).movedim(1, -1), atol=1e-5, rtol=0)
    tiled = kl.decode_tiled(lat, tile_x=2, tile_y=2)  # core passes tiles in the graph latent's px (x16)
    assert kl.model.last_tiling.tile_size == 32 and (tiled - out).abs().max() < 1e-4


def test_tiny_flux2_pipeline_with_klvae_vae(pair):
    """Flux2Pipeline offline (no text encoder: prompt embeddings given), text-to-image and with a
    reference image (which the pipeline encodes): klvae's VAE gives diffusers' VAE's images."""
    from PIL import Image
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    d, k = pair
    torch.manual_seed(0)
    tr = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
                                 axes_dims_rope=[4, 4, 4, 4])
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=d, text_encoder=None, tokenizer=None,
                         transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    ref_img = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(6)) * 255).byte().numpy())
    pe = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    go = lambda **kw: pipe(prompt_embeds=pe, height=64, width=64, num_inference_steps=2, output_type="pt",
                           generator=torch.Generator().manual_seed(0), **kw).images
    refs = [go(), go(image=ref_img)]
    pipe.vae = k
    ours = [go(), go(image=ref_img)]
    for a, b in zip(ours, refs):
        assert a.shape == (1, 3, 64, 64) and psnr(a * 2 - 1, b * 2 - 1) >= 50, psnr(a * 2 - 1, b * 2 - 1)
