"""klvae.vae: the KL autoencoder library (plain torch + safetensors; never imports ComfyUI): SD1.x/2.x,
SDXL, SD3, Flux.1, Flux.2, Qwen-Image (Wan 2.1), Wan 2.2, Qwen-Image 2.1 and HunyuanImage-2.1 VAEs.

Modules, each one concern (imports run down this list, never up):
  errors.py            KLVAEError, the one exception bad input raises
  diffusers_compat.py  diffusers' key names, config.json and call shapes
  config.py            VAEConfig (checked when made); the registry of networks and their families
  groupnorm.py         GroupNorm statistics (float64, additive over bands) and the precise CPU GroupNorm
  ops.py               what the networks and both tiled engines share: SiLU, Tile and its 3x3 conv,
                       warm buffers, progress
  model.py             the SD-style Encoder, Decoder and their blocks (module names = checkpoint keys),
                       its families and their registration (config.Network)
  memory.py            free memory, peak measurement, glibc's mmap threshold
  distributed.py       a torch.distributed process group as bands of rows (halo rows, gathered statistics)
  verbs.py             the verbs a layer type describes its computation in (conv, rows, residual, attention)
  engine.py            exact tiling: stores, bands, the interpreter of descriptions
  bounded.py           bounded tiling: descriptions streamed in strips, statistics from a mosaic
  layers.py            the layer types: description, shape, memory, FLOPs, fp16 scaling (one class each)
  model_qwenimage.py   Qwen-Image's and Wan 2.1's VAE, images and clips: modules, Steps, key maps, its Network
  model_wan22.py       Wan 2.2's and Qwen-Image 2.1's VAEs (residual blocks across levels, 16x): modules, Steps,
                       key maps, its Network
  model_hunyuanimage.py  HunyuanImage-2.1's VAE: modules, Steps, key maps, its Network
  tiling.py            Tiling options, the plan and its memory model, execute(plan), the report
  precision.py         device and dtype policy, the fp16/bf16 overflow guard
  checkpoint.py        reading, checking and writing VAE files
  metrics.py           psnr_vs_full, max_abs_vs_full, seam_ratio
  images.py            image files as [1, 3, H, W] tensors in [-1, 1], and back
  shipped.py           the files that ship with klvae: DEMO_VAE (16 ch), DEMO_VAE_SD1 (4 ch), DEMO_PHOTO
  autoencoder.py       AutoencoderKL, its posterior, encode/decode, load_vae
"""
from . import model, model_qwenimage, model_wan22, model_hunyuanimage  # noqa: F401 -- the networks, registered in this order
from .autoencoder import AutoencoderKL, DiagonalGaussian, load_vae
from .checkpoint import save_vae
from .config import FAMILIES, VAEConfig, preset
from .diffusers_compat import diffusers_config, load_pipeline, save_pipeline
from .errors import Interrupted, KLVAEError
from .images import pad_to_multiple, read_image, write_image
from .metrics import max_abs_vs_full, psnr_vs_full, seam_ratio
from .precision import resolve_device, resolve_dtype
from .shipped import DEMO_PHOTO, DEMO_VAE, DEMO_VAE_SD1
from .tiling import DEFAULT_MODE, Plan, Tiling, TilingReport

__all__ = ["AutoencoderKL", "DEFAULT_MODE", "DEMO_PHOTO", "DEMO_VAE", "DEMO_VAE_SD1", "DiagonalGaussian", "FAMILIES",
           "Interrupted", "KLVAEError", "Plan", "Tiling", "TilingReport", "VAEConfig", "diffusers_config",
           "load_pipeline", "load_vae", "max_abs_vs_full", "pad_to_multiple", "preset", "psnr_vs_full", "read_image", "resolve_device",
           "resolve_dtype", "save_pipeline", "save_vae", "seam_ratio", "write_image"]
