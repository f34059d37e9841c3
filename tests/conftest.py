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
