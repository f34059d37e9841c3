import warnings

import pytest
import torch

from klvae.vae import load_vae, preset
from klvae.vae.checkpoint import diffusers_config

torch.set_num_threads(2)


def make_diffusers_vae(family="sd1", seed=0, **overrides):
    """A diffusers.AutoencoderKL of a family's config (optionally narrowed) with seeded weights.

    Weights are diffusers' own init plus seeded noise on the norms and biases, so that no layer
    is an identity and a mistake in a GroupNorm affine or a bias cannot hide.
    """
    from diffusers import AutoencoderKL as DAutoencoderKL

    cfg = diffusers_config(preset(family, **overrides))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = DAutoencoderKL(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def small(family="sd1"):
    """Narrow config for fast tests: same structure (4 levels, attention, quant convs) as the family."""
    return dict(ch=32, ch_mult=(1, 2, 2, 2))


def klvae_from(dvae, family=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_vae(dvae if isinstance(dvae, dict) else dvae.state_dict(), family=family, **kw)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


# -- a real ComfyUI host (tests/comfy_host.py), shared by test_comfyui.py and test_browser.py ----------
@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI 0.3.75 with the pack in custom_nodes and these files:
    models/vae/sdxl_vae.safetensors   full-width SD-shaped KL VAE, calibrated seeded weights, fp16
                                      (full width because core's VAELoader assumes SD's widths)
    models/vae/flux_ae_small.safetensors  narrow 16-channel Flux-shaped VAE (our loader reads any width)
    models/vae/taesd.safetensors      a TAESD (core's VAELoader loads it; not a KL autoencoder)
    models/vae/unet.safetensors       a few UNet keys (not a VAE at all)
    input/klvae_test.png              96x80 structured test picture
    input/example.png                 ComfyUI's own 768x768 example picture (used by examples/*.json)
    """
    import shutil
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    import comfy_host
    from klvae.vae import save_vae

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import calibrate, test_image

    server = comfy_host.Server(tmp_path_factory.mktemp("comfy"))
    vae_dir = server.base / "models" / "vae"
    vae_dir.mkdir(parents=True)
    (server.base / "input").mkdir(parents=True)
    d = make_diffusers_vae("sdxl", seed=3)
    calibrate(d, test_image(64), 4)
    save_vae(klvae_from(d, family="sdxl", dtype="fp16"), vae_dir / "sdxl_vae.safetensors")
    save_vae(klvae_from(make_diffusers_vae("flux", seed=4, **small()), family="flux"), vae_dir / "flux_ae_small.safetensors")
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
