"""klvae's AutoencoderKL as a diffusers pipeline's `vae`, and conversions both ways, offline.

The pipelines are tiny (seeded UNet, a 5-layer CLIP text model, a tokenizer built from a local
byte-level vocabulary), so they run in seconds; the VAE is SD-shaped, narrowed and calibrated.
"""
import io

import pytest
import torch
from safetensors.torch import save_file

from klvae.testing import NARROW, calibrate, diffusers_vae, psnr, test_image
from klvae.vae import AutoencoderKL, load_vae, preset

def psnr_np(a, b) -> float:
    """PSNR of two pipeline outputs (numpy, [0, 1])."""
    return psnr(torch.from_numpy(a) * 2 - 1, torch.from_numpy(b) * 2 - 1)


def same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].contiguous(), b[k].contiguous()), k


# -- conversions -----------------------------------------------------------------------------------
def test_from_diffusers_keeps_every_weight_and_the_config():
    d = diffusers_vae("sdxl", seed=1, ch=32, ch_mult=(1, 2, 2, 2), norm_groups=8)
    d.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
                         force_upcast=False, scaling_factor=0.5)  # a Playground-style SDXL-shaped VAE
    k = AutoencoderKL.from_diffusers(d)
    assert k.config.norm_groups == 8 and k.config.scaling_factor == 0.5
    assert k.config.latents_mean == (0.1, -0.2, 0.3, 0.0) and k.config.force_upcast is False
    back = k.to_diffusers()
    same_weights(d.state_dict(), back.state_dict())
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "latent_channels",
                "block_out_channels", "norm_num_groups", "layers_per_block", "use_quant_conv"):
        assert back.config[key] == d.config[key], key
    # and through a diffusers folder on disk (config.json written by klvae, read by diffusers)
    from diffusers import AutoencoderKL as DAutoencoderKL
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        k.save_pretrained(tmp)
        again = DAutoencoderKL.from_pretrained(tmp)
        assert again.config.latents_std == d.config.latents_std
        same_weights(d.state_dict(), again.state_dict())
        assert load_vae(tmp).config.latents_mean == k.config.latents_mean


def test_klvae_to_diffusers_and_back_is_bit_exact():
    k = load_vae(diffusers_vae("flux", seed=2, **NARROW).state_dict(), family="flux", dtype="bf16")
    d = k.to_diffusers()
    assert d.dtype == torch.bfloat16 and d.config.shift_factor == pytest.approx(0.1159)
    k2 = AutoencoderKL.from_diffusers(d)
    assert k2.config == k.config and k2.dtype == torch.bfloat16
    same_weights(k.state_dict(), k2.state_dict())


@pytest.mark.parametrize("name,family,scale,shift,z", [("sdxl_vae.safetensors", "sdxl", 0.13025, None, 4),
                                                        ("ae.safetensors", "flux", 0.3611, 0.1159, 16)])
def test_lone_files_get_their_family_config_not_sd15_defaults(tmp_path, name, family, scale, shift, z):
    """What diffusers' from_single_file gets wrong without config=: a lone SDXL or Flux VAE file."""
    d = diffusers_vae(family, seed=3, **NARROW)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(path))  # diffusers keys, no metadata
    conv = load_vae(path).to_diffusers()
    assert conv.config.scaling_factor == pytest.approx(scale) and conv.config.latent_channels == z
    assert conv.config.shift_factor == (pytest.approx(shift) if shift else None)
    assert conv.config.force_upcast == (family == "sdxl")
    same_weights(d.state_dict(), conv.state_dict())


# -- raw <-> scaled --------------------------------------------------------------------------------
class _KeepLatents:
    """A scheduler whose noising returns the latents unchanged: what is left of prepare_latents is
    the pipeline's own encode and scaling."""
    def add_noise(self, latents, noise, t):
        return latents

    def scale_noise(self, latents, t, noise):
        return latents


def pipeline_scaled(family, vae, x, seed):
    """What a diffusers img2img pipeline makes of image x with this VAE, by the pipeline's own code."""
    from types import SimpleNamespace

    from diffusers import (FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionXLImg2ImgPipeline)
    me = SimpleNamespace(vae=vae, scheduler=_KeepLatents())
    g = torch.Generator().manual_seed(seed)
    args = (x, torch.tensor([1]), 1, 1, torch.float32, torch.device("cpu"), g)
    if family == "sd1":
        return StableDiffusionImg2ImgPipeline.prepare_latents(me, *args)
    if family == "sdxl":
        return StableDiffusionXLImg2ImgPipeline.prepare_latents(me, *args, add_noise=False)
    if family == "sd3":
        return StableDiffusion3Img2ImgPipeline.prepare_latents(me, *args)
    return FluxImg2ImgPipeline._encode_vae_image(me, x, g)


@pytest.mark.parametrize("family,stats", [("sd1", False), ("sdxl", False), ("sdxl", True), ("sd3", False),
                                          ("flux", False)])
def test_scaled_latents_follow_diffusers_pipelines(family, stats):
    """to_scaled equals what each family's img2img pipeline does to an encoded image (its own code
    runs: prepare_latents or _encode_vae_image, with klvae's VAE and the same generator); SDXL also
    with per-channel latents_mean/std (Playground v2.5's convention); from_scaled inverts it."""
    import dataclasses
    k = AutoencoderKL(preset(family, **NARROW)).eval()
    if stats:
        k.config = dataclasses.replace(k.config, latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(2.0, 1.0, 0.5, 4.0))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ref = pipeline_scaled(family, k, x, seed=5)
    raw = k.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(k.to_scaled(raw), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(k.from_scaled(ref), raw, atol=1e-5, rtol=0)


# -- call shapes -----------------------------------------------------------------------------------
def test_diffusers_call_shapes():
    k = load_vae(diffusers_vae("sd1", seed=4, **NARROW).state_dict(), family="sd1")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = k.encode(x).latent_dist
    assert torch.equal(k.encode(x, return_dict=False)[0].latent_dist.mode(), post.mode())
    z = post.mode()
    full = k.decode(z)
    # the three ways scripts read a decode: klvae's tensor, diffusers' `.sample`, and `[0]` of a tuple
    assert isinstance(full, torch.Tensor) and torch.equal(k.decode(z).sample, full)
    assert type(full + 0) is torch.Tensor and type(full.sample) is torch.Tensor and full.shape == (2, 3, 32, 32)
    assert torch.equal(k.decode(z, return_dict=True).sample, full) and torch.equal(k.decode(z, return_dict=True)[0], full)
    assert torch.equal(k.decode(z, return_dict=False)[0], full)
    buf = io.BytesIO()  # a saved decode is a plain tensor file: weights_only loading needs no klvae class
    torch.save({"pixels": full}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)["pixels"]
    assert type(back) is torch.Tensor and torch.equal(back, full)
    assert k.config.scaling_factor == k.config["scaling_factor"] == 0.18215
    assert len(k.config.block_out_channels) == 4 and k.config.latents_mean is None and k.config.get("nope", 3) == 3
    k.enable_slicing()
    # batch 1 vs batch 2 differ by torch's own float noise (different conv kernels): ~1e-4
    assert torch.allclose(k.decode(z), full, atol=1e-3) and torch.allclose(k.encode(x).mode(), z, atol=1e-3)
    k.disable_slicing().enable_tiling(tile_size=16)
    assert k.use_tiling and torch.allclose(k.decode(z), full, atol=1e-4) and k.last_tiling.n_tiles > 1
    k.disable_tiling()
    assert not k.use_tiling and torch.equal(k.decode(z), full) and k.last_tiling.mode == "untiled"


# -- pipelines ----------------------------------------------------------------------------------------
def tiny_tokenizer():
    """A character-level CLIP tokenizer from an in-memory vocabulary (no merges): nothing downloaded."""
    import string

    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_letters + string.digits:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                        intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                                        vocab_size=1000))
    vae = diffusers_vae("sd1", seed=5, **NARROW)
    calibrate(vae, test_image(64))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                          set_alpha_to_one=False)
    p = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(),
                                unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def run(p, **kw):
    return p("a photo of a cat", num_inference_steps=2, height=128, width=128, output_type="np",
             generator=torch.Generator().manual_seed(0), **kw).images


def test_text_to_image_with_klvae_swapped_in(pipe):
    dvae = pipe.vae
    ref = run(pipe)
    try:
        pipe.vae = AutoencoderKL.from_diffusers(dvae)
        assert pipe.vae.dtype == torch.float32 and pipe.vae_scale_factor == 8
        ours = run(pipe)
        db = psnr_np(ours, ref)
        print(f"txt2img klvae vs diffusers VAE: {db:.1f} dB")
        assert db >= 50
        pipe.vae.enable_tiling(tile_size=64)  # 2x2 exact tiles on the 128x128 image
        tiled = run(pipe)
        assert pipe.vae.last_tiling.n_tiles == 4
        print(f"txt2img klvae tiled psnr_vs_full: {psnr_np(tiled, ours):.1f} dB")
        assert psnr_np(tiled, ours) >= 50
    finally:
        pipe.vae = dvae


def test_img2img_sample_and_argmax_with_klvae(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    img = (test_image(128) + 1) / 2
    dvae = pipe.vae
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    go = lambda: i2i("a photo of a cat", image=img, strength=0.5, num_inference_steps=4, output_type="np",
                     generator=torch.Generator().manual_seed(1)).images
    ref = go()  # retrieve_latents(..., sample_mode="sample") with the pipeline's generator
    x = img * 2 - 1
    ref_mode = retrieve_latents(dvae.encode(x), sample_mode="argmax")
    ref_sample = retrieve_latents(dvae.encode(x), generator=torch.Generator().manual_seed(7))
    try:
        i2i.vae = AutoencoderKL.from_diffusers(dvae)
        ours = go()
        print(f"img2img klvae vs diffusers VAE: {psnr_np(ours, ref):.1f} dB")
        assert psnr_np(ours, ref) >= 50
        mode = retrieve_latents(i2i.vae.encode(x), sample_mode="argmax")
        sample = retrieve_latents(i2i.vae.encode(x), generator=torch.Generator().manual_seed(7))
        assert torch.allclose(mode, ref_mode, atol=1e-4) and torch.allclose(sample, ref_sample, atol=1e-4)
        assert not torch.allclose(sample, mode, atol=1e-3)
    finally:
        i2i.vae = dvae


def test_model_cpu_offload_moves_klvae_vae_through_its_hook(pipe):
    """enable_model_cpu_offload() attaches accelerate's hook to every component; diffusers' own VAE
    fires it from encode/decode (@apply_forward_hook), and so does klvae's. (On this CPU-only
    machine the offload device is the CPU, so the hook's call is what is checked.)"""
    dvae = pipe.vae
    ref = run(pipe)
    try:
        pipe.vae = AutoencoderKL.from_diffusers(dvae)
        pipe.enable_model_cpu_offload(device="cpu")
        hook = pipe.vae._hf_hook
        calls = []
        pre = hook.pre_forward
        hook.pre_forward = lambda module, *a, **kw: calls.append(module) or pre(module, *a, **kw)
        out = run(pipe)
        assert calls and all(m is pipe.vae for m in calls)
        assert psnr_np(out, ref) >= 50
    finally:
        pipe.remove_all_hooks()
        pipe.vae = dvae


def test_save_and_load_whole_pipelines_with_klvae_vae(pipe, tmp_path):
    """diffusers saves only its own classes (a klvae VAE would be dropped as `vae: [null, null]`)
    and type-checks what from_pretrained is given; save_pipeline/load_pipeline do what a user means."""
    import json

    from diffusers import AutoencoderKL as DAutoencoderKL, DiffusionPipeline

    from klvae.vae import load_pipeline, save_pipeline
    dvae = pipe.vae
    ref = run(pipe)
    try:
        k = AutoencoderKL.from_diffusers(dvae)
        pipe.vae = k
        save_pipeline(pipe, tmp_path / "p")
        assert pipe.vae is k  # the pipeline keeps klvae's VAE
        assert json.loads((tmp_path / "p" / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
        plain = DiffusionPipeline.from_pretrained(tmp_path / "p")  # plain diffusers, no klvae involved
        assert type(plain.vae) is DAutoencoderKL
        same_weights(dvae.state_dict(), plain.vae.state_dict())
        loaded = load_pipeline(tmp_path / "p", vae=k)
        loaded.set_progress_bar_config(disable=True)
        assert loaded.vae is k and psnr_np(run(loaded), ref) >= 50
    finally:
        pipe.vae = dvae
