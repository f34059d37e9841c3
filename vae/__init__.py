"""klvae.vae: the KL autoencoder library (plain torch + safetensors; never imports ComfyUI).

Modules, each one concern (imports run down this list, never up):
  errors.py            KLVAEError, the one exception bad input raises
  diffusers_compat.py  diffusers' key names, config.json and call shapes
  config.py            VAEConfig (checked when made) and the family presets
  model.py             Encoder, Decoder and their blocks (module names = checkpoint keys)
  precision.py         device and dtype policy, the fp16/bf16 overflow guard
  memory.py            free memory, peak measurement, glibc's mmap threshold
  checkpoint.py        reading, checking and writing VAE files
  tiling.py            Tiling options, the plan and its memory model
  distributed.py       a torch.distributed process group as bands of rows (halo rows, gathered statistics)
  engine.py            exact tiling: the segment engine and its stores
  bounded.py           bounded tiling: frozen statistics from a mosaic
  autoencoder.py       AutoencoderKL, its posterior, encode/decode, load_vae
"""
from .autoencoder import AutoencoderKL, DiagonalGaussian, load_vae
from .checkpoint import save_vae
from .config import FAMILIES, VAEConfig, preset
from .diffusers_compat import diffusers_config, load_pipeline, save_pipeline
from .errors import KLVAEError
from .precision import resolve_device, resolve_dtype
from .tiling import DEFAULT_MODE, Interrupted, Plan, Tiling, TilingReport

__all__ = ["AutoencoderKL", "DEFAULT_MODE", "DiagonalGaussian", "FAMILIES", "Interrupted", "KLVAEError", "Plan",
           "Tiling", "TilingReport", "VAEConfig", "diffusers_config", "load_pipeline", "load_vae", "preset",
           "resolve_device", "resolve_dtype", "save_pipeline", "save_vae"]
