"""Fixtures shared by the test files. Helpers (metrics, seeded VAEs, the test image) are in
klvae/testing.py, shared with the benchmarks."""
import pytest
import torch

from klvae.testing import NARROW, calibrate, diffusers_vae, klvae_from, test_image

torch.set_num_threads(2)


# -- a real ComfyUI host (tests/comfy_host.py), shared by test_comfyui.py and test_browser.py ----------
@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI 0.3.75 with the pack in custom_nodes and these files:
    models/vae/sdxl_vae.safetensors   full-width SD-shaped KL VAE, calibrated seeded weights, fp16
                                      (full width because core's VAELoader assumes SD's widths)
    models/vae/flux_ae_small.safetensors  narrow 16-channel Flux-shaped VAE (our loader reads any width)
    models/vae/flux2-vae.safetensors  full-width Flux.2-shaped KL VAE (32 channels, latent BatchNorm), fp16
    models/vae/qwen_image_vae.safetensors  Qwen-Image's VAE (Wan 2.1's) at 1/6 of its width, original keys
    models/vae/wan_2.1_vae.safetensors     the same file under Wan's name (the video example's)
    models/vae/hunyuan_image_2.1_vae.safetensors  HunyuanImage-2.1's VAE at its released widths (406 M
                                      parameters, 0.8 GB in fp16: core's loader builds only those), ComfyUI's keys
    models/vae/taesd.safetensors      a TAESD (core's VAELoader loads it; not a KL autoencoder)
    models/vae/unet.safetensors       a few UNet keys (not a VAE at all)
    models/vae/hostile.safetensors    a VAE whose key indices ask for 10^8 blocks
    input/klvae_test.png              96x80 structured test picture
    input/example.png                 ComfyUI's own 768x768 example picture (used by example_workflows/*.json)
    """
    import shutil

    from safetensors.torch import save_file

    import comfy_host
    from klvae.vae import save_vae

    server = comfy_host.Server(tmp_path_factory.mktemp("comfy"))
    vae_dir = server.base / "models" / "vae"
    vae_dir.mkdir(parents=True)
    (server.base / "input").mkdir(parents=True)
    save_vae(klvae_from(calibrate(diffusers_vae("sdxl", seed=3), test_image(64)), family="sdxl", dtype="fp16"),
             vae_dir / "sdxl_vae.safetensors")
    save_vae(klvae_from(calibrate(diffusers_vae("flux2", seed=5), test_image(64)), family="flux2", dtype="fp16"),
             vae_dir / "flux2-vae.safetensors")
    # Qwen-Image's VAE as ComfyUI's own file has it (the original keys); core's loader reads the base
    # width from the weights and assumes the released dim_mult (1, 2, 4, 4): 16 here, not 96
    save_vae(klvae_from(diffusers_vae("qwenimage", seed=6, ch=16)), vae_dir / "qwen_image_vae.safetensors")
    shutil.copy(vae_dir / "qwen_image_vae.safetensors", vae_dir / "wan_2.1_vae.safetensors")  # the same network
    # HunyuanImage-2.1's: core's VAELoader builds it at the released widths whatever the file holds
    save_vae(klvae_from(diffusers_vae("hunyuanimage", seed=7), dtype="fp16"), vae_dir / "hunyuan_image_2.1_vae.safetensors")
    small_flux = klvae_from(diffusers_vae("flux", seed=4, **NARROW), family="flux")
    save_vae(small_flux, vae_dir / "flux_ae_small.safetensors")
    hostile = {k: v.contiguous() for k, v in small_flux.state_dict().items()}
    hostile["encoder.down.0.block.99999999.conv1.weight"] = torch.zeros(1)
    hostile["decoder.up.0.block.100000000.conv1.weight"] = torch.zeros(1)
    save_file(hostile, str(vae_dir / "hostile.safetensors"))
    save_file(comfy_host.taesd_state_dict(), str(vae_dir / "taesd.safetensors"))
    g = torch.Generator().manual_seed(0)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(320, 4, 3, 3, generator=g),
               "model.diffusion_model.time_embed.0.weight": torch.randn(1280, 320, generator=g)},
              str(vae_dir / "unet.safetensors"))
    server.image = comfy_host.test_png(server.base / "input" / "klvae_test.png")
    shutil.copy(comfy_host.comfy_tree() / "input" / "example.png", server.base / "input")  # the examples' picture
    server.start()
    yield server
    server.stop()
