"""klvae.vae: the KL autoencoder library (plain torch + safetensors; never imports ComfyUI)."""
from .autoencoder import AutoencoderKL, DiagonalGaussian
from .checkpoint import diffusers_config, load_vae, save_vae
from .config import FAMILIES, VAEConfig, preset
from .errors import KLVAEError
from .precision import resolve_device, resolve_dtype
from .tiling import Interrupted, Tiling, TilingReport

__all__ = ["AutoencoderKL", "DiagonalGaussian", "FAMILIES", "Interrupted", "KLVAEError", "Tiling", "TilingReport",
           "VAEConfig", "diffusers_config", "load_vae", "preset", "resolve_device", "resolve_dtype", "save_vae"]
